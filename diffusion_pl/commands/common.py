"""What the project's commands share: the one-line input error, checkpoint loading, the device launch.

`sample` and `evaluate` load a `diffusion-pl fit` checkpoint (`load_checkpoint`), read the shape it
generates (`image_shape`), split work over devices with Lightning Fabric (`make_fabric`) and take the
same loading / sampling options (`add_model_options`); `evaluate` and `reconstruct-ema` report bad
input as a `CommandError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion_pl.errors import UserValueError

__all__ = ["CommandError", "read_rgb", "make_fabric", "image_shape", "load_checkpoint", "add_model_options"]


class CommandError(UserValueError):
    """A bad command-line input; the message is one line naming the input and what was expected."""


def read_rgb(path: str | Path) -> np.ndarray:
    """uint8 (H, W, 3) of an image file (a writable copy); grey and RGBA become RGB (alpha dropped)."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


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


def load_checkpoint(path: str, device: torch.device, trust_config: bool = False):
    """DiffusionModule from a `diffusion-pl fit` checkpoint, on `device`, in eval mode (UserErrors in one line)."""
    from diffusion_pl.module import load_module

    if not Path(path).is_file():
        raise CommandError(f"--ckpt {path} does not exist: expected a checkpoint written by `diffusion-pl fit`")
    return load_module(path, map_location="cpu", trust_config=trust_config).to(device).eval()


def add_model_options(p) -> None:
    """The options `sample` and `evaluate` share for how a checkpoint is loaded and sampled."""
    p.add_argument("--clip-x0", type=float, default=None,
                   help="clamp the predicted x0 to [-v, v] at every step (DDPM samples with 1); default: no clipping")
    p.add_argument("--trust-config", action="store_true",
                   help="allow a checkpoint whose saved config imports from packages other than diffusion_pl, torch, "
                        "lightning, timm, diffusers (a config is code: only for checkpoints you trust)")
