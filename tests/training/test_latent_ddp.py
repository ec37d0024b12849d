"""Latent diffusion under 2-rank CPU DDP, end to end: `prepare --encode` with the tiny VAE, then `diffusion-pl fit` of
configs/cpu_latent_tiny.yaml on the latent shards with trainer devices 2 / strategy ddp in a subprocess; its
checkpoint holds no autoencoder weights (but its spec) and `diffusion-pl sample` decodes it to pixels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_pl.cli.main import main
from diffusion_pl.cli.prepare import main as prepare_main
from tests.support.latent import TINY_VAE_CONFIG
from tests.support.paths import REPO, repo_pythonpath

pytest.importorskip("diffusers")
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")]
CLASSES = 5  # configs/cpu_latent_tiny.yaml's num_classes


def _encoded_shards(tmp_path: Path) -> Path:
    """40 seeded 16x16 noise PNGs in 5 class folders, encoded by the tiny VAE (config, seed 0) with both flips."""
    tree = tmp_path / "tree"
    for i in range(40):
        (tree / f"c{i % CLASSES}").mkdir(parents=True, exist_ok=True)
        image = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(image).save(tree / f"c{i % CLASSES}" / f"{i:02d}.png")
    out = tmp_path / "latents"
    assert prepare_main(["folder", str(tree), "--out", str(out), "--encode",
                         json.dumps({"config": TINY_VAE_CONFIG, "seed": 0}), "--accelerator", "cpu",
                         "--shard_size", "10"]) == 0
    return out


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        env.pop(key, None)
    env.update({"PYTHONPATH": repo_pythonpath(),
                "DIFFUSION_PL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
                "PYTHONUNBUFFERED": "1"})
    return env


def _run(cmd: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """Run `cmd` in its own session; on timeout kill it with the ranks it started."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
        pytest.fail(f"fit did not finish in {timeout} s:\n{out.decode(errors='replace')[-4000:]}")
    return proc.returncode, out.decode(errors="replace")


def test_two_rank_ddp_fit_on_latent_shards(tmp_path, monkeypatch, tiny_autoencoder):
    shards = _encoded_shards(tmp_path)
    run = tmp_path / "run"
    started = time.monotonic()
    code, out = _run([sys.executable, "-m", "diffusion_pl", "fit", "--config",
                      str(REPO / "configs" / "cpu_latent_tiny.yaml"), "--trainer.accelerator=cpu",
                      "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=3",
                      f"--trainer.default_root_dir={run}", f"--data.init_args.shards={shards}",
                      "--data.init_args.batch_size=4"], _env(tmp_path), timeout=120)
    elapsed = time.monotonic() - started
    assert code == 0, out[-4000:]
    assert "MEMBER: 2/2" in out, out[-2000:]  # Lightning started the second rank
    (ckpt_path,) = (run / "checkpoints").glob("last.ckpt")
    ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 3
    state = ckpt["state_dict"]
    assert state and all(k.startswith(("net.", "ema.")) for k in state)  # no autoencoder weights
    assert ckpt["autoencoder_spec"] == tiny_autoencoder(scale=0.5).spec()  # its identity instead
    (grid,) = run.rglob("samples/heunode_17_step3.png")  # the grid rank 0 wrote: decoded 16x16 cells
    with Image.open(grid) as im:
        assert im.size == (5 * 17 + 1, 5 * 17 + 1)
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    assert main(["sample", "--ckpt_path", str(ckpt_path), "--num_samples", "3", "--sampler", "ddim", "--steps", "2",
                 "--out", str(tmp_path / "samples")]) == 0
    arr = np.load(tmp_path / "samples" / "samples_3x16x16x3.npz")["arr_0"]
    assert arr.shape == (3, 16, 16, 3) and arr.dtype == np.uint8
    assert elapsed < 90, f"the 2-rank fit took {elapsed:.0f} s"
    print(f"2-rank latent fit: {elapsed:.1f} s")
