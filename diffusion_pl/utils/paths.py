"""Where the project keeps files of its own: the user cache folder, a training run's folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["cache_dir", "run_dir"]


def cache_dir() -> Path:
    """The user cache root: $DIFFUSION_PL_CACHE, else ~/.cache/diffusion_pl."""
    return Path(os.environ.get("DIFFUSION_PL_CACHE", Path.home() / ".cache" / "diffusion_pl"))


def run_dir(trainer: Any) -> Path:
    """The run folder of a Lightning Trainer: the logger's versioned log_dir when there is one, else default_root_dir.

    `trainer.log_dir` is a collective under DDP: every rank must call this at the same point."""
    return Path(trainer.log_dir or trainer.default_root_dir)
