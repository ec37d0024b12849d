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

from diffusion_pl.data.pixels import to_uint8
from diffusion_pl.evaluation.generation import generate
from diffusion_pl.evaluation.metrics.inception import WEIGHTS_ENV
from diffusion_pl.cli.main import main
from diffusion_pl.evaluation.bits_per_dim import dataset_bits_per_dim
from diffusion_pl.data.datamodule import ShardDataModule
from diffusion_pl.oracle import GaussianMixture
from diffusion_pl.prediction import EpsPrediction
from diffusion_pl.processes.variance_preserving import VPLinear
from diffusion_pl.sampling.posterior import DDIM
from diffusion_pl.sampling.edm import EDMStochastic
from diffusion_pl.sampling.grids import KarrasGrid
from tests.support.commands import DDIM_ETA1
from tests.support.evaluation import DATA, IMAGE_SIZE, STAND_IN

def sample(run, out, *args, sampler: tuple[str, ...] = ("ddim", "--steps", "2")) -> int:
    return main(["sample", "--ckpt_path", run["ckpt"], "--sampler", *sampler, "--out", str(out), *args])


def read_npz(path: Path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_fit_cli_builds_the_callbacks_from_yaml(run):
    rows = list(csv.DictReader(next(run["root"].rglob("metrics.csv")).open()))
    values = [float(r["fid6/heunode_1"]) for r in rows if r.get("fid6/heunode_1")]
    assert len(values) == 1 and math.isfinite(values[0])
    assert len(list(run["root"].rglob("samples/ddim_2_step2.png"))) == 1


def test_fit_logs_losses_and_evaluations_at_the_same_step(run):
    """The 2-step fit logs every step (the CLI's log_every_n_steps for short runs); the loss of step 2, the FID
    after it and its grid file all carry step 2, with the TrainingMonitor's scalars beside the loss."""
    rows = list(csv.DictReader(next(run["root"].rglob("metrics.csv")).open()))
    steps = lambda key: sorted(int(r["step"]) for r in rows if r.get(key))  # noqa: E731
    assert steps("train/loss") == [1, 2] and steps("fid6/heunode_1") == [2]
    for key in ("train/lr", "train/grad_norm", "train/images_per_sec", "train/sec_per_kimg", "train/ema_decay"):
        assert steps(key) == [1, 2], key
    assert list(run["root"].rglob("samples/ddim_2_step2.png"))


def test_sample_writes_a_grid_png(run, tmp_path, capsys):
    grid = tmp_path / "grids" / "g.png"
    assert sample(run, tmp_path / "s", "--num-samples", "5", "--npz", "--grid", str(grid), "--grid_nrow", "2") == 0
    with Image.open(grid) as image:  # 2 per row, 3 rows, 1-pixel padding
        assert image.size == (2 * (IMAGE_SIZE + 1) + 1, 3 * (IMAGE_SIZE + 1) + 1)
        first = np.asarray(image.convert("RGB"))[1:1 + IMAGE_SIZE, 1:1 + IMAGE_SIZE]
    samples = read_npz(tmp_path / "s" / f"samples_5x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz")["arr_0"]
    np.testing.assert_array_equal(first, samples[0])  # the top-left cell is sample 0
    assert not list((tmp_path / "s").glob("*.png"))  # --npz: the grid was made before the PNGs were removed
    assert sample(run, tmp_path / "t", "--num-samples", "2", "--grid", str(tmp_path / "t" / "g.png")) == 2
    assert "expected a path outside it" in capsys.readouterr().err


def test_sample_npz_resume_and_batch_size_invariance(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a"
    assert sample(run, out, "--num_samples", "6", "--batch_size", "4") == 0
    first = read_npz(out / f"samples_6x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz")
    assert first["arr_0"].dtype == np.uint8 and first["arr_0"].shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert first["arr_1"].tolist() == [0, 1, 2, 3, 4, 0]  # balanced labels i % 5
    # an interrupted run: three PNGs and the npz are missing, a half-written temporary is left
    for i in (1, 4, 5):
        (out / f"{i:06d}.png").unlink()
    (out / f"samples_6x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz").unlink()
    (out / ".000004.tmp-99999.png").write_bytes(b"partial")  # as fileio.atomic_path names it
    written = {}
    original = generate

    def counting(module, sampler, indices, *args, **kwargs):
        written["indices"] = list(indices)
        return original(module, sampler, indices, *args, **kwargs)

    monkeypatch.setattr("diffusion_pl.cli.sample.generate", counting)
    assert sample(run, out, "--num_samples", "6", "--batch_size", "2") == 0
    assert written["indices"] == [1, 4, 5]  # only the missing ones, each once
    assert "resuming: 3 of 6" in capsys.readouterr().err
    resumed = read_npz(out / f"samples_6x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz")
    np.testing.assert_array_equal(resumed["arr_0"], first["arr_0"])  # batch 2 == batch 4, bit for bit
    # one image per batch, npz only: the same images again, and no PNGs left behind
    assert sample(run, tmp_path / "b", "--num_samples", "6", "--batch_size", "1", "--npz") == 0
    np.testing.assert_array_equal(read_npz(tmp_path / "b" / f"samples_6x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz")["arr_0"],
                                  first["arr_0"])
    assert not list((tmp_path / "b").glob("*.png"))


def test_sample_refuses_to_overwrite_another_run(run, tmp_path, capsys):
    out = tmp_path / "s"
    assert sample(run, out, "--num_samples", "2", "--png") == 0
    assert sample(run, out, "--num_samples", "2", "--seed", "5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffusion-pl sample: error: --out") and "differs in seed" in err[-1]
    assert sample(run, out, "--num_samples", "2", "--seed", "5", "--overwrite") == 0
    assert json.loads((out / "sample_config.json").read_text())["seed"] == 5
    assert main(["sample", "--ckpt_path", run["ckpt"], "--sampler", "nope", "--num_samples", "1", "--out", str(out)]) == 2
    assert "expected one of" in capsys.readouterr().err


@pytest.mark.slow
def test_sample_full_spec_with_eta_is_recorded_and_resumes(run, tmp_path, capsys, ddim_spec):
    npz = f"samples_3x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz"
    assert sample(run, tmp_path / "short", "--num_samples", "3") == 0  # the short-name form: DDIM, eta = 0
    config = json.loads((tmp_path / "short" / "sample_config.json").read_text())
    assert config["sampler"] == ddim_spec(eta=0.0)  # the short name records the whole resolved spec too
    spec = '{"class_path": "diffusion_pl.sampling.posterior.DDIM", "init_args": {"steps": 2, "eta": 1.0}}'
    out = tmp_path / "eta1"
    assert sample(run, out, "--num_samples", "3", sampler=(spec,)) == 0
    assert json.loads((out / "sample_config.json").read_text())["sampler"] == ddim_spec(eta=1.0)
    eta0, eta1 = read_npz(tmp_path / "short" / npz)["arr_0"], read_npz(out / npz)["arr_0"]
    assert (eta0 != eta1).any()  # eta reached the sampler: DDIM's noise changed the images
    # the same spec resumes; the same spec with another eta is a different run
    (out / "000001.png").unlink()
    (out / npz).unlink()
    capsys.readouterr()
    assert sample(run, out, "--num_samples", "3", sampler=(spec,)) == 0
    assert "resuming: 2 of 3" in capsys.readouterr().err
    np.testing.assert_array_equal(read_npz(out / npz)["arr_0"], eta1)
    assert sample(run, out, "--num_samples", "3", sampler=(spec.replace("1.0", "0.5"),)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a different run (differs in sampler)" in err[0]
    # a full spec without steps takes --steps; equal to the short name's spec, so it resumes the short run
    full = '{"class_path": "diffusion_pl.sampling.posterior.DDIM"}'
    assert sample(run, tmp_path / "short", "--num_samples", "3", sampler=(full, "--steps", "2")) == 0
    # a folder written before specs were recorded (repr(sampler)) resumes too, and then records the spec
    legacy = tmp_path / "short" / "sample_config.json"
    legacy.write_text(json.dumps({**config, "sampler": repr(DDIM(steps=2))}))
    assert sample(run, tmp_path / "short", "--num_samples", "3") == 0
    assert json.loads(legacy.read_text()) == config
    legacy.write_text(json.dumps({**config, "sampler": repr(DDIM(steps=2, eta=1.0))}))
    assert sample(run, tmp_path / "short", "--num_samples", "3") == 2


def test_sample_yaml_spec_nested_grid_and_spec_file(run, tmp_path, monkeypatch, ddim_spec):
    used = []
    original = generate

    def recording(module, sampler, *args, **kwargs):
        used.append(sampler)
        return original(module, sampler, *args, **kwargs)

    monkeypatch.setattr("diffusion_pl.cli.sample.generate", recording)
    # YAML, as LightningCLI accepts it (EDM's stochastic sampler with churn)
    edm = "class_path: diffusion_pl.sampling.edm.EDMStochastic\ninit_args: {steps: 2, S_churn: 40}"
    assert sample(run, tmp_path / "edm", "--num_samples", "2", "--npz", sampler=(edm,)) == 0
    config = json.loads((tmp_path / "edm" / "sample_config.json").read_text())["sampler"]
    assert config["class_path"] == "diffusion_pl.sampling.edm.EDMStochastic"
    assert config["init_args"]["steps"] == 2 and config["init_args"]["S_churn"] == 40.0
    assert config["init_args"]["S_noise"] == 1.003  # the defaults are recorded too
    assert isinstance(used[-1], EDMStochastic) and used[-1].S_churn == 40.0
    # a nested grid object: KarrasGrid instead of DDIM's default log-SNR grid
    grid = {"class_path": "diffusion_pl.sampling.grids.KarrasGrid", "init_args": {"rho": 3}}
    spec = json.dumps({"class_path": "diffusion_pl.sampling.posterior.DDIM", "init_args": {"steps": 2, "grid": grid}})
    assert sample(run, tmp_path / "karras", "--num_samples", "2", "--npz", sampler=(spec,)) == 0
    resolved = ddim_spec(grid={"class_path": "diffusion_pl.sampling.grids.KarrasGrid",
                               "init_args": {"rho": 3.0, "max_noise_level": 80.0}})
    assert json.loads((tmp_path / "karras" / "sample_config.json").read_text())["sampler"] == resolved
    assert isinstance(used[-1].grid, KarrasGrid) and used[-1].grid.rho == 3.0  # the grid reached the sampler
    # the same spec from a .yaml file (class names resolved, steps from --steps): the same run, so it resumes
    file = tmp_path / "sampler.yaml"
    file.write_text("class_path: DDIM\ninit_args:\n  grid: {class_path: KarrasGrid, init_args: {rho: 3}}\n")
    assert sample(run, tmp_path / "karras", "--num_samples", "2", "--npz", sampler=(str(file), "--steps", "2")) == 0
    assert used[-1].steps == 2 and used[-1].grid.rho == 3.0
    file.write_text(file.read_text().replace("rho: 3", "rho: 5"))  # another grid: another run
    assert sample(run, tmp_path / "karras", "--num_samples", "2", "--npz", sampler=(str(file), "--steps", "2")) == 2


SPEC_ERRORS = [  # (--sampler and other arguments, what the one line says)
    (['{"class_path": "diffusion_pl.sampling.NoSuchSampler"}'], "has no attribute 'NoSuchSampler'"),
    (['{"class_path": "diffusion_pl.sampling.grids.KarrasGrid"}'], "does not correspond to a subclass of Sampler"),
    (['{"class_path": "this.Sampler"}'], "this.Sampler lies outside the packages diffusion_pl and torch"),
    (['{"class_path": "DDIM", "init_args": {"grid": "{class_path: this.Grid}"}}'], "this.Grid lies outside"),
    (['{"class_path": "diffusion_pl.sampling.posterior.DDIM", "init_args": {"eta": "high"}}'], "init_args.eta: Expected a"),
    (['{"class_path": "diffusion_pl.sampling.posterior.DDIM", "init_args": {"eta": -1}}'], "eta must be >= 0"),
    (['{"class_path": "diffusion_pl.sampling.posterior.DDIM", "init_args": {"steps": 3}}', "--steps", "2"], "both set steps"),
    (['{"class_path": "diffusion_pl.sampling.posterior.DDIM"'], "is not valid JSON / YAML"),
    (["missing.yaml"], "the file does not exist"),
    (["nope"], "expected one of"),
]


@pytest.mark.parametrize("sampler, message", SPEC_ERRORS, ids=[m for _, m in SPEC_ERRORS])
def test_sample_refuses_a_bad_sampler_spec_in_one_line(run, tmp_path, capsys, sampler, message):
    assert sample(run, tmp_path / "out", "--num_samples", "1", sampler=tuple(sampler)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffusion-pl sample: error: --") and message in err[0], err
    assert "expected" in err[0] and not (tmp_path / "out").exists()
    assert "this" not in sys.modules  # a spec names a module outside diffusion_pl / torch: it is not imported


def test_evaluate_checks_the_sampler_specs_before_any_work(run, tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise AssertionError("evaluate reached the Inception weights before checking --sampler")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert main(["evaluate", "--ckpt_path", run["ckpt"], "--data", DATA, "--num_samples", "4", "--sampler", "ddim",
                 '{"class_path": "diffusion_pl.sampling.posterior.DDIM", "init_args": {"eta": "high"}}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffusion-pl evaluate: error: --sampler") and "init_args.eta" in err[0]


@pytest.mark.slow
def test_sample_two_processes_match_one(run, tmp_path):
    assert sample(run, tmp_path / "one", "--num_samples", "5", "--batch_size", "5") == 0
    env = {**os.environ, **run["env"], "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffusion_pl", "sample", "--ckpt_path", run["ckpt"], "--sampler", "ddim", "--steps", "2",
           "--num_samples", "5", "--batch_size", "2", "--devices", "2", "--accelerator", "cpu",
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = f"samples_5x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz"
    one, two = read_npz(tmp_path / "one" / name), read_npz(tmp_path / "two" / name)
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])


def test_evaluate_checkpoint_and_its_samples_agree(run, tmp_path, capsys, ddim_spec):
    report = tmp_path / "report.json"
    # a short name and a full spec (its steps from --steps), scored side by side
    assert main(["evaluate", "--ckpt_path", run["ckpt"], "--data", DATA, "--num_samples", "6", "--sampler", "ddim",
                 DDIM_ETA1, "--steps", "2", "--batch_size", "4", "--isc", "--feature_extractor", STAND_IN,
                 "--report", str(report)]) == 0
    assert "fid6" in capsys.readouterr().out  # the table names the sample count
    r = json.loads(report.read_text())
    assert r["protocol"]["n"] == 6 and r["protocol"]["reference"]["n"] == int(DATA.rsplit("=", 1)[1])
    assert r["seed_range"] == [0, 5] and r["ema"] is True and len(r["checkpoint_sha256"]) == 64
    point, stochastic = r["results"]
    # DDIM's steps count network evaluations (diffusers' num_inference_steps): 2 steps are 2 evaluations
    assert point["name"] == "ddim_2" and point["nfe"] == 2 and math.isfinite(point["fid"]) and "is" in point
    assert point["sampler"] == ddim_spec(eta=0.0) and stochastic["sampler"] == ddim_spec(eta=1.0)
    assert stochastic["name"] == "ddim_2#2" and stochastic["steps"] == 2 and stochastic["fid"] != point["fid"]
    # the same samples written by `sample`, scored from the PNG folder and from the npz
    assert sample(run, tmp_path / "s", "--num_samples", "6") == 0
    for source in (tmp_path / "s", tmp_path / "s" / f"samples_6x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz"):
        assert main(["evaluate", "--samples", str(source), "--data", DATA, "--feature_extractor", STAND_IN,
                     "--report", str(tmp_path / "r2.json")]) == 0
        again = json.loads((tmp_path / "r2.json").read_text())["results"][0]
        assert again["n"] == 6 and again["fid"] == pytest.approx(point["fid"], rel=1e-6)


def test_evaluate_resizes_the_reference_to_the_samples_size(run, tmp_path, capsys):
    """8x8 samples against 16x16 shards: the reference is resized as training resizes, so the training
    pipeline's own 8x8 images score FID ~0 (against the unresized 16x16 images they would not)."""
    big = "builtin:shapes?size=16&count=48"
    dm = ShardDataModule(shards=big, val_shards=big, batch_size=16, num_workers=0, image_size=8, random_flip=False)
    dm.setup("validate")
    images = torch.cat([to_uint8(x) for x, _ in dm.val_dataloader()])
    assert images.shape == (48, 3, 8, 8)
    np.savez(tmp_path / "s.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    report = tmp_path / "r.json"
    assert main(["evaluate", "--samples", str(tmp_path / "s.npz"), "--data", big, "--feature_extractor", STAND_IN,
                 "--report", str(report)]) == 0
    assert "reference images resized from 16x16 to 8x8" in capsys.readouterr().err
    r = json.loads(report.read_text())
    assert r["protocol"]["reference"]["image_size"] == [8, 8]
    assert r["protocol"]["reference"]["stored_size"] == [16, 16]
    assert r["results"][0]["fid"] == pytest.approx(0.0, abs=1e-6)
    # non-square samples cannot be matched by the square resize: one line naming both sizes
    np.savez(tmp_path / "wide.npz", arr_0=np.zeros((4, 8, 6, 3), np.uint8))
    assert main(["evaluate", "--samples", str(tmp_path / "wide.npz"), "--data", big,
                 "--feature_extractor", STAND_IN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "samples are 8x6" in err[0] and "are 16x16" in err[0]


def test_evaluate_refuses_a_sample_folder_of_mixed_sizes_or_broken_files(run, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, side in enumerate((8, 8, 6)):
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(folder / f"{i:06d}.png")
    args = ["evaluate", "--samples", str(folder), "--data", DATA, "--feature_extractor", STAND_IN]
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
    assert main(["evaluate", "--ckpt_path", run["ckpt"], "--data", DATA, "--num_samples", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--inception_weights PATH" in err[0] and WEIGHTS_ENV in err[0]
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


def test_sample_clip_x0_clamps_the_final_images_and_is_recorded(run, tmp_path):
    """DDIM ends with x = x0_hat, so --clip_x0 0.1 keeps every pixel within 127.5 * (1 +- 0.1)."""
    out = tmp_path / "clip"
    assert sample(run, out, "--num_samples", "4", "--clip_x0", "0.1", "--npz") == 0
    images = read_npz(out / f"samples_4x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz")["arr_0"]
    assert images.min() >= 114 and images.max() <= 141
    assert json.loads((out / "sample_config.json").read_text())["clip_x0"] == 0.1
    assert sample(run, tmp_path / "free", "--num_samples", "4", "--npz") == 0
    free = read_npz(tmp_path / "free" / f"samples_4x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz")["arr_0"]
    assert free.max() - free.min() > 27  # the same samples unclipped span a wider range


def test_sample_refuses_a_checkpoint_whose_config_imports_elsewhere(run, tmp_path, capsys):
    """A checkpoint's config is code: a class_path outside the trusted packages needs --trust_config."""
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["process"]["class_path"] = "collections.OrderedDict"
    forged = tmp_path / "forged.ckpt"
    torch.save(ckpt, forged)
    capsys.readouterr()
    assert main(["sample", "--ckpt_path", str(forged), "--num_samples", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "collections.OrderedDict" in err[0] and "--trust_config" in err[0]
    assert not (tmp_path / "o").exists()


def test_ddpm_spec_with_variance_and_a_timestep_grid_parses():
    """Ho et al.'s protocol as a --sampler spec: DDPM's variance and a nested TimestepGrid reach the sampler."""
    from diffusion_pl.cli.common import CommandError
    from diffusion_pl.cli.sampler_spec import resolve_sampler
    from diffusion_pl.sampling.posterior import DDPM
    from diffusion_pl.sampling.grids import TimestepGrid

    spec = ('{"class_path": "ddpm", "init_args": {"variance": "fixedlarge", "grid": '
            '{"class_path": "TimestepGrid", "init_args": {"spacing": "trailing"}}}}')
    sampler, resolved = resolve_sampler(spec, steps=100)
    assert isinstance(sampler, DDPM) and sampler.variance == "fixedlarge" and sampler.steps == 100
    assert isinstance(sampler.grid, TimestepGrid) and sampler.grid.spacing == "trailing"
    assert resolved == {"class_path": "diffusion_pl.sampling.posterior.DDPM", "init_args": {
        "steps": 100, "final_denoise": True, "variance": "fixedlarge",
        "grid": {"class_path": "diffusion_pl.sampling.grids.TimestepGrid",
                 "init_args": {"spacing": "trailing", "num_train_steps": None, "steps_offset": 0, "continuous": None}}}}
    sampler, _ = resolve_sampler("ddpm")  # the short name: 1000 steps, beta-tilde, the training timesteps
    assert sampler.steps == 1000 and sampler.variance == "fixedsmall" and isinstance(sampler.grid, TimestepGrid)
    with pytest.raises(CommandError, match="init_args.variance"):
        resolve_sampler('{"class_path": "ddpm", "init_args": {"variance": "large"}}')
