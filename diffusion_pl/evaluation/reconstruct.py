"""Post-hoc EMA as a function: checkpoints of any EMA length from a run's PowerEMA snapshots (EDM2 Sec. 3).

    from diffusion_pl.evaluation.reconstruct import reconstruct

    report = reconstruct("runs/cifar10", [0.05, 0.10], "runs/cifar10/phema-ckpt")
    report.paths, report.profile_errors

reads the snapshots `RUN/phema/phema-<step>-<sigma_rel>.pt` that the PowerEMA callback wrote, solves for
each requested sigma_rel the least-squares coefficients of its power-function profile at the latest
snapshot step (or `step`) over all snapshots up to that step (Karras et al. 2024, App. C.3, Algorithm 3;
as edm2 reconstruct_phema.py; the math is diffusion_pl/training/phema.py), and writes
`OUT/phema-<step>-<sigma_rel>.ckpt` (or OUT itself when it is one .ckpt for one sigma_rel), atomically: a copy
of the run's newest checkpoint whose `ema.*` weights are the reconstruction, which `evaluate`, `diffusion-pl
sample --ckpt_path` and `diffusion-pl evaluate --ckpt_path` take as they are.

The copy keeps `net.*`, the config and `global_step` of that checkpoint and drops the optimizer and
callback states (it is for sampling, not for resuming); `checkpoint["phema"]` records the sigma_rel,
gamma, step, images seen, the snapshots used and the relative L2 error of the reconstructed profile.
Weights are summed in float32, one snapshot in memory at a time, at most `batch` outputs per pass.
`diffusion-pl reconstruct-ema` (diffusion_pl/cli/reconstruct_ema.py) is this function behind a command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from diffusion_pl.utils.checkpoint import read_checkpoint, read_snapshot
from diffusion_pl.utils.errors import MissingFileError, UserError, UserValueError
from diffusion_pl.utils.fileio import atomic_path, writable_folder
from diffusion_pl.training.callbacks.checkpointing import find_resume_checkpoint
from diffusion_pl.training.phema import (SIGMA_REL_MAX, SNAPSHOT_FOLDER, SNAPSHOT_FORMAT, check_sigma_rel,
                                         list_snapshot_files, profile_residual, sigma_rel_to_gamma,
                                         solve_posthoc_coefficients)
from diffusion_pl.evaluation.loading import Names, argument_name

__all__ = ["POOR_FIT", "Snapshot", "ReconstructReport", "read_snapshots", "reconstruct"]

POOR_FIT = 0.10  # relative L2 profile error above which a reconstruction is flagged as extrapolated
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "callbacks")  # dropped from the written copies


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    nimg: int
    sigma_rel: float
    gamma: float


@dataclass(frozen=True)
class ReconstructReport:
    """What `reconstruct` wrote: output j is `paths[j]`, the EMA of length `sigma_rels[j]` (exponent `gammas[j]`)
    at snapshot step `step` (`nimg` images seen), whose profile the snapshots match up to `profile_errors[j]`
    (relative L2; above POOR_FIT the profile lies outside what the tracked profiles span). `net.*` and the
    config come from `base_checkpoint`, saved at `base_step`."""

    paths: list[Path]
    sigma_rels: list[float]
    gammas: list[float]
    profile_errors: list[float]
    step: int
    nimg: int
    base_checkpoint: Path
    base_step: int
    snapshots: list[Path]

    @property
    def poor_fits(self) -> list[bool]:
        """Whether each output's profile error lies above POOR_FIT."""
        return [error > POOR_FIT for error in self.profile_errors]

    def to_dict(self) -> dict:
        """The report as JSON data (paths as strings)."""
        return {"paths": [str(p) for p in self.paths], "sigma_rels": self.sigma_rels, "gammas": self.gammas,
                "profile_errors": self.profile_errors, "step": self.step, "nimg": self.nimg,
                "base_checkpoint": str(self.base_checkpoint), "base_step": self.base_step,
                "snapshots": [str(p) for p in self.snapshots]}


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


def _check_args(run: Path, sigma_rels: Sequence[float], out: Path, batch: int, names: Names) -> list[float]:
    checked = []
    for value in sigma_rels:
        try:
            checked.append(check_sigma_rel(value))
        except (TypeError, ValueError) as err:
            raise UserValueError(f"{names('sigma_rels')} {value} is out of range: expected values in "
                                 f"(0, {SIGMA_REL_MAX:.4f}] (1/sqrt(12), the uniform average, is the widest "
                                 "profile)") from err
    checked = sorted(set(checked))
    if not checked:
        raise UserValueError(f"{names('sigma_rels')} is empty: expected at least one EMA length")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserValueError(f"{names('batch')} {batch} is invalid: expected a positive integer")
    if not run.is_dir():
        raise MissingFileError(f"{names('run')} {run} is not a folder: expected the run folder of `diffusion-pl fit`")
    if out.suffix == ".ckpt" and len(checked) > 1:
        raise UserValueError(f"{names('out')} {out} is one file but {len(checked)} sigma_rels are asked for: expected "
                             "a folder")
    if out.suffix != ".ckpt" and out.is_file():
        raise UserValueError(f"{names('out')} {out} is a file: expected a folder, or a path ending in .ckpt for one "
                             "sigma_rel")
    return checked


