"""Power-function EMA and post-hoc reconstruction (EDM2 Sec. 3, App. C): the closed forms, the tracked
averages, the least-squares reconstruction, the PowerEMA callback (timing, exact resume, atomic snapshots)
and `diffusion-pl reconstruct-ema` end to end."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy.integrate import quad

from diffusion_pl.training.callbacks.checkpointing import AtomicCheckpointIO
from diffusion_pl.training.callbacks.power_ema import PowerEMA
from diffusion_pl.cli.main import main
from diffusion_pl.evaluation.reconstruct import read_snapshots
from diffusion_pl.training.module import load_module
from diffusion_pl.training.phema import (SIGMA_REL_MAX, PowerFunctionEMA, gamma_to_sigma_rel, list_snapshot_files,
                                         power_ema_beta, profile_inner_products, profile_residual, sigma_rel_to_gamma,
                                         save_snapshot, snapshot_name, solve_posthoc_coefficients)
from diffusion_pl.cli.run_folder import previous_run_outputs
from tests.support.fit import DYING_TORCH_SAVE
from tests.support.training import make_datamodule, make_module

SIGMA_RELS = (0.01, 0.05, 0.07, 0.10, 0.2, 0.28, SIGMA_REL_MAX)


def _profile(tau: float, gamma: float, t: float) -> float:
    """p_{gamma,t}(tau) (EDM2 Eq. 121)."""
    return (gamma + 1.0) * tau ** gamma / t ** (gamma + 1.0) if 0.0 < tau <= t else 0.0


# -- closed forms ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma_rel", SIGMA_RELS)
def test_sigma_rel_and_gamma_round_trip_and_match_the_integrated_profile_std(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma >= 0.0
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-10, abs=1e-12)
    # the std of the profile on [0, 1], integrated numerically, is sigma_rel (Eq. 123)
    mean = quad(lambda x: x * _profile(x, gamma, 1.0), 0.0, 1.0, epsabs=1e-14, epsrel=1e-13)[0]
    second = quad(lambda x: x * x * _profile(x, gamma, 1.0), 0.0, 1.0, epsabs=1e-14, epsrel=1e-13)[0]
    assert math.sqrt(second - mean ** 2) == pytest.approx(sigma_rel, rel=1e-8)


def test_known_exponents_and_range():
    """EDM2 Sec. 3.1: sigma_rel 0.10 is gamma 6.94, 0.05 is gamma 16.97; 1/sqrt(12) is the uniform average."""
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(SIGMA_REL_MAX) == 0.0
    for bad in (0.0, -0.1, 0.29, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("t_a,gamma_a,t_b,gamma_b",
                         [(3.0, 6.9, 5.0, 17.0), (5.0, 6.9, 3.0, 17.0), (4.0, 0.0, 4.0, 2.5)])
def test_profile_inner_products_match_numerical_integration(t_a, gamma_a, t_b, gamma_b):
    exact = quad(lambda x: _profile(x, gamma_a, t_a) * _profile(x, gamma_b, t_b), 0.0, min(t_a, t_b),
                 epsabs=1e-14, epsrel=1e-12)[0]
    assert float(profile_inner_products(t_a, gamma_a, t_b, gamma_b)) == pytest.approx(exact, rel=1e-9)


def test_tracked_average_weights_each_step_by_the_profile_mass_on_it():
    """One-hot weights theta_j = e_j, steps of unequal image counts: after the last step the average is the
    vector of weights the EMA gave each step, which must be the profile's mass on that step's interval
    (t_j^(g+1) - t_{j-1}^(g+1)) / t^(g+1): the recursion (Eq. 127) is exact for piecewise-constant weights."""
    sizes = [3, 5, 2, 8, 8, 1, 4, 6, 7, 2]
    sigma_rels = (0.05, 0.10, 0.25)
    x = torch.zeros(len(sizes), dtype=torch.float64)
    ema = PowerFunctionEMA([x], ["x"], sigma_rels)
    for j, size in enumerate(sizes):
        x.zero_()[j] = 1.0
        ema.update([x], size)
    edges = np.concatenate([[0.0], np.cumsum(sizes)])  # t_0 = 0, ..., t_T
    assert ema.nimg == edges[-1] and ema.step == len(sizes)
    for gamma, (average,) in zip(ema.gammas, ema.averages):
        mass = (edges[1:] ** (gamma + 1) - edges[:-1] ** (gamma + 1)) / edges[-1] ** (gamma + 1)
        np.testing.assert_allclose(average.numpy(), mass, rtol=1e-12, atol=1e-15)
    assert power_ema_beta(6.9, t=16, t_delta=16) == 0.0  # the first step copies the weights


# -- reconstruction ----------------------------------------------------------------------------------------

def _grid(num: int, sigma_rels=(0.05, 0.10), every: float = 1000.0):
    t = np.repeat(np.arange(1, num + 1) * every, len(sigma_rels))
    gamma = np.tile([sigma_rel_to_gamma(s) for s in sigma_rels], num)
    return t, gamma


def test_a_tracked_profile_is_its_own_reconstruction():
    t, gamma = _grid(8)
    for k in (len(t) - 2, len(t) - 1):  # both profiles at the last snapshot time
        coeffs = solve_posthoc_coefficients(t, gamma, t[k], gamma[k])[:, 0]
        expected = np.zeros(len(t))
        expected[k] = 1.0
        np.testing.assert_allclose(coeffs, expected, atol=1e-9)
        assert profile_residual(coeffs, t, gamma, t[k], gamma[k])[0] < 1e-6


def test_reconstruction_is_an_average_and_better_with_more_snapshots():
    target = sigma_rel_to_gamma(0.07)
    errors = []
    for num in (2, 4, 8, 16):
        t, gamma = _grid(num)
        coeffs = solve_posthoc_coefficients(t, gamma, t[-1], [target, sigma_rel_to_gamma(0.2)])
        np.testing.assert_allclose(coeffs.sum(axis=0), 1.0, rtol=1e-12)  # a constant trajectory comes back exactly
        errors.append(profile_residual(coeffs[:, 0], t, gamma, t[-1], target)[0])
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.01, errors  # 16 snapshots of 0.05 and 0.10 span 0.07 to within 1% in L2
    with pytest.raises(ValueError, match="repeated"):
        solve_posthoc_coefficients([1.0, 1.0], [6.9, 6.9], 1.0, 6.9)


def test_intermediate_sigma_rel_reconstructed_from_two_matches_a_tracked_one():
    """An MLP trained with Adam on noisy regression (noisy weights, as in diffusion training) tracks 0.05, 0.07
    and 0.10; 0.07 reconstructed from 10 snapshots each of 0.05 and 0.10 must match the tracked 0.07.

    Tolerance: the reconstruction is a least-squares fit of the 0.07 profile by the snapshot profiles,
    exact only up to the fit's residual (here 0.9% in L2, `profile_residual`), so the weights can only be
    as close as the weight trajectory lets that residual show. The scale is the gap between the two
    tracked averages: the error measured 0.3% of ||theta_0.05 - theta_0.10||; the test allows 2% (7x
    margin for other seeds and platforms), while the nearest tracked input is a third of the gap away.
    """
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    ema = PowerFunctionEMA(list(net.parameters()), [n for n, _ in net.named_parameters()], (0.05, 0.07, 0.10))
    w = torch.randn(4, 1)
    flat = lambda i: torch.cat([a.flatten() for a in ema.averages[i]]).double()  # noqa: E731
    snapshots = []
    for step in range(1, 401):
        x = torch.randn(16, 4)  # (B, 4)
        y = torch.sin(x @ w) + 0.3 * torch.randn(16, 1)
        loss = (net(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(list(net.parameters()), 16)
        if step % 40 == 0:
            snapshots += [(ema.nimg, ema.gammas[i], flat(i)) for i in (0, 2)]
    t_in, gamma_in = [s[0] for s in snapshots], [s[1] for s in snapshots]
    coeffs = solve_posthoc_coefficients(t_in, gamma_in, ema.nimg, ema.gammas[1])[:, 0]
    reconstruction = sum(float(c) * s[2] for c, s in zip(coeffs, snapshots))
    gap = (flat(0) - flat(2)).norm()
    error = (reconstruction - flat(1)).norm()
    assert profile_residual(coeffs, t_in, gamma_in, ema.nimg, ema.gammas[1])[0] < 0.02
    assert error < 0.02 * gap, f"error {error:.3g} vs gap {gap:.3g}"
    assert min((flat(0) - flat(1)).norm(), (flat(2) - flat(1)).norm()) > 0.2 * gap


def test_resume_refuses_other_sigma_rels():
    x = torch.zeros(3)
    state = PowerFunctionEMA([x], ["x"], (0.05, 0.10)).state_dict()
    with pytest.raises(ValueError, match=r"sigma_rels \[0.05, 0.1\] but this run tracks \[0.05, 0.07\]"):
        PowerFunctionEMA([x], ["x"], (0.05, 0.07)).load_state_dict(state)


# -- the callback ------------------------------------------------------------------------------------------

class _SaveAtStep(L.Callback):
    """Saves a checkpoint in on_train_batch_end at one step: listed before PowerEMA, it runs before its update."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.path.exists():
            trainer.save_checkpoint(self.path)


