"""Every benchmark script under bench/ imports (the package moves under them; a script that no longer imports is a
benchmark nobody can rerun). Running them is for their users; the benchmark with a toy mode has its own test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_bench_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their siblings (bench_module) as when run
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}_under_test", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)  # top level only: each script runs under `if __name__ == "__main__"`
    if script.name.startswith("bench_"):  # a script; other files are modules the scripts share (train_floor.py)
        assert callable(getattr(module, "main", None)), f"{script.name} has no main()"
