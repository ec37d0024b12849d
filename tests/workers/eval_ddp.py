"""Subprocess entry for tests/evaluation/test_eval_callbacks.py: the FID + grid callbacks in a short CPU DDP fit.

Running strategy="ddp" inside pytest would re-launch the whole test session in the child
processes, so multi-process runs go through this script.

usage: PYTHONPATH=<repository root> python tests/workers/eval_ddp.py OUT_DIR --devices N
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tests.support.evaluation import StandInFeatures, fit, make_callbacks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    extractor = StandInFeatures()
    fid, grid = make_callbacks(extractor)
    trainer = fit(args.out, [fid, grid], devices=args.devices)
    result = {"fid": fid.last, "images_seen": extractor.images_seen, "grids": [str(p) for p in grid.written]}
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
