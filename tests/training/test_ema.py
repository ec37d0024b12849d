"""The EMA object (schedule, validation, images-seen counter, its checkpoint state) and the base of callbacks
that act after an optimizer step, under gradient accumulation and across a resume."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_pl.training.callbacks.checkpointing import AtomicCheckpointIO
from diffusion_pl.training.callbacks.optimizer_step import OptimizerStepCallback
from diffusion_pl.training.callbacks.power_ema import PowerEMA
from diffusion_pl.training.ema import EMA, STATE_KEY
from diffusion_pl.utils.errors import UserValueError
from tests.support.training import make_datamodule, make_module

BATCH = 8  # make_datamodule's batch size


def _fit(root: Path, max_steps: int, ckpt_path: str | None = None, callbacks=(), every: int = 3, **kwargs):
    """A tiny fit with EDM's half-life and ramp-up, so that the EMA's numbers depend on the images-seen counter."""
    L.seed_everything(0, verbose=False)
    module = make_module(ema_half_life_images=40.0, ema_rampup_ratio=0.5)
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=every, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, plugins=[AtomicCheckpointIO()],
                        limit_val_batches=0, callbacks=[*callbacks, checkpoint], **kwargs)
    trainer.fit(module, make_datamodule(), ckpt_path=ckpt_path)
    return module


def _power(root: Path) -> PowerEMA:
    return PowerEMA(sigma_rels=(0.05, 0.10), snapshot_every_n_steps=100, at_train_end=False,
                    dirpath=str(root / "phema"))


# -- the schedule --------------------------------------------------------------------------------------------

def test_schedules_follow_ddpm_score_sde_and_edm():
    assert EMA(decay=0.9999).beta(step=5, images_seen=500, images=100) == 0.9999
    warm = EMA(decay=0.9999, warmup=True)
    assert [warm.beta(step=n, images_seen=0, images=1) for n in (0, 10)] == [0.1, 11 / 20]
    edm = EMA(half_life_images=500_000, rampup_ratio=0.05)
    # EDM: half-life min(500k, 0.05 x images seen before the step), beta = 0.5^(batch / half-life)
    assert edm.beta(step=3, images_seen=1_000_000, images=512) == pytest.approx(0.5 ** (512 / 50_000), rel=1e-15)
    assert edm.beta(step=0, images_seen=0, images=512) == 0.0  # the first step copies the network
    assert EMA(half_life_images=1000).beta(step=0, images_seen=0, images=1000) == 0.5


@pytest.mark.parametrize("kwargs, named", [
    ({"decay": 1.0}, "ema_decay is 1.0"), ({"decay": -0.1}, "ema_decay is -0.1"),
    ({"decay": math.nan}, "ema_decay is nan"), ({"warmup": "yes"}, "ema_warmup is 'yes'"),
    ({"half_life_images": 0}, "ema_half_life_images is 0"), ({"half_life_images": math.inf}, "is inf"),
    ({"rampup_ratio": -0.05}, "ema_rampup_ratio is -0.05"),
])
def test_bad_values_are_one_line_errors_naming_the_argument(kwargs, named):
    with pytest.raises(UserValueError, match="expected") as err:
        EMA(**kwargs)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_update_counts_images_and_an_unknown_counter_starts_at_step_times_images():
    averaged, net = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema = EMA(half_life_images=100, rampup_ratio=0.5)
    ema.update(averaged, net, step=0, images=8)
    ema.update(averaged, net, step=1, images=8)
    assert ema.images_seen == 16 and ema.state_dict() == {"images_seen": 16}
    resumed = EMA(half_life_images=100, rampup_ratio=0.5)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.images_seen == 16
    resumed.load_state_dict({})  # a checkpoint written before the counter was saved
    assert resumed.images_seen is None and resumed.state_dict() == {}
    beta = resumed.update(averaged, net, step=5, images=8)
    assert resumed.images_seen == 6 * 8 and beta == 0.5 ** (8 / 20)  # half-life 0.5 x 40 images before the step


def test_update_moves_the_average_by_the_returned_beta_and_copies_buffers():
    """ema <- beta ema + (1 - beta) net on the parameters (checked against the formula), buffers copied."""
    torch.manual_seed(0)
    averaged, net = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for p in (*averaged.parameters(), *net.parameters(), net.running_mean):
        p.data.normal_()
    before = [p.detach().clone() for p in averaged.parameters()]
    beta = EMA(decay=0.9).update(averaged, net, step=0, images=4)
    assert beta == 0.9
    for avg, old, new in zip(averaged.parameters(), before, net.parameters()):
        torch.testing.assert_close(avg, 0.9 * old + 0.1 * new)
    assert torch.equal(averaged.running_mean, net.running_mean)


# -- one counter for both EMAs, saved and resumed ------------------------------------------------------------

def test_both_emas_count_the_same_images_under_gradient_accumulation(tmp_path):
    """2 micro-batches of 8 per optimizer step, 3 steps: 48 images for the module's EMA, PowerEMA and the checkpoint."""
    power = _power(tmp_path)
    module = _fit(tmp_path, 3, callbacks=[power], accumulate_grad_batches=2)
    assert module.averaging.images_seen == power.ema.nimg == 3 * 2 * BATCH
    saved = torch.load(tmp_path / "checkpoints" / "epoch=0-step=3.ckpt", weights_only=True)
    assert saved[STATE_KEY] == {"images_seen": 48} and saved["callbacks"]["PowerEMA"]["nimg"] == 48


