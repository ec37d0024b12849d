"""What generating from a checkpoint needs: the device launch, the checkpoint's module, its guide, its shape.

`evaluate` (diffusion_pl/evaluation/evaluate.py) and the `sample` command load a `diffusion-pl fit`
checkpoint (`load_checkpoint`), read the shape it generates (`image_shape`), split work over devices
with Lightning Fabric (`make_fabric`) and load the optional autoguidance checkpoint (`load_guide`).

One-line errors name each input through `names`, a function from an argument name (`guide_ckpt`) to
the name the caller gave it: the argument itself from Python, the flag (`--guide-ckpt`) from a command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from diffusion_pl.guidance import check_guidance_channels, check_guidance_interval
from diffusion_pl.utils.errors import MissingFileError, UserValueError
from diffusion_pl.utils.fileio import sha256_file
from diffusion_pl.evaluation.generation import guide_mismatch

__all__ = ["Names", "argument_name", "make_fabric", "image_shape", "load_checkpoint", "load_guide",
           "guidance_config"]

Names = Callable[[str], str]


def argument_name(name: str) -> str:
    """The default `names`: an argument is named as the Python argument it is."""
    return name


def make_fabric(devices: int, accelerator: str = "auto", what: str = "devices"):
    """A launched Lightning Fabric: DDP over `devices` processes (gloo on CPU), or one process."""
    import lightning as L

    if devices < 1:
        raise UserValueError(f"{what} {devices} is invalid: expected a positive integer")
    fabric = L.Fabric(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto")
    fabric.launch()  # re-runs this command in devices - 1 child processes
    return fabric


def image_shape(module) -> tuple[int, int, int]:
    """(C, H, W) the network generates, from its `in_channels` and `img_resolution` attributes."""
    net = module.net
    if not hasattr(net, "img_resolution") or not hasattr(net, "in_channels"):
        raise UserValueError(f"network {type(net).__name__} has no img_resolution / in_channels attributes: expected "
                             "a diffusion_pl.networks UNet or DiT (or a network that sets both)")
    size = net.img_resolution
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(net.in_channels), int(h), int(w)


def load_checkpoint(path: str | Path, device: torch.device, trust_config: bool = False, what: str = "ckpt"):
    """DiffusionModule from a `diffusion-pl fit` checkpoint, on `device`, in eval mode (UserErrors in one line)."""
    from diffusion_pl.training.module import load_module

    if not Path(path).is_file():
        raise MissingFileError(f"{what} {path} does not exist: expected a checkpoint written by `diffusion-pl fit`")
    return load_module(str(path), map_location="cpu", trust_config=trust_config).to(device).eval()


def load_guide(module, guide_ckpt: str | Path | None, device: torch.device, *, trust_config: bool = False,
               guidance_interval=None, guidance_channels: int | None = None, names: Names = argument_name):
    """The `guide_ckpt` DiffusionModule (autoguidance, Karras et al. 2024), refused in one line unless it matches
    `module` (None without one); also checks `guidance_interval` and `guidance_channels` against `module`."""
    try:
        check_guidance_interval(guidance_interval, names("guidance_interval"))
        check_guidance_channels(guidance_channels, names("guidance_channels"), available=image_shape(module)[0])
    except ValueError as err:
        raise UserValueError(str(err)) from None
    if guide_ckpt is None:
        return None
    if not Path(guide_ckpt).is_file():
        raise MissingFileError(f"{names('guide_ckpt')} {guide_ckpt} does not exist: expected a checkpoint written by "
                               "`diffusion-pl fit`")
    guide = load_checkpoint(guide_ckpt, device, trust_config=trust_config, what=names("guide_ckpt"))
    problem = guide_mismatch(module, guide)
    if problem is not None:
        raise UserValueError(f"{names('guide_ckpt')} {guide_ckpt} {problem.replace('the model', names('ckpt'))}: "
                             "expected the same")
    return guide


def guidance_config(guide_ckpt: str | Path | None = None, guidance_interval=None,
                    guidance_channels: int | None = None) -> dict:
    """The guide checkpoint's sha256, the guidance interval and channels, for run configs (empty when none is given)."""
    out = {}
    if guide_ckpt is not None:
        out["guide_checkpoint_sha256"] = sha256_file(guide_ckpt)
    if guidance_interval is not None:
        out["guidance_interval"] = list(guidance_interval)
    if guidance_channels is not None:
        out["guidance_channels"] = guidance_channels
    return out
