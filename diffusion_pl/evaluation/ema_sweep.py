"""The FID sweep of `diffusion-pl reconstruct-ema --fid-data`: FID against EMA length, as a table and a plot.

EDM2 (Karras et al. 2024, Sec. 3 and Fig. 5) picks the EMA length after training: reconstruct a range
of sigma_rel from the snapshots, score each, keep the best. Here every reconstruction written by
reconstruct-ema is scored by `diffusion-pl evaluate` (its own options, given after `--`, with one device
launch, one feature extractor and one reference for all of them; each checkpoint gets its usual
`.eval.json` report), and the sweep is written beside the reconstructions:

    OUT/phema-sweep-<step>.csv   sigma_rel, gamma, profile_error, then one metric column per sampler
    OUT/phema-sweep-<step>.png   the metric against sigma_rel, one line per sampler, the best point marked

The metric is FID with the InceptionV3 extractor; with `--feature-extractor` it is the Frechet distance in
that extractor's features, and the plot and table say so.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

from diffusion_pl.utils.fileio import atomic_path

__all__ = ["evaluate_args", "run_sweep", "sweep_rows", "write_csv", "write_plot", "format_table"]


def evaluate_args(data: str, evaluate_argv: list[str]):
    """The `diffusion-pl evaluate` arguments of the sweep, checked before any reconstruction is written."""
    from diffusion_pl.cli import evaluate
    from diffusion_pl.cli.common import CommandError

    for flag in ("--ckpt", "--samples", "--data", "--report", "--devices"):
        if flag in evaluate_argv or any(a.startswith(flag + "=") for a in evaluate_argv):
            raise CommandError(f"evaluate option {flag} after `--` is set by reconstruct-ema itself: expected only "
                               "sampling and metric options (--num-samples, --sampler, --steps, --guidance, ...)")
    try:
        args = evaluate.parser().parse_args(["--ckpt", "<reconstruction>", "--data", data, *evaluate_argv])
    except SystemExit as err:  # argparse has printed its usage error
        raise CommandError(f"the evaluate options after `--` ({' '.join(evaluate_argv)}) do not parse: expected "
                           "options of `diffusion-pl evaluate`") from err
    evaluate.check_args(args)  # counts, --steps per sampler, each sampler spec: before any slow work
    return args


def run_sweep(args, paths: list[Path], sigma_rels: list[float], gammas: list[float], errors: list[float],
              stem: Path) -> list[dict]:
    """Evaluate every reconstruction (`args`: from `evaluate_args`), write `stem`.csv and `stem`.png, print the
    table; returns the rows."""
    from diffusion_pl.cli import evaluate

    reports = evaluate.run_checkpoints(args, [str(p) for p in paths])
    rows = sweep_rows(reports, sigma_rels, gammas, errors)
    metric = metric_name(reports[0])
    write_csv(stem.with_suffix(".csv"), rows)
    write_plot(stem.with_suffix(".png"), rows, metric, step_note=stem.name)
    print(format_table(rows, metric))
    print(f"sweep: {stem.with_suffix('.csv')} and {stem.with_suffix('.png')}", file=sys.stderr)
    return rows


def metric_name(report: dict) -> str:
    """'FID' with InceptionV3, else 'Frechet distance (<extractor>)', with the sample count."""
    protocol = report["protocol"]
    extractor = protocol["extractor"]
    name = "FID" if extractor.startswith("torch-fidelity InceptionV3") else f"Frechet distance ({extractor})"
    return f"{name}, {protocol['n']} samples"


def sweep_rows(reports: list[dict], sigma_rels: list[float], gammas: list[float], errors: list[float]) -> list[dict]:
    """One row per sigma_rel: sigma_rel, gamma, profile_error and `fid/<sampler point>` for every sampler."""
    rows = []
    for report, sigma_rel, gamma, error in zip(reports, sigma_rels, gammas, errors):
        row = {"sigma_rel": sigma_rel, "gamma": gamma, "profile_error": error}
        row.update({f"fid/{p['name']}": p["fid"] for p in report["results"]})
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


def write_plot(path: Path, rows: list[dict], metric: str, step_note: str = "") -> None:
    """The metric against sigma_rel (EDM2 Fig. 5), one line per sampler, its minimum marked."""
    import matplotlib

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
