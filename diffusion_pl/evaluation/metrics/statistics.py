"""Sample-quality statistics: FID (Heusel et al. 2017), KID (Binkowski et al. 2018), IS (Salimans et al. 2016),
precision / recall (Kynkaanniemi et al. 2019, precision_recall.py) and FD_DINOv2 (dinov2.py, EDM2's).

Frechet math, the on-disk reference-statistics cache, and SampleMetrics, which accumulates the
generated side with torchmetrics and reduces it over DDP ranks. A feature extractor is any nn.Module
mapping uint8 (B, 3, H, W) to features (B, D), or to a pair (features, logits); features are
computed once per batch (`extract`) and passed through to torchmetrics. Reference statistics are
computed once per (data, extractor, protocol, kept features) and cached as
`$DIFFUSION_PL_CACHE/fid_refs/<hash>.pt`; a further feature space (DINOv2) has its own entry, as its
extractor is part of the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.aggregation import CatMetric
from torchmetrics.image import FrechetInceptionDistance, InceptionScore, KernelInceptionDistance
from tqdm import tqdm

from diffusion_pl.utils.fileio import atomic_path
from diffusion_pl.evaluation.generation import rank_world
from diffusion_pl.evaluation.metrics.precision_recall import PR_NEIGHBOURS, PR_REFERENCE, precision_recall, reference_subset
from diffusion_pl.utils.paths import cache_dir

__all__ = ["PROTOCOL", "ReferenceStats", "SampleMetrics", "extract", "fingerprint", "reference_stats",
           "frechet_distance", "gaussian_stats"]

PROTOCOL = "uint8-round-clamp/rgb/v1"  # part of every cache key: bump when the image -> uint8 path changes


# ----------------------------------------------------------------------------- features and ranks
def extract(extractor: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """(features (B, D) float64, logits (B, K) or None) of uint8 images (B, 3, H, W)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images for the feature extractor have dtype {images.dtype}: expected torch.uint8")
    with torch.no_grad():
        out = extractor(images)
    features, logits = out if isinstance(out, (tuple, list)) else (out, None)
    return features.reshape(images.shape[0], -1).double(), logits


def _barrier() -> None:
    """Wait for every rank of the default process group (nothing outside one)."""
    if rank_world()[1] > 1:
        dist.barrier()


def _device(module: nn.Module) -> torch.device:
    """Where a module's tensors live (parameters or buffers), CPU for a stateless one."""
    return next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))


