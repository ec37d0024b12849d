"""The recording module of the data DDP tests, shared by tests/data/test_data.py and its subprocess worker
(tests/workers/data_ddp.py): which samples each rank trained on."""

from __future__ import annotations

import lightning as L
import torch


def sample_ids(images: torch.Tensor) -> list[int]:
    """Ids of constant-colour test images: id = 256 * red + green (see make_id_shards in tests/data/test_data.py)."""
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
