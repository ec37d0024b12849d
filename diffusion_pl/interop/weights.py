"""Reading weight files from other libraries, and refusing weights that do not fit a network, in one line."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion_pl.utils.errors import UserValueError, one_line

__all__ = ["check_state_dict", "read_weights"]


def check_state_dict(net: nn.Module, state_dict: Mapping[str, Tensor], source: str, expected: str) -> None:
    """Refuse (UserValueError, one line) a state dict whose keys or shapes differ from `net.state_dict()`'s.

    `source` names where the weights came from, `expected` what they should have been; the message
    names the first few missing, unexpected and wrongly shaped keys.
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = [f"{name} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches (file vs network)", wrong)) if keys]
    if problems:
        raise UserValueError(f"{source} weights do not fit the {type(net).__name__} its config describes: "
                             f"{'; '.join(problems)}: expected {expected}")


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a .safetensors file or a torch file (loaded with weights_only=True), on the CPU.

    torch files may hold an argparse.Namespace (facebookresearch/DiT train.py saves its `args`);
    nothing else is unpickled.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):
            # another project's weight file (a DiT .pt, a diffusers .bin), not a diffusion_pl checkpoint
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's / safetensors' messages for foreign, pickled or truncated files
        raise UserValueError(f"{path} cannot be read as weights ({one_line(err, 120)}): expected a safetensors "
                             "file or a torch state dict (tensors only)") from err
