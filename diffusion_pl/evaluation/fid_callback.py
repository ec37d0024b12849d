"""FIDCallback: FID (+ KID, IS, precision / recall, FD_DINOv2) of EMA samples in training, split over DDP ranks.

Sample i is drawn with seed `seed + i` (and class i % num_classes when conditional, or a random class with
label_sampling="random"); rank r
takes a contiguous block of indices, so the value does not depend on the world size or the batch
size. Reference statistics are computed once per (data, extractor, protocol) and cached on disk,
or read from a published mu / sigma npz (`ref_stats`, as `diffusion-pl evaluate --ref_stats`;
diffusion_pl/evaluation/metrics/published.py), which a model trained on latent shards can use instead of image shards.
The feature extractor and metric states live in this callback, never in the LightningModule
(whose state the EMA copies and checkpoints save).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from diffusion_pl.evaluation.every_n import EveryNSteps
from diffusion_pl.guidance import Guidance
from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.data.reference import reference_images
from diffusion_pl.evaluation.generation import LABEL_SAMPLINGS, generate, metric_prefix, rank_indices
from diffusion_pl.evaluation.metrics.dinov2 import load_dinov2
from diffusion_pl.evaluation.metrics.inception import load_inception
from diffusion_pl.evaluation.metrics.precision_recall import PR_REFERENCE
from diffusion_pl.evaluation.metrics.statistics import ReferenceStats, SampleMetrics, _device, extract, reference_stats
from diffusion_pl.sampling.base import Sampler
from diffusion_pl.training.log_step import log_step
from diffusion_pl.training.sharding import is_sharded

__all__ = ["FIDCallback"]


class FIDCallback(EveryNSteps):
    """Every `every_n_steps`: FID of `num_samples` EMA samples per sampler, logged as e.g. `fid10k/heunode_17`.

    Args:
        every_n_steps: evaluate after every this many optimizer steps.
        num_samples: samples per evaluation, split over ranks; 50000 is the published protocol,
            fewer are labelled with the count (`fid10k/...`).
        sampler: one sampler or a list of them (default HeunODE(steps=17), EDM's 35 NFE).
        data: reference shard set (a `shards` string); default: the datamodule's training shards. Its
            images are resized to the datamodule's image_size when they differ, as training resizes them.
        ref_stats: a published npz of reference feature statistics `mu` (D,) / `sigma` (D, D) instead of `data`
            (e.g. ADM's VIRTUAL_imagenet256_labeled.npz; comparable only with the extractor that computed it, the
            torch-fidelity port of ADM's TF Inception for ADM's files). Read and checked against the extractor's
            dimension when fit starts; KID needs `data` (an npz holds no features).
        inception_weights: local InceptionV3 weights file (else $DIFFUSION_PL_INCEPTION_WEIGHTS, else
            torch hub's cache, downloaded once); checked when fit starts.
        feature_extractor: a stand-in nn.Module uint8 (B, 3, H, W) -> features (B, D) (tests).
        kid, isc: also log KID (needs the reference features, cached separately) and Inception Score.
        pr: also log precision and recall (k = 3, ADM's evaluator) against `pr_reference` reference features
            (a fixed random subset, cached with the reference statistics).
        fd_dinov2: also log FD_DINOv2 (EDM2's): DINOv2 ViT-L/14 from `dinov2_weights` (torch hub's
            dinov2_vitl14_pretrain.pth; else $DIFFUSION_PL_DINOV2_WEIGHTS, else torch hub's cache), loaded when fit
            starts; or give the extractor module itself as `dinov2_weights` (tests).
        label_sampling: a conditional model's classes: "balanced" (i % num_classes) or "random" (uniform).
        batch_size: samples per sampler call and images per extractor call, per rank.
        seed: sample i uses seed + i.
        guidance: every guidance option in one value (diffusion_pl/guidance.py): the weight w, a guide checkpoint
            (autoguidance, Karras et al. 2024: same process, prediction, shape and classes, a smaller or less
            trained model; loaded and checked when fit starts), the noise-level interval (Kynkäänniemi et al.
            2024), the guided channels (DiT's 3 of 4 latent channels) and x0 clipping (DDPM's FID protocol clips
            at 1). Default: unguided, unclipped.
        download_timeout: seconds to wait for the weights server before failing.
        name: metrics are named `fid10k/<name>_<sampler>` instead of `fid10k/<sampler>`; labels another
            FIDCallback of the run already uses get `_2`, `_3`, ... (diffusion_pl/evaluation/every_n.py).
    """

    def __init__(self, every_n_steps: int = 10_000, num_samples: int = 10_000,
                 sampler: Sampler | list[Sampler] | None = None, data: str | None = None,
                 inception_weights: str | None = None, feature_extractor: nn.Module | None = None,
                 kid: bool = False, isc: bool = False, batch_size: int = 256, seed: int = 0,
                 guidance: Guidance | None = None, download_timeout: float = 10.0,
                 ref_stats: str | None = None, name: str | None = None, pr: bool = False,
                 pr_reference: int = PR_REFERENCE, fd_dinov2: bool = False,
                 dinov2_weights: str | nn.Module | None = None, label_sampling: str = "balanced") -> None:
        if every_n_steps < 1 or num_samples < 2 or batch_size < 1:
            raise ValueError(f"FIDCallback: expected every_n_steps >= 1, num_samples >= 2, batch_size >= 1, got "
                             f"{every_n_steps}, {num_samples}, {batch_size}")
        if ref_stats is not None and data is not None:
            raise UserValueError(f"FIDCallback: data {data} and ref_stats {ref_stats} are both set: expected one "
                                 "reference (image shards or a published mu / sigma npz)")
        if ref_stats is not None and (kid or pr or fd_dinov2):
            metric = "kid" if kid else "pr" if pr else "fd_dinov2"
            raise UserValueError(f"FIDCallback: {metric}=True with ref_stats: expected data: (it needs the reference "
                                 "images' features, an npz holds only their mean and covariance)")
        if label_sampling not in LABEL_SAMPLINGS or pr_reference < 1:
            raise UserValueError(f"FIDCallback: label_sampling {label_sampling!r}, pr_reference {pr_reference}: "
                                 f"expected one of {sorted(LABEL_SAMPLINGS)} and a positive count")
        super().__init__(every_n_steps, sampler, guidance, name)
        self.num_samples, self.data, self.ref_stats = num_samples, data, ref_stats
        self.inception_weights, self.kid, self.isc = inception_weights, kid, isc
        self.batch_size, self.seed, self.download_timeout = batch_size, seed, download_timeout
        self.pr, self.pr_reference, self.fd_dinov2, self.label_sampling = pr, pr_reference, fd_dinov2, label_sampling
        self._dinov2: list[nn.Module] = [dinov2_weights] if isinstance(dinov2_weights, nn.Module) else []
        self.dinov2_weights = None if isinstance(dinov2_weights, nn.Module) else dinov2_weights
        self.others: list = []  # (name, extractor, reference) of FD_DINOv2
        # kept in a list so Lightning / deepcopy never treat it as part of this callback's state
        self._extractor: list[nn.Module] = [feature_extractor] if feature_extractor is not None else []
        self.reference: ReferenceStats | None = None

    @property
    def extractor(self) -> nn.Module:
        return self._extractor[0]

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Preflight: fail before training, in one line, when the Inception weights or the guide cannot be loaded."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not self._extractor:
            self._extractor.append(load_inception(self.inception_weights, download_timeout=self.download_timeout))
        if stage == "fit" and self.fd_dinov2 and not self._dinov2:
            self._dinov2.append(load_dinov2(self.dinov2_weights, download_timeout=self.download_timeout))
        if stage == "fit" and self.ref_stats is not None and self.reference is None:
            self.reference = self._published()
        if stage == "fit" and self.num_samples < trainer.world_size:
            raise ValueError(f"FIDCallback: num_samples={self.num_samples} is below the {trainer.world_size} ranks: "
                             "expected at least one sample per rank")
        if stage == "fit" and is_sharded(trainer.strategy):
            # a sharded network's forward is a collective: every rank must run as many sampler calls
            batches = {math.ceil(len(rank_indices(self.num_samples, r, trainer.world_size)) / self.batch_size)
                       for r in range(trainer.world_size)}
            if len(batches) > 1:
                raise ValueError(f"FIDCallback: num_samples={self.num_samples} gives the {trainer.world_size} ranks "
                                 f"different numbers of batches of {self.batch_size} under sharded training: expected "
                                 f"a multiple of {trainer.world_size * self.batch_size} (world size x batch_size)")

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        """Move the extractor to the module's device and load (or compute once) the reference statistics."""
        super().on_fit_start(trainer, pl_module)
        self._extractor[0] = self.extractor.to(pl_module.device).eval()
        if self.ref_stats is not None:  # read at setup
            return
        datamodule = trainer.datamodule
        data = self.data or (None if pl_module.codec.data_is_latent(datamodule) else getattr(datamodule, "shards", None))
        if data is None:
            raise ValueError("FIDCallback: no reference data: expected `data:` (a shards string of images) or a "
                             "datamodule with a `shards` attribute of image shards")
        # reference images are scored at the training images' size (resized as training resizes them),
        # so a model trained on resized data is compared at the resolution it learns
        size = pl_module.codec.reference_size(datamodule)  # a latent module's: the decoded samples' size
        images, key, info = reference_images(data, batch_size=self.batch_size, image_size=size)
        keep = True if self.kid else self.pr_reference if self.pr else False
        self.reference = reference_stats(images, key, self.extractor, with_features=keep, total=info["count"],
                                         progress=trainer.is_global_zero)
        if self.fd_dinov2:
            dinov2 = self._dinov2[0] = self._dinov2[0].to(pl_module.device).eval()
            images, key, info = reference_images(data, batch_size=self.batch_size, image_size=size)
            self.others = [("fd_dinov2", dinov2, reference_stats(images, key, dinov2, total=info["count"],
                                                                 progress=trainer.is_global_zero))]

    def _published(self) -> ReferenceStats:
        """The statistics of `ref_stats`, checked against the extractor's feature dimension (one-line errors)."""
        from diffusion_pl.evaluation.metrics.published import published_reference

        # any image size tells the dimension: InceptionV3 resizes to 299, the stand-ins pool
        probe = torch.zeros(2, 3, 64, 64, dtype=torch.uint8, device=_device(self.extractor))
        dim = extract(self.extractor, probe)[0].shape[1]
        return published_reference(self.ref_stats, dim, what="FIDCallback ref_stats")[0]

    def on_every_n_steps(self, trainer: L.Trainer, pl_module) -> None:
        """Evaluate on every rank and log the values at this step."""
        values = self.evaluate(trainer, pl_module)
        # Straight to the loggers: self.log(on_step=True) would reach them only on steps that are
        # multiples of log_every_n_steps. callback_metrics lets ModelCheckpoint monitor the value.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=log_step(trainer))  # the losses' index (training/log_step.py)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})  # equal on all ranks

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        """{'fid10k/heunode_17': value, ...} for every sampler; every rank must call it (collective)."""
        indices = rank_indices(self.num_samples, trainer.global_rank, trainer.world_size)
        values = {}
        for sampler, label in zip(self.samplers, self.labels):
            metrics = SampleMetrics(self.extractor, self.reference, kid=self.kid, isc=self.isc, pr=self.pr,
                                    pr_reference=self.pr_reference, seed=self.seed, others=self.others)
            for _, images, _, _ in generate(pl_module, sampler, indices, self.image_shape, seed=self.seed,
                                            guidance=self.sampling_guidance(), label_sampling=self.label_sampling,
                                            batch_size=self.batch_size,
                                            device=pl_module.device, progress=trainer.is_global_zero):
                metrics.update(images)
            out = metrics.compute()
            for key in ("fid", "fd_dinov2", "kid", "is", "precision", "recall"):
                if key in out:
                    values[f"{metric_prefix(key, self.num_samples)}/{label}"] = out[key]
        return values
