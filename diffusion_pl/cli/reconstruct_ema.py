"""`diffusion-pl reconstruct-ema`: checkpoints of any EMA length from a run's PowerEMA snapshots (EDM2 post-hoc EMA).

    diffusion-pl reconstruct-ema --run RUN --sigma-rel 0.07 0.12 --out OUT

reads the snapshots `RUN/phema/phema-<step>-<sigma_rel>.pt` that the PowerEMA callback wrote, solves for
each requested sigma_rel the least-squares coefficients of its power-function profile at the latest
snapshot step (or --step) over all snapshots up to that step (Karras et al. 2024, App. C.3, Algorithm 3;
as edm2 reconstruct_phema.py), and writes `OUT/phema-<step>-<sigma_rel>.ckpt` (or OUT itself when it is one
.ckpt for one sigma_rel): a copy of the run's newest checkpoint whose `ema.*` weights are the
reconstruction, which `diffusion-pl sample --ckpt` and `diffusion-pl evaluate --ckpt` take as they are.

The copy keeps `net.*`, the config and `global_step` of that checkpoint and drops the optimizer and
callback states (it is for sampling, not for resuming); `checkpoint["phema"]` records the sigma_rel,
gamma, step, images seen, the snapshots used and the relative L2 error of the reconstructed profile.
Weights are summed in float32, one snapshot in memory at a time, at most --batch outputs per pass.

    diffusion-pl reconstruct-ema --run RUN --sigma-rel 0.03 0.05 0.07 0.09 0.11 0.13 --out OUT \
        --fid-data shards/cifar10-train -- --num-samples 10000 --sampler heunode --steps 17

also scores every reconstruction with `diffusion-pl evaluate` (the options after `--` are its own) and
writes the sweep, FID against sigma_rel, as OUT/phema-sweep-<step>.csv and .png (EDM2 Fig. 5; see
diffusion_pl/evaluation/ema_sweep.py). The sweep runs on one device.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffusion_pl.training.callbacks.checkpointing import find_resume_checkpoint
from diffusion_pl.cli.common import CommandError
from diffusion_pl.utils.checkpoint import read_checkpoint, read_snapshot
from diffusion_pl.utils.errors import MissingFileError, UserError, run_command
from diffusion_pl.utils.fileio import atomic_path
from diffusion_pl.training.phema import (SIGMA_REL_MAX, SNAPSHOT_FOLDER, SNAPSHOT_FORMAT, check_sigma_rel,
                                         list_snapshot_files, profile_residual, sigma_rel_to_gamma,
                                         solve_posthoc_coefficients)

__all__ = ["main", "parser", "run", "Snapshot", "read_snapshots"]

POOR_FIT = 0.10  # relative L2 profile error above which a reconstruction is flagged as extrapolated
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "callbacks")  # dropped from the written copies


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffusion-pl reconstruct-ema", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run folder of `diffusion-pl fit` trained with the PowerEMA callback")
    p.add_argument("--sigma-rel", type=float, nargs="+", required=True,
                   help=f"EMA lengths to reconstruct, relative to training time, each in (0, {SIGMA_REL_MAX:.4f}]")
    p.add_argument("--out", required=True,
                   help="output folder (phema-<step>-<sigma_rel>.ckpt per value), or a .ckpt file for one value")
    p.add_argument("--step", type=int, default=None, help="snapshot step to reconstruct at; None: the latest")
    p.add_argument("--ckpt", default=None,
                   help="checkpoint to copy (config, net.*); None: the run's newest by stored step")
    p.add_argument("--snapshots", default=None, help=f"snapshot folder; None: RUN/{SNAPSHOT_FOLDER}")
    p.add_argument("--batch", type=int, default=8, help="outputs summed per pass over the snapshots (memory)")
    p.add_argument("--trust-config", action="store_true",
                   help="allow a checkpoint whose saved config imports from packages other than diffusion_pl, torch, "
                        "lightning, timm, diffusers (a config is code: only for checkpoints you trust)")
    p.add_argument("--fid-data", default=None, metavar="SHARDS",
                   help="also score each reconstruction against these reference shards with `diffusion-pl evaluate` "
                        "(its options after `--`) and write the sweep OUT/phema-sweep-<step>.csv / .png")
    return p


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    nimg: int
    sigma_rel: float
    gamma: float


def _load(path: Path) -> dict:
    return read_snapshot(path, SNAPSHOT_FORMAT)


def read_snapshots(folder: Path) -> list[Snapshot]:
    """Every snapshot in `folder`, sorted by (images seen, sigma_rel); raises on an unreadable one."""
    found = []
    for _, path in list_snapshot_files(folder):
        data = _load(path)
        found.append(Snapshot(path, int(data["step"]), int(data["nimg"]), float(data["sigma_rel"]),
                              float(data["gamma"])))
    return sorted(found, key=lambda s: (s.nimg, s.sigma_rel))


def _check_args(args: argparse.Namespace) -> list[float]:
    sigma_rels = []
    for value in args.sigma_rel:
        try:
            sigma_rels.append(check_sigma_rel(value))
        except ValueError as err:
            raise CommandError(f"--sigma-rel {value} is out of range: expected values in (0, {SIGMA_REL_MAX:.4f}] "
                               "(1/sqrt(12), the uniform average, is the widest profile)") from err
    sigma_rels = sorted(set(sigma_rels))
    if args.batch < 1:
        raise CommandError(f"--batch {args.batch} is invalid: expected a positive integer")
    if not Path(args.run).is_dir():
        raise MissingFileError(f"--run {args.run} is not a folder: expected the run folder of `diffusion-pl fit`")
    out = Path(args.out)
    if out.suffix == ".ckpt" and len(sigma_rels) > 1:
        raise CommandError(f"--out {out} is one file but {len(sigma_rels)} sigma_rels are asked for: expected a folder")
    if out.suffix != ".ckpt" and out.is_file():
        raise CommandError(f"--out {out} is a file: expected a folder, or a path ending in .ckpt for one sigma_rel")
    if getattr(args, "evaluate_argv", None) and args.fid_data is None:
        raise CommandError(f"options after `--` ({' '.join(args.evaluate_argv)}) are for the --fid-data sweep: "
                           "expected --fid-data SHARDS")
    if args.fid_data is not None:
        from diffusion_pl.evaluation.ema_sweep import evaluate_args

        args.evaluate = evaluate_args(args.fid_data, getattr(args, "evaluate_argv", []))
    return sigma_rels


def _inputs(args: argparse.Namespace) -> tuple[list[Snapshot], int, int]:
    """(snapshots up to the target step, target step, images seen at it)."""
    folder = Path(args.snapshots) if args.snapshots else Path(args.run) / SNAPSHOT_FOLDER
    snapshots = read_snapshots(folder)
    if not snapshots:
        raise CommandError(f"{folder} holds no post-hoc EMA snapshots: expected a run trained with the callback "
                           "diffusion_pl.training.callbacks.power_ema.PowerEMA (see its snapshot_every_n_steps)")
    steps = sorted({s.step for s in snapshots})
    step = steps[-1] if args.step is None else args.step
    if step not in steps:
        shown = ", ".join(map(str, steps[-5:]))
        raise CommandError(f"--step {args.step} has no snapshots in {folder}: expected one of the snapshot steps "
                           f"(latest: {shown})")
    at_step = {s.nimg for s in snapshots if s.step == step}
    if len(at_step) != 1:
        raise CommandError(f"the snapshots of step {step} in {folder} disagree on the images seen ({sorted(at_step)}): "
                           "expected snapshots of one run")
    nimg = at_step.pop()
    used = [s for s in snapshots if s.step <= step]
    pairs = {}
    for s in used:
        if (s.nimg, s.gamma) in pairs:
            raise CommandError(f"snapshots {pairs[s.nimg, s.gamma].name} and {s.path.name} hold the same profile "
                               f"(images {s.nimg}, sigma_rel {s.sigma_rel}): expected snapshots of one run")
        pairs[s.nimg, s.gamma] = s.path
    return used, step, nimg


def _base_checkpoint(args: argparse.Namespace) -> tuple[Path, dict]:
    run_folder = Path(args.run)
    if args.ckpt is not None:
        path = Path(args.ckpt)
    else:
        found = find_resume_checkpoint(run_folder, run_folder / "checkpoints", recursive=False)
        if found is None:
            raise CommandError(f"run folder {run_folder} holds no checkpoint (in it or in checkpoints/): expected a "
                               "run of `diffusion-pl fit`, or --ckpt")
        path = Path(found)
    ckpt = read_checkpoint(path, trust_config=args.trust_config).raw  # written on with its config: trust-checked
    if not any(k.startswith("ema.") for k in ckpt.get("state_dict", {})):
        raise CommandError(f"{path} has no ema.* weights: expected a checkpoint of a DiffusionModule")
    return path, ckpt


def _check_layout(ckpt_path: Path, ema_state: dict, snapshot_path: Path, snapshot: dict) -> None:
    state = snapshot["state_dict"]
    if set(state) != set(ema_state):
        differ = sorted(set(state) ^ set(ema_state))[:3]
        raise CommandError(f"snapshot {snapshot_path.name} does not match the ema weights of {ckpt_path} (keys "
                           f"differ: {', '.join(differ)}): expected a checkpoint of the same run")
    for key, value in state.items():
        if tuple(value.shape) != tuple(ema_state[key].shape):
            raise CommandError(f"snapshot {snapshot_path.name} has {key} of shape {tuple(value.shape)} but {ckpt_path} "
                               f"has {tuple(ema_state[key].shape)}: expected a checkpoint of the same run")


def _output_paths(args: argparse.Namespace, step: int, sigma_rels: list[float]) -> list[Path]:
    out = Path(args.out)
    paths = [out] if out.suffix == ".ckpt" else [out / f"phema-{step:09d}-{s!r}.ckpt" for s in sigma_rels]
    run_folder = Path(args.run).resolve()
    for path in paths:
        if path.resolve().parent in (run_folder, run_folder / "checkpoints"):
            raise CommandError(f"--out {args.out} writes into {path.resolve().parent}, where `--ckpt_path last` looks "
                               "for checkpoints to resume: expected another folder (e.g. RUN/phema-ckpt)")
        if path.exists():
            try:  # trust_config: only its keys are looked at
                old = read_checkpoint(path, trust_config=True).raw
            except UserError:
                old = None
            if old is None or "phema" not in old:
                raise CommandError(f"--out {path} exists and is not a reconstruction of reconstruct-ema: expected a "
                                   "new path (an earlier reconstruction is replaced)")
    return paths


def run(args: argparse.Namespace) -> list[Path]:
    """Reconstruct every --sigma-rel; returns the written checkpoint paths."""
    from tqdm import tqdm

    sigma_rels = _check_args(args)
    snapshots, step, nimg = _inputs(args)
    ckpt_path, ckpt = _base_checkpoint(args)
    ema_state = {k[len("ema."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
    last = _load(snapshots[-1].path)  # a snapshot of the target step: its buffers are the network's at that step
    _check_layout(ckpt_path, ema_state, snapshots[-1].path, last)
    averaged = list(last["averaged"])
    paths = _output_paths(args, step, sigma_rels)
    t_in = np.array([s.nimg for s in snapshots], dtype=np.float64)
    gamma_in = np.array([s.gamma for s in snapshots])
    gamma_out = np.array([sigma_rel_to_gamma(s) for s in sigma_rels])
    coeffs = solve_posthoc_coefficients(t_in, gamma_in, float(nimg), gamma_out)  # (N_in, N_out)
    errors = profile_residual(coeffs, t_in, gamma_in, float(nimg), gamma_out)  # (N_out,)
    base_step = int(ckpt.get("global_step", -1))
    if base_step != step:
        print(f"reconstruct-ema: net.* and the config come from {ckpt_path} (step {base_step}); ema.* is the "
              f"reconstruction at step {step}", file=sys.stderr)
    batches = [list(range(i, min(i + args.batch, len(sigma_rels)))) for i in range(0, len(sigma_rels), args.batch)]
    with tqdm(total=len(batches) * len(snapshots), desc="reconstruct-ema", unit="snapshot", disable=None) as bar:
        for batch in batches:
            sums = [{k: torch.zeros(ema_state[k].shape, dtype=torch.float32) for k in averaged} for _ in batch]
            for i, snapshot in enumerate(snapshots):
                state = _load(snapshot.path)
                _check_layout(ckpt_path, ema_state, snapshot.path, state)
                weights = state["state_dict"]
                for acc, j in zip(sums, batch):
                    torch._foreach_add_([acc[k] for k in averaged], [weights[k].float() for k in averaged],
                                        alpha=float(coeffs[i, j]))
                bar.update()
            for acc, j in zip(sums, batch):
                _write(paths[j], ckpt, ema_state, last, acc, {
                    "sigma_rel": sigma_rels[j], "gamma": float(gamma_out[j]), "step": step, "nimg": nimg,
                    "profile_error": float(errors[j]), "base_checkpoint": str(ckpt_path),
                    "snapshots": [s.path.name for s in snapshots], "coefficients": coeffs[:, j].tolist()})
    for path, sigma_rel, error in zip(paths, sigma_rels, errors):
        flag = (f"; poor fit (above {POOR_FIT:.0%}): sigma_rel {sigma_rel} lies outside what the tracked profiles "
                "span") if error > POOR_FIT else ""
        print(f"wrote {path} (sigma_rel {sigma_rel}, step {step}, {len(snapshots)} snapshots, profile error "
              f"{error:.2%}{flag})", file=sys.stderr)
    if args.fid_data is not None:
        from diffusion_pl.evaluation.ema_sweep import run_sweep

        folder = Path(args.out).parent if Path(args.out).suffix == ".ckpt" else Path(args.out)
        run_sweep(args.evaluate, paths, sigma_rels, gamma_out.tolist(), errors.tolist(),
                  folder / f"phema-sweep-{step:09d}")
    return paths


def _write(path: Path, ckpt: dict, ema_state: dict, last: dict, acc: dict, meta: dict) -> None:
    """The base checkpoint without training state, with ema.* = the reconstruction (buffers from `last`)."""
    state_dict = dict(ckpt["state_dict"])
    for key, value in last["state_dict"].items():
        value = acc.get(key, value)
        state_dict[f"ema.{key}"] = value.to(ema_state[key].dtype) if value.is_floating_point() else value.clone()
    out = {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}
    out["state_dict"] = state_dict
    out["phema"] = meta
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        torch.save(out, f)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `diffusion-pl reconstruct-ema`; returns a process exit code.

    Arguments after a `--` are options of `diffusion-pl evaluate` for the --fid-data sweep."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, evaluate_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser().parse_args(own)
    args.evaluate_argv = evaluate_argv
    return run_command("reconstruct-ema", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
