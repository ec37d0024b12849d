"""The run folder as the callbacks see it: where grids, snapshots and reports of a run are written."""

from __future__ import annotations

from pathlib import Path

import lightning as L

__all__ = ["run_dir"]


def run_dir(trainer: L.Trainer) -> Path:
    """The run folder: the logger's versioned log_dir when there is one, else default_root_dir."""
    return Path(trainer.log_dir or trainer.default_root_dir)
