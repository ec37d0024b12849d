"""Sharded training (FSDP): the wrap policy, the EMA on shards, full checkpoints, the YAML, PowerEMA on shards.

The multi-process tests run 2 CPU ranks (gloo) in subprocesses (tests/workers/fsdp_fit.py, fsdp2_ema.py):
Lightning's FSDPStrategy through tests/support/sharding.py (Lightning refuses it on CPU; the subclass changes
only the device FSDP is given), and torch's FSDP2 `fully_shard` directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from diffusion_pl.cli.main import main
from diffusion_pl.networks.dit import DiTBlock, dit_tiny
from diffusion_pl.networks.unet_blocks import ResBlock
from diffusion_pl.processes.variance_preserving import VPLinear
from diffusion_pl.training.callbacks.power_ema import PowerEMA
from diffusion_pl.training.ema import EMA
from diffusion_pl.training.module import DiffusionModule, load_module
from diffusion_pl.training.phema import list_snapshot_files
from diffusion_pl.training.sharding import BlockWrapPolicy, global_grad_norm, is_sharded
from diffusion_pl.utils.errors import UserValueError
from tests.support.paths import REPO, repo_pythonpath
from tests.support.sharding import step_module
from tests.support.training import make_net


def _wrapped(module: torch.nn.Module) -> set[str]:
    """Names of the submodules FSDP's auto-wrap would make units of (the policy's own selection, no processes)."""
    chosen = BlockWrapPolicy()._run_policy(module, ignored_modules=set(), root_kwargs={})
    names = {id(m): name for name, m in module.named_modules()}
    return {names[id(m)] for m in chosen}


def test_policy_wraps_every_dit_block_and_each_network():
    module = DiffusionModule(dit_tiny(img_resolution=8), VPLinear())
    wrapped = _wrapped(module)
    blocks = {f"{net}.blocks.{i}" for net in ("net", "ema") for i in range(len(module.net.blocks))}
    assert wrapped == {"net", "ema", *blocks}  # the root (the LightningModule) is wrapped by FSDP itself


def test_policy_wraps_every_unet_resblock_and_each_network():
    module = DiffusionModule(make_net(), VPLinear())
    wrapped = _wrapped(module)
    resblocks = {name for name, m in module.named_modules() if isinstance(m, ResBlock)}
    assert len(resblocks) >= 2 * 6 and not any(isinstance(m, DiTBlock) for m in module.modules())
    assert wrapped == {"net", "ema", *resblocks}


def test_ema_update_refuses_networks_sharded_unlike():
    net = dit_tiny(img_resolution=8)
    averaged = dit_tiny(img_resolution=8)
    with torch.no_grad():  # as a rank holds a root unit's slice: net's first weight whole, the EMA's a piece of it
        averaged.x_embedder.proj.weight.data = averaged.x_embedder.proj.weight.data.flatten()[:5]
    with pytest.raises(RuntimeError, match="sharded alike.*BlockWrapPolicy"):
        EMA(0.5).update(averaged, net, step=0, images=4)


def test_grad_norm_unsharded_is_the_norm_of_all_gradients():
    grads = [torch.tensor([3.0]), torch.tensor([4.0, 0.0]), torch.zeros(0)]
    assert global_grad_norm(grads, DDPStrategy()).item() == pytest.approx(5.0)
    assert is_sharded(FSDPStrategy()) and not is_sharded(FSDPStrategy(sharding_strategy="NO_SHARD"))


@pytest.mark.parametrize("strategy", [FSDPStrategy(), FSDPStrategy(sharding_strategy="SHARD_GRAD_OP"),
                                      FSDPStrategy(sharding_strategy="NO_SHARD")])
def test_power_ema_accepts_fsdp(strategy):
    trainer = SimpleNamespace(strategy=strategy)
    callback = PowerEMA()
    module = DiffusionModule(dit_tiny(img_resolution=8), VPLinear())
    callback.setup(trainer, module, "fit")
    assert callback._trainer is trainer
    if is_sharded(strategy):  # the full shapes, read before FSDP wraps the network, for gathering the slices
        assert callback._full["shapes"] == [p.shape for p in module.net.parameters()]


@pytest.mark.parametrize("strategy,named", [(ModelParallelStrategy(), "ModelParallelStrategy"),
                                            (FSDPStrategy(use_orig_params=False), "use_orig_params=False")])
def test_power_ema_refuses_other_sharded_strategies_in_one_line(strategy, named):
    with pytest.raises(UserValueError) as err:
        PowerEMA().setup(SimpleNamespace(strategy=strategy), DiffusionModule(dit_tiny(img_resolution=8), VPLinear()),
                         "fit")
    message = str(err.value)
    assert "\n" not in message and named in message and "expected single-device, DDP or FSDPStrategy" in message


def test_fsdp_strategy_override_parses(capsys):
    """The documented override gives FSDPStrategy with BlockWrapPolicy and full checkpoints on top of the recipe."""
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(REPO / "configs" / "imagenet256_dit_xl2.yaml"),
              "--config", "fsdp", "--print_config"])  # the packaged override, by name
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert strategy["init_args"]["auto_wrap_policy"]["class_path"] in (  # printed by its shortest import path
        "diffusion_pl.BlockWrapPolicy", "diffusion_pl.training.sharding.BlockWrapPolicy")
    assert strategy["init_args"]["state_dict_type"] == "full"
    assert printed["model"]["net"]["init_args"]["depth"] == 28  # the recipe's DiT-XL/2 is kept


def _run(args: list[str], timeout: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float) -> None:
    """Wait for a worker; on timeout kill it with the ranks it started."""
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
        pytest.fail(f"worker did not finish in {timeout} s:\n{out.decode(errors='replace')[-4000:]}")
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def fsdp_and_ddp_runs(tmp_path_factory):
    """4 optimizer steps with PowerEMA (snapshots and checkpoints every 2 steps) on 2 ranks, under FSDPStrategy +
    BlockWrapPolicy and under DDP, same seeds and data (tests/workers/fsdp_fit.py)."""
    root = tmp_path_factory.mktemp("fits")
    runs = {name: root / name for name in ("fsdp", "ddp")}
    procs = [_run(["tests/workers/fsdp_fit.py", str(out), name, "--steps", "4", "--power-ema"], 300)
             for name, out in runs.items()]
    for proc in procs:
        _wait(proc, 300)
    return runs


@pytest.mark.slow
def test_lightning_fsdp_fit_equals_ddp_and_writes_a_full_checkpoint(fsdp_and_ddp_runs):
    """2 ranks under FSDPStrategy + BlockWrapPolicy against 2 ranks under DDP, same seeds and data: the EMA is
    sharded like the weights on each rank, the logged gradient norm and the checkpoint (full state dict: net and
    EMA) equal DDP's, and load_module reads the sharded run's checkpoint as `sample` / `evaluate` do."""
    runs = fsdp_and_ddp_runs
    records = {name: [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)] for name, out in runs.items()}
    full = records["ddp"][0]["ema_shapes"]
    for rank in records["fsdp"]:  # each rank holds a flat slice of every EMA parameter, together all of it
        assert rank["net_type"] == "FullyShardedDataParallel"
        assert all(len(shape) == 1 for shape in rank["ema_shapes"])
    local = sum(shape[0] for rank in records["fsdp"] for shape in rank["ema_shapes"])
    assert local == sum(torch.Size(shape).numel() for shape in full)
    assert records["fsdp"][0]["grad_norms"] == pytest.approx(records["ddp"][0]["grad_norms"], rel=1e-5)
    assert len(records["fsdp"][0]["grad_norms"]) == 4

    sharded = torch.load(runs["fsdp"] / "last.ckpt", weights_only=True)
    reference = torch.load(runs["ddp"] / "last.ckpt", weights_only=True)
    assert sharded["global_step"] == 4 and sharded["ema_state"] == reference["ema_state"]
    assert sorted(sharded["state_dict"]) == sorted(reference["state_dict"])
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(sharded["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    moved = [k for k in reference["state_dict"] if k.startswith("ema.")
             and not torch.equal(reference["state_dict"][k], reference["state_dict"]["net." + k[4:]])]
    assert moved  # the EMA lags the net: the comparison covers updated averages, not copies

    module = load_module(str(runs["fsdp"] / "last.ckpt"))
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, sharded["state_dict"][key], msg=key)


def _power_ema_state(run, checkpoint: str = "last.ckpt") -> dict:
    return torch.load(run / checkpoint, weights_only=True)["callbacks"]["PowerEMA"]


@pytest.mark.slow
def test_power_ema_on_fsdp_shards_snapshots_and_reconstructs_as_under_ddp(fsdp_and_ddp_runs, tmp_path, capsys):
    """PowerEMA under FSDPStrategy: each rank keeps flat slices of every average (adding up to the whole); the
    snapshot files (gathered to rank 0) and the checkpoint's averages equal the DDP run's to float rounding, and
    `diffusion-pl reconstruct-ema` makes the same checkpoint from either run's snapshots."""
    runs = fsdp_and_ddp_runs
    records = {name: [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)] for name, out in runs.items()}
    full = records["ddp"][0]["power_ema_shapes"]
    for rank in records["fsdp"]:
        assert all(len(shape) == 1 for averages in rank["power_ema_shapes"] for shape in averages)
    for i in range(2):  # per sigma_rel and parameter, the two ranks' slices add up to the parameter
        local = [a[0] + b[0] for a, b in zip(*(rank["power_ema_shapes"][i] for rank in records["fsdp"]))]
        assert local == [torch.Size(shape).numel() for shape in full[i]]

    names = [p.name for _, p in list_snapshot_files(runs["ddp"] / "phema")]
    assert len(names) == 4 and names == [p.name for _, p in list_snapshot_files(runs["fsdp"] / "phema")]
    for name in names:
        sharded, reference = (torch.load(run / "phema" / name, weights_only=True) for run in runs.values())
        assert {k: v for k, v in sharded.items() if k != "state_dict"} == \
            {k: v for k, v in reference.items() if k != "state_dict"}
        assert list(sharded["state_dict"]) == list(reference["state_dict"])  # buffers included, same order
        for key, value in reference["state_dict"].items():
            assert sharded["state_dict"][key].shape == value.shape
            torch.testing.assert_close(sharded["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
    last = torch.load(runs["ddp"] / "last.ckpt", weights_only=True)["state_dict"]
    final = torch.load(runs["ddp"] / "phema" / names[-2], weights_only=True)  # step 4, sigma_rel 0.05
    assert any(not torch.equal(final["state_dict"][k], last[f"net.{k}"]) for k in final["averaged"])  # averaged

    sharded, reference = (_power_ema_state(run) for run in runs.values())
    assert (sharded["step"], sharded["nimg"]) == (reference["step"], reference["nimg"]) == (4, 32)
    for ours, theirs in zip(sharded["averages"], reference["averages"], strict=True):
        assert list(ours) == list(theirs)
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value.cpu(), rtol=1e-5, atol=1e-6, msg=key)

    for name, run in runs.items():
        assert main(["reconstruct-ema", "--run", str(run), "--sigma_rel", "0.07", "--out",
                     str(tmp_path / f"{name}.ckpt")]) == 0
    assert "4 snapshots" in capsys.readouterr().err
    sharded, reference = (torch.load(tmp_path / f"{name}.ckpt", weights_only=True)["state_dict"] for name in runs)
    assert sorted(sharded) == sorted(reference)
    for key, value in reference.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_power_ema_under_fsdp_resumes_exactly(fsdp_and_ddp_runs, tmp_path):
    """Resumed under FSDPStrategy from the step-2 checkpoint (whole averages, cut back into each rank's slices),
    2 more steps give bit for bit the straight run's averages and step-4 snapshots; resumed under FSDPStrategy
    from the DDP run's step-2 checkpoint, the same to float rounding."""
    straight = fsdp_and_ddp_runs["fsdp"]
    early = "checkpoints/epoch=0-step=2.ckpt"
    state = _power_ema_state(straight, early)
    full = json.loads((fsdp_and_ddp_runs["ddp"] / "rank0.json").read_text())["power_ema_shapes"]
    assert state["step"] == 2 and [[list(v.shape) for v in averages.values()] for averages in state["averages"]] == full
    resumed = {name: tmp_path / name for name in ("fsdp", "ddp")}
    procs = [_run(["tests/workers/fsdp_fit.py", str(out), "fsdp", "--steps", "4", "--power-ema", "--resume",
                   str(fsdp_and_ddp_runs[name] / early)], 300) for name, out in resumed.items()]
    for proc in procs:
        _wait(proc, 300)
    reference = _power_ema_state(straight)
    for name, out in resumed.items():
        exact = {"rtol": 0, "atol": 0} if name == "fsdp" else {"rtol": 1e-5, "atol": 1e-6}
        ours = _power_ema_state(out)
        assert (ours["step"], ours["nimg"]) == (reference["step"], reference["nimg"]) == (4, 32)
        for mine, theirs in zip(ours["averages"], reference["averages"], strict=True):
            assert list(mine) == list(theirs)
            for key, value in theirs.items():
                torch.testing.assert_close(mine[key], value, **exact, msg=f"from {name}: {key}")
        names = [p.name for _, p in list_snapshot_files(out / "phema")]
        assert names == ["phema-000000004-0.05.pt", "phema-000000004-0.1.pt"]
        for snapshot in names:
            mine, theirs = (torch.load(run / "phema" / snapshot, weights_only=True) for run in (out, straight))
            for key, value in theirs["state_dict"].items():
                torch.testing.assert_close(mine["state_dict"][key], value, **exact,
                                           msg=f"from {name}: {snapshot} {key}")


@pytest.mark.slow
def test_ema_update_on_fsdp2_shards_equals_the_unsharded_update(tmp_path):
    """EMA.update on DTensor shards (torch FSDP2 `fully_shard`, 2 gloo ranks, units as BlockWrapPolicy names them),
    gathered to a full state dict, equals the same update on the whole tensors."""
    _wait(_run(["tests/workers/fsdp2_ema.py", str(tmp_path), "unet"], 300), 300)
    saved = torch.load(tmp_path / "full.pt", weights_only=True)
    shapes = saved["local_shapes"]
    reference = step_module("unet")
    step_module("unet", reference)
    whole = [list(p.shape) for p in reference.ema.parameters()]
    assert shapes[0] != whole  # the ranks held shards (dim 0 split), not copies
    assert all(a[0] + b[0] == w[0] for a, b, w in zip(shapes[0], shapes[1], whole))
    state = saved["state_dict"]
    assert sorted(state) == sorted(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-7, msg=key)
