"""FIDCallback(ref_stats=NPZ): FID against a published mu / sigma npz instead of reference images, and its one-line
refusals (both references, KID without features, a missing file, another feature dimension)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_pl.evaluation.fid_callback import FIDCallback
from diffusion_pl.utils.errors import UserError
from diffusion_pl.evaluation.generation import generate
from diffusion_pl.evaluation.metrics.statistics import extract, frechet_distance, gaussian_stats
from diffusion_pl.sampling.posterior import DDIM

DIM = 12  # StandInFeatures' feature dimension


def _npz(path, dim: int = DIM, seed: int = 0):
    """Known statistics: a mean and an SPD covariance drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim)) / dim
    mu, sigma = rng.normal(size=dim) * 0.3, a @ a.T + 0.01 * np.eye(dim)
    np.savez(path, mu=mu, sigma=sigma)
    return path, torch.from_numpy(mu), torch.from_numpy(sigma)


def test_fid_against_ref_stats_equals_the_frechet_distance(tmp_path, monkeypatch, stand_in_features, frozen_fit,
                                                             recording):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    path, mu, sigma = _npz(tmp_path / "ref.npz")
    extractor = stand_in_features()
    fid = recording(FIDCallback)(every_n_steps=2, num_samples=16, sampler=DDIM(steps=2), ref_stats=str(path),
                                 feature_extractor=extractor, batch_size=8)
    trainer = frozen_fit(tmp_path, [fid])
    assert set(fid.last) == {"fid16/ddim_2"}
    assert extractor.images_seen == 2 + 16  # the dimension probe, then the samples: no reference images
    assert not (tmp_path / "cache" / "fid_refs").exists()  # no reference statistics computed or cached
    # the same samples scored directly (frozen weights: the module after fit is the one the callback sampled)
    module = trainer.lightning_module
    images = torch.cat([batch[1] for batch in generate(module, DDIM(steps=2), range(16), fid.image_shape,
                                                       batch_size=8)])
    features = extract(stand_in_features(), images)[0]
    expected = frechet_distance(*gaussian_stats(features), mu, sigma)
    assert fid.last["fid16/ddim_2"] == pytest.approx(expected, rel=1e-5)
    assert expected > 0.1  # the known statistics are not the samples'


def _refused(fn, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


def test_ref_stats_refusals(tmp_path, stand_in_features, frozen_fit, recording):
    path, _, _ = _npz(tmp_path / "ref.npz")
    _refused(lambda: FIDCallback(data="builtin:shapes", ref_stats=str(path)), "both set: expected one reference")
    _refused(lambda: FIDCallback(ref_stats=str(path), kid=True), "kid=True with ref_stats: expected data:")
    wrong, _, _ = _npz(tmp_path / "wrong.npz", dim=5)
    for npz, match in [(tmp_path / "none.npz", "FIDCallback ref_stats .*none.npz does not exist"),
                       (wrong, r"FIDCallback ref_stats .*wrong.npz has mu \(5,\) and sigma \(5, 5\): expected "
                               r"\(12,\) and \(12, 12\)")]:
        fid = recording(FIDCallback)(every_n_steps=1, num_samples=4, sampler=DDIM(steps=1), ref_stats=str(npz),
                                     feature_extractor=stand_in_features())
        _refused(lambda: frozen_fit(tmp_path / npz.stem, [fid]), match)
        assert fid.image_shape is None  # refused at setup, before any training batch
