"""Multi-node training and SLURM requeue, end to end through `diffusion-pl fit` in subprocesses.

- Two torchrun "nodes" on localhost (one CPU rank each, gloo) train into one shared run folder:
  both exit 0, the ranks trained on disjoint images, and every rank ends with the weights (net
  and EMA) of the final checkpoint, bit for bit.
- A SLURM job (SLURM variables set, a stand-in `scontrol` on PATH): SIGUSR1 makes Lightning save
  `<run>/hpc_ckpt_1.ckpt` and call `scontrol requeue <job id>`; the job is then killed (kill -9,
  or SIGTERM some steps later, which saves checkpoints/last.ckpt and exits 143) and the requeued
  command (`--ckpt_path last`) resumes from the newest checkpoint by step, bit-exactly (same
  weights, EMA and batches as a job that was never interrupted).
- A SIGUSR1 that lands inside an optimizer step still gives an hpc checkpoint of one step
  boundary (DeferredRequeue moves Lightning's save to the end of the step).

What each rank trained on and ended with is recorded by tests/support/multinode.py (a callback
given by class_path in the config), so these tests check the training's own inputs and outputs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.support.paths import repo_pythonpath

JOB_ID = "4242"

pytestmark = pytest.mark.slow


def _config(path: Path, probe: Path, max_steps: int, **probe_args: int) -> Path:
    probe_init = ", ".join([f'out: "{probe}"', *(f"{k}: {v}" for k, v in probe_args.items())])
    path.write_text(textwrap.dedent(f"""
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 1
          max_steps: {max_steps}
          enable_progress_bar: false
          enable_model_summary: false
          limit_val_batches: 0
          log_every_n_steps: 1
          callbacks:
            - class_path: tests.support.multinode.BatchProbe
              init_args: {{{probe_init}}}
        model:
          net:
            class_path: diffusion_pl.networks.unet.UNet
            init_args: {{model_channels: 8, channel_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [],
                         dropout: 0.0}}
          process: {{class_path: diffusion_pl.processes.variance_preserving.VPLinear}}
          ema_decay: 0.5
        data:
          class_path: diffusion_pl.data.datamodule.ShardDataModule
          init_args: {{shards: "builtin:shapes?size=8&count=64", batch_size: 4, num_workers: 0}}
    """))
    return path


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        env.pop(key, None)
    env.update({
        "PYTHONPATH": repo_pythonpath(),
        "DIFFUSION_PL_CACHE": str(tmp_path / "cache"),  # shared by the "nodes", as on a shared file system
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONUNBUFFERED": "1",
        **extra,
    })
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(probe: Path, rank: int, pid: int | None = None) -> list[dict]:
    """The probe's per-step records of one rank (of one process when pid is given)."""
    files = sorted(probe.glob(f"steps-rank{rank}-pid{pid if pid is not None else '*'}.jsonl"))
    # only whole lines: the test polls these files while the job appends to them
    return [json.loads(line) for f in files for line in f.read_text().split("\n")[:-1]]


def _final(probe: Path, rank: int, pid: int | None = None) -> dict:
    files = sorted(probe.glob(f"final-rank{rank}-pid{pid if pid is not None else '*'}.pt"))
    assert len(files) == 1, files
    return torch.load(files[0], weights_only=True)


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ"
    assert any(k.startswith("net.") for k in a) and any(k.startswith("ema.") for k in a), sorted(a)[:5]
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{what}: {key} differs"


