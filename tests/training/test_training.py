"""The training system: exact resume, crash-safe checkpoints, SIGTERM, non-finite losses, CPU DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_pl.training.callbacks.checkpointing import (AtomicCheckpointIO, PreemptionCheckpoint,
                                                           find_resume_checkpoint)
from diffusion_pl.networks.base import ScoreNetwork
from diffusion_pl.training.module import DiffusionModule, load_module
from diffusion_pl.prediction import EpsPrediction
from diffusion_pl.processes.variance_preserving import VPLinear
from tests.support.fit import DYING_TORCH_SAVE
from tests.support.paths import REPO, WORKERS, repo_pythonpath
from tests.support.training import IMAGE_SIZE, make_datamodule, make_module, make_net


def _trainer(root: Path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, plugins=[AtomicCheckpointIO()],
                     limit_val_batches=0, **kwargs)


def _fit(root: Path, max_steps: int, ckpt_path: str | None = None, num_workers: int = 0, every: int = 3):
    L.seed_everything(0, verbose=False)
    module = make_module(lr_warmup_steps=2)
    ckpt = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=every, save_top_k=-1, save_last=True)
    trainer = _trainer(root, max_steps, callbacks=[ckpt])
    trainer.fit(module, make_datamodule(num_workers=num_workers), ckpt_path=ckpt_path)
    return module, trainer


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs")


def _optimizer_state(trainer: L.Trainer) -> dict:
    state = trainer.optimizers[0].state_dict()["state"]
    return {f"{i}.{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    """6 steps straight == 3 steps + resume from the step-3 checkpoint + 3 steps (weights, EMA, optimizer).

    The data stream's exact resume with dataloader workers is tested in test_data.py."""
    straight, t_straight = _fit(tmp_path / "a", 6)
    _fit(tmp_path / "b", 3)
    ckpt = tmp_path / "b" / "checkpoints" / "epoch=0-step=3.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    resumed, t_resumed = _fit(tmp_path / "b", 6, ckpt_path=str(ckpt))
    assert t_resumed.global_step == t_straight.global_step == 6
    _assert_same_state(straight.net.state_dict(), resumed.net.state_dict())
    _assert_same_state(straight.ema.state_dict(), resumed.ema.state_dict())
    _assert_same_state(_optimizer_state(t_straight), _optimizer_state(t_resumed))
    # the resumed run drew exactly the straight run's last three batches of times
    torch.testing.assert_close(torch.cat(straight.loss_fn.times[3:]), torch.cat(resumed.loss_fn.times), rtol=0, atol=0)


def test_ema_tracks_net_and_is_used_for_sampling(tmp_path):
    module, _ = _fit(tmp_path, 4)
    net = torch.cat([p.flatten() for p in module.net.parameters()])
    ema = torch.cat([p.flatten() for p in module.ema.parameters()])
    assert not torch.equal(net, ema), "EMA must lag the trained weights"
    assert all(not p.requires_grad for p in module.ema.parameters())
    x, t = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.full((2,), 0.5)
    torch.testing.assert_close(module.model(ema=True)(x, t, None), module.ema(x, module.process.noise_label(t), None))


def test_ema_half_life_schedule():
    module = DiffusionModule(make_net(), VPLinear(), ema_half_life_images=1000.0, ema_rampup_ratio=None)
    assert module.averaging.beta(step=10, images_seen=10 * 1000, images=1000) == pytest.approx(0.5)
    ramp = DiffusionModule(make_net(), VPLinear(), ema_half_life_images=1e6, ema_rampup_ratio=0.05)
    # 10 steps of 100 images: half-life = min(1e6, 0.05 * 1000) = 50 images
    assert ramp.averaging.beta(step=10, images_seen=10 * 100, images=100) == pytest.approx(0.5 ** (100 / 50))
    warm = DiffusionModule(make_net(), VPLinear(), ema_decay=0.9999, ema_warmup=True)
    assert warm.averaging.beta(step=0, images_seen=0, images=1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="ema_decay"):
        DiffusionModule(make_net(), VPLinear(), ema_decay=1.5)