class _RecordWeights(L.Callback):
    """The network's weights after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list[list[torch.Tensor]] = []
        self._start = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._start:
            self.weights.append([p.detach().clone() for p in pl_module.net.parameters()])


def _fit(root: Path, max_steps: int, ckpt_path: str | None = None, callbacks=(), with_power: bool = True,
         **trainer_kwargs):
    L.seed_everything(0, verbose=False)
    module = make_module()
    power = PowerEMA(sigma_rels=(0.05, 0.10), snapshot_every_n_steps=2)
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=3, save_top_k=-1)
    callbacks = [*callbacks, *([power] if with_power else []), checkpoint]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, plugins=[AtomicCheckpointIO()],
                        limit_val_batches=0, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, make_datamodule(), ckpt_path=ckpt_path)
    return module, power


def _assert_same(a, b, where: str = "") -> None:
    """Nested dicts / lists of tensors and numbers are bitwise equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{where} differs")
    else:
        assert a == b, where


def test_updates_after_each_optimizer_step_under_gradient_accumulation(tmp_path):
    """2 micro-batches of 8 per step: one update per optimizer step with t_delta 16, on the stepped weights."""
    recorder = _RecordWeights()
    module, power = _fit(tmp_path, 3, callbacks=[recorder], accumulate_grad_batches=2)
    assert power.ema.step == 3 and power.ema.nimg == 3 * 16
    replay = PowerFunctionEMA(recorder.weights[0], [n for n, _ in module.net.named_parameters()], (0.05, 0.10))
    for weights in recorder.weights:
        replay.update(weights, 16)
    for ours, theirs in zip(power.ema.averages, replay.averages):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [s for s, _ in list_snapshot_files(tmp_path / "phema")] == [2, 2, 3, 3]  # every 2 steps + the last


