"""Where things are: the repository root and the subprocess workers, for tests that read the README, recipes or
the package's own files, and for subprocesses that import tests.support (PYTHONPATH=<repository root>)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKERS = REPO / "tests" / "workers"


def repo_pythonpath() -> str:
    """PYTHONPATH for a subprocess that imports `tests.support`: the repository root, then this process's own."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
