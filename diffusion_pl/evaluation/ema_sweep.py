"""The FID sweep of post-hoc EMA lengths: FID against sigma_rel, as a table and a plot.

EDM2 (Karras et al. 2024, Sec. 3 and Fig. 5) picks the EMA length after training: reconstruct a range
of sigma_rel from the snapshots (diffusion_pl/evaluation/reconstruct.py), score each, keep the best. Here
every reconstruction is scored by `evaluate_checkpoints` (diffusion_pl/evaluation/evaluate.py: one device
launch, one feature extractor and one reference for all of them; each checkpoint gets its usual
`.eval.json` report beside it), and the sweep is written beside the reconstructions:

    OUT/phema-sweep-<step>.csv   sigma_rel, gamma, profile_error, then one metric column per sampler
    OUT/phema-sweep-<step>.png   the metric against sigma_rel, one line per sampler, the best point marked

The metric is FID with the InceptionV3 extractor; with another feature extractor it is the Frechet
distance in that extractor's features, and the plot and table say so. `diffusion-pl reconstruct-ema
--fid_data` runs it after the reconstruction.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.utils.fileio import atomic_path
from diffusion_pl.evaluation.evaluate import EvalOptions, evaluate_checkpoints
from diffusion_pl.evaluation.reconstruct import ReconstructReport
from diffusion_pl.evaluation.report import EvalReport, default_report_path

__all__ = ["Sweep", "run_sweep", "sweep_stem", "metric_name", "sweep_rows", "write_csv", "write_plot",
           "format_table"]


@dataclass(frozen=True)
class Sweep:
    """The sweep: one row per sigma_rel (sigma_rel, gamma, profile_error, `fid/<sampler point>` ...), the metric
    they hold, the files written and each reconstruction's evaluation report."""

    rows: list[dict]
    metric: str
    csv: Path
    png: Path | None  # None without matplotlib (an optional dependency: the `plot` extra)
    reports: list[EvalReport]

    def table(self) -> str:
        """The sweep as aligned text, with the best sigma_rel of each sampler named below it."""
        return format_table(self.rows, self.metric)


def sweep_stem(reconstruction: ReconstructReport) -> Path:
    """OUT/phema-sweep-<step>: beside the reconstructions."""
    return reconstruction.paths[0].parent / f"phema-sweep-{reconstruction.step:09d}"


def run_sweep(options: EvalOptions, reconstruction: ReconstructReport, stem: str | Path | None = None,
              on_report: Callable[[EvalReport], None] | None = None) -> Sweep:
    """Evaluate every reconstruction with `options` (one device), write each report beside its checkpoint
    (`<ckpt>.eval.json`, then `on_report(report)`), `stem`.csv and `stem`.png (default `sweep_stem`)."""
    if options.devices != 1:
        raise UserValueError(f"{options.names('devices')} {options.devices} for the post-hoc EMA sweep: expected 1 "
                             "(the sweep runs on one device)")

    def publish(report: EvalReport) -> None:
        report.write_json(default_report_path(report.source["checkpoint"]))
        if on_report is not None:
            on_report(report)

    reports = evaluate_checkpoints(options, list(reconstruction.paths), on_report=publish)
    rows = sweep_rows(reports, reconstruction.sigma_rels, reconstruction.gammas, reconstruction.profile_errors)
    metric = metric_name(reports[0])
    stem = Path(stem) if stem is not None else sweep_stem(reconstruction)
    csv_path, png_path = stem.with_suffix(".csv"), stem.with_suffix(".png")
    write_csv(csv_path, rows)
    if not write_plot(png_path, rows, metric, step_note=stem.name):
        png_path = None
    return Sweep(rows, metric, csv_path, png_path, reports)


def metric_name(report: EvalReport) -> str:
    """'FID' with InceptionV3, else 'Frechet distance (<extractor>)', with the sample count."""
    protocol = report.protocol
    extractor = protocol["extractor"]
    name = "FID" if extractor.startswith("torch-fidelity InceptionV3") else f"Frechet distance ({extractor})"
    return f"{name}, {protocol['n']} samples"


def sweep_rows(reports: list[EvalReport], sigma_rels: list[float], gammas: list[float], errors: list[float]) -> list[dict]:
    """One row per sigma_rel: sigma_rel, gamma, profile_error and `fid/<sampler point>` for every sampler."""
    rows = []
    for report, sigma_rel, gamma, error in zip(reports, sigma_rels, gammas, errors):
        row = {"sigma_rel": sigma_rel, "gamma": gamma, "profile_error": error}
        row.update({f"fid/{p['name']}": p["fid"] for p in report.results})
        rows.append(row)
    return rows


def _metric_columns(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k.startswith("fid/")]


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def format_table(rows: list[dict], metric: str) -> str:
    """The sweep as aligned text, with the best sigma_rel of each sampler named below it."""
    cols = ["sigma_rel", "gamma", "profile_error", *_metric_columns(rows)]
    cells = [[f"{r[c]:.4g}" if c != "profile_error" else f"{r[c]:.2%}" for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = [f"post-hoc EMA sweep ({metric})", "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    for col in _metric_columns(rows):
        best = min(rows, key=lambda r: r[col] if math.isfinite(r[col]) else math.inf)
        lines.append(f"best {col[4:]}: sigma_rel {best['sigma_rel']:.4g} ({best[col]:.4g})")
    return "\n".join(lines)


def write_plot(path: Path, rows: list[dict], metric: str, step_note: str = "") -> bool:
    """The metric against sigma_rel (EDM2 Fig. 5), one line per sampler, its minimum marked; False (and nothing
    written) without matplotlib, an optional dependency (`pip install diffusion-pl[plot]`)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")  # files only: no display is needed or assumed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4), dpi=120)
    x = [r["sigma_rel"] for r in rows]
    for col in _metric_columns(rows):
        y = [r[col] for r in rows]
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=col[4:])
        best = min(range(len(y)), key=lambda i: y[i] if math.isfinite(y[i]) else math.inf)
        ax.plot([x[best]], [y[best]], marker="*", markersize=11, color=line.get_color())
    ax.set_xlabel("EMA length sigma_rel")
    ax.set_ylabel("FID" if metric.startswith("FID") else "Frechet distance")
    name, _, count = metric.rpartition(", ")
    extractor = name[name.find("(") + 1:-1].rsplit(".", 1)[-1] if "(" in name else "InceptionV3"
    ax.set_title(f"post-hoc EMA sweep ({extractor} features, {count})", fontsize=9)
    if step_note:
        ax.text(0.99, 0.98, step_note, transform=ax.transAxes, ha="right", va="top", fontsize=7, color="gray")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True
