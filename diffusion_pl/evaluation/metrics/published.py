"""Published reference statistics: FID against an npz of `mu` / `sigma` instead of reference images.

ADM's reference batches (openai/guided-diffusion evaluations/README.md; for ImageNet 256,
`VIRTUAL_imagenet256_labeled.npz`) hold `mu` (2048,) and `sigma` (2048, 2048): the mean and covariance
of the pool3 features of the whole training set (plus `mu_s` / `sigma_s` for sFID and 10,000 images
`arr_0`). Their evaluator reads them as they are (evaluations/evaluator.py:167-171), computed with the
TF Inception graph `classify_image_graph_def.pb` (evaluator.py:20-23), fed uint8 images that the graph
itself resizes bilinearly to 299 x 299, output `pool_3:0` (evaluator.py:586-600). torch-fidelity's
InceptionV3 (`inception-v3-compat`, the extractor here) is a port of that graph with its TF1 bilinear
resize, so an FID against these statistics is ADM's protocol up to the port's floating-point differences.
Statistics made by any other extractor are only comparable with that extractor.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from diffusion_pl.utils.errors import MissingFileError, UserValueError
from diffusion_pl.utils.fileio import sha256_file
from diffusion_pl.evaluation.metrics.statistics import ReferenceStats

__all__ = ["NOMINAL_N", "ADM_PROTOCOL", "published_reference"]

NPZ_HELP = ("an npz with 'mu' (D,) and 'sigma' (D, D) of the extractor's features, as numpy.savez writes it (ADM's "
            "reference batches, e.g. VIRTUAL_imagenet256_labeled.npz)")
NOMINAL_N = 50_000  # the count when the npz gives none: mean and covariance do not depend on it
ADM_PROTOCOL = ("published mu / sigma of 2048-d pool3 features; ADM's evaluator computes them with the TF Inception "
                "graph classify_image_graph_def.pb (pool_3:0, the graph's own bilinear resize to 299x299), of which "
                "torch-fidelity's InceptionV3 here is a port: comparable up to the port's floating-point differences")


def published_reference(path: str | Path, dim: int | None = None,
                        what: str = "--ref_stats") -> tuple[ReferenceStats, dict]:
    """(ReferenceStats with the file's mean and covariance, info for the report); one-line errors for a missing
    file, a file that is not an npz, missing keys or dimensions other than (dim,) and (dim, dim)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist: expected {NPZ_HELP}")
    try:
        with np.load(path) as npz:
            keys = sorted(npz.keys())
            if "mu" not in keys or "sigma" not in keys:
                raise UserValueError(f"{what} {path} has keys {keys}: expected 'mu' and 'sigma' (reference feature "
                                     "mean and covariance)")
            mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
            n = int(npz["n"]) if "n" in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # a truncated npz is a BadZipFile
        if isinstance(err, UserValueError):
            raise
        raise UserValueError(f"{what} {path} is not an npz file ({type(err).__name__}): "
                             f"expected {NPZ_HELP}") from err
    d = mu.shape[0] if mu.ndim == 1 else None
    if d is None or sigma.shape != (d, d) or (dim is not None and d != dim):
        expected = f"({dim},) and ({dim}, {dim}), the feature extractor's dimension" if dim else "(D,) and (D, D)"
        raise UserValueError(f"{what} {path} has mu {mu.shape} and sigma {sigma.shape}: expected {expected}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserValueError(f"{what} {path} holds non-finite values: expected finite statistics")
    count = n if n is not None and n > 1 else NOMINAL_N
    mu_t, sigma_t = torch.from_numpy(mu), torch.from_numpy(sigma)
    # sums that give back exactly this mean and (unbiased) covariance: S = n mu, O = (n - 1) sigma + n mu mu^T
    stats = ReferenceStats(count, mu_t * count, sigma_t * (count - 1) + count * torch.outer(mu_t, mu_t))
    info = {"ref_stats": str(path), "ref_stats_sha256": sha256_file(path), "n": n, "dim": d}
    return stats, info
