"""FD_DINOv2 as EDM2 computes it: DINOv2's preprocessing and position embeddings, the Frechet formula, the preflight.

With DIFFUSION_PL_EDM2_REPO and DIFFUSION_PL_DINOV2_REPO set to checkouts of NVlabs/edm2 and
facebookresearch/dinov2, `test_features_equal_edm2_detector_on_torch_hub_model` runs EDM2's own detector
around torch hub's model code (random weights) beside the extractor here; it is skipped otherwise.
"""

from __future__ import annotations

import math
import os
import sys
import time
import urllib.request
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from diffusion_pl.evaluation.metrics.dinov2 import (DINOV2_URL, DINOV2_WEIGHTS_ENV, DINOv2Features,
                                                    DINOv2WeightsError, hub_state_dict_to_timm, load_dinov2)
from diffusion_pl.evaluation.metrics.statistics import SampleMetrics, gaussian_stats, reference_stats

SMALL = "vit_small_patch14_dinov2"  # the same family as EDM2's ViT-L/14, small enough for every test run


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(DINOV2_WEIGHTS_ENV, raising=False)


@pytest.fixture(scope="module")
def small() -> DINOv2Features:
    torch.manual_seed(0)
    return DINOv2Features(arch=SMALL)


def _hub_state_dict(net: torch.nn.Module, grid: int = 37, seed: int = 1) -> dict:
    """A state_dict laid out as torch hub's DINOv2 (518 x 518 position embeddings, a mask_token), random values."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in net.state_dict().items()}
    state["pos_embed"] = torch.randn(1, 1 + grid * grid, state["pos_embed"].shape[-1], generator=g)
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return state


def test_preprocessing_is_edm2s(small):
    """EDM2's DINOv2Detector (NVlabs/edm2 calculate_metrics.py:62-77, resize_mode 'torch'), written out here."""
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = F.interpolate(images.to(torch.float32), size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, -1, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).reshape(1, -1, 1, 1)
    torch.testing.assert_close(small.preprocess(images), x, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(small(images), small.net(x), rtol=0, atol=0)
    assert small(images).shape == (2, 384) and small.num_features == 384


def test_position_embeddings_are_resampled_as_torch_hub_does(small):
    """torch hub's DINOv2 resamples its 37 x 37 position embeddings at each call (facebookresearch/dinov2
    dinov2/models/vision_transformer.py:180-212, interpolate_offset 0.1 and no antialias by
    dinov2/hub/backbones.py:27-28); the loaded model holds the same 16 x 16 embeddings."""
    state = _hub_state_dict(small.net)
    pos = state["pos_embed"]
    m, w0 = 37, 224 // 14
    patches = F.interpolate(pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
                            scale_factor=(float(w0 + 0.1) / m, float(w0 + 0.1) / m))
    expected = torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], 1)
    converted = hub_state_dict_to_timm(state, small.net)
    torch.testing.assert_close(converted["pos_embed"], expected, rtol=0, atol=0)
    assert "mask_token" not in converted and converted.keys() == small.net.state_dict().keys()
    # timm's own resampling (antialiased, to the exact size) would give other embeddings
    from timm.layers import resample_abs_pos_embed
    timm_way = resample_abs_pos_embed(pos, new_size=(w0, w0), num_prefix_tokens=1)
    assert (timm_way - expected).abs().max() > 1e-2


def test_weights_file_round_trip_and_fingerprint(tmp_path, small):
    file = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(_hub_state_dict(small.net), file)
    loaded = DINOv2Features(file, arch=SMALL)
    assert loaded.fingerprint == DINOv2Features(file, arch=SMALL).fingerprint != small.fingerprint
    converted = hub_state_dict_to_timm(torch.load(file, weights_only=True), loaded.net)
    assert all(torch.equal(v, converted[k]) for k, v in loaded.net.state_dict().items())


