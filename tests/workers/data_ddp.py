"""DDP worker for tests/data/test_data.py and tests/data/test_latent_data.py (run as a script, never collected).

    PYTHONPATH=<repository root> python tests/workers/data_ddp.py SHARDS OUT_DIR NUM_WORKERS [pixels|labels]

Trains a trivial module for a few steps with strategy="ddp" on 2 CPU processes (gloo);
each rank writes OUT_DIR/rank<R>.json with the ids of the samples it saw: read from the pixels
(tests/data/test_data.py make_id_shards) or, for latent shards, the labels (one class per sample), with the
shapes of the batches. It must be a
separate script: Lightning's DDP launcher re-runs sys.argv in the child process, which
inside pytest would re-run the whole test session.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from diffusion_pl.data.datamodule import ShardDataModule
from tests.support.data import Recorder


def main(shards: str, out: str, num_workers: int, ids: str = "pixels") -> None:
    """Fit 6 steps on 2 ranks and dump what each rank saw."""
    torch.set_num_threads(1)
    dm = ShardDataModule(shards, batch_size=4, num_workers=num_workers, shuffle_buffer=8)
    model = Recorder(ids)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    record = {"rank": dm._rank, "world_size": dm._world, "ids": model.ids, "shapes": sorted(map(str, model.shapes))}
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