# ----------------------------------------------------------------------------- Frechet distance
def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, unbiased covariance) of features (N, D), in float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) (Frechet 1957; Dowson & Landau 1982, eq. 2)."""
    mu1, mu2, sigma1, sigma2 = (a.detach().double().cpu() for a in (mu1, mu2, sigma1, sigma2))
    # tr (S1 S2)^1/2 = sum sqrt(eig(S1^1/2 S2 S1^1/2)): a symmetric PSD matrix, so eigvalsh is exact
    # and stable, unlike sqrtm of the non-symmetric product
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    tr_covmean = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


# ----------------------------------------------------------------------------- reference statistics
@dataclass
class ReferenceStats:
    """Reference feature statistics: count, sum, sum of outer products (+ all features for KID, or the features of
    the `reference_subset` for precision / recall)."""

    n: int
    feature_sum: Tensor  # (D,) float64
    outer_sum: Tensor  # (D, D) float64
    features: Tensor | None = None  # (n, D) or (subset, D) float32

    def subset_features(self, keep: int) -> Tensor:
        """The features of `reference_subset(n, keep)`: picked from all features, or those kept."""
        if self.features is None:
            raise ValueError("reference statistics lack features: expected reference_stats(..., with_features=...) "
                             "for precision / recall")
        if self.features.shape[0] == self.n:
            return self.features[reference_subset(self.n, keep)]
        if self.features.shape[0] != min(keep, self.n):
            raise ValueError(f"reference statistics keep {self.features.shape[0]} features: expected all {self.n} or "
                             f"the subset of {min(keep, self.n)}")
        return self.features

    @property
    def mu(self) -> Tensor:
        return self.feature_sum / self.n

    @property
    def sigma(self) -> Tensor:
        mu = self.mu
        return (self.outer_sum - self.n * torch.outer(mu, mu)) / (self.n - 1)


def fingerprint(extractor: nn.Module) -> str:
    """sha256 of an extractor's class and weights (or its own `fingerprint` attribute)."""
    own = getattr(extractor, "fingerprint", None)
    if isinstance(own, str):
        return own
    h = hashlib.sha256(f"{type(extractor).__module__}.{type(extractor).__qualname__}".encode())
    for name, tensor in sorted(extractor.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_file(data_key: str, extractor_key: str, with_features: bool | int) -> Path:
    key = json.dumps({"data": data_key, "extractor": extractor_key, "protocol": PROTOCOL,
                      "features": with_features}, sort_keys=True)
    return cache_dir() / "fid_refs" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"


def _compute_reference(images: Iterable[Tensor], extractor: nn.Module, with_features: bool | int,
                       device: torch.device, progress: bool, total: int | None) -> ReferenceStats:
    n, feature_sum, outer_sum, kept = 0, None, None, []
    # a capped subset with a known total is picked while streaming; else all are kept and picked at the end
    keep = reference_subset(total, with_features) if _capped(with_features) and total is not None else None
    with tqdm(total=total, desc="reference statistics", unit="img", disable=not progress) as bar:
        for batch in images:
            features, _ = extract(extractor, (batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch).to(device))
            if feature_sum is None:
                feature_sum = features.new_zeros(features.shape[1])
                outer_sum = features.new_zeros(features.shape[1], features.shape[1])
            feature_sum += features.sum(0)
            outer_sum += features.T @ features
            if keep is not None:
                rows = keep[(keep >= n) & (keep < n + features.shape[0])] - n
                kept.append(features[rows.to(features.device)].float().cpu())
            elif with_features:
                kept.append(features.float().cpu())
            n += features.shape[0]
            bar.update(features.shape[0])
    if n < 2:
        raise ValueError(f"reference data yielded {n} images: expected at least 2 for FID statistics")
    if keep is not None and n != total:
        raise ValueError(f"reference data yielded {n} images but its manifest counts {total}: expected the same")
    features = torch.cat(kept) if with_features else None
    if _capped(with_features) and keep is None:
        features = features[reference_subset(n, with_features)]
    return ReferenceStats(n, feature_sum.cpu(), outer_sum.cpu(), features)


def _capped(with_features: bool | int) -> bool:
    """Whether `with_features` asks for a capped subset (an int) rather than all (True) or none (False)."""
    return not isinstance(with_features, bool) and isinstance(with_features, int)


def reference_stats(images: Iterable[Tensor], data_key: str, extractor: nn.Module, *,
                    with_features: bool | int = False, device: str | torch.device | None = None,
                    progress: bool = True, total: int | None = None) -> ReferenceStats:
    """Reference statistics of uint8 image batches, cached on disk per (data_key, extractor, protocol, features).

    with_features: False (mean and covariance only), True (every feature: KID) or a count (the features of
    `reference_subset(n, count)`: precision / recall).

    `images` is iterated only on a cache miss, by local rank 0 of each node; the others wait and read the file.
    """
    file = _cache_file(data_key, fingerprint(extractor), with_features)
    local_rank = int(os.environ.get("LOCAL_RANK", rank_world()[0]))
    if local_rank == 0 and not file.is_file():
        device = torch.device(device) if device is not None else _device(extractor)
        stats = _compute_reference(images, extractor, with_features, device, progress, total)
        with atomic_path(file) as tmp:  # a reader never sees half a file
            torch.save({"n": stats.n, "feature_sum": stats.feature_sum, "outer_sum": stats.outer_sum,
                        "features": stats.features}, tmp)
    _barrier()  # on every rank, hit or miss, so the collective calls always pair up
    # the reference-statistics cache file written above (feature sums), not a checkpoint
    return ReferenceStats(**torch.load(file, map_location="cpu", weights_only=True))


# ----------------------------------------------------------------------------- generated-side metrics
class _Passthrough(nn.Module):
    """Features are computed once per batch by `extract`; torchmetrics receives them as its 'images'."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def _frechet(reference: ReferenceStats, device: torch.device) -> FrechetInceptionDistance:
    """torchmetrics' FID state (feature sums) for features of the reference's dimension."""
    dim = reference.feature_sum.shape[0]
    return FrechetInceptionDistance(_Passthrough(dim), sync_on_compute=False).to(device)


class SampleMetrics:
    """FID (+ KID, IS, precision / recall, Frechet distances in other feature spaces) of generated uint8 images
    against ReferenceStats, reduced over DDP ranks by torchmetrics.

    pr: precision and recall (k = pr_neighbours) against the reference's `subset_features(pr_reference)`.
    others: (name, extractor, reference) of further feature spaces, each reported as its Frechet distance
        under `name` (("fd_dinov2", DINOv2Features, its reference) gives EDM2's FD_DINOv2).
    """

    def __init__(self, extractor: nn.Module, reference: ReferenceStats, *, kid: bool = False, isc: bool = False,
                 pr: bool = False, kid_subsets: int = 100, kid_subset_size: int = 1000, isc_splits: int = 10,
                 pr_reference: int = PR_REFERENCE, pr_neighbours: int = PR_NEIGHBOURS, seed: int = 0,
                 others: Sequence[tuple[str, nn.Module, ReferenceStats]] = ()) -> None:
        if kid and reference.features is None:
            raise ValueError("reference statistics lack features: expected reference_stats(..., with_features=True) "
                             "for KID")
        self.extractor, self.reference, self.seed = extractor, reference, seed
        dim = reference.feature_sum.shape[0]
        device = _device(extractor)  # DDP reduces the metric states on this device
        self.fid = _frechet(reference, device)
        self.kid = KernelInceptionDistance(_Passthrough(dim), subsets=kid_subsets, subset_size=kid_subset_size,
                                           sync_on_compute=False).to(device) if kid else None
        self.isc = InceptionScore(_Passthrough(0), splits=isc_splits, sync_on_compute=False).to(device) if isc else None
        self.pr_real = reference.subset_features(pr_reference) if pr else None
        self.pr = CatMetric(sync_on_compute=False).to(device) if pr else None
        self.pr_neighbours = pr_neighbours
        self.others = [(name, other, ref, _frechet(ref, _device(other))) for name, other, ref in others]

    def update(self, images: Tensor) -> None:
        """Add a batch of generated uint8 images (B, 3, H, W) on the extractor's device."""
        features, logits = extract(self.extractor, images)
        self.fid.update(features, real=False)
        if self.pr is not None:
            self.pr.update(features.float())
        for _, other, _, state in self.others:
            state.update(extract(other, images.to(_device(other)))[0], real=False)
        if self.kid is not None:
            self.kid.update(features.float(), real=False)
        if self.isc is not None:
            if logits is None:
                raise ValueError("the feature extractor returns no logits: expected (features, logits) for IS")
            self.isc.update(logits.double())

    def compute(self) -> dict[str, float]:
        """{'fid', 'n'} (+ 'kid', 'kid_std', 'is', 'is_std'); the same value on every rank."""
        # collectives first, on every rank: feature sums (FID) and features (KID, IS) over ranks
        self.fid.sync()  # a no-op outside DDP
        for *_, state in self.others:
            state.sync()
        for metric, name in ((self.kid, "fake_features"), (self.isc, "features"), (self.pr, "value")):
            if metric is not None:
                _gather_lists(metric, name)
        rank, world = rank_world()
        # then rank 0 alone does the matrix square root (2048 x 2048) and tells the others
        out = [self._values() if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(out, src=0)
        return out[0]

    def _values(self) -> dict[str, float]:
        n, ref = int(self.fid.fake_features_num_samples), self.reference
        out = {"fid": _frechet_value(self.fid, ref), "n": n}
        for name, _, other_ref, state in self.others:
            out[name] = _frechet_value(state, other_ref)
        if self.pr is not None:
            fake = torch.cat(self.pr.value)
            out["precision"], out["recall"] = precision_recall(self.pr_real.to(fake.device), fake, self.pr_neighbours)
        # KID subsets and IS splits draw torch.randperm from the global generator: fix it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.kid is not None:
                self.kid.real_features = [ref.features.to(self.kid.fake_features[0])]
                self.kid.subset_size = min(self.kid.subset_size, n, ref.n)
                out["kid"], out["kid_std"] = (float(v) for v in self.kid.compute())
            if self.isc is not None:
                out["is"], out["is_std"] = (float(v) for v in self.isc.compute())
        return out


def _frechet_value(state: FrechetInceptionDistance, reference: ReferenceStats) -> float:
    """The Frechet distance of a reduced generated-side state against the reference statistics."""
    # the reference enters after the reduction, so it is counted once whatever the world size
    state.real_features_sum = reference.feature_sum.to(state.fake_features_sum)
    state.real_features_cov_sum = reference.outer_sum.to(state.fake_features_sum)
    state.real_features_num_samples = torch.tensor(reference.n, device=state.fake_features_sum.device)
    return float(state.compute())


def _gather_lists(metric, name: str) -> None:
    """Concatenate a list state across ranks in rank order (one tensor per rank, uneven sizes allowed)."""
    # torchmetrics gathers a list state element by element, which hangs when ranks hold different
    # numbers of batches; one concatenated tensor per rank gathers safely.
    local = getattr(metric, name)
    setattr(metric, name, [torch.cat(local)] if local else [])
    metric.sync()
    parts = getattr(metric, name)
    setattr(metric, name, [torch.cat(parts)] if isinstance(parts, list) else [parts])