@pytest.mark.slow
def test_resume_is_bit_exact_and_checkpoints_hold_their_step(tmp_path):
    """6 steps straight == 3 steps + resume from a checkpoint saved by a callback that runs before PowerEMA's
    update (state_dict applies it first) + 3 steps: averages, images seen and snapshot files alike."""
    _, straight = _fit(tmp_path / "a", 6)
    early = tmp_path / "b" / "early.ckpt"
    _fit(tmp_path / "b", 3, callbacks=[_SaveAtStep(3, early)])
    regular = torch.load(tmp_path / "b" / "checkpoints" / "epoch=0-step=3.ckpt", weights_only=True)
    saved = torch.load(early, weights_only=True)
    assert saved["callbacks"]["PowerEMA"]["step"] == 3 and saved["callbacks"]["PowerEMA"]["nimg"] == 24
    _assert_same(saved["callbacks"]["PowerEMA"], regular["callbacks"]["PowerEMA"])
    # a snapshot past the resume point, as a killed longer run would leave: removed when training restarts at 3
    stale = tmp_path / "b" / "phema" / "phema-000000008-0.05.pt"
    stale.write_bytes(b"from an abandoned continuation")
    _, resumed = _fit(tmp_path / "b", 6, ckpt_path=str(early))
    assert not stale.exists()
    assert resumed.ema.step == straight.ema.step == 6 and resumed.ema.nimg == straight.ema.nimg == 48
    _assert_same(straight.ema.state_dict(), resumed.ema.state_dict())
    names = [p.name for _, p in list_snapshot_files(tmp_path / "a" / "phema")]
    assert len(names) == 6  # steps 2, 4, 6; the split run also snapshotted its first job's last step, 3
    split = {p.name for _, p in list_snapshot_files(tmp_path / "b" / "phema")}
    assert split == {*names, "phema-000000003-0.05.pt", "phema-000000003-0.1.pt"}
    for name in names:
        _assert_same(torch.load(tmp_path / "a" / "phema" / name, weights_only=True),
                     torch.load(tmp_path / "b" / "phema" / name, weights_only=True))