def test_lr_warmup_is_linear(tmp_path):
    module, trainer = _fit(tmp_path, 1)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(2e-4 * 0.5)  # the next step's lr after 1 step of a 2-step warm-up: 1 / 2
    # the first step ran at lr 0 (the papers' ramp lr x step / warmup, step from 0): the weights did not move
    L.seed_everything(0, verbose=False)
    fresh = make_module(lr_warmup_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(fresh.net.parameters(), module.net.parameters()))


class _GradRecorder(L.Callback):
    """The gradients' total norm as the optimizer is about to step (Lightning calls callbacks before the module)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        flat = torch.cat([p.grad.flatten() for p in pl_module.net.parameters() if p.grad is not None])
        self.norms.append(flat.norm().item())


def test_grad_norm_is_logged_before_clipping(tmp_path):
    L.seed_everything(0, verbose=False)
    module, recorder = make_module(), _GradRecorder()
    trainer = _trainer(tmp_path, 2, enable_checkpointing=False, gradient_clip_val=1e-3, callbacks=[recorder])
    trainer.fit(module, make_datamodule())
    assert len(recorder.norms) == 2
    logged = trainer.callback_metrics["train/grad_norm"].item()
    assert logged == pytest.approx(recorder.norms[-1], rel=1e-5)
    assert logged > 1e-2, "the logged norm must be the one before clipping to 1e-3"


def test_a_python_checkpoint_naming_a_class_from_outside_the_package_needs_trust(tmp_path):
    """A module built in Python saves its components' config (tests/training/test_python_checkpoint.py); this one's
    loss is a class of the tests, outside the trusted packages, so loading it is refused in one line unless trusted."""
    _fit(tmp_path, 3)
    path = str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=r"tests\.support\.training\.RecordingLoss") as err:
        load_module(path)
    assert "\n" not in str(err.value) and "trust_config" in str(err.value)
    assert type(load_module(path, trust_config=True).loss_fn).__name__ == "RecordingLoss"


class _NaNAfter(ScoreNetwork):
    """A network that starts returning NaN after `k` calls."""

    def __init__(self, k: int) -> None:
        inner = make_net()
        super().__init__(inner.img_resolution, inner.in_channels, inner.out_channels, inner.num_classes)
        self.inner, self.k, self.calls = inner, k, 0

    def forward(self, x, noise_label, class_labels=None):
        self.calls += 1
        out = self.inner(x, noise_label, class_labels)
        return out * float("nan") if self.calls > self.k else out


def test_nonfinite_loss_raises_naming_the_step(tmp_path):
    module = DiffusionModule(_NaNAfter(2), VPLinear(), EpsPrediction())
    with pytest.raises(FloatingPointError, match="non-finite training loss at step 2"):
        _trainer(tmp_path, 5, enable_checkpointing=False).fit(module, make_datamodule())


def test_nonfinite_loss_skip_keeps_weights_finite(tmp_path):
    module = DiffusionModule(_NaNAfter(2), VPLinear(), EpsPrediction(), nonfinite_loss="skip")
    trainer = _trainer(tmp_path, 4, enable_checkpointing=False, max_epochs=-1)
    trainer.fit(module, make_datamodule())
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    assert all(torch.isfinite(p).all() for p in module.ema.parameters())


# -- crash safety ------------------------------------------------------------------------------------

KILL_DURING_SAVE = textwrap.dedent("""
    import io, os, signal, sys, torch
    from diffusion_pl.training.callbacks.checkpointing import AtomicCheckpointIO
    path = sys.argv[1]
    ckpt_io = AtomicCheckpointIO()
    ckpt_io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
""") + DYING_TORCH_SAVE + textwrap.dedent("""
    ckpt_io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