@pytest.mark.slow
def test_fd_dinov2_is_edm2s_frechet_formula(small):
    """FD_DINOv2 of SampleMetrics' `others` equals EDM2's calculate_metrics_from_stats (calculate_metrics.py:266-269:
    scipy's sqrtm of the covariance product) on the same features, and FID's own path on them."""
    real = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8)
    fake = (real.int() // 2 + 40).to(torch.uint8)
    with torch.no_grad():
        f_real, f_fake = small(real).double(), small(fake).double()
    ref = reference_stats(iter(real.split(10)), "data", small, progress=False)
    metrics = SampleMetrics(small, ref, others=[("fd_dinov2", small, ref)])
    for batch in fake.split(7):
        metrics.update(batch)
    out = metrics.compute()
    (mu_r, sigma_r), (mu_f, sigma_f) = (tuple(t.numpy() for t in gaussian_stats(f)) for f in (f_real, f_fake))
    m = np.square(mu_f - mu_r).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma_f, sigma_r))  # EDM2 passes disp=False (deprecated in SciPy) for the same
    edm2 = float(np.real(m + np.trace(sigma_f + sigma_r - s * 2)))
    assert out["fd_dinov2"] == pytest.approx(edm2, rel=1e-4) and out["fd_dinov2"] == pytest.approx(out["fid"], rel=1e-9)
    assert math.isfinite(out["fd_dinov2"]) and out["fd_dinov2"] > 0


@pytest.mark.slow
def test_preflight_fails_in_one_line_without_weights(tmp_path, monkeypatch):
    def hang(*args, **kwargs):  # a network that never answers
        time.sleep(60)

    monkeypatch.setattr(urllib.request, "urlopen", hang)
    start = time.time()
    with pytest.raises(DINOv2WeightsError) as err:
        load_dinov2(download_timeout=0.5)
    assert time.time() - start < 5
    message = str(err.value)
    assert "\n" not in message and DINOV2_URL in message and "--dinov2_weights" in message
    assert DINOV2_WEIGHTS_ENV in message
    with pytest.raises(DINOv2WeightsError, match="does not exist"):
        load_dinov2(tmp_path / "none.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    monkeypatch.setenv(DINOV2_WEIGHTS_ENV, str(bad))
    with pytest.raises(DINOv2WeightsError, match="is not torch hub's DINOv2 ViT-L/14 state_dict"):
        load_dinov2()


@pytest.mark.slow
def test_vit_l14_with_random_weights_gives_1024_features():
    extractor = DINOv2Features()  # EDM2's architecture, timm's random initialisation
    with torch.no_grad():
        features = extractor(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert features.shape == (2, 1024) and torch.isfinite(features).all()


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("DIFFUSION_PL_EDM2_REPO") and os.environ.get("DIFFUSION_PL_DINOV2_REPO")),
                    reason="DIFFUSION_PL_EDM2_REPO / DIFFUSION_PL_DINOV2_REPO (checkouts of NVlabs/edm2 and "
                           "facebookresearch/dinov2) not set")
def test_features_equal_edm2_detector_on_torch_hub_model(tmp_path, monkeypatch):
    for repo in ("DIFFUSION_PL_EDM2_REPO", "DIFFUSION_PL_DINOV2_REPO"):
        monkeypatch.syspath_prepend(os.environ[repo])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checkouts' own warnings (xFormers missing)
        import calculate_metrics
        from dinov2.hub.backbones import _make_dinov2_model
        torch.manual_seed(0)
        hub = _make_dinov2_model(arch_name="vit_small", pretrained=False).eval()  # torch hub's dinov2_vits14 code
    with torch.no_grad():
        for name, p in hub.named_parameters():
            if "gamma" in name or "pos_embed" in name:
                p.normal_(0, 0.5)  # layer scales and embeddings far from their initial values
    torch.save(hub.state_dict(), tmp_path / "hub.pth")
    detector = calculate_metrics.DINOv2Detector.__new__(calculate_metrics.DINOv2Detector)  # no download
    detector.resize_mode, detector.model = "torch", hub
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(DINOv2Features(tmp_path / "hub.pth", arch=SMALL)(images), detector(images),
                                   rtol=1e-5, atol=1e-5)
    sys.modules.pop("calculate_metrics", None)