def test_added_to_a_running_training_starts_from_the_current_weights(tmp_path):
    """Resumed from a checkpoint without PowerEMA state: a warning, t continues from the steps already done."""
    _fit(tmp_path, 3, with_power=False)
    with pytest.warns(UserWarning, match="without PowerEMA averages"):
        module, power = _fit(tmp_path, 4, ckpt_path=str(tmp_path / "checkpoints" / "epoch=0-step=3.ckpt"))
    assert power.ema.step == 4 and power.ema.nimg == 4 * 8


# the snapshot writer PowerEMA uses (diffusion_pl.training.phema.save_snapshot), without Lightning's import time
KILL_DURING_SNAPSHOT = textwrap.dedent("""
    import io, os, signal, sys, torch
    from pathlib import Path
    from diffusion_pl.training.phema import save_snapshot, snapshot_name
    def snapshot(step):
        return {"format": "diffusion_pl.training.phema/1", "state_dict": {"w": torch.full((64, 64), float(step))},
                "averaged": ["w"], "step": step, "nimg": 8 * step, "sigma_rel": 0.05, "gamma": 16.97}
    folder = Path(sys.argv[1])
    save_snapshot(folder / snapshot_name(1, 0.05), snapshot(1))
""") + DYING_TORCH_SAVE + textwrap.dedent("""
    save_snapshot(folder / snapshot_name(2, 0.05), snapshot(2))
""")


@pytest.mark.slow
def test_a_killed_snapshot_write_leaves_no_partial_snapshot(tmp_path):
    folder = tmp_path / "phema"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SNAPSHOT, str(folder)], timeout=120, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = sorted(p.name for p in folder.iterdir())
    assert len(leftovers) == 2 and leftovers[0].startswith("."), leftovers  # the killed write's hidden temporary
    assert [(s.step, s.nimg, s.sigma_rel) for s in read_snapshots(folder)] == [(1, 8, 0.05)]
    assert torch.equal(torch.load(folder / "phema-000000001-0.05.pt", weights_only=True)["state_dict"]["w"],
                       torch.ones(64, 64))
    # the next snapshot written there (a resumed run) removes the killed write's temporary file
    save_snapshot(folder / snapshot_name(2, 0.05), {**torch.load(folder / "phema-000000001-0.05.pt",
                                                                 weights_only=True), "step": 2})
    assert sorted(p.name for p in folder.iterdir()) == ["phema-000000001-0.05.pt", "phema-000000002-0.05.pt"]


# -- the command -------------------------------------------------------------------------------------------

