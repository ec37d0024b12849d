"""Learning-rate schedules: values against their formulas, one-line refusals, and exact resume in a real fit."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.training.schedules import Constant, Cosine, InverseSqrt
from diffusion_pl.processes.variance_preserving import VPLinear
from tests.support.training import make_datamodule, make_module, make_net

BASE_LR = 2e-4  # DiffusionModule's default Adam


def test_constant_warms_up_linearly_from_zero():
    schedule = Constant(warmup_steps=4)
    assert [schedule(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert Constant()(0) == 1.0  # no warm-up: the optimizer's lr from the first step


def test_cosine_warm_up_edges_midpoint_and_floor():
    schedule = Cosine(warmup_steps=10, total_steps=110, min_ratio=0.2)
    assert schedule(0) == 0.0 and schedule(5) == 0.5 and schedule(9) == pytest.approx(0.9)
    assert schedule(10) == pytest.approx(1.0)  # the warm-up's end is the cosine's top
    assert schedule(60) == pytest.approx(0.2 + 0.8 * 0.5)  # half-way down: the mean of top and floor
    assert schedule(35) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert schedule(110) == pytest.approx(0.2) and schedule(500) == pytest.approx(0.2)  # the floor, then held
    assert Cosine(total_steps=4)(4) == 0.0  # min_ratio 0 decays to zero


def test_inverse_sqrt_matches_edm2_by_hand():
    """EDM2's lr / ref_lr = 1 / sqrt(max(t / t_ref, 1)) x min(t / t_rampup, 1), t in images before the step."""
    # 1000 images a step, t_ref 70000 steps (EDM2's --decay for ImageNet-512), ramp-up 10 Mimg (EDM2's default)
    edm2 = InverseSqrt(ref_steps=70000, rampup_kimg=10000, batch_size=1000)
    assert edm2(0) == 0.0
    assert edm2(5000) == pytest.approx(0.5)  # 5 Mimg: half-way up the ramp, before t_ref
    assert edm2(10000) == pytest.approx(1.0) and edm2(70000) == pytest.approx(1.0)
    assert edm2(140000) == pytest.approx(1 / math.sqrt(2))  # t = 2 t_ref
    assert edm2(280000) == pytest.approx(0.5)  # t = 4 t_ref
    # t_ref in kimg: 70000 kimg at 1000 images a step is the same 70000 steps
    assert InverseSqrt(ref_kimg=70000, rampup_kimg=10000, batch_size=1000)(140000) == pytest.approx(1 / math.sqrt(2))
    # a batch that does not divide the counts: 2048 images a step, t_ref 1 Mimg -> 1e6 / 2048 steps
    odd = InverseSqrt(ref_kimg=1000, batch_size=2048)
    assert odd(2000) == pytest.approx(1 / math.sqrt(2000 * 2048 / 1e6))
    assert InverseSqrt(ref_steps=100, rampup_steps=10)(5) == pytest.approx(0.5)  # all in steps: no batch needed


@pytest.mark.parametrize("build, message", [
    (lambda: Constant(-1), "Constant warmup_steps is -1: expected an integer >= 0"),
    (lambda: Cosine(warmup_steps=-5, total_steps=10), "Cosine warmup_steps is -5"),
    (lambda: Cosine(total_steps=-10), "Cosine total_steps is -10"),
    (lambda: Cosine(total_steps=10, min_ratio=1.5), "Cosine min_ratio is 1.5: expected a number in [0, 1]"),
    (lambda: Cosine(total_steps=10, min_ratio=-0.1), "Cosine min_ratio is -0.1"),
    (lambda: Cosine(warmup_steps=10, total_steps=10), "expected total_steps > warmup_steps"),
    (lambda: InverseSqrt(), "expected exactly one of them"),
    (lambda: InverseSqrt(ref_steps=10, ref_kimg=10), "expected exactly one of them"),
    (lambda: InverseSqrt(ref_steps=-10), "InverseSqrt ref_steps is -10: expected a positive number"),
    (lambda: InverseSqrt(ref_steps=10, rampup_steps=-1), "InverseSqrt rampup_steps is -1"),
    (lambda: InverseSqrt(ref_steps=10, rampup_steps=5, rampup_kimg=5), "expected at most one of them"),
    (lambda: InverseSqrt(ref_kimg=10, batch_size=0), "InverseSqrt batch_size is 0"),
    (lambda: DiffusionModule(make_net(), VPLinear(), lr_warmup_steps=5, lr_schedule=Cosine(total_steps=10)),
     "lr_warmup_steps is 5 and lr_schedule is Cosine("),
    (lambda: DiffusionModule(make_net(), VPLinear(), lr_schedule=0.5), "lr_schedule is a float"),
])
def test_bad_schedules_are_refused_in_one_line(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_lengths_are_refused_in_one_line():
    endless = SimpleNamespace(estimated_stepping_batches=float("inf"), max_steps=-1)
    with pytest.raises(ValueError, match=r"Cosine has no total_steps and the trainer's length is unknown"):
        Cosine(min_ratio=0.1).bind(endless)
    no_batch = SimpleNamespace(datamodule=None, world_size=1, accumulate_grad_batches=1)
    with pytest.raises(ValueError, match=r"the data module has no batch_size: expected InverseSqrt\(batch_size"):
        InverseSqrt(ref_kimg=10).bind(no_batch)
    with pytest.raises(ValueError, match="expected InverseSqrt"):
        InverseSqrt(ref_kimg=10)(5)  # unbound and no batch: kimg cannot become steps
    four_ranks = SimpleNamespace(datamodule=SimpleNamespace(batch_size=8), world_size=4, accumulate_grad_batches=2)
    assert InverseSqrt(ref_kimg=10).bind(four_ranks).batch_size == 64  # 8 x 4 ranks x 2 accumulated
    with pytest.raises(ValueError, match=r"batch_size is 32 but the run's global batch is 64 \(batch_size 8 x 4"):
        InverseSqrt(ref_kimg=10, batch_size=32).bind(four_ranks)


class _LearningRates(L.Callback):
    """The optimizer's lr as each optimizer step starts, by global step."""

    def __init__(self) -> None:
        self.lr: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


class _StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _fit(root, schedule, max_steps: int, stop_at: int | None = None, ckpt_path: str | None = None) -> dict:
    L.seed_everything(0, verbose=False)
    module, rates = make_module(lr_schedule=schedule), _LearningRates()
    callbacks = [rates, ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=3, save_top_k=-1)]
    if stop_at is not None:
        callbacks.append(_StopAt(stop_at))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, make_datamodule(batch_size=8), ckpt_path=ckpt_path)
    assert trainer.global_step == (stop_at or max_steps)
    return rates.lr


