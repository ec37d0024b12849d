"""FID math, the uint8 protocol, the reference cache and the Inception preflight (no download needed)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torchmetrics.image import FrechetInceptionDistance

import diffusion_pl
from diffusion_pl.evaluation.metrics.inception import INCEPTION_URL, WEIGHTS_ENV, inception_weights_file
from diffusion_pl.evaluation.metrics import inception
from diffusion_pl.evaluation.metrics.inception import (InceptionFeatures, InceptionWeightsError, load_inception,
                                                       random_inception_weights)
from diffusion_pl.evaluation.metrics.statistics import SampleMetrics, frechet_distance, gaussian_stats, reference_stats
from diffusion_pl.data.pixels import to_uint8
from diffusion_pl.evaluation.generation import metric_prefix


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Fresh cache and torch hub folders, no weights from the environment."""
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)


class TableFeatures(nn.Module):
    """Extractor whose 'images' are indices (3 uint8 digits in base 256) into a fixed feature table."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        digits = x[:, :, 0, 0].long()  # (B, 3)
        features = self.table[digits[:, 0] * 65536 + digits[:, 1] * 256 + digits[:, 2]]
        return features, features  # the features double as IS logits


def index_images(indices: range) -> torch.Tensor:
    i = torch.tensor(list(indices))
    return torch.stack([i // 65536, i // 256 % 256, i % 256], 1).to(torch.uint8)[:, :, None, None]  # (B, 3, 1, 1)


def pipeline_fid(real: torch.Tensor, fake: torch.Tensor, **kwargs) -> dict:
    """The full path: reference_stats over real 'images', SampleMetrics over generated ones, in batches."""
    extractor = TableFeatures(torch.cat([real, fake]))
    n_real = real.shape[0]
    real_batches = (index_images(range(a, min(a + 500, n_real))) for a in range(0, n_real, 500))
    reference = reference_stats(real_batches, "table", extractor, with_features=kwargs.get("kid", False),
                                progress=False)  # the table is in the extractor's weights: its own cache key
    scores = SampleMetrics(extractor, reference, **kwargs)
    for a in range(n_real, n_real + fake.shape[0], 700):
        scores.update(index_images(range(a, min(a + 700, n_real + fake.shape[0]))))
    return scores.compute()


def gaussian(n: int, mu: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mu + torch.randn(n, mu.shape[0], generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T


def random_gaussian(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return torch.randn(dim, generator=g, dtype=torch.float64), a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def closed_form(mu1, cov1, mu2, cov2) -> float:
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 sqrtm(C1 C2)), with scipy's matrix square root."""
    root = scipy.linalg.sqrtm(cov1.numpy() @ cov2.numpy()).real
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * np.trace(root))


def test_frechet_distance_closed_form():
    (mu1, cov1), (mu2, cov2) = random_gaussian(6, 0), random_gaussian(6, 1)
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(closed_form(mu1, cov1, mu2, cov2), rel=1e-9)
    # commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2 + |mu1 - mu2|^2
    a, b = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    exact = float((a.sqrt() - b.sqrt()).square().sum()) + 3.0
    assert frechet_distance(torch.zeros(3), a.diag(), torch.ones(3), b.diag()) == pytest.approx(exact, rel=1e-12)
    assert frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_gaussian_features_matches_closed_form_and_torch_fidelity():
    (mu1, cov1), (mu2, cov2) = random_gaussian(4, 2), random_gaussian(4, 3)
    real, fake = gaussian(20_000, mu1, cov1, seed=4), gaussian(15_000, mu2, cov2, seed=5)
    fid = pipeline_fid(real, fake)["fid"]
    # the estimate from 20k / 15k samples is near the population value ...
    assert fid == pytest.approx(closed_form(mu1, cov1, mu2, cov2), rel=0.03)
    # ... and equals torch-fidelity's (TTUR / pytorch-fid formula) on the same features
    fidelity = fid_statistics_to_metric(fid_features_to_statistics(real), fid_features_to_statistics(fake), False)
    assert fid == pytest.approx(fidelity["frechet_inception_distance"], rel=1e-8)
    assert fid == pytest.approx(frechet_distance(*gaussian_stats(real), *gaussian_stats(fake)), rel=1e-8)


def test_fid_of_a_set_against_itself_is_zero():
    real = gaussian(3000, *random_gaussian(5, 6), seed=7)
    assert abs(pipeline_fid(real, real.clone())["fid"]) < 1e-6


def test_kid_and_is_wiring():
    real = gaussian(600, *random_gaussian(5, 8), seed=9)
    same = pipeline_fid(real, real.clone(), kid=True, kid_subsets=10, kid_subset_size=300)
    shifted = pipeline_fid(real, real + 1.0, kid=True, kid_subsets=10, kid_subset_size=300)
    assert abs(same["kid"]) < 3 * same["kid_std"] and shifted["kid"] > 10 * abs(same["kid"])
    # IS of identical logits is exactly 1 (every p(y|x) equals p(y))
    out = pipeline_fid(real, real[:1].expand(400, -1).clone(), isc=True, isc_splits=4)
    assert out["is"] == pytest.approx(1.0, abs=1e-6)