def test_reconstruct_ema_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["reconstruct-ema", "--run", str(tiny_run), "--sigma_rel", "0.05", "0.07", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "wrote" in err and "6 snapshots" in err, err
    paths = sorted(out.iterdir())
    assert [p.name for p in paths] == ["phema-000000006-0.05.ckpt", "phema-000000006-0.07.ckpt"]
    base = torch.load(tiny_run / "checkpoints" / "epoch=0-step=6.ckpt", weights_only=True)
    snapshot = torch.load(tiny_run / "phema" / "phema-000000006-0.05.pt", weights_only=True)
    own = torch.load(paths[0], weights_only=True)
    assert not {"optimizer_states", "callbacks"} & set(own) and own["phema"]["sigma_rel"] == 0.05
    for key, value in snapshot["state_dict"].items():  # a tracked profile comes back as itself
        torch.testing.assert_close(own["state_dict"][f"ema.{key}"], value, rtol=0, atol=1e-7)
    for key, value in base["state_dict"].items():
        if key.startswith("net."):
            assert torch.equal(own["state_dict"][key], value)
    between = torch.load(paths[1], weights_only=True)["state_dict"]
    assert any(not torch.equal(between[f"ema.{key}"], own["state_dict"][f"ema.{key}"]) for key in snapshot["averaged"])
    # the output is a checkpoint `sample` takes
    assert load_module(str(paths[1])).ema is not None
    assert main(["sample", "--ckpt_path", str(paths[1]), "--sampler", "ddim", "--steps", "2", "--num_samples", "2",
                 "--out", str(tmp_path / "samples"), "--png"]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2
    # one file, an earlier step; and the run folder counts phema/ as output of a previous run
    single = tmp_path / "one.ckpt"
    assert main(["reconstruct-ema", "--run", str(tiny_run), "--sigma_rel", "0.1", "--step", "4", "--out",
                 str(single)]) == 0
    assert torch.load(single, weights_only=True)["phema"]["step"] == 4
    assert tiny_run / "phema" in previous_run_outputs(tiny_run)


@pytest.mark.parametrize("args,message", [
    (["--sigma_rel", "0.3"], "--sigma_rel 0.3 is out of range"),
    (["--sigma_rel", "0.07", "--step", "3"], "--step 3 has no snapshots"),
    (["--sigma_rel", "0.07", "0.1", "--out", "{tmp}/one.ckpt"], "is one file but 2 sigma_rels"),
    (["--sigma_rel", "0.07", "--out", "{run}/checkpoints"], "where `--ckpt_path last` looks"),
    (["--sigma_rel", "0.07", "--snapshots", "{tmp}"], "holds no post-hoc EMA snapshots"),
    (["--sigma_rel", "0.07", "--out", "{run}/checkpoints/new.ckpt"], "where `--ckpt_path last` looks"),
])
def test_reconstruct_ema_bad_input_is_one_line(tiny_run, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, run=tiny_run) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert main(["reconstruct-ema", "--run", str(tiny_run), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffusion-pl reconstruct-ema: error: ") and message in err[0], err


def test_reconstruct_ema_fid_sweep_writes_table_plot_and_reports(tiny_run, tmp_path, capsys):
    """--fid_data: every reconstruction is scored by `evaluate` (its options after `--`); the sweep's CSV holds
    the values of each checkpoint's own report, which equal a separate `diffusion-pl evaluate` of it, and
    the PNG is a plot."""
    import csv
    import json

    from PIL import Image

    out = tmp_path / "out"
    data = "builtin:shapes?size=8&count=64"
    metric_args = ["--num_samples", "8", "--sampler", "ddim", "heunode", "--steps", "2", "1", "--batch_size", "8",
                   "--feature_extractor", "tests.support.evaluation.StandInFeatures"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
        assert main(["reconstruct-ema", "--run", str(tiny_run), "--sigma_rel", "0.05", "0.07", "0.1", "--out", str(out),
                     "--fid_data", data, "--", *metric_args]) == 0
        printed = capsys.readouterr().out
        with open(out / "phema-sweep-000000006.csv") as f:
            rows = list(csv.DictReader(f))
        assert [float(r["sigma_rel"]) for r in rows] == [0.05, 0.07, 0.1]
        assert list(rows[0]) == ["sigma_rel", "gamma", "profile_error", "fid/ddim_2", "fid/heunode_1"]
        for row in rows:
            report = json.loads((out / f"phema-000000006-{float(row['sigma_rel'])!r}.eval.json").read_text())
            assert {f"fid/{p['name']}": p["fid"] for p in report["results"]} == \
                {k: float(v) for k, v in row.items() if k.startswith("fid/")}
        assert len({r["fid/ddim_2"] for r in rows}) == 3  # different EMA lengths score differently
        assert "post-hoc EMA sweep (Frechet distance (tests.support.evaluation.StandInFeatures), 8 samples)" in printed
        assert "best ddim_2: sigma_rel" in printed
        with Image.open(out / "phema-sweep-000000006.png") as im:
            assert im.format == "PNG" and im.size[0] > 300
        alone = tmp_path / "alone.json"
        assert main(["evaluate", "--ckpt_path", str(out / "phema-000000006-0.07.ckpt"), "--data", data, *metric_args,
                     "--report", str(alone)]) == 0
    assert json.loads(alone.read_text())["results"][0]["fid"] == float(rows[1]["fid/ddim_2"])
    capsys.readouterr()
    assert main(["reconstruct-ema", "--run", str(tiny_run), "--sigma_rel", "0.07", "--out", str(tmp_path / "o2"),
                 "--", "--num_samples", "8"]) == 2
    assert "expected --fid_data SHARDS" in capsys.readouterr().err
    assert main(["reconstruct-ema", "--run", str(tiny_run), "--sigma_rel", "0.07", "--out", str(tmp_path / "o3"),
                 "--fid_data", data, "--", "--data", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluate option --data after `--` is set by reconstruct-ema itself" in err[0], err
