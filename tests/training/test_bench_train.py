"""bench/bench_train.py in --toy mode: the framework-against-plain-loop benchmark prints its tables, and the
comparison itself is sound (both sides train the same steps from the same weights, to the same losses)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN_COLUMNS = ["network", "fast paths", "batch", "steps trained fw / plain", "framework img/s", "plain img/s",
                 "framework / plain", "peak MiB fw", "peak MiB plain"]
SAMPLE_COLUMNS = ["network", "sampler", "NFE", "fast paths", "batch", "framework img/s", "plain img/s",
                  "framework / plain", "max diff / max abs"]


def _table(lines: list[str], columns: list[str]) -> list[list[str]]:
    """The rows of the markdown table whose header has `columns`."""
    header = "| " + " | ".join(columns) + " |"
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "bench/bench_train.py", "--toy", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_toy_run_prints_the_ratio_tables(toy_run):
    stdout, report = toy_run
    lines = stdout.splitlines()
    train = _table(lines, TRAIN_COLUMNS)
    assert [(row[0], row[1]) for row in train] == [(n, f) for n in ("ddpmpp", "dit_xl2") for f in ("off", "on")]
    for row in train:
        assert len(row) == len(TRAIN_COLUMNS)
        fw_ips, plain_ips, ratio = (float(row[i]) for i in (4, 5, 6))
        assert fw_ips > 0 and plain_ips > 0
        assert ratio == pytest.approx(fw_ips / plain_ips, rel=0.01)
        assert row[7] == row[8] == "n/a"  # peak memory: CUDA's allocator statistics only
    sample = _table(lines, SAMPLE_COLUMNS)
    assert [(row[0], row[1], row[3]) for row in sample] == [("ddpmpp", "HeunODE", "off"), ("ddpmpp", "HeunODE", "on"),
                                                           ("dit_xl2", "DDIM", "off"), ("dit_xl2", "DDIM", "on")]
    assert [int(row[2]) for row in sample] == [5, 5, 4, 4]  # Heun: 2 steps x 2 + the final denoise; DDIM: steps
    assert all(len(row) == len(SAMPLE_COLUMNS) and float(row[5]) > 0 and float(row[6]) > 0 for row in sample)
    assert report["toy"] and report["device"].startswith("cpu")


@pytest.mark.slow
def test_both_sides_train_the_same_steps_with_finite_losses(toy_run):
    _, report = toy_run
    total = report["warmup"] + report["steps"]
    assert len(report["train"]) == 4
    for row in report["train"]:
        assert row["framework_steps"] == row["plain_steps"] == total
        assert len(row["framework_losses"]) == len(row["plain_losses"]) == total
        assert all(math.isfinite(v) for v in row["framework_losses"] + row["plain_losses"])


@pytest.mark.slow
def test_the_comparison_is_of_the_same_training(toy_run):
    """In float32 on the CPU both sides start from identical weights and give the same loss at step 1 (the plain
    loop draws the module's noise); the later steps, the trained weights and the EMA agree too, so both run the
    same optimizer and EMA update."""
    _, report = toy_run
    assert [c["net"] for c in report["checks"]] == ["ddpmpp", "dit_xl2"]
    for check in report["checks"]:
        assert check["same_start"]
        assert check["loss1_framework"] == check["loss1_plain"]
        assert check["end_weights_rel_diff"] < 1e-5 and check["end_ema_rel_diff"] < 1e-5
    for row in report["train"]:
        if row["fast"] == "off":
            assert row["framework_losses"] == pytest.approx(row["plain_losses"], rel=1e-5)
    # sampling: the same grid from the same noise (float32 rounding apart)
    assert all(row["max_diff"] < 1e-3 for row in report["sample"] if row["fast"] == "off")
