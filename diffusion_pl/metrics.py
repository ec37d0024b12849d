"""Sample-quality metrics: FID (Heusel et al. 2017), KID (Binkowski et al. 2018), IS (Salimans et al. 2016).

The protocol that matches published CIFAR-10 numbers (EDM, ADM, torch-fidelity):

    images in [-1, 1] -> uint8: round((x + 1) * 127.5), clamped to [0, 255]
    -> InceptionV3 of the TF FID graph (torch-fidelity's weights), bilinear resize to 299 as TF1
       (no antialiasing) -> 2048 pool features (+ 1008 logits for IS)
    -> FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^1/2), 50,000 samples vs 50,000 training images.

A feature extractor is any nn.Module mapping uint8 (B, 3, H, W) to features (B, D), or to a pair
(features, logits). Reference statistics are computed once per (data, extractor, protocol) and
cached as `$DIFFUSION_PL_CACHE/fid_refs/<hash>.pt`. Generated-side accumulation and the cross-rank
reduction use torchmetrics; features are computed once per batch and passed through to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from unittest import mock

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm
from torchmetrics.image import FrechetInceptionDistance, InceptionScore, KernelInceptionDistance
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

from diffusion_pl.data import ShardDataModule, builtin, resolve_shards
from diffusion_pl.data.prepare import cache_dir
from diffusion_pl.errors import UserError
from diffusion_pl.sampling import sample

__all__ = [
    "PROTOCOL", "WEIGHTS_ENV", "InceptionWeightsError", "InceptionFeatures", "ReferenceStats", "SampleMetrics",
    "to_uint8", "extract", "load_inception", "inception_weights_file", "random_inception_weights", "fingerprint",
    "reference_images", "reference_stats", "frechet_distance", "gaussian_stats", "metric_prefix", "sampler_label",
    "class_labels_for", "generate", "rank_world", "rank_indices",
]

PROTOCOL = "uint8-round-clamp/rgb/v1"  # part of every cache key: bump when the image -> uint8 path changes
WEIGHTS_ENV = "DIFFUSION_PL_INCEPTION_WEIGHTS"
INCEPTION_URL = tf_inception.URL_INCEPTION_V3
FULL_PROTOCOL_SAMPLES = 50_000


class InceptionWeightsError(UserError, RuntimeError):
    """The InceptionV3 weights are missing or unreadable; the message says how to provide them."""


# ----------------------------------------------------------------------------- protocol
def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] (B, C, H, W) -> uint8 (B, 3, H, W), rounded and clamped; grey repeated to RGB."""
    # torchmetrics' normalize=True does (x * 255).byte(), which wraps out-of-range values around.
    u8 = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


def extract(extractor: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """(features (B, D) float64, logits (B, K) or None) of uint8 images (B, 3, H, W)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images for the feature extractor have dtype {images.dtype}: expected torch.uint8")
    with torch.no_grad():
        out = extractor(images)
    features, logits = out if isinstance(out, (tuple, list)) else (out, None)
    return features.reshape(images.shape[0], -1).double(), logits


def metric_prefix(name: str, n: int) -> str:
    """`fid` for the full 50k protocol, else the sample count in the name (`fid10k`, `fid500`)."""
    if n >= FULL_PROTOCOL_SAMPLES:
        return name
    return f"{name}{n // 1000}k" if n % 1000 == 0 else f"{name}{n}"


# ----------------------------------------------------------------------------- Inception weights
def _hub_weights_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[-1]


def _how_to_provide(reason: str) -> str:
    return (f"the FID feature extractor (InceptionV3) cannot be loaded: {reason}; download {INCEPTION_URL} "
            f"on a machine with internet and pass it with --inception-weights PATH (callback: "
            f"inception_weights: PATH) or {WEIGHTS_ENV}=PATH, or copy it to {_hub_weights_file()}")


def _probe(url: str, timeout: float) -> str | None:
    """None if `url` answers within `timeout` seconds, else the reason; never blocks longer (DNS included)."""
    result: list[str | None] = ["no answer within %.0f s" % timeout]

    def run() -> None:
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
            result[0] = None
        except Exception as err:  # any network failure means the same: weights not downloadable
            result[0] = str(err).splitlines()[0][:120] if str(err) else type(err).__name__

    # a daemon thread bounds the wait even where getaddrinfo ignores socket timeouts
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return result[0]


def inception_weights_file(path: str | None = None, download_timeout: float = 10.0) -> Path:
    """The weights file: `path`, else $DIFFUSION_PL_INCEPTION_WEIGHTS, else torch hub's cache (downloaded once)."""
    path = path or os.environ.get(WEIGHTS_ENV) or None
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise InceptionWeightsError(_how_to_provide(f"weights file {file} does not exist"))
        return file
    cached = _hub_weights_file()
    if cached.is_file():
        return cached
    reason = _probe(INCEPTION_URL, download_timeout)
    if reason is None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=True)
            return cached
        except Exception as err:  # a failed download mid-way is as unusable as none
            reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
    raise InceptionWeightsError(_how_to_provide(f"no weights file given and the download failed ({reason})"))


