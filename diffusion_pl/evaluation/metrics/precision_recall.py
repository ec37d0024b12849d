"""Improved precision and recall (Kynkaanniemi et al. 2019) with k = 3 nearest neighbours, as ADM's evaluator.

Each feature set stands for a manifold: the union of balls around its points, each ball's radius the
distance to the point's k-th nearest neighbour in its own set (the point itself not counted). Precision is
the fraction of generated samples inside the reference manifold, recall the fraction of reference images
inside the generated one. ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py) computes
them on Inception pool features of its reference batch (10,000 images for ImageNet) and of all samples:
`compute_prec_recall` (:194-202) takes the radii of both sets (`manifold_radii`, :248-281: squared
Euclidean distances, the value at index k of each row partitioned, index 0 being the point itself) and
counts the points within some ball (`evaluate_pr` and `DistanceBlock`, :325-411: distance <= radius,
:390-391). Distances here are squared Euclidean in float32, |u|^2 - 2 u.v + |v|^2 clamped at 0
(`_batch_pairwise_distances`, :414-430); ADM computes them in float16 first and falls back to float32 only
when float16 overflows (:374-384), so a point within float16 rounding of a radius can count differently there.

A reference of many images keeps a fixed random subset of their features (`reference_subset`): the
reference-statistics cache stores those, not all.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PR_NEIGHBOURS", "PR_REFERENCE", "reference_subset", "manifold_radii", "precision_recall"]

PR_NEIGHBOURS = 3  # k of ADM's ManifoldEstimator (nhood_sizes=(3,), evaluator.py:217)
PR_REFERENCE = 10_000  # reference features kept: the size of ADM's reference batches
_BLOCK_ELEMENTS = 1 << 27  # distances held at once (512 MB of float32)


def reference_subset(n: int, keep: int, seed: int = 0) -> Tensor:
    """Sorted indices of the `keep` of n reference images whose features are kept (all when keep >= n): a
    fixed random subset, so a class-sorted data set still gives every class its share."""
    if keep >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].sort().values


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]).clamp_(min=0)


def _rows(columns: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(columns, 1))


def manifold_radii(features: Tensor, k: int = PR_NEIGHBOURS) -> Tensor:
    """(N,) squared distance of each point to its k-th nearest neighbour in `features` (N, D), itself excluded."""
    if features.shape[0] <= k:
        raise ValueError(f"{features.shape[0]} feature vectors for precision / recall: expected more than k = {k}")
    features = features.float()
    rows = _rows(features.shape[0])
    # kthvalue(k + 1): the point itself, at distance 0, is the smallest of its row
    return torch.cat([_squared_distances(features[a:a + rows], features).kthvalue(k + 1, dim=1).values
                      for a in range(0, features.shape[0], rows)])


def _inside(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """(N,) whether each point lies within some centre's ball (squared distance <= its squared radius)."""
    rows = _rows(centres.shape[0])
    return torch.cat([(_squared_distances(points[a:a + rows], centres) <= radii[None]).any(1)
                      for a in range(0, points.shape[0], rows)])


def precision_recall(real: Tensor, fake: Tensor, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` (M, D) against reference features `real` (N, D)."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features for precision / recall have shapes {tuple(real.shape)} and {tuple(fake.shape)}: "
                         "expected (N, D) and (M, D)")
    real, fake = real.float(), fake.to(real.device).float()
    precision = _inside(fake, real, manifold_radii(real, k)).double().mean()
    recall = _inside(real, fake, manifold_radii(fake, k)).double().mean()
    return float(precision), float(recall)
