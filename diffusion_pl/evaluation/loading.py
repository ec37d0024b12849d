"""What generating from a checkpoint needs: the device launch, the checkpoint's module and its guide.

`evaluate` (diffusion_pl/evaluation/evaluate.py) and the `sample` command load a `diffusion-pl fit`
checkpoint (`load_checkpoint`), split work over devices with Lightning Fabric (`make_fabric`) and load the
optional autoguidance checkpoint (`load_guide`); the shape generated is the network's declared
`module.net.image_shape`.

One-line errors name each input through `names`, a function from an argument name (`guide_ckpt`) to
the name the caller gave it: the argument itself from Python, the flag (`--guide_ckpt`) from a command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from diffusion_pl.guidance import Guidance
from diffusion_pl.utils.errors import MissingFileError, UserValueError
from diffusion_pl.utils.fileio import sha256_file
from diffusion_pl.evaluation.generation import guide_mismatch

__all__ = ["Names", "argument_name", "make_fabric", "load_checkpoint", "load_guide",
           "guidance_config"]

Names = Callable[[str], str]


# the guidance options are fields of the one `guidance` argument (a Guidance) from Python
_GUIDANCE_FIELDS = {"guide_ckpt": "guidance.guide", "guidance_interval": "guidance.interval",
                    "guidance_channels": "guidance.channels"}


def argument_name(name: str) -> str:
    """The default `names`: an argument is named as the Python argument (or `guidance` field) it is."""
    return _GUIDANCE_FIELDS.get(name, name)


def make_fabric(devices: int, accelerator: str = "auto", what: str = "devices"):
    """A launched Lightning Fabric: DDP over `devices` processes (gloo on CPU), or one process."""
    import lightning as L

    if devices < 1:
        raise UserValueError(f"{what} {devices} is invalid: expected a positive integer")
    fabric = L.Fabric(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto")
    fabric.launch()  # re-runs this command in devices - 1 child processes
    return fabric


def load_checkpoint(path: str | Path, device: torch.device, trust_config: bool = False):
    """DiffusionModule from a `diffusion-pl fit` checkpoint, on `device`, in eval mode (UserErrors in one line, the
    checkpoint reader's: diffusion_pl/utils/checkpoint.py)."""
    from diffusion_pl.training.module import load_module

    return load_module(str(path), map_location="cpu", trust_config=trust_config).to(device).eval()


def load_guide(module, guidance: Guidance, device: torch.device, *, names: Names = argument_name) -> Guidance:
    """`guidance` with its guide checkpoint loaded (autoguidance, Karras et al. 2024) and checked against `module`.

    A guide given as a path is loaded (`guidance.trust_guide_config` applies to its saved config) and refused in one
    line unless it can guide `module` (same process, prediction, shape, classes and codec); the guided channels are
    checked against what `module` samples. A guidance without a guide path is returned as it is.
    """
    try:
        guidance.check_channels(module.net.image_shape[0])
    except ValueError as err:
        raise UserValueError(str(err).replace("guidance channels", names("guidance_channels"), 1)) from None
    path = guidance.guide_path
    if path is None:
        return guidance
    if not Path(path).is_file():
        raise MissingFileError(f"{names('guide_ckpt')} {path} does not exist: expected a checkpoint written by "
                               "`diffusion-pl fit`")
    guide = load_checkpoint(path, device, trust_config=guidance.trust_guide_config)
    problem = guide_mismatch(module, guide)
    if problem is not None:
        raise UserValueError(f"{names('guide_ckpt')} {path} {problem.replace('the model', names('ckpt'))}: "
                             "expected the same")
    return guidance.replace(guide=guide)


def guidance_config(guidance: Guidance) -> dict:
    """What a run config records of `guidance`: the guide checkpoint's sha256, the interval and the channels (only
    those given), so that a rerun with other guidance is another run."""
    out = {}
    if guidance.guide_path is not None:
        out["guide_checkpoint_sha256"] = sha256_file(guidance.guide_path)
    if guidance.interval is not None:
        out["guidance_interval"] = list(guidance.interval)
    if guidance.channels is not None:
        out["guidance_channels"] = guidance.channels
    return out
