"""`diffusion-pl sample` and `diffusion-pl evaluate` on a checkpoint made by `diffusion-pl fit`."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _eval_setup import DATA, IMAGE_SIZE
from diffusion_pl import metrics
from diffusion_pl.cli import main
from diffusion_pl.commands.evaluate import dataset_bits_per_dim
from diffusion_pl.data import ShardDataModule
from diffusion_pl.oracle import GaussianMixture
from diffusion_pl.prediction import EpsPrediction
from diffusion_pl.processes import VPLinear

TESTS = Path(__file__).parent
STAND_IN = "_eval_setup.StandInFeatures"

FIT_CONFIG = f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: ROOT, name: csv}}
  callbacks:
    - class_path: diffusion_pl.callbacks.sample_grid.SampleGrid
      init_args:
        every_n_steps: 2
        num_samples: 5
        sampler: [{{class_path: diffusion_pl.sampling.DDIM, init_args: {{steps: 2}}}}]
    - class_path: diffusion_pl.callbacks.fid.FIDCallback
      init_args:
        every_n_steps: 2
        num_samples: 6
        sampler: {{class_path: diffusion_pl.sampling.HeunODE, init_args: {{steps: 1}}}}
        feature_extractor: {{class_path: {STAND_IN}}}
model:
  net:
    class_path: diffusion_pl.networks.UNet
    init_args: {{img_resolution: {IMAGE_SIZE}, model_channels: 8, channel_mult: [1, 2], num_res_blocks: 1,
                attn_resolutions: [], dropout: 0.0, num_classes: 5}}
  process: {{class_path: diffusion_pl.processes.VPLinear}}
  ema_decay: 0.5
data:
  class_path: diffusion_pl.data.ShardDataModule
  init_args: {{shards: "{DATA}", batch_size: 8, num_workers: 0}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step `diffusion-pl fit` (callbacks from YAML by class_path); yields its folder and checkpoint."""
    root = tmp_path_factory.mktemp("fit")
    env = {"DIFFUSION_PL_CACHE": str(root / "cache"), "TORCH_HOME": str(root / "torch")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv(metrics.WEIGHTS_ENV, raising=False)
        config = root / "fit.yaml"
        config.write_text(FIT_CONFIG.replace("ROOT", str(root)))
        assert main(["fit", "--config", str(config), f"--trainer.default_root_dir={root}"]) == 0
        yield {"root": root, "ckpt": str(next(root.rglob("*.ckpt"))), "env": env}


def sample(run, out, *args) -> int:
    return main(["sample", "--ckpt", run["ckpt"], "--sampler", "ddim", "--steps", "2", "--out", str(out), *args])


def read_npz(path: Path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_fit_cli_builds_the_callbacks_from_yaml(run):
    rows = list(csv.DictReader(next(run["root"].rglob("metrics.csv")).open()))
    values = [float(r["fid6/heunode_1"]) for r in rows if r.get("fid6/heunode_1")]
    assert len(values) == 1 and math.isfinite(values[0])
    assert len(list(run["root"].rglob("samples/ddim_2_step2.png"))) == 1


def test_sample_npz_resume_and_batch_size_invariance(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a"
    assert sample(run, out, "--num-samples", "6", "--batch-size", "4") == 0
    first = read_npz(out / f"samples_6x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz")
    assert first["arr_0"].dtype == np.uint8 and first["arr_0"].shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert first["arr_1"].tolist() == [0, 1, 2, 3, 4, 0]  # balanced labels i % 5
    # an interrupted run: three PNGs and the npz are missing, a half-written temporary is left
    for i in (1, 4, 5):
        (out / f"{i:06d}.png").unlink()
    (out / f"samples_6x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz").unlink()
    (out / ".000004.png.tmp").write_bytes(b"partial")
    written = {}
    original = metrics.generate

    def counting(module, sampler, indices, *args, **kwargs):
        written["indices"] = list(indices)
        return original(module, sampler, indices, *args, **kwargs)

    monkeypatch.setattr("diffusion_pl.commands.sample.generate", counting)
    assert sample(run, out, "--num-samples", "6", "--batch-size", "2") == 0
    assert written["indices"] == [1, 4, 5]  # only the missing ones, each once
    assert "resuming: 3 of 6" in capsys.readouterr().err
    resumed = read_npz(out / f"samples_6x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz")
    np.testing.assert_array_equal(resumed["arr_0"], first["arr_0"])  # batch 2 == batch 4, bit for bit
    # one image per batch, npz only: the same images again, and no PNGs left behind
    assert sample(run, tmp_path / "b", "--num-samples", "6", "--batch-size", "1", "--npz") == 0
    np.testing.assert_array_equal(read_npz(tmp_path / "b" / f"samples_6x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz")["arr_0"],
                                  first["arr_0"])
    assert not list((tmp_path / "b").glob("*.png"))


def test_sample_refuses_to_overwrite_another_run(run, tmp_path, capsys):
    out = tmp_path / "s"
    assert sample(run, out, "--num-samples", "2", "--png") == 0
    assert sample(run, out, "--num-samples", "2", "--seed", "5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffusion-pl sample: error: --out") and "differs in seed" in err[-1]
    assert sample(run, out, "--num-samples", "2", "--seed", "5", "--overwrite") == 0
    assert json.loads((out / "sample_config.json").read_text())["seed"] == 5
    assert main(["sample", "--ckpt", run["ckpt"], "--sampler", "nope", "--num-samples", "1", "--out", str(out)]) == 2
    assert "expected one of" in capsys.readouterr().err


def test_sample_two_processes_match_one(run, tmp_path):
    assert sample(run, tmp_path / "one", "--num-samples", "5", "--batch-size", "5") == 0
    env = {**os.environ, **run["env"], "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffusion_pl", "sample", "--ckpt", run["ckpt"], "--sampler", "ddim", "--steps", "2",
           "--num-samples", "5", "--batch-size", "2", "--devices", "2", "--accelerator", "cpu",
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = f"samples_5x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz"
    one, two = read_npz(tmp_path / "one" / name), read_npz(tmp_path / "two" / name)
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])


def test_evaluate_checkpoint_and_its_samples_agree(run, tmp_path, capsys):
    report = tmp_path / "report.json"
    assert main(["evaluate", "--ckpt", run["ckpt"], "--data", DATA, "--num-samples", "6", "--sampler", "ddim",
                 "--steps", "2", "--batch-size", "4", "--isc", "--feature-extractor", STAND_IN,
                 "--report", str(report)]) == 0
    assert "fid6" in capsys.readouterr().out  # the table names the sample count
    r = json.loads(report.read_text())
    assert r["protocol"]["n"] == 6 and r["protocol"]["reference"]["n"] == int(DATA.rsplit("=", 1)[1])
    assert r["seed_range"] == [0, 5] and r["ema"] is True and len(r["checkpoint_sha256"]) == 64
    point = r["results"][0]
    assert point["name"] == "ddim_2" and point["nfe"] == 3 and math.isfinite(point["fid"]) and "is" in point
    # the same samples written by `sample`, scored from the PNG folder and from the npz
    assert sample(run, tmp_path / "s", "--num-samples", "6") == 0
    for source in (tmp_path / "s", tmp_path / "s" / f"samples_6x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz"):
        assert main(["evaluate", "--samples", str(source), "--data", DATA, "--feature-extractor", STAND_IN,
                     "--report", str(tmp_path / "r2.json")]) == 0
        again = json.loads((tmp_path / "r2.json").read_text())["results"][0]
        assert again["n"] == 6 and again["fid"] == pytest.approx(point["fid"], rel=1e-6)


def test_evaluate_resizes_the_reference_to_the_samples_size(run, tmp_path, capsys):
    """8x8 samples against 16x16 shards: the reference is resized as training resizes, so the training
    pipeline's own 8x8 images score FID ~0 (against the unresized 16x16 images they would not)."""
    big = "builtin:shapes?size=16&count=48"
    dm = ShardDataModule(shards=big, val_shards=big, batch_size=16, num_workers=0, image_size=8, random_flip=False)
    dm.setup("validate")
    images = torch.cat([metrics.to_uint8(x) for x, _ in dm.val_dataloader()])
    assert images.shape == (48, 3, 8, 8)
    np.savez(tmp_path / "s.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    report = tmp_path / "r.json"
    assert main(["evaluate", "--samples", str(tmp_path / "s.npz"), "--data", big, "--feature-extractor", STAND_IN,
                 "--report", str(report)]) == 0
    assert "reference images resized from 16x16 to 8x8" in capsys.readouterr().err
    r = json.loads(report.read_text())
    assert r["protocol"]["reference"]["image_size"] == [8, 8]
    assert r["protocol"]["reference"]["stored_size"] == [16, 16]
    assert r["results"][0]["fid"] == pytest.approx(0.0, abs=1e-6)
    # non-square samples cannot be matched by the square resize: one line naming both sizes
    np.savez(tmp_path / "wide.npz", arr_0=np.zeros((4, 8, 6, 3), np.uint8))
    assert main(["evaluate", "--samples", str(tmp_path / "wide.npz"), "--data", big,
                 "--feature-extractor", STAND_IN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "samples are 8x6" in err[0] and "are 16x16" in err[0]


def test_evaluate_refuses_a_sample_folder_of_mixed_sizes_or_broken_files(run, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, side in enumerate((8, 8, 6)):
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(folder / f"{i:06d}.png")
    args = ["evaluate", "--samples", str(folder), "--data", DATA, "--feature-extractor", STAND_IN]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "000002.png is 6x6 but 000000.png is 8x8" in err[0]
    (folder / "000002.png").write_bytes(b"not a png")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "000002.png cannot be read" in err[0]


def test_evaluate_without_inception_weights_fails_in_one_line(run, tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert main(["evaluate", "--ckpt", run["ckpt"], "--data", DATA, "--num-samples", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--inception-weights PATH" in err[0] and metrics.WEIGHTS_ENV in err[0]
    assert main(["evaluate", "--samples", str(tmp_path / "none"), "--data", DATA]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bits_per_dim_of_the_oracle_is_exact():
    """An exact model (Gaussian mixture on 1x2x2 images): the ODE bits/dim equals -log2 p(x)/D + 7 at bin centres.

    The likelihood tests check bits_per_dim in depth; this checks the command's chunking and reduction.
    """
    process, prediction = VPLinear(), EpsPrediction()
    g = torch.Generator().manual_seed(0)
    means = 0.4 * torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.2
    mixture = GaussianMixture(torch.tensor([1.0, 2.0, 3.0]), means, torch.tensor([0.15, 0.2, 0.25]))
    images = ((mixture.sample(5, g) + 1) * 128).floor().clamp(0, 255).to(torch.uint8).reshape(5, 1, 2, 2)
    out = dataset_bits_per_dim(mixture.model(process, prediction), process, prediction, images, batch_size=2,
                               dequantize=False, divergence="exact", dtype=torch.float64, rtol=1e-6, atol=1e-6,
                               prior_log_prob=lambda x_T: mixture.log_prob(x_T, process.t_max, process))
    x = 2.0 * (images.double().reshape(5, 4) + 0.5) / 256.0 - 1.0  # bin centres (no dequantization noise)
    exact = -mixture.log_prob(x, process.t_min, process) / (4 * math.log(2.0)) + 7.0
    assert out["n"] == 5 and out["bpd"] == pytest.approx(float(exact.mean()), abs=1e-3)