def test_uint8_protocol_rounds_and_clamps():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 1.7]).reshape(1, 1, 1, 7)
    u8 = to_uint8(x)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 3, 1, 7)  # grey repeated to RGB
    assert u8[0, 0, 0].tolist() == [0, 0, 0, 128, 191, 255, 255]
    # torchmetrics' normalize=True path would wrap 1.7 around instead of clamping
    assert ((x + 1) / 2 * 255).byte()[0, 0, 0, -1] != 255


def test_metric_prefix_names_the_sample_count():
    assert metric_prefix("fid", 50_000) == "fid"
    assert metric_prefix("fid", 10_000) == "fid10k"
    assert metric_prefix("kid", 500) == "kid500"


def test_reference_cache_is_reused(tmp_path, stand_in_features):
    extractor = stand_in_features()
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    first = reference_stats(iter(images.split(16)), "data-a", extractor, progress=False)
    seen = extractor.images_seen
    assert seen == 40 and len(list((tmp_path / "cache" / "fid_refs").glob("*.pt"))) == 1

    def never():
        raise AssertionError("the cached reference was recomputed")
        yield

    again = reference_stats(never(), "data-a", stand_in_features(), progress=False)  # same weights: same key
    torch.testing.assert_close(again.outer_sum, first.outer_sum, rtol=0, atol=0)
    mu, sigma = gaussian_stats(extractor(images)[0])
    torch.testing.assert_close(first.mu, mu)
    torch.testing.assert_close(first.sigma, sigma)
    # another extractor (other weights) or other data is another key
    reference_stats(iter(images.split(16)), "data-a", stand_in_features(seed=1), progress=False)
    reference_stats(iter(images.split(16)), "data-b", extractor, progress=False)
    assert len(list((tmp_path / "cache" / "fid_refs").glob("*.pt"))) == 3


def test_preflight_fails_fast_without_weights(monkeypatch):
    def hang(*args, **kwargs):  # a network that never answers
        time.sleep(60)

    monkeypatch.setattr(urllib.request, "urlopen", hang)
    start = time.time()
    with pytest.raises(InceptionWeightsError) as err:
        load_inception(download_timeout=0.5)
    assert time.time() - start < 5
    message = str(err.value)
    assert "\n" not in message
    assert "--inception_weights" in message and WEIGHTS_ENV in message and INCEPTION_URL in message
    with pytest.raises(InceptionWeightsError, match="does not exist"):
        load_inception("/nonexistent/inception.pth")


@pytest.mark.slow
def test_preflight_passes_with_a_weights_file(tmp_path, monkeypatch):
    path = random_inception_weights(tmp_path / "inception.pth", seed=3)  # torch-fidelity's format: a state_dict
    extractor = load_inception(str(path))
    assert isinstance(extractor, InceptionFeatures)
    images = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8)
    features, logits = extractor(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    # torchmetrics' FID extractor with torch-fidelity's resize (antialias=False) gives the same features
    # (to float32 rounding of the features' scale: random weights give features of order 1e-7); torchmetrics takes
    # `antialias` from 1.8 on, and its older extractor resized as torch-fidelity does
    import inspect

    options = {"antialias": False} if "antialias" in inspect.signature(FrechetInceptionDistance).parameters else {}
    tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path), **options)
    expected = tm.inception(images)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # the file is also found through the environment variable, and in torch hub's cache folder
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    assert inception_weights_file() == path
    monkeypatch.delenv(WEIGHTS_ENV)
    hub = inception._hub_weights_file()
    hub.parent.mkdir(parents=True)
    hub.write_bytes(path.read_bytes())
    assert inception_weights_file(download_timeout=0.01) == hub
    # a file that is not a state_dict fails in one line
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionWeightsError, match="is not a torch-fidelity InceptionV3 state_dict"):
        load_inception(str(bad))


@pytest.mark.slow
def test_generation_loads_without_the_metrics_stack():
    """Sample grids and `diffusion-pl sample` import generation, never diffusion_pl.evaluation.metrics (torch-fidelity)."""
    # `import lightning` itself imports torchmetrics (and so torch-fidelity), so for the callback the
    # check is that neither diffusion_pl.evaluation.metrics nor the FID callback is loaded
    code = ("import sys, diffusion_pl.evaluation.generation, diffusion_pl.cli.sample; "
            "assert 'torch_fidelity' not in sys.modules and 'torchmetrics' not in sys.modules, 'metrics stack'; "
            "import diffusion_pl.evaluation.sample_grid; "
            "loaded = [m for m in ('diffusion_pl.evaluation.metrics', 'diffusion_pl.evaluation.fid_callback') if m in sys.modules]; "
            "assert not loaded, loaded; "
            "from diffusion_pl.evaluation.fid_callback import FIDCallback; assert 'diffusion_pl.evaluation.metrics' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_package_does_not_use_unittest_mock():
    """Test doubles stay in tests/ (lightning imports unittest.mock itself, so the source is checked)."""
    package = Path(diffusion_pl.__file__).parent
    assert not [str(p) for p in package.rglob("*.py") if "unittest" in p.read_text()]
