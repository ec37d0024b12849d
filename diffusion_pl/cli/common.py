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

from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.utils.fileio import sha256_file

__all__ = ["CommandError", "read_rgb", "make_fabric", "image_shape", "load_checkpoint", "add_model_options",
           "load_guide", "guidance_config"]


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
    from diffusion_pl.training.module import load_module

    return load_module(path, map_location="cpu", trust_config=trust_config).to(device).eval()


def add_model_options(p) -> None:
    """The options `sample` and `evaluate` share for how a checkpoint is loaded and sampled."""
    p.add_argument("--clip-x0", type=float, default=None,
                   help="clamp the predicted x0 to [-v, v] at every step (DDPM samples with 1); default: no clipping")
    p.add_argument("--trust-config", action="store_true",
                   help="allow a checkpoint whose saved config imports from packages other than diffusion_pl, torch, "
                        "lightning, timm, diffusers (a config is code: only for checkpoints you trust)")
    p.add_argument("--guide-ckpt", default=None, metavar="PATH",
                   help="autoguidance (Karras et al. 2024): a weaker checkpoint of the same process, prediction and "
                        "image shape (a smaller or less trained model); --guidance w then mixes D_guide + w (D - D_guide)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="apply guidance only at noise levels sigma/alpha in [LO, HI] (Kynkäänniemi et al. 2024); "
                        "default: at every level")
    p.add_argument("--guidance-channels", type=int, default=None, metavar="K",
                   help="guide only the first K channels of the model's output, the rest being the conditional "
                        "output (DiT samples with 3 of its 4 latent channels); default: all channels")


def load_guide(args, module, device: torch.device):
    """The --guide-ckpt DiffusionModule, refused in one line unless it matches `module` (None without one);
    also checks --guidance-interval and --guidance-channels."""
    from diffusion_pl.guidance import check_guidance_channels, check_guidance_interval
    from diffusion_pl.evaluation.generation import guide_mismatch

    try:
        check_guidance_interval(getattr(args, "guidance_interval", None), "--guidance-interval")
        check_guidance_channels(getattr(args, "guidance_channels", None), "--guidance-channels",
                                available=image_shape(module)[0])
    except ValueError as err:
        raise CommandError(str(err)) from None
    if getattr(args, "guide_ckpt", None) is None:
        return None
    if not Path(args.guide_ckpt).is_file():
        raise CommandError(f"--guide-ckpt {args.guide_ckpt} does not exist: expected a checkpoint written by "
                           "`diffusion-pl fit`")
    guide = load_checkpoint(args.guide_ckpt, device, trust_config=args.trust_config)
    problem = guide_mismatch(module, guide)
    if problem is not None:
        raise CommandError(f"--guide-ckpt {args.guide_ckpt} {problem.replace('the model', '--ckpt')}: "
                           "expected the same")
    return guide


def guidance_config(args) -> dict:
    """The guide checkpoint's sha256, the guidance interval and channels, for run configs (empty when none is given)."""
    out = {}
    if getattr(args, "guide_ckpt", None) is not None:
        out["guide_checkpoint_sha256"] = sha256_file(args.guide_ckpt)
    if getattr(args, "guidance_interval", None) is not None:
        out["guidance_interval"] = list(args.guidance_interval)
    if getattr(args, "guidance_channels", None) is not None:
        out["guidance_channels"] = args.guidance_channels
    return out
