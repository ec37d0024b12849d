"""DDP helper for tests/test_data.py (run as a script, never collected by pytest).

    python tests/_data_ddp_worker.py SHARDS OUT_DIR NUM_WORKERS [pixels|labels]

Trains a trivial module for a few steps with strategy="ddp" on 2 CPU processes (gloo);
each rank writes OUT_DIR/rank<R>.json with the ids of the samples it saw: read from the pixels
(test_data.make_id_shards) or, for latent shards, the labels (one class per sample), with the
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


def sample_ids(images: torch.Tensor) -> list[int]:
    """Ids of constant-colour test images: id = 256 * red + green (see test_data.make_id_shards)."""
    pixels = ((images[:, :2, 0, 0] + 1) * 127.5).round().long()  # (B, 2) uint8 values of R, G
    return (pixels[:, 0] * 256 + pixels[:, 1]).tolist()


class Recorder(L.LightningModule):
    """Records the ids of every training sample; one parameter so DDP has something to sync."""

    def __init__(self, ids: str = "pixels"):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.ids: list[int] = []
        self.by, self.shapes = ids, set()

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.ids += sample_ids(images) if self.by == "pixels" else labels.tolist()
        self.shapes.add((tuple(images.shape[1:]), str(images.dtype), str(labels.dtype)))
        return (self.w * images.mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


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