class InceptionFeatures(nn.Module):
    """InceptionV3 of the TF FID graph via torch-fidelity: uint8 (B,3,H,W) -> (pool3 (B,2048), logits (B,1008))."""

    num_features = 2048

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        # torch-fidelity resizes with TF1's bilinear (no antialias), as the published FID numbers did
        self.net = tf_inception.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
        # channels_last convolutions: 1.44x the images/s on one CPU thread (5.50 vs 3.83 at batch 32), with
        # features equal to float32 rounding (relative difference 2e-7); the fingerprint is unchanged
        self.net.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = self.net(x)  # (B, 2048), (B, 1008)
        return features, logits


def load_inception(path: str | None = None, device: str | torch.device | None = None,
                   download_timeout: float = 10.0) -> InceptionFeatures:
    """The FID extractor, or a one-line InceptionWeightsError saying how to provide the weights (preflight)."""
    file = inception_weights_file(path, download_timeout)
    try:
        extractor = InceptionFeatures(file)
    except Exception as err:  # unpickling / key mismatch: the file is not what torch-fidelity expects
        raise InceptionWeightsError(_how_to_provide(
            f"{file} is not a torch-fidelity InceptionV3 state_dict ({type(err).__name__})")) from err
    return extractor.to(device) if device is not None else extractor


def random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised InceptionV3 state_dict in torch-fidelity's format (tests, timing)."""
    # torch-fidelity's constructor always loads weights; skip that once to get the bare architecture
    with torch.random.fork_rng(devices=[]), \
            mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        torch.manual_seed(seed)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return Path(path)


