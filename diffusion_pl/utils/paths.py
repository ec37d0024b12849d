"""Where the project keeps files of its own: the user cache folder."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The user cache root: $DIFFUSION_PL_CACHE, else ~/.cache/diffusion_pl."""
    return Path(os.environ.get("DIFFUSION_PL_CACHE", Path.home() / ".cache" / "diffusion_pl"))