def _kill(proc: subprocess.Popen) -> None:
    """Kill a subprocess started in its own session, with everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _tail(text: str | bytes | None, n: int = 4000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


# ----------------------------------------------------------------------------- torchrun, two nodes
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_torchrun_nodes_train_disjoint_data_to_identical_weights(tmp_path, rendezvous):
    """`static`: --master-addr/--master-port and --node-rank; `c10d`: the README's --rdzv-backend c10d."""
    steps = 4
    run, probe = tmp_path / "run", tmp_path / "probe"
    config = _config(tmp_path / "fit.yaml", probe, max_steps=steps)
    port = _free_port()
    env = _env(tmp_path)
    procs, outputs = [], []
    try:
        for node in (0, 1):
            if rendezvous == "static":
                where = ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
            else:  # node ranks are assigned by the rendezvous; the first agent to come hosts its store
                where = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mn"]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", *where,
                   "-m", "diffusion_pl", "fit", "--config", str(config), "--trainer.accelerator", "cpu",
                   "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.strategy", "ddp",
                   f"--trainer.default_root_dir={run}"]
            procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 150
        for proc in procs:
            outputs.append(_tail(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]))
    finally:
        for proc in procs:
            _kill(proc)
    for node, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {node} exited {proc.returncode}:\n{out}"

    records = [_records(probe, rank) for rank in (0, 1)]
    for rank, recs in enumerate(records):
        assert [(r["rank"], r["world_size"]) for r in recs] == [(rank, 2)] * steps
        assert [(r["before"], r["after"]) for r in recs] == [(s, s + 1) for s in range(steps)]
        assert all(len(r["hashes"]) == 4 for r in recs)  # batch_size images per rank and step
    seen = [{h for r in recs for h in r["hashes"]} for recs in records]
    assert len(seen[0]) > 1 and len(seen[1]) > 1, "a rank trained on copies of one image"
    assert not seen[0] & seen[1], f"{len(seen[0] & seen[1])} images were trained on by both ranks"

    # one shared run folder: the final checkpoint (written by rank 0), config, TensorBoard events
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1, sorted(p.relative_to(run) for p in run.rglob("*"))
    ckpt = torch.load(ckpts[0], weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == steps
    assert (run / "config.yaml").is_file()
    assert len(list(run.glob("events.out.tfevents.*"))) == 1, "only global rank 0 logs"
    finals = [_final(probe, rank) for rank in (0, 1)]
    assert finals[0]["global_step"] == finals[1]["global_step"] == steps
    _assert_same_state(finals[0]["state_dict"], finals[1]["state_dict"], "rank 0 vs rank 1")
    _assert_same_state(finals[1]["state_dict"], ckpt["state_dict"], "rank 1 vs the final checkpoint")


# ----------------------------------------------------------------------------- SLURM requeue
def _slurm_env(tmp_path: Path, bin_dir: Path) -> dict:
    return _env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", SLURM_JOB_ID=JOB_ID,
                SLURM_JOB_NAME="diffusion-test", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1",
                SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost",
                MASTER_PORT=str(_free_port()))


def _stand_in_scontrol(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexit 0\n')
    script.chmod(0o755)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job exited ({proc.returncode}) before {what}:\n{_tail(proc.communicate()[0])}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.05)


def _run_job(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=150, start_new_session=True,
                          check=False)


def _pids(probe: Path, exclude: int) -> list[int]:
    return sorted({int(p.name.split("-pid")[1].split(".")[0]) for p in probe.glob("steps-rank0-pid*.jsonl")} - {exclude})