def _inputs(folder: Path, step: int | None, names: Names) -> tuple[list[Snapshot], int, int]:
    """(snapshots up to the target step, target step, images seen at it)."""
    snapshots = read_snapshots(folder)
    if not snapshots:
        raise UserValueError(f"{folder} holds no post-hoc EMA snapshots: expected a run trained with the callback "
                             "diffusion_pl.training.callbacks.power_ema.PowerEMA (see its snapshot_every_n_steps)")
    steps = sorted({s.step for s in snapshots})
    target = steps[-1] if step is None else step
    if target not in steps:
        shown = ", ".join(map(str, steps[-5:]))
        raise UserValueError(f"{names('step')} {step} has no snapshots in {folder}: expected one of the snapshot "
                             f"steps (latest: {shown})")
    at_step = {s.nimg for s in snapshots if s.step == target}
    if len(at_step) != 1:
        raise UserValueError(f"the snapshots of step {target} in {folder} disagree on the images seen "
                             f"({sorted(at_step)}): expected snapshots of one run")
    nimg = at_step.pop()
    used = [s for s in snapshots if s.step <= target]
    pairs = {}
    for s in used:
        if (s.nimg, s.gamma) in pairs:
            raise UserValueError(f"snapshots {pairs[s.nimg, s.gamma].name} and {s.path.name} hold the same profile "
                                 f"(images {s.nimg}, sigma_rel {s.sigma_rel}): expected snapshots of one run")
        pairs[s.nimg, s.gamma] = s.path
    return used, target, nimg


def _base_checkpoint(run_folder: Path, ckpt: Path | None, names: Names,
                     trust_config: bool = False) -> tuple[Path, dict]:
    if ckpt is not None:
        path = Path(ckpt)
    else:
        found = find_resume_checkpoint(run_folder, run_folder / "checkpoints", recursive=False)
        if found is None:
            raise UserValueError(f"run folder {run_folder} holds no checkpoint (in it or in checkpoints/): expected a "
                                 f"run of `diffusion-pl fit`, or {names('ckpt')}")
        path = Path(found)
    # the copies carry its config, so it is trust-checked as a loaded checkpoint would be
    option = f"trust_config=True ({names('trust_config')})"
    ckpt = read_checkpoint(path, trust_config=trust_config, trust_option=option).raw
    if not any(k.startswith("ema.") for k in ckpt.get("state_dict", {})):
        raise UserValueError(f"{path} has no ema.* weights: expected a checkpoint of a DiffusionModule")
    return path, ckpt


def _check_layout(ckpt_path: Path, ema_state: dict, snapshot_path: Path, snapshot: dict) -> None:
    state = snapshot["state_dict"]
    if set(state) != set(ema_state):
        differ = sorted(set(state) ^ set(ema_state))[:3]
        raise UserValueError(f"snapshot {snapshot_path.name} does not match the ema weights of {ckpt_path} (keys "
                             f"differ: {', '.join(differ)}): expected a checkpoint of the same run")
    for key, value in state.items():
        if tuple(value.shape) != tuple(ema_state[key].shape):
            raise UserValueError(f"snapshot {snapshot_path.name} has {key} of shape {tuple(value.shape)} but "
                                 f"{ckpt_path} has {tuple(ema_state[key].shape)}: expected a checkpoint of the "
                                 "same run")


def _output_paths(run: Path, out: Path, step: int, sigma_rels: list[float], names: Names) -> list[Path]:
    paths = [out] if out.suffix == ".ckpt" else [out / f"phema-{step:09d}-{s!r}.ckpt" for s in sigma_rels]
    writable_folder(paths[0].parent, names("out"))  # before the slow reconstruction
    run_folder = run.resolve()
    for path in paths:
        if path.resolve().parent in (run_folder, run_folder / "checkpoints"):
            raise UserValueError(f"{names('out')} {out} writes into {path.resolve().parent}, where `--ckpt_path "
                                 "last` looks for checkpoints to resume: expected another folder (e.g. RUN/phema-ckpt)")
        if path.exists():
            try:  # trust_config: only its keys are looked at, nothing is built from it
                old = read_checkpoint(path, trust_config=True).raw
            except UserError:
                old = None
            if old is None or "phema" not in old:
                raise UserValueError(f"{names('out')} {path} exists and is not a reconstruction of reconstruct-ema: "
                                     "expected a new path (an earlier reconstruction is replaced)")
    return paths


