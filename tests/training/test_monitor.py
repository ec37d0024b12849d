"""TrainingMonitor and the step index of logged values: what a short CPU fit writes to a CSVLogger."""

from __future__ import annotations

import csv
import types

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from diffusion_pl.training.callbacks.monitor import TrainingMonitor
from diffusion_pl.utils.errors import UserValueError
from tests.support.training import make_datamodule, make_module

BATCH, ACCUMULATE, WARMUP, LR = 8, 2, 4, 1e-3


def _adam(params):
    return torch.optim.Adam(params, lr=LR)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    """6 optimizer steps of 2 micro-batches, logged every 2 steps, with lr warm-up and a warmed-up EMA."""
    root = tmp_path_factory.mktemp("monitor")
    torch.manual_seed(0)
    module = make_module(optimizer=_adam, lr_warmup_steps=WARMUP, ema_decay=0.99, ema_warmup=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, accumulate_grad_batches=ACCUMULATE,
                        log_every_n_steps=2, logger=CSVLogger(root, name="csv"), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        callbacks=[TrainingMonitor()])
    trainer.fit(module, make_datamodule(batch_size=BATCH))
    with open(next(root.rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


def _at(rows, key):
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def test_losses_and_health_scalars_share_the_step_index(rows):
    # the loss of optimizer step k is logged at k (the steps completed), as the callbacks' values are
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/images_per_sec", "train/sec_per_kimg",
                "train/kimg", "train/ema_decay"):
        assert sorted(_at(rows, key)) == [2, 4, 6], key


def test_learning_rate_is_the_one_the_step_used(rows):
    # warm-up: lr x min(step / warmup, 1) with step counted from 0, so step k (1-based) used (k - 1) / warmup
    assert _at(rows, "train/lr") == pytest.approx({k: LR * min(1.0, (k - 1) / WARMUP) for k in (2, 4, 6)})


def test_images_seen_and_ema_decay(rows):
    # images per optimizer step = batch x accumulation x world size (1)
    assert _at(rows, "train/kimg") == pytest.approx({k: k * BATCH * ACCUMULATE / 1000 for k in (2, 4, 6)})
    # score_sde's warm-up after k - 1 earlier steps: min(decay, k / (9 + k))
    assert _at(rows, "train/ema_decay") == pytest.approx({k: min(0.99, k / (9.0 + k)) for k in (2, 4, 6)})


def test_throughput_is_positive_and_consistent(rows):
    per_sec, sec_per_kimg = _at(rows, "train/images_per_sec"), _at(rows, "train/sec_per_kimg")
    for step, value in per_sec.items():
        assert value > 0 and sec_per_kimg[step] == pytest.approx(1000.0 / value, rel=1e-5)


def test_no_accelerator_memory_on_cpu(rows):
    assert "train/peak_memory_gib" not in rows[0]  # absent, not a fake 0


def test_learning_rate_names_per_param_group():
    groups = [{"lr": 0.1}, {"lr": 0.2}]
    trainer = types.SimpleNamespace(optimizers=[types.SimpleNamespace(param_groups=groups)])
    assert TrainingMonitor.learning_rates(trainer) == {"train/lr_group0": 0.1, "train/lr_group1": 0.2}
    trainer.optimizers[0].param_groups = groups[:1]
    assert TrainingMonitor.learning_rates(trainer) == {"train/lr": 0.1}


def test_clock_leaves_out_the_sampling_callbacks(monkeypatch):
    """The time a callback reports in `busy_seconds` (SampleGrid, FIDCallback) is not training time."""
    monitor, now = TrainingMonitor(), [100.0]
    monkeypatch.setattr("diffusion_pl.training.callbacks.monitor.time.perf_counter", lambda: now[0])
    sampler = types.SimpleNamespace(busy_seconds=0.0)
    trainer = types.SimpleNamespace(world_size=1, callbacks=[monitor, sampler],
                                    strategy=types.SimpleNamespace(root_device=torch.device("cpu")))
    monitor.on_train_start(trainer, None)
    now[0], sampler.busy_seconds = 112.0, 10.0  # 12 s, of which 10 s sampling
    monitor._steps, monitor._images = 4, 400
    assert monitor.throughput(trainer) == pytest.approx({"train/images_per_sec": 200.0, "train/sec_per_kimg": 5.0})


def test_window_is_checked():
    with pytest.raises(UserValueError, match="window is 1: expected an integer >= 2"):
        TrainingMonitor(window=1)
