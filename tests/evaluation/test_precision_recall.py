"""Precision / recall (Kynkaanniemi et al. 2019) against ADM's ManifoldEstimator, and the reference features kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_pl.evaluation.metrics.precision_recall import manifold_radii, precision_recall, reference_subset
from diffusion_pl.evaluation.metrics.statistics import ReferenceStats, SampleMetrics, reference_stats
from tests.support.evaluation import StandInFeatures


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))


# ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py), its algorithm in numpy, float32 distances (the
# path it falls back to when float16 overflows), row / column blocks as there but small, so the blocking is exercised
def _adm_distances(u, v):  # _batch_pairwise_distances, evaluator.py:414-430
    norm_u = np.sum(np.square(u), 1).reshape(-1, 1)
    norm_v = np.sum(np.square(v), 1).reshape(1, -1)
    return np.maximum(norm_u - 2 * u @ v.T + norm_v, 0.0)


def _adm_radii(features, k=3, rows=7, cols=11):  # ManifoldEstimator.manifold_radii, evaluator.py:248-281
    n = len(features)
    radii = np.zeros([n], dtype=np.float32)
    distance_batch = np.zeros([rows, n], dtype=np.float32)
    for begin1 in range(0, n, rows):
        end1 = min(begin1 + rows, n)
        for begin2 in range(0, n, cols):
            end2 = min(begin2 + cols, n)
            distance_batch[0:end1 - begin1, begin2:end2] = _adm_distances(features[begin1:end1], features[begin2:end2])
        radii[begin1:end1] = np.partition(distance_batch[0:end1 - begin1], np.arange(k + 1), axis=1)[:, k]
    return radii


def _adm_precision_recall(ref, sample, rows=7, cols=11):  # compute_prec_recall + evaluate_pr, evaluator.py:194-358
    radii_1, radii_2 = _adm_radii(ref), _adm_radii(sample)
    status_1, status_2 = np.zeros(len(ref), bool), np.zeros(len(sample), bool)
    for begin_1 in range(0, len(ref), rows):
        for begin_2 in range(0, len(sample), cols):
            d = _adm_distances(ref[begin_1:begin_1 + rows], sample[begin_2:begin_2 + cols])  # less_thans, :390-391
            status_1[begin_1:begin_1 + rows] |= (d <= radii_2[None, begin_2:begin_2 + cols]).any(1)
            status_2[begin_2:begin_2 + cols] |= (d <= radii_1[begin_1:begin_1 + rows, None]).any(0)
    return float(status_2.mean()), float(status_1.mean())  # (precision, recall)


def _features(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) * scale + shift


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.7, 1.0), (0.0, 0.6), (0.3, 1.5)])
def test_precision_recall_equal_adm_manifold_estimator(shift, scale):
    real, fake = _features(230, 16, seed=0), _features(170, 16, seed=1, shift=shift, scale=scale)
    ours = precision_recall(real, fake)
    theirs = _adm_precision_recall(real.numpy(), fake.numpy())
    assert ours == pytest.approx(theirs, abs=1e-12)
    torch.testing.assert_close(manifold_radii(real), torch.from_numpy(_adm_radii(real.numpy())), rtol=1e-5, atol=1e-6)


def test_precision_recall_read_as_the_paper_says():
    real = _features(300, 8, seed=2)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    # samples collapsed onto one data point (mode collapse): precise (inside the data) but with no recall
    collapsed = real[0] + 1e-3 * _features(50, 8, seed=3)
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall == pytest.approx(1 / 300)
    # samples far from the data: neither
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="expected more than k = 3"):
        precision_recall(real[:3], real)


def test_reference_subset_is_fixed_and_spread_over_the_data():
    keep = reference_subset(1000, 100)
    assert torch.equal(keep, reference_subset(1000, 100)) and keep.tolist() == sorted(set(keep.tolist()))
    assert len(keep) == 100 and int(keep.max()) < 1000
    # a class-sorted data set (10 blocks of 100) still gives every class a share
    assert set((keep // 100).tolist()) == set(range(10))
    assert torch.equal(reference_subset(50, 100), torch.arange(50))


@pytest.mark.parametrize("total", [40, None])
def test_reference_cache_keeps_the_subset_of_features(total):
    """A capped reference keeps the features of the same fixed subset whether picked while streaming (count known)
    or from all of them, and caches them apart from the all-features entry."""
    extractor = StandInFeatures()
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    every = reference_stats(iter(images.split(16)), "data", extractor, with_features=True, progress=False)
    capped = reference_stats(iter(images.split(16)), "data", extractor, with_features=12, total=total,
                             progress=False)
    assert every.features.shape == (40, 12) and capped.features.shape == (12, 12)
    torch.testing.assert_close(capped.features, every.features[reference_subset(40, 12)], rtol=0, atol=0)
    torch.testing.assert_close(capped.subset_features(12), every.subset_features(12), rtol=0, atol=0)
    torch.testing.assert_close(capped.outer_sum, every.outer_sum)
    with pytest.raises(ValueError, match="expected all 40 or the subset of 20"):
        capped.subset_features(20)


def test_sample_metrics_report_precision_recall_of_the_generated_features():
    extractor = StandInFeatures()
    real = torch.randint(0, 256, (60, 3, 8, 8), dtype=torch.uint8)
    fake = (real[:45].int() + torch.randint(-40, 40, (45, 3, 8, 8))).clamp(0, 255).to(torch.uint8)
    reference = reference_stats(iter(real.split(25)), "data", extractor, with_features=50, total=60, progress=False)
    metrics = SampleMetrics(extractor, reference, pr=True, pr_reference=50)
    for batch in fake.split(20):
        metrics.update(batch)
    out = metrics.compute()
    expected = precision_recall(extractor(real)[0][reference_subset(60, 50)], extractor(fake)[0])
    assert (out["precision"], out["recall"]) == pytest.approx(expected, abs=1e-12)
    assert 0 < out["precision"] <= 1 and 0 < out["recall"] <= 1
    with pytest.raises(ValueError, match="lack features"):
        SampleMetrics(extractor, ReferenceStats(2, torch.zeros(12), torch.eye(12)), pr=True)