def reconstruct(run: str | Path, sigma_rels: Sequence[float], out: str | Path, *, step: int | None = None,
                ckpt: str | Path | None = None, snapshots: str | Path | None = None, batch: int = 8,
                progress: bool = True, trust_config: bool = False, names: Names = argument_name) -> ReconstructReport:
    """Write a checkpoint of every EMA length in `sigma_rels` (each in (0, 1/sqrt(12)]; sorted, repeats dropped).

    Args:
        run: run folder of `diffusion-pl fit` trained with the PowerEMA callback.
        sigma_rels: EMA lengths relative to training time.
        out: output folder (phema-<step>-<sigma_rel>.ckpt per value), or a .ckpt file for one value; not the run
            folder nor its checkpoints/ (where `--ckpt_path last` looks). An earlier reconstruction is replaced.
        step: the snapshot step to reconstruct at; None: the latest.
        ckpt: the checkpoint to copy (config, net.*); None: the run's newest by stored step.
        snapshots: the snapshot folder; None: RUN/phema.
        batch: outputs summed per pass over the snapshots (memory: `batch` float32 copies of the EMA weights).
        progress: a progress bar on stderr (when it is a terminal).
        trust_config: allow a base checkpoint whose saved config names classes outside the trusted packages.
        names: how one-line errors name an argument (`diffusion-pl reconstruct-ema` names its flags).
    """
    from tqdm import tqdm

    run, out = Path(run), Path(out)
    sigma_rels = _check_args(run, sigma_rels, out, batch, names)
    used, step, nimg = _inputs(Path(snapshots) if snapshots else run / SNAPSHOT_FOLDER, step, names)
    ckpt_path, base = _base_checkpoint(run, Path(ckpt) if ckpt is not None else None, names, trust_config)
    ema_state = {k[len("ema."):]: v for k, v in base["state_dict"].items() if k.startswith("ema.")}
    last = _load(used[-1].path)  # a snapshot of the target step: its buffers are the network's at that step
    _check_layout(ckpt_path, ema_state, used[-1].path, last)
    paths = _output_paths(run, out, step, sigma_rels, names)
    t_in = np.array([s.nimg for s in used], dtype=np.float64)
    gamma_in = np.array([s.gamma for s in used])
    gamma_out = np.array([sigma_rel_to_gamma(s) for s in sigma_rels])
    coeffs = solve_posthoc_coefficients(t_in, gamma_in, float(nimg), gamma_out)  # (N_in, N_out)
    errors = profile_residual(coeffs, t_in, gamma_in, float(nimg), gamma_out)  # (N_out,)
    batches = [list(range(i, min(i + batch, len(sigma_rels)))) for i in range(0, len(sigma_rels), batch)]
    with tqdm(total=len(batches) * len(used), desc="reconstruct-ema", unit="snapshot",
              disable=None if progress else True) as bar:
        for outputs in batches:
            sums = _weighted_sums(used, outputs, coeffs, ckpt_path, ema_state, list(last["averaged"]), bar)
            for acc, j in zip(sums, outputs):
                _write(paths[j], base, ema_state, last, acc, {
                    "sigma_rel": sigma_rels[j], "gamma": float(gamma_out[j]), "step": step, "nimg": nimg,
                    "profile_error": float(errors[j]), "base_checkpoint": str(ckpt_path),
                    "snapshots": [s.path.name for s in used], "coefficients": coeffs[:, j].tolist()})
    return ReconstructReport(paths=paths, sigma_rels=sigma_rels, gammas=gamma_out.tolist(),
                             profile_errors=errors.tolist(), step=step, nimg=nimg, base_checkpoint=ckpt_path,
                             base_step=int(base.get("global_step", -1)), snapshots=[s.path for s in used])


def _weighted_sums(used: list[Snapshot], outputs: list[int], coeffs: np.ndarray, ckpt_path: Path, ema_state: dict,
                   averaged: list[str], bar) -> list[dict]:
    """sum_i coeffs[i, j] theta_i of the averaged weights for each output j, one snapshot in memory at a time."""
    sums = [{k: torch.zeros(ema_state[k].shape, dtype=torch.float32) for k in averaged} for _ in outputs]
    for i, snapshot in enumerate(used):
        state = _load(snapshot.path)
        _check_layout(ckpt_path, ema_state, snapshot.path, state)
        weights = state["state_dict"]
        for acc, j in zip(sums, outputs):
            torch._foreach_add_([acc[k] for k in averaged], [weights[k].float() for k in averaged],
                                alpha=float(coeffs[i, j]))
        bar.update()
    return sums


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
