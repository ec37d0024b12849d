"""The CPU latent recipe through the commands: `fit` (configs/cpu_latent_tiny.yaml), `sample` and `evaluate` on
decoded pixels, and `evaluate --ref_stats` with published-style mu / sigma (and its one-line errors)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_pl.cli.main import main
from diffusion_pl.data.reference import reference_images
from diffusion_pl.evaluation.metrics.statistics import extract
from tests.support.evaluation import STAND_IN, StandInFeatures
from tests.support.paths import REPO

pytest.importorskip("diffusers")
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")]
IMAGES = "builtin:shapes?size=16&count=48"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """configs/cpu_latent_tiny.yaml for 3 steps (on-the-fly encoding); yields its folder and checkpoint."""
    root = tmp_path_factory.mktemp("latent_fit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFUSION_PL_CACHE", str(root / "cache"))
        assert main(["fit", "--config", str(REPO / "configs" / "cpu_latent_tiny.yaml"), "--trainer.max_steps=3",
                     f"--trainer.default_root_dir={root}", f"--data.init_args.shards={IMAGES}",
                     "--data.init_args.batch_size=8"]) == 0
        yield {"root": root, "ckpt": str(next(root.rglob("*.ckpt")))}


def test_the_recipe_trains_and_its_grid_is_decoded(run):
    ckpt = torch.load(run["ckpt"], weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 3
    assert all(k.startswith(("net.", "ema.")) for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["autoencoder"]["class_path"] == "diffusion_pl.codecs.autoencoder.Autoencoder"
    (grid,) = run["root"].rglob("samples/heunode_17_step3.png")
    with Image.open(grid) as im:  # 5 x 5 cells of 16 x 16 decoded pixels, 1-pixel padding
        assert im.size == (5 * 17 + 1, 5 * 17 + 1)


def test_sample_writes_decoded_pixels(run, tmp_path):
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt_path", run["ckpt"], "--num_samples", "3", "--sampler", "ddim", "--steps", "2",
                 "--out", str(out)]) == 0
    arr = np.load(out / "samples_3x16x16x3.npz")["arr_0"]
    assert arr.shape == (3, 16, 16, 3) and arr.dtype == np.uint8
    assert json.loads((out / "sample_config.json").read_text())["image_shape"] == [4, 8, 8]  # the latent shape


def _ref_npz(path: Path, **overrides) -> Path:
    """mu / sigma of the stand-in's features of IMAGES, as a published reference batch would hold them."""
    images, _, _ = reference_images(IMAGES, batch_size=16)
    features = torch.cat([extract(StandInFeatures(), batch)[0] for batch in images])
    arrays = {"mu": features.mean(0).numpy(), "sigma": torch.cov(features.T).numpy(), **overrides}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_evaluate_scores_decoded_samples_against_data_or_ref_stats(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(run["root"] / "cache"))
    common = ["evaluate", "--ckpt_path", run["ckpt"], "--num_samples", "4", "--sampler", "ddim", "--steps", "2",
              "--batch_size", "4", "--feature_extractor", STAND_IN]
    assert main([*common, "--data", IMAGES, "--report", str(tmp_path / "data.json")]) == 0
    npz = _ref_npz(tmp_path / "ref.npz")
    assert main([*common, "--ref_stats", str(npz), "--report", str(tmp_path / "npz.json")]) == 0
    by_data, by_npz = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("data", "npz"))
    assert by_npz["results"][0]["fid"] == pytest.approx(by_data["results"][0]["fid"], rel=1e-6)
    reference = by_npz["protocol"]["reference"]
    assert reference["ref_stats"] == str(npz) and reference["image_size"] == [16, 16] and reference["n"] is None
    assert "same feature extractor" in reference["protocol_note"]
    capsys.readouterr()
    bad = [(tmp_path / "none.npz", "does not exist"),
           (_ref_npz(tmp_path / "keys.npz", mu=None, sigma=None, m=np.zeros(3)), "expected 'mu' and 'sigma'"),
           (_ref_npz(tmp_path / "dims.npz", mu=np.zeros(5), sigma=np.eye(5)), r"expected \(12,\) and \(12, 12\)")]
    for path, match in bad:
        assert main([*common, "--ref_stats", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(match, err), err
    for args, match in (([*common, "--ref_stats", str(npz), "--data", IMAGES], "give one reference"),
                        ([*common, "--ref_stats", str(npz), "--kid"], "--kid with --ref_stats"),
                        # bits/dim of latents is not the images' likelihood
                        ([*common, "--data", IMAGES, "--bpd"], "a latent diffusion model: expected a pixel-space")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err


def test_fit_fills_the_latent_shape_of_image_data(tmp_path, capsys):
    """With model.autoencoder and image data, unset in_channels / img_resolution come from the latents (4, 8)."""
    assert main(["fit", "--config", str(REPO / "configs" / "cpu_latent_tiny.yaml"), "--trainer.max_steps=1",
                 f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.shards={IMAGES}",
                 "--data.init_args.batch_size=4", "--model.net.init_args.in_channels=null",
                 "--model.net.init_args.img_resolution=null", "--trainer.callbacks=[]"]) == 0
    assert "model.net in_channels=4, img_resolution=8 (from the data)" in capsys.readouterr().err

