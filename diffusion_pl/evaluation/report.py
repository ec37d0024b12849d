"""The evaluation report: what `evaluate` returns and `diffusion-pl evaluate` writes as `<ckpt>.eval.json`.

A report holds the protocol (everything the numbers depend on: sample count, reference set, feature
extractor, resize, quantisation, world and batch size), what was scored (the checkpoint with its sha256,
EMA or not, guidance, seed range; or the sample files), one result row per sampler and the seconds it
took. `to_dict()` is the JSON the command has always written; `from_dict` reads one back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusion_pl.utils.fileio import atomic_path
from diffusion_pl.evaluation.generation import metric_prefix
from diffusion_pl.evaluation.metrics.dinov2 import DINOV2_PROTOCOL, DINOv2Features
from diffusion_pl.evaluation.metrics.inception import InceptionFeatures
from diffusion_pl.evaluation.metrics.precision_recall import PR_NEIGHBOURS
from diffusion_pl.evaluation.metrics.statistics import PROTOCOL, fingerprint

__all__ = ["INCEPTION_PROTOCOL", "EvalReport", "protocol_of", "default_report_path", "format_table"]

INCEPTION_PROTOCOL = ("torch-fidelity InceptionV3 (TF FID graph weights), pool3 2048 features; "
                      "bilinear resize to 299x299 as TF1 (no antialias)")
_REPORT_KEYS = ("protocol", "results", "seconds")
_METRICS = ("fid", "fd_dinov2", "kid", "is", "precision", "recall")  # what values() names, in this order


@dataclass(frozen=True)
class EvalReport:
    """One evaluated source: a checkpoint (or a loaded module) with its samplers, or a folder / .npz of samples.

    Attributes:
        protocol: n, full_protocol, reference (data, n, split, source, image_size, stored_size; ref_stats,
            ref_stats_sha256 and protocol_note for a published npz), extractor, resize, extractor_sha256,
            quantisation, world_size, batch_size; fd_dinov2 (its extractor and sha256) and precision_recall (k,
            reference features, feature space) when asked for.
        source: what was scored. A checkpoint: checkpoint, checkpoint_sha256 (both None for a module given
            as an object), ema, guidance, clip_x0, seed_range, class_labels and label_sampling, the guidance options that were set
            (guide_checkpoint_sha256, guidance_interval, guidance_channels) and bits_per_dim when asked for.
            Samples: {"samples": path}.
        results: one row per sampler: name (`ddim_50`, a repeat `ddim_50#2`), sampler (its spec), steps, nfe,
            n, fid, and kid / kid_std, is / is_std, precision / recall, fd_dinov2 when asked for; samples have one row named after the file.
        seconds: wall-clock time of this source, reference statistics included when computed for it.
    """

    protocol: dict[str, Any]
    source: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: protocol, the source's fields, results, seconds (the `.eval.json` layout)."""
        return {"protocol": self.protocol, **self.source, "results": self.results, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        """The report of a `to_dict()` (e.g. an `.eval.json` read back)."""
        return cls(protocol=data["protocol"], source={k: v for k, v in data.items() if k not in _REPORT_KEYS},
                   results=data["results"], seconds=data["seconds"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def write_json(self, path: str | Path) -> Path:
        """Write `to_json()` atomically (a reader never sees half a report); returns the path."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json())
        return path

    @property
    def bits_per_dim(self) -> dict[str, Any] | None:
        """bpd, bpd_stderr, n, nfe_mean and how they were computed, when bits/dim was asked for."""
        return self.source.get("bits_per_dim")

    def values(self) -> dict[str, float]:
        """Every metric by the name FIDCallback logs it under, e.g. {'fid10k/ddim_50': ..., 'is10k/ddim_50': ...,
        'fd_dinov2_10k/ddim_50': ..., 'precision10k/ddim_50': ...}."""
        return {f"{metric_prefix(key, row['n'])}/{row['name']}": row[key]
                for row in self.results for key in _METRICS if key in row}

    def table(self) -> str:
        """The results as an aligned text table (what the command prints)."""
        return format_table(self.results)


def protocol_of(extractor, reference, data: str | None, data_info: dict, n: int, world_size: int,
                batch_size: int, dinov2=None, pr_reference: int | None = None) -> dict[str, Any]:
    """The report's protocol: the reference set, the feature extractor and how images reach it (and the DINOv2
    extractor of FD_DINOv2, the reference subset of precision / recall, when given)."""
    inception = isinstance(extractor, InceptionFeatures)
    extras = {}
    if dinov2 is not None:
        extras["fd_dinov2"] = {"extractor": DINOV2_PROTOCOL if isinstance(dinov2, DINOv2Features)
                               else f"{type(dinov2).__module__}.{type(dinov2).__qualname__}",
                               "extractor_sha256": fingerprint(dinov2)}
    if pr_reference is not None:
        extras["precision_recall"] = {"k": PR_NEIGHBOURS, "reference_features": min(pr_reference, reference.n),
                                      "reference_subset": "fixed random subset (seed 0) of the reference images",
                                      "features": "the FID extractor's", "distances": "squared Euclidean, float32"}
    return {"n": n, "full_protocol": n >= 50_000,
            "reference": {"data": data, "n": data_info.get("n", reference.n), "split": data_info["split"],
                          "source": data_info["source"], "image_size": data_info["image_size"],
                          "stored_size": data_info["stored_size"],
                          **{k: data_info[k] for k in ("ref_stats", "ref_stats_sha256", "protocol_note")
                             if k in data_info}},
            "extractor": INCEPTION_PROTOCOL if inception
            else f"{type(extractor).__module__}.{type(extractor).__qualname__}",
            "resize": "bilinear to 299x299, TF1-compatible (antialias=False)" if inception
            else "none (extractor's own)",
            "extractor_sha256": fingerprint(extractor), "quantisation": PROTOCOL,
            "world_size": world_size, "batch_size": batch_size, **extras}


def default_report_path(source: str | Path) -> Path:
    """Where the command writes a source's report: `<ckpt>.eval.json`, or `<folder>/eval.json` for a folder."""
    source = Path(source)
    return source / "eval.json" if source.is_dir() else source.with_suffix(".eval.json")


def format_table(points: list[dict]) -> str:
    """Aligned text table; metric columns are named with the sample count below 50k (fid10k)."""
    cols = [c for c in ("name", "steps", "nfe", "n", "fid", "fd_dinov2", "kid", "kid_std", "is", "is_std", "precision",
                        "recall") if any(c in p for p in points)]
    n = points[0]["n"]
    heads = [metric_prefix(c, n) if c in _METRICS else c for c in cols]
    rows = [[f"{p[c]:.4g}" if isinstance(p.get(c), float) else str(p.get(c, "")) for c in cols] for p in points]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
