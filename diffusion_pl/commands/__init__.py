"""The project's own subcommands (`diffusion-pl sample`, `diffusion-pl evaluate`) and what they share.

Each command module has `main(argv) -> int`; `diffusion_pl.cli` dispatches to it. Multi-device runs
go through Lightning Fabric (DDP): every rank takes a contiguous block of sample indices, and
sample i uses seed + i, so outputs do not depend on the number of devices or the batch size.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion_pl import sampling
from diffusion_pl.errors import UserValueError
from diffusion_pl.sampling import Sampler

__all__ = ["CommandError", "sampler_classes", "make_sampler", "sha256_file", "make_fabric", "image_shape",
           "load_checkpoint"]


class CommandError(UserValueError):
    """A bad command-line input; the message is one line naming the input and what was expected."""


def sampler_classes() -> dict[str, type[Sampler]]:
    """CLI name (lower-case class name) -> sampler class, for every sampler diffusion_pl.sampling exports."""
    classes = (getattr(sampling, name) for name in sampling.__all__)
    return {cls.__name__.lower(): cls for cls in classes
            if inspect.isclass(cls) and issubclass(cls, Sampler) and cls is not Sampler}


def make_sampler(name: str, steps: int | None = None) -> Sampler:
    """The sampler called `name` (case-insensitive class name) with `steps` (its default when None)."""
    classes = sampler_classes()
    cls = classes.get(name.lower())
    if cls is None:
        raise CommandError(f"--sampler {name!r} is unknown: expected one of {', '.join(sorted(classes))}")
    if steps is not None and steps < 1:
        raise CommandError(f"--steps {steps} is invalid: expected a positive integer")
    return cls(steps=steps) if steps is not None else cls()


def read_rgb(path: str | Path) -> np.ndarray:
    """uint8 (H, W, 3) of an image file (a writable copy); grey and RGBA become RGB (alpha dropped)."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_fabric(devices: int, accelerator: str = "auto"):
    """A launched Lightning Fabric: DDP over `devices` processes (gloo on CPU), or one process."""
    import lightning as L

    if devices < 1:
        raise CommandError(f"--devices {devices} is invalid: expected a positive integer")
    fabric = L.Fabric(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto")
    fabric.launch()  # re-runs this command in devices - 1 child processes
    return fabric


def image_shape(module) -> tuple[int, int, int]:
    """(C, H, W) the network generates, from its `in_channels` and `img_resolution` attributes."""
    net = module.net
    if not hasattr(net, "img_resolution") or not hasattr(net, "in_channels"):
        raise CommandError(f"network {type(net).__name__} has no img_resolution / in_channels attributes: expected "
                           "a diffusion_pl.networks UNet or DiT (or a network that sets both)")
    size = net.img_resolution
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(net.in_channels), int(h), int(w)


def load_checkpoint(path: str, device: torch.device):
    """DiffusionModule from a `diffusion-pl fit` checkpoint, on `device`, in eval mode."""
    from diffusion_pl.module import load_module

    if not Path(path).is_file():
        raise CommandError(f"--ckpt {path} does not exist: expected a checkpoint written by `diffusion-pl fit`")
    try:
        module = load_module(path, map_location="cpu")
    except ValueError as err:
        raise CommandError(str(err).splitlines()[0]) from err
    return module.to(device).eval()