""")


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpts" / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path)], timeout=120, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))
    leftovers = [p for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert leftovers, "the killed save should have left its temporary file behind"
    assert find_resume_checkpoint(tmp_path) == str(path)
    # the next save into that folder (a resumed run) removes the dead writer's temporary file
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path.parent / "epoch=0-step=3.ckpt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]


def test_find_resume_checkpoint_uses_stored_step(tmp_path):
    ckpt_io = AtomicCheckpointIO()
    ckpt_io.save_checkpoint({"global_step": 7}, tmp_path / "hpc_ckpt_1.ckpt")
    time.sleep(0.01)
    ckpt_io.save_checkpoint({"global_step": 5}, tmp_path / "checkpoints" / "last.ckpt")  # newer file, older step
    (tmp_path / "checkpoints" / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="broken.ckpt"):
        assert find_resume_checkpoint(tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")
    assert find_resume_checkpoint(tmp_path / "missing") is None


def _cli_config(tmp_path: Path, max_steps: int) -> Path:
    root = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 1
          max_steps: {max_steps}
          default_root_dir: {root}
          logger: false
          enable_progress_bar: false
          enable_model_summary: false
          limit_val_batches: 0
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{dirpath: {root}/checkpoints, every_n_train_steps: 1000, save_last: true}}
            - class_path: tests.support.training.StepMarker
              init_args: {{path: {tmp_path}/steps.txt}}
        model:
          net:
            class_path: diffusion_pl.networks.unet.UNet
            init_args: {{img_resolution: {IMAGE_SIZE}, model_channels: 16, channel_mult: [1, 2], num_res_blocks: 1,
                         attn_resolutions: [8]}}
          process: {{class_path: diffusion_pl.processes.variance_preserving.VPLinear}}
          prediction: {{class_path: diffusion_pl.prediction.EpsPrediction}}
        data:
          class_path: diffusion_pl.data.datamodule.ShardDataModule
          init_args: {{shards: "builtin:shapes?size={IMAGE_SIZE}", batch_size: 8, num_workers: 0}}
    """))
    return config


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": repo_pythonpath()}


def _steps(path: Path) -> list[int]:
    return [int(s) for s in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_sigterm_saves_and_exits_nonzero_then_resumes(tmp_path):
    config = _cli_config(tmp_path, max_steps=100_000)
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_pl", "fit", "--config", str(config)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marker = tmp_path / "steps.txt"
    deadline = time.time() + 180
    while len(_steps(marker)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143, output[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved_step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert saved_step >= 3
    # resume with --ckpt_path last: continues from the saved step to the new max_steps
    marker.unlink()
    resume = subprocess.run([sys.executable, "-m", "diffusion_pl", "fit", "--config", str(config), "--ckpt_path",
                             "last", "--trainer.max_steps", str(saved_step + 2)], env=_env(), capture_output=True,
                            timeout=300)
    assert resume.returncode == 0, resume.stderr.decode()[-3000:]
    assert _steps(marker) == [saved_step + 1, saved_step + 2]
    module = load_module(str(last))  # the CLI checkpoint carries its config
    assert isinstance(module.process, VPLinear)


@pytest.mark.slow
def test_ddp_two_ranks_identical_weights_different_noise(tmp_path):
    proc = subprocess.run([sys.executable, str(WORKERS / "train.py"), str(tmp_path), "--devices", "2",
                           "--max-steps", "3"], capture_output=True, timeout=300, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 3
    _assert_same_state(r0["net"], r1["net"])
    _assert_same_state(r0["ema"], r1["ema"])
    assert not torch.equal(r0["times"], r1["times"]), "ranks must draw different diffusion times"


def test_preemption_callback_targets_checkpoint_dir(tmp_path):
    trainer = _trainer(tmp_path, 1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck")])
    assert PreemptionCheckpoint()._target(trainer) == tmp_path / "ck" / "last.ckpt"
    assert PreemptionCheckpoint(dirpath=str(tmp_path / "x"))._target(trainer) == tmp_path / "x" / "last.ckpt"


def test_validation_loss_is_deterministic_with_label_dropout(tmp_path):
    """p_uncond > 0: the dropped labels come from the validation generator, so val/loss repeats exactly."""
    from diffusion_pl.data.datamodule import ShardDataModule
    from diffusion_pl.losses import DenoisingLoss

    torch.manual_seed(0)
    module = DiffusionModule(make_net(num_classes=5), VPLinear(), EpsPrediction(), DenoisingLoss(p_uncond=0.5))
    with torch.no_grad():  # the zero-initialised output layer would make the loss blind to the labels
        for p in module.ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    shapes = f"builtin:shapes?size={IMAGE_SIZE}&count=16"
    dm = ShardDataModule(shards=shapes, val_shards=shapes, batch_size=8, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    losses = []
    for _ in range(2):
        torch.manual_seed(len(losses))  # a different global generator state each time
        losses.append(trainer.validate(module, dm, verbose=False)[0]["val/loss"])
    assert losses[0] == losses[1]