@pytest.mark.parametrize("end", ["sigkill", "sigterm"])
def test_slurm_sigusr1_requeues_and_the_requeued_job_resumes_from_the_newest_checkpoint(tmp_path, end):
    """SIGUSR1 -> hpc_ckpt_1.ckpt + `scontrol requeue`; then the job ends as SLURM ends it at the time limit.

    `sigkill`: nothing more is saved, the requeued job resumes from the hpc checkpoint.
    `sigterm` (some steps later): PreemptionCheckpoint saves checkpoints/last.ckpt and exits 143; that
    one is newer by stored step, so the requeued job resumes from it.
    """
    run, probe, bin_dir, log = tmp_path / "run", tmp_path / "probe", tmp_path / "bin", tmp_path / "scontrol.log"
    _stand_in_scontrol(bin_dir, log)
    env = _slurm_env(tmp_path, bin_dir)
    # the job holds after step 3 until probe/release exists: SIGUSR1 lands between two optimizer
    # steps (test_slurm_hpc_checkpoint_saved_mid_step_is_consistent sends one inside a step)
    config = _config(tmp_path / "fit.yaml", probe, max_steps=10_000, pause_at_step=3)
    fit = [sys.executable, "-m", "diffusion_pl", "fit", "--config", str(config), f"--trainer.default_root_dir={run}"]
    hpc, last = run / "hpc_ckpt_1.ckpt", run / "checkpoints" / "last.ckpt"
    job = subprocess.Popen(fit, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        _wait_for(lambda: len(_records(probe, 0, job.pid)) >= 3, job, 120, "training step 3")
        job.send_signal(signal.SIGUSR1)  # SLURM's --signal=SIGUSR1@N before the time limit
        # the signal is only recorded; DeferredRequeue saves and requeues when this batch end goes on
        time.sleep(0.5)
        (probe / "release").touch()
        _wait_for(hpc.is_file, job, 60, "hpc_ckpt_1.ckpt")
        _wait_for(lambda: log.is_file() and log.read_text().strip(), job, 30, "scontrol call")
        hpc_step = torch.load(hpc, weights_only=True, map_location="cpu")["global_step"]
        if end == "sigkill":  # the time limit with no grace: the hpc checkpoint stays the newest one
            job.kill()
            job.communicate(timeout=30)
        else:  # some steps later, SIGTERM at the time limit: a last.ckpt newer than the hpc checkpoint
            _wait_for(lambda: _records(probe, 0, job.pid)[-1]["after"] > hpc_step, job, 60, "a step after the hpc one")
            job.send_signal(signal.SIGTERM)
            output = _tail(job.communicate(timeout=60)[0])
            assert job.returncode == 143, output
    finally:
        _kill(job)
    assert log.read_text().splitlines() == [f"requeue {JOB_ID}"]
    trained = [r["after"] for r in _records(probe, 0, job.pid)]
    assert hpc_step == 3 and trained[:3] == [1, 2, 3], (hpc_step, trained)
    if end == "sigkill":
        assert not list(run.glob("checkpoints/*.ckpt")), "only the hpc checkpoint should exist after kill -9"
        newest, newest_step = hpc, hpc_step
    else:
        newest, newest_step = last, torch.load(last, weights_only=True, map_location="cpu")["global_step"]
        assert newest_step == trained[-1] > hpc_step, (newest_step, trained, hpc_step)

    # the requeued job runs the same command with --ckpt_path last (as the README's sbatch script)
    target = newest_step + 2
    resumed = _run_job([*fit, "--ckpt_path", "last", f"--trainer.max_steps={target}"], env, tmp_path)
    assert resumed.returncode == 0, _tail(resumed.stderr)
    assert f"resuming from {newest} (step {newest_step})" in resumed.stderr, _tail(resumed.stderr)
    (pid,) = _pids(probe, exclude=job.pid)
    records = _records(probe, 0, pid)
    assert [(r["before"], r["after"]) for r in records] == [(newest_step, newest_step + 1), (newest_step + 1, target)]
    ckpts = [p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(ckpts) == 1, ckpts
    final = torch.load(ckpts[0], weights_only=False, map_location="cpu")
    assert final["global_step"] == target
    _assert_same_state(_final(probe, 0, pid)["state_dict"], final["state_dict"], "resumed job vs its checkpoint")

    # bit-exact: a job that was never interrupted, trained straight to the same step, ends the same
    straight_probe = tmp_path / "straight_probe"
    straight_cfg = _config(tmp_path / "straight.yaml", straight_probe, max_steps=target)
    straight = _run_job([sys.executable, "-m", "diffusion_pl", "fit", "--config", str(straight_cfg),
                         f"--trainer.default_root_dir={tmp_path / 'straight'}"], env, tmp_path)
    assert straight.returncode == 0, _tail(straight.stderr)
    reference = _final(straight_probe, 0)
    assert reference["global_step"] == target
    straight_hashes = [r["hashes"] for r in _records(straight_probe, 0)]
    assert straight_hashes[newest_step:] == [r["hashes"] for r in records], "the resumed job trained on other batches"
    _assert_same_state(reference["state_dict"], final["state_dict"], "straight job vs requeued job")


def test_slurm_hpc_checkpoint_saved_mid_step_is_consistent(tmp_path):
    """SIGUSR1 right after optimizer.step() of step 3: the hpc checkpoint must describe one step boundary."""
    run, probe, bin_dir, log = tmp_path / "run", tmp_path / "probe", tmp_path / "bin", tmp_path / "scontrol.log"
    _stand_in_scontrol(bin_dir, log)
    config = _config(tmp_path / "fit.yaml", probe, max_steps=6, signal_in_step=3)
    fit = [sys.executable, "-m", "diffusion_pl", "fit", "--config", str(config), f"--trainer.default_root_dir={run}"]
    done = _run_job(fit, _slurm_env(tmp_path, bin_dir), tmp_path)
    assert done.returncode == 0, _tail(done.stderr)
    assert log.read_text().splitlines() == [f"requeue {JOB_ID}"]
    ckpt = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True, map_location="cpu")
    adam_steps = sorted({int(state["step"]) for state in ckpt["optimizer_states"][0]["state"].values()})
    assert adam_steps == [ckpt["global_step"]], f"global_step {ckpt['global_step']}, optimizer steps {adam_steps}"
