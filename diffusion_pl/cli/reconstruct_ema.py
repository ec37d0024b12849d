"""`diffusion-pl reconstruct-ema`: checkpoints of any EMA length from a run's PowerEMA snapshots (EDM2 post-hoc EMA).

    diffusion-pl reconstruct-ema --run RUN --sigma_rel 0.07 0.12 --out OUT

reads the snapshots `RUN/phema/phema-<step>-<sigma_rel>.pt` that the PowerEMA callback wrote, solves for
each requested sigma_rel the least-squares coefficients of its power-function profile at the latest
snapshot step (or --step) over all snapshots up to that step (Karras et al. 2024, App. C.3, Algorithm 3),
and writes `OUT/phema-<step>-<sigma_rel>.ckpt` (or OUT itself when it is one .ckpt for one sigma_rel): a
copy of the run's newest checkpoint whose `ema.*` weights are the reconstruction, which `diffusion-pl sample
--ckpt_path` and `diffusion-pl evaluate --ckpt_path` take as they are (diffusion_pl/evaluation/reconstruct.py, the
`reconstruct` function this command calls, says more).

    diffusion-pl reconstruct-ema --run RUN --sigma_rel 0.03 0.05 0.07 0.09 0.11 0.13 --out OUT \
        --fid_data shards/cifar10-train -- --num_samples 10000 --sampler heunode --steps 17

also scores every reconstruction as `diffusion-pl evaluate` would (the options after `--` are its own) and
writes the sweep, FID against sigma_rel, as OUT/phema-sweep-<step>.csv and .png (EDM2 Fig. 5; see
diffusion_pl/evaluation/ema_sweep.py). The sweep runs on one device.
"""

from __future__ import annotations

import argparse
import sys

from diffusion_pl.cli.common import CommandError, CommandParser, add_trust_option, flag
from diffusion_pl.utils.errors import run_command
from diffusion_pl.training.phema import SIGMA_REL_MAX, SNAPSHOT_FOLDER

__all__ = ["main", "parser", "run", "sweep_options"]

# evaluate options the sweep sets itself
SWEEP_FLAGS = ("--ckpt_path", "--samples", "--data", "--report", "--devices")


def parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="diffusion-pl reconstruct-ema", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                      flag_aliases={"--ckpt": "--ckpt_path", "--batch": "--batch_size"})
    p.add_argument("--run", required=True, help="run folder of `diffusion-pl fit` trained with the PowerEMA callback")
    p.add_argument("--sigma_rel", type=float, nargs="+", required=True,
                   help=f"EMA lengths to reconstruct, relative to training time, each in (0, {SIGMA_REL_MAX:.4f}]")
    p.add_argument("--out", required=True,
                   help="output folder (phema-<step>-<sigma_rel>.ckpt per value), or a .ckpt file for one value")
    p.add_argument("--step", type=int, default=None, help="snapshot step to reconstruct at; None: the latest")
    p.add_argument("--ckpt_path", dest="ckpt", metavar="PATH", default=None,
                   help="checkpoint to copy (config, net.*); None: the run's newest by stored step")
    p.add_argument("--snapshots", default=None, help=f"snapshot folder; None: RUN/{SNAPSHOT_FOLDER}")
    p.add_argument("--batch_size", dest="batch", type=int, default=8, help="outputs summed per pass over the snapshots (memory)")
    add_trust_option(p)
    p.add_argument("--fid_data", default=None, metavar="SHARDS",
                   help="also score each reconstruction against these reference shards with `diffusion-pl evaluate` "
                        "(its options after `--`) and write the sweep OUT/phema-sweep-<step>.csv / .png")
    return p


def sweep_options(data: str, evaluate_argv: list[str]):
    """The evaluation options of the --fid_data sweep from `diffusion-pl evaluate` arguments, checked before any
    reconstruction is written."""
    from diffusion_pl.cli import evaluate

    parser = evaluate.parser()
    for arg in evaluate_argv:  # by any spelling: `--ckpt` is `--ckpt_path`
        name = (parser.canonical(arg) or "").split("=", 1)[0] if arg.startswith("--") else None
        if name in SWEEP_FLAGS:
            raise CommandError(f"evaluate option {name} after `--` is set by reconstruct-ema itself: expected only "
                               "sampling and metric options (--num_samples, --sampler, --steps, --guidance, ...)")
    try:
        args = parser.parse_args(["--ckpt_path", "<reconstruction>", "--data", data, *evaluate_argv])
    except SystemExit as err:  # argparse has printed its usage error
        raise CommandError(f"the evaluate options after `--` ({' '.join(evaluate_argv)}) do not parse: expected "
                           "options of `diffusion-pl evaluate`") from err
    return evaluate.options_from_args(args)  # counts, --steps per sampler, each sampler spec: before any slow work


def run(args: argparse.Namespace):
    """Reconstruct every --sigma_rel (and run the --fid_data sweep); returns the reconstruction's report."""
    from diffusion_pl.evaluation.reconstruct import reconstruct

    evaluate_argv = getattr(args, "evaluate_argv", [])
    if evaluate_argv and args.fid_data is None:
        raise CommandError(f"options after `--` ({' '.join(evaluate_argv)}) are for the --fid_data sweep: "
                           "expected --fid_data SHARDS")
    options = sweep_options(args.fid_data, evaluate_argv) if args.fid_data is not None else None
    report = reconstruct(args.run, args.sigma_rel, args.out, step=args.step, ckpt=args.ckpt,
                         snapshots=args.snapshots, batch=args.batch, trust_config=args.trust_config, names=flag)
    _print_written(report)
    if options is not None:
        _sweep(options, report)
    return report


def _print_written(report) -> None:
    from diffusion_pl.evaluation.reconstruct import POOR_FIT

    if report.base_step != report.step:
        print(f"reconstruct-ema: net.* and the config come from {report.base_checkpoint} (step {report.base_step}); "
              f"ema.* is the reconstruction at step {report.step}", file=sys.stderr)
    for path, sigma_rel, error, poor_fit in zip(report.paths, report.sigma_rels, report.profile_errors,
                                                report.poor_fits):
        poor = (f"; poor fit (above {POOR_FIT:.0%}): sigma_rel {sigma_rel} lies outside what the tracked profiles "
                "span") if poor_fit else ""
        print(f"wrote {path} (sigma_rel {sigma_rel}, step {report.step}, {len(report.snapshots)} snapshots, profile "
              f"error {error:.2%}{poor})", file=sys.stderr)


def _sweep(options, report) -> None:
    from diffusion_pl.cli.evaluate import print_report
    from diffusion_pl.evaluation.ema_sweep import run_sweep
    from diffusion_pl.evaluation.report import default_report_path

    def published(result) -> None:
        print_report(result)
        print(f"report: {default_report_path(result.source['checkpoint'])}", file=sys.stderr)

    sweep = run_sweep(options, report, on_report=published)
    print(sweep.table())
    if sweep.png is None:
        print(f"sweep: {sweep.csv} (no plot: matplotlib is not installed; pip install matplotlib)", file=sys.stderr)
    else:
        print(f"sweep: {sweep.csv} and {sweep.png}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `diffusion-pl reconstruct-ema`; returns a process exit code.

    Arguments after a `--` are options of `diffusion-pl evaluate` for the --fid_data sweep."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, evaluate_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser().parse_args(own)
    args.evaluate_argv = evaluate_argv
    return run_command("reconstruct-ema", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
