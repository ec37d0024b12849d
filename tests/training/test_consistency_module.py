"""DiffusionModule trains with ConsistencyLoss: the loss sees the run's images seen (ECT's stages), and a
parameterization without the consistency boundary condition is refused when the module is built."""

from __future__ import annotations

import lightning as L
import pytest

from diffusion_pl.consistency import ConsistencyLoss, ECTSchedule
from diffusion_pl.prediction import EDMPreconditioning, X0Prediction
from diffusion_pl.processes.exploding import EDM
from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.utils.errors import UserValueError
from tests.support.training import make_datamodule, make_net


class RecordingConsistencyLoss(ConsistencyLoss):
    """ConsistencyLoss that keeps the images_seen of every call."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[int] = []

    def __call__(self, *args, **kwargs):
        self.seen.append(kwargs["images_seen"])
        return super().__call__(*args, **kwargs)


def test_the_loss_counts_images_across_steps_and_accumulation(tmp_path):
    loss = RecordingConsistencyLoss(schedule=ECTSchedule(images_per_stage=16))
    module = DiffusionModule(make_net(), EDM(), EDMPreconditioning(), loss, ema_decay=0.9)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        limit_val_batches=0, accumulate_grad_batches=2)
    trainer.fit(module, make_datamodule(batch_size=4))
    assert loss.seen == [0, 0, 8, 8, 16, 16]  # 2 micro-batches of 4 per optimizer step
    assert [loss.schedule.stage(n) for n in loss.seen] == [0, 0, 0, 0, 1, 1]


def test_x0_prediction_is_refused_when_the_module_is_built():
    with pytest.raises(UserValueError, match="loss ConsistencyLoss: X0Prediction .* not the identity"):
        DiffusionModule(make_net(), EDM(), X0Prediction(), ConsistencyLoss())