# ----------------------------------------------------------------------------- distributed helpers
def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_indices(n: int, rank: int, world: int) -> range:
    """This rank's contiguous block of sample indices 0..n-1 (blocks in rank order cover them in order)."""
    return range(rank * n // world, (rank + 1) * n // world)


def _barrier() -> None:
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
    """Reference feature statistics: count, sum, sum of outer products (+ all features, for KID)."""

    n: int
    feature_sum: Tensor  # (D,) float64
    outer_sum: Tensor  # (D, D) float64
    features: Tensor | None = None  # (n, D) float32

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


def _cache_file(data_key: str, extractor_key: str, with_features: bool) -> Path:
    key = json.dumps({"data": data_key, "extractor": extractor_key, "protocol": PROTOCOL,
                      "features": with_features}, sort_keys=True)
    return cache_dir() / "fid_refs" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"


def _compute_reference(images: Iterable[Tensor], extractor: nn.Module, with_features: bool,
                       device: torch.device, progress: bool, total: int | None) -> ReferenceStats:
    n, feature_sum, outer_sum, kept = 0, None, None, []
    with tqdm(total=total, desc="reference statistics", unit="img", disable=not progress) as bar:
        for batch in images:
            features, _ = extract(extractor, (batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch).to(device))
            if feature_sum is None:
                feature_sum = features.new_zeros(features.shape[1])
                outer_sum = features.new_zeros(features.shape[1], features.shape[1])
            feature_sum += features.sum(0)
            outer_sum += features.T @ features
            n += features.shape[0]
            if with_features:
                kept.append(features.float().cpu())
            bar.update(features.shape[0])
    if n < 2:
        raise ValueError(f"reference data yielded {n} images: expected at least 2 for FID statistics")
    return ReferenceStats(n, feature_sum.cpu(), outer_sum.cpu(), torch.cat(kept) if with_features else None)


def reference_stats(images: Iterable[Tensor], data_key: str, extractor: nn.Module, *, with_features: bool = False,
                    device: str | torch.device | None = None, progress: bool = True,
                    total: int | None = None) -> ReferenceStats:
    """Reference statistics of uint8 image batches, cached on disk per (data_key, extractor, protocol).

    `images` is iterated only on a cache miss, by local rank 0 of each node; the others wait and read the file.
    """
    file = _cache_file(data_key, fingerprint(extractor), with_features)
    local_rank = int(os.environ.get("LOCAL_RANK", rank_world()[0]))
    if local_rank == 0 and not file.is_file():
        device = torch.device(device) if device is not None else _device(extractor)
        stats = _compute_reference(images, extractor, with_features, device, progress, total)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        torch.save({"n": stats.n, "feature_sum": stats.feature_sum, "outer_sum": stats.outer_sum,
                    "features": stats.features}, tmp)
        os.replace(tmp, file)  # atomic: a reader never sees half a file
    _barrier()  # on every rank, hit or miss, so the collective calls always pair up
    return ReferenceStats(**torch.load(file, map_location="cpu", weights_only=True))


# ----------------------------------------------------------------------------- generated-side metrics
class _Passthrough(nn.Module):
    """Features are computed once per batch by `extract`; torchmetrics receives them as its 'images'."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


class SampleMetrics:
    """FID (+ KID, IS) of generated uint8 images against ReferenceStats, reduced over DDP ranks by torchmetrics."""

    def __init__(self, extractor: nn.Module, reference: ReferenceStats, *, kid: bool = False, isc: bool = False,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, isc_splits: int = 10, seed: int = 0) -> None:
        if kid and reference.features is None:
            raise ValueError("reference statistics lack features: expected reference_stats(..., with_features=True) "
                             "for KID")
        self.extractor, self.reference, self.seed = extractor, reference, seed
        dim = reference.feature_sum.shape[0]
        device = _device(extractor)  # DDP reduces the metric states on this device
        self.fid = FrechetInceptionDistance(_Passthrough(dim), sync_on_compute=False).to(device)
        self.kid = KernelInceptionDistance(_Passthrough(dim), subsets=kid_subsets, subset_size=kid_subset_size,
                                           sync_on_compute=False).to(device) if kid else None
        self.isc = InceptionScore(_Passthrough(0), splits=isc_splits, sync_on_compute=False).to(device) if isc else None

    def update(self, images: Tensor) -> None:
        """Add a batch of generated uint8 images (B, 3, H, W) on the extractor's device."""
        features, logits = extract(self.extractor, images)
        self.fid.update(features, real=False)
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
        for metric, name in ((self.kid, "fake_features"), (self.isc, "features")):
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
        # the reference enters after the reduction, so it is counted once whatever the world size
        self.fid.real_features_sum = ref.feature_sum.to(self.fid.fake_features_sum)
        self.fid.real_features_cov_sum = ref.outer_sum.to(self.fid.fake_features_sum)
        self.fid.real_features_num_samples = torch.tensor(ref.n, device=self.fid.fake_features_sum.device)
        out = {"fid": float(self.fid.compute()), "n": n}
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


def _gather_lists(metric, name: str) -> None:
    """Concatenate a list state across ranks in rank order (one tensor per rank, uneven sizes allowed)."""
    # torchmetrics gathers a list state element by element, which hangs when ranks hold different
    # numbers of batches; one concatenated tensor per rank gathers safely.
    local = getattr(metric, name)
    setattr(metric, name, [torch.cat(local)] if local else [])
    metric.sync()
    parts = getattr(metric, name)
    setattr(metric, name, [torch.cat(parts)] if isinstance(parts, list) else [parts])


# ----------------------------------------------------------------------------- data and generation
def reference_images(data: str, batch_size: int = 250, num_workers: int = 0,
                     image_size: int | None = None) -> tuple[Iterable[Tensor], str, dict]:
    """(uint8 batches in stored order, cache key, info) of a shard set (a `shards` string).

    When the stored images are not `image_size` square, they are resized (and centre-cropped) as
    ShardDataModule(image_size=...) does for training, and the cache key says so. info holds 'count',
    'split', 'source' (from the manifest), 'image_size' (the size scored) and 'stored_size', both (H, W)
    (stored_size None for a mixed-size set, which needs `image_size`).
    """
    manifest = None
    if data.startswith("builtin:"):  # generated deterministically from its parameters and version
        key = f"{data}#v{builtin.VERSION}"
    else:
        urls, manifest = resolve_shards(data)
        if manifest is not None and all("sha256" in s for s in manifest["shards"]):
            key = json.dumps([manifest.get("count"), [s["sha256"] for s in manifest["shards"]]])
        else:  # no manifest: the files themselves (path and size)
            key = json.dumps([[u, Path(u).stat().st_size if Path(u).is_file() else None] for u in urls])

    def datamodule(size: int | None) -> ShardDataModule:
        # the validation stream is finite, in order and unflipped: exactly the stored images
        return ShardDataModule(shards=data, val_shards=data, batch_size=batch_size, num_workers=num_workers,
                               image_size=size, random_flip=False)

    mixed = manifest is not None and (manifest.get("mixed_sizes") or manifest.get("image_size") is None)
    if mixed and image_size is not None:  # no one stored size: every image is resized to image_size
        dm, stored = datamodule(image_size), None
        key += f"@{image_size}"
    else:
        dm = datamodule(None)
        stored = tuple(dm.output_size)
        if image_size is not None and (image_size, image_size) != stored:
            dm = datamodule(image_size)
            key += f"@{image_size}"
    info = {k: (manifest or {}).get(k) for k in ("count", "split", "source")}
    info.update(image_size=list(dm.output_size), stored_size=list(stored) if stored else None)
    return (to_uint8(images) for images, _ in dm.val_dataloader()), key, info


def sampler_label(sampler) -> str:
    """Name of a (sampler, steps) point in logged metrics: class name and steps, e.g. `heunode_17`."""
    return f"{type(sampler).__name__.lower()}_{sampler.steps}"


def class_labels_for(indices: Sequence[int], num_classes: int | None, choices: Sequence[int] | None = None,
                     device: str | torch.device | None = None) -> Tensor | None:
    """Label of sample i: choices[i % len(choices)], else i % num_classes (balanced); None if unconditional."""
    if num_classes is None:
        return None
    labels = [choices[i % len(choices)] if choices else i % num_classes for i in indices]
    return torch.tensor(labels, dtype=torch.long, device=device)


def generate(module, sampler, indices: Sequence[int], image_shape: Sequence[int], *, seed: int = 0,
             guidance: float = 1.0, ema: bool = True, class_choices: Sequence[int] | None = None,
             batch_size: int = 64, device: str | torch.device | None = None, clip_x0: float | None = None,
             progress: bool = False) -> Iterator[tuple[list[int], Tensor, Tensor | None, int]]:
    """(indices, uint8 images, labels, nfe) per batch; sample i uses seed + i, so batches do not matter.

    clip_x0: clamp x0_hat to [-clip_x0, clip_x0] at every network evaluation (DDPM's sampling clips at 1).
    """

    indices = list(indices)
    model, net = module.model(ema=ema), module.ema if ema else module.net
    training = net.training
    net.eval()  # Lightning's model.train() also flips the EMA copy; sampling needs eval (no dropout)
    try:
        with tqdm(total=len(indices), desc=f"sampling {sampler_label(sampler)}", unit="img",
                  disable=not progress) as bar:
            for start in range(0, len(indices), batch_size):
                idx = indices[start:start + batch_size]
                labels = class_labels_for(idx, module.num_classes, class_choices, device)
                out = sample(model, module.process, module.prediction, sampler, (len(idx), *image_shape),
                             class_labels=labels, guidance=guidance, null_label=module.null_label,
                             clip_x0=clip_x0, seeds=[seed + i for i in idx], device=device)
                bar.update(len(idx))
                yield idx, to_uint8(out.x), labels, out.nfe
    finally:
        net.train(training)