@pytest.mark.slow
@pytest.mark.parametrize("schedule, expected", [
    # total from the trainer's max_steps (8): the stopped run must not decay over its own 3 steps
    (Cosine(warmup_steps=2, min_ratio=0.1), Cosine(warmup_steps=2, total_steps=8, min_ratio=0.1)),
    # kimg with the batch from the data module: 8 images a step, t_ref 24 images = 3 steps, ramp-up 2 steps
    (InverseSqrt(ref_kimg=0.024, rampup_kimg=0.016), InverseSqrt(ref_steps=3, rampup_steps=2)),
])
def test_resumed_run_has_the_uninterrupted_learning_rates(tmp_path, schedule, expected):
    straight = _fit(tmp_path / "a", schedule, 8)
    assert sorted(straight) == list(range(8))
    for step, lr in straight.items():
        assert lr == pytest.approx(BASE_LR * expected(step), abs=1e-12), step
    _fit(tmp_path / "b", schedule, 8, stop_at=3)
    resumed = _fit(tmp_path / "b", schedule, 8, ckpt_path=str(tmp_path / "b" / "checkpoints" / "epoch=0-step=3.ckpt"))
    assert sorted(resumed) == list(range(3, 8))
    assert all(resumed[step] == straight[step] for step in resumed), (resumed, straight)


def test_recipes_pick_a_schedule_by_class_path_and_keep_lr_warmup_steps(tmp_path, monkeypatch, tiny_fit_config):
    from diffusion_pl.cli.fit import DiffusionCLI

    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    config = tiny_fit_config(default_root_dir=str(tmp_path))
    config["model"]["lr_schedule"] = {"class_path": "diffusion_pl.training.schedules.InverseSqrt",
                                      "init_args": {"ref_steps": 70000, "rampup_kimg": 10000}}
    module = DiffusionCLI(args=config, run=False).model
    assert module.lr_schedule == InverseSqrt(ref_steps=70000, rampup_kimg=10000)
    assert module.hparams["lr_schedule"]["class_path"] == "diffusion_pl.training.schedules.InverseSqrt"  # saved
    del config["model"]["lr_schedule"]
    config["model"]["lr_warmup_steps"] = 7  # the recipes' and older checkpoints' warm-up: Constant(7)
    assert DiffusionCLI(args=config, run=False).model.lr_schedule == Constant(7)


@pytest.mark.slow
def test_fit_command_line_schedule_runs_and_its_checkpoint_rebuilds_it(tmp_path, monkeypatch, tiny_fit_config):
    import yaml

    from diffusion_pl.cli.fit import DiffusionCLI
    from diffusion_pl.training.module import load_module

    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_fit_config(max_steps=3, logger=False)))
    cli = DiffusionCLI(args=["fit", "--config", str(recipe), f"--trainer.default_root_dir={tmp_path / 'run'}",
                             "--model.lr_schedule", "Cosine", "--model.lr_schedule.warmup_steps", "1",
                             "--model.lr_schedule.min_ratio", "0.1"])
    assert cli.model.lr_schedule == Cosine(warmup_steps=1, min_ratio=0.1)
    # after 3 of max_steps 3 the cosine has reached its floor: 0.1 x the optimizer's lr
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * BASE_LR)
    (ckpt,) = (tmp_path / "run").rglob("*step=3*.ckpt")
    assert load_module(str(ckpt)).lr_schedule == Cosine(warmup_steps=1, min_ratio=0.1)