def test_a_checkpoint_without_the_counter_resumes_with_the_same_counter_and_numbers(tmp_path):
    """A step-3 checkpoint stripped of the counter (as written before it was saved) resumes like the full one: the
    counter is 3 x 8 images at the first step, the ramped-up EMA and PowerEMA's averages match a straight run."""
    straight_power = _power(tmp_path / "a")
    straight = _fit(tmp_path / "a", 5, callbacks=[straight_power])
    _fit(tmp_path / "b", 3, callbacks=[_power(tmp_path / "b")])
    checkpoint = torch.load(tmp_path / "b" / "checkpoints" / "epoch=0-step=3.ckpt", weights_only=True)
    assert checkpoint.pop(STATE_KEY) == {"images_seen": 3 * BATCH}
    old = tmp_path / "b" / "old.ckpt"
    torch.save(checkpoint, old)
    power = _power(tmp_path / "b")
    resumed = _fit(tmp_path / "b", 5, ckpt_path=str(old), callbacks=[power])
    assert resumed.averaging.images_seen == straight.averaging.images_seen == 5 * BATCH
    assert power.ema.nimg == 5 * BATCH
    for key, value in straight.ema.state_dict().items():
        torch.testing.assert_close(resumed.ema.state_dict()[key], value, rtol=0, atol=0, msg=f"ema.{key} differs")
    for ours, theirs in zip(power.ema.averages, straight_power.ema.averages):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- the step base -------------------------------------------------------------------------------------------

class _Steps(OptimizerStepCallback):
    def __init__(self) -> None:
        super().__init__()
        self.fired: list[int] = []
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.batches += 1

    def on_optimizer_step_end(self, trainer, pl_module):
        self.fired.append(trainer.global_step)


def test_step_callback_fires_once_per_optimizer_step_and_not_at_the_resumed_step(tmp_path):
    first = _Steps()
    _fit(tmp_path, 3, callbacks=[first], every=2, accumulate_grad_batches=2)
    assert first.batches == 6 and first.fired == [1, 2, 3]  # not step 0, not per micro-batch
    resumed = _Steps()
    _fit(tmp_path, 4, ckpt_path=str(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"), callbacks=[resumed], every=2,
         accumulate_grad_batches=2)
    assert resumed.batches == 4 and resumed.fired == [3, 4]  # the resumed step 2 does not fire again


def test_step_callback_subclass_must_implement_the_hook(tmp_path):
    with pytest.raises(NotImplementedError, match="OptimizerStepCallback must implement on_optimizer_step_end"):
        _fit(tmp_path, 1, callbacks=[OptimizerStepCallback()])
