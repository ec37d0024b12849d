"""Power-function EMA and post-hoc EMA reconstruction (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models" (EDM2), Sec. 3 and App. C).

A power-function EMA at training time t (here: training images seen) averages the trajectory of the
weights theta(tau) with the profile

    p_{gamma,t}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),    0 < tau <= t        (EDM2 Eq. 121)

whose standard deviation relative to t, sigma_rel, depends on gamma alone:

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))                          (Eq. 123)

`gamma_to_sigma_rel` is Eq. 123; `sigma_rel_to_gamma` inverts it, the largest root of the cubic
gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0 (Eq. 126, Algorithm 2).
sigma_rel lies in (0, 1/sqrt(12)]: gamma = 0 is the uniform average of the whole run, the widest profile.

Tracking (`PowerFunctionEMA`): after each optimizer step, with t the images seen after it and t_delta the
images of that step, average <- beta average + (1 - beta) theta with

    beta = (1 - t_delta / t)^(gamma + 1)                                             (Eq. 127)

The first step has beta = 0 (the average starts as the weights). For a trajectory that is constant over
each step this recursion is exact: the weight it gives to step j is the profile's mass on that step's
interval, (t_j^(gamma+1) - t_{j-1}^(gamma+1)) / t^(gamma+1), so the tracked averages are exactly the
continuous profiles the reconstruction works with (no discretisation error).

Reconstruction (`solve_posthoc_coefficients`): every snapshot i (time t_i, exponent gamma_i) is the
trajectory weighted by p_i. A profile p_r at time t_r is approximated by sum_i c_i p_i in L2 over tau,
the least-squares solution A c = b with A_ij = <p_i, p_j>, b_i = <p_i, p_r> in closed form (Eq. 151,
Algorithm 3); then theta_r ~ sum_i c_i theta_i. Times enter only through ratios (up to a common factor in
A and b), so counting time in images or in steps of constant size gives the same coefficients.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffusion_pl.utils.fileio import atomic_path

__all__ = ["SIGMA_REL_MAX", "check_sigma_rel", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "power_ema_beta",
           "profile_inner_products", "solve_posthoc_coefficients", "profile_residual", "PowerFunctionEMA",
           "SNAPSHOT_FORMAT", "SNAPSHOT_FOLDER", "snapshot_name", "list_snapshot_files", "save_snapshot"]

SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # gamma = 0: the uniform average over the run (0.2887)


def check_sigma_rel(sigma_rel: float) -> float:
    """`sigma_rel` as a float; ValueError unless 0 < sigma_rel <= 1/sqrt(12)."""
    value = float(sigma_rel)
    if not 0.0 < value <= SIGMA_REL_MAX * (1 + 1e-12):
        raise ValueError(f"sigma_rel is {sigma_rel}: expected a value in (0, {SIGMA_REL_MAX:.4f}] (the EMA length "
                         "relative to training time; 1/sqrt(12) is the uniform average)")
    return min(value, SIGMA_REL_MAX)


def gamma_to_sigma_rel(gamma: float) -> float:
    """sigma_rel of the power-function profile with exponent gamma >= 0 (EDM2 Eq. 123; edm2 training/phema.py:19)."""
    if not gamma >= 0.0:
        raise ValueError(f"gamma is {gamma}: expected a value >= 0")
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative std `sigma_rel` (EDM2 Eq. 126, Algorithm 2).

    The cubic has exactly one root >= 0 for sigma_rel <= 1/sqrt(12) (one sign change, Descartes); it is
    found as the largest real eigenvalue of the companion matrix (numpy.roots, as edm2 training/phema.py:28)
    and polished by Newton steps in float64.
    """
    s = check_sigma_rel(sigma_rel)
    k = s ** -2.0
    coeffs = (1.0, 7.0, 16.0 - k, 12.0 - k)
    gamma = max(float(r.real) for r in np.roots(coeffs) if abs(r.imag) <= 1e-9 * max(1.0, abs(r)))
    for _ in range(3):  # Newton on the cubic; the root is simple
        f = ((gamma + 7.0) * gamma + 16.0 - k) * gamma + 12.0 - k
        df = (3.0 * gamma + 14.0) * gamma + 16.0 - k
        if df == 0.0:
            break
        gamma -= f / df
    return max(gamma, 0.0)


def power_ema_beta(gamma: float, t: float, t_delta: float) -> float:
    """Per-step decay tracking the profile of exponent gamma: (1 - t_delta / t)^(gamma + 1) (EDM2 Eq. 127).

    `t` is the training time after the step (t_delta <= t), `t_delta` the time the step took; the first
    step (t == t_delta) gives 0.
    """
    if not 0 < t_delta <= t:
        raise ValueError(f"t_delta is {t_delta} and t is {t}: expected 0 < t_delta <= t")
    return (1.0 - t_delta / t) ** (gamma + 1.0)


def profile_inner_products(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> = integral of p_{gamma_a,t_a}(tau) p_{gamma_b,t_b}(tau) d tau, broadcast over the arguments.

    In closed form (EDM2 Eq. 151, Algorithm 3; edm2 training/phema.py:55):
    (gamma_a + 1)(gamma_b + 1) (t_a/t_b)^(gamma_b if t_a < t_b else -gamma_a) / ((gamma_a + gamma_b + 1) max(t_a, t_b)).
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    num = (gamma_a + 1.0) * (gamma_b + 1.0) * ratio ** exponent
    return num / ((gamma_a + gamma_b + 1.0) * np.maximum(t_a, t_b))


def _gram(t_in: np.ndarray, gamma_in: np.ndarray, t_out: np.ndarray, gamma_out: np.ndarray):
    col, row = (lambda x: x.reshape(-1, 1)), (lambda x: x.reshape(1, -1))
    a = profile_inner_products(col(t_in), col(gamma_in), row(t_in), row(gamma_in))  # (N_in, N_in)
    b = profile_inner_products(col(t_in), col(gamma_in), row(t_out), row(gamma_out))  # (N_in, N_out)
    return a, b


def _as_arrays(t_in, gamma_in, t_out, gamma_out):
    t_in, gamma_in = (np.asarray(x, dtype=np.float64).ravel() for x in np.broadcast_arrays(t_in, gamma_in))
    t_out, gamma_out = (np.asarray(x, dtype=np.float64).ravel() for x in np.broadcast_arrays(t_out, gamma_out))
    if t_in.size == 0:
        raise ValueError("no input profiles: expected at least one snapshot")
    if (t_in <= 0).any() or (t_out <= 0).any():
        raise ValueError(f"times must be > 0, got inputs {t_in.min()} and outputs {t_out.min()}")
    return t_in, gamma_in, t_out, gamma_out


def solve_posthoc_coefficients(t_in, gamma_in, t_out, gamma_out) -> np.ndarray:
    """Coefficients c (N_in, N_out): output profile j ~ sum_i c[i, j] input profile i (EDM2 Algorithm 3).

    Solves the normal equations A c = b of the L2 fit, then scales each column to sum 1 (as edm2
    training/phema.py:84), so that the reconstruction is an average: a constant trajectory comes back
    exactly. Input profiles must be distinct (a repeated (t, gamma) pair makes A singular).
    """
    t_in, gamma_in, t_out, gamma_out = _as_arrays(t_in, gamma_in, t_out, gamma_out)
    pairs = set(zip(t_in.tolist(), gamma_in.tolist()))
    if len(pairs) != t_in.size:
        raise ValueError(f"{t_in.size - len(pairs)} input profiles are repeated (same t and gamma): expected distinct "
                         "snapshots")
    a, b = _gram(t_in, gamma_in, t_out, gamma_out)
    coeffs = np.linalg.solve(a, b)
    return coeffs / coeffs.sum(axis=0, keepdims=True)


def profile_residual(coeffs: np.ndarray, t_in, gamma_in, t_out, gamma_out) -> np.ndarray:
    """Relative L2 error ||sum_i c_i p_i - p_out|| / ||p_out|| of each reconstructed profile (N_out,).

    From the same inner products: ||r||^2 = c^T A c - 2 c^T b + <p_out, p_out>. A measure of how well the
    snapshots span the requested profile (small inside the tracked range, large when extrapolating).
    """
    t_in, gamma_in, t_out, gamma_out = _as_arrays(t_in, gamma_in, t_out, gamma_out)
    a, b = _gram(t_in, gamma_in, t_out, gamma_out)
    c = np.asarray(coeffs, dtype=np.float64).reshape(t_in.size, t_out.size)
    norm2 = profile_inner_products(t_out, gamma_out, t_out, gamma_out)  # (N_out,)
    r2 = np.einsum("io,ij,jo->o", c, a, c) - 2.0 * np.einsum("io,io->o", c, b) + norm2
    return np.sqrt(np.maximum(r2, 0.0) / norm2)


class PowerFunctionEMA:
    """Power-function EMAs of a list of tensors for several sigma_rel at once (EDM2 Sec. 3.1, Eq. 127).

    `update(params, t_delta)` after every optimizer step: t (images seen) grows by t_delta and each
    average takes one `torch._foreach_lerp_`. Averages are float32 (float64 stays float64) on the
    parameters' device. State (`state_dict`) is plain tensors and numbers, loadable with weights_only.

    Args:
        params: the tensors to average (the network's parameters), e.g. `list(net.parameters())`.
        names: a name for each tensor (the state_dict keys), checked on `load_state_dict`.
        sigma_rels: the tracked EMA lengths, each in (0, 1/sqrt(12)].
    """

    def __init__(self, params: Sequence[Tensor], names: Sequence[str], sigma_rels: Iterable[float]) -> None:
        self.sigma_rels = tuple(check_sigma_rel(s) for s in sigma_rels)
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"sigma_rels is {list(self.sigma_rels)}: expected at least one value, no repeats")
        if len(names) != len(params):
            raise ValueError(f"{len(names)} names for {len(params)} tensors: expected one name per tensor")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.names = list(names)
        self.averages: list[list[Tensor]] = [[_average_like(p) for p in params] for _ in self.sigma_rels]
        self.nimg = 0  # t: training images seen
        self.step = 0  # optimizer steps averaged

    @torch.no_grad()
    def update(self, params: Sequence[Tensor], t_delta: int) -> list[float]:
        """One optimizer step of `t_delta` images: average <- beta average + (1 - beta) param; returns the betas."""
        self.nimg += int(t_delta)
        self.step += 1
        betas = []
        for gamma, averages in zip(self.gammas, self.averages):
            beta = power_ema_beta(gamma, self.nimg, t_delta)
            sources = [p.detach() if p.dtype == a.dtype else p.detach().to(a.dtype) for p, a in zip(params, averages)]
            torch._foreach_lerp_(averages, sources, 1.0 - beta)
            betas.append(beta)
        return betas

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "nimg": self.nimg, "step": self.step,
                "averages": [dict(zip(self.names, averages)) for averages in self.averages]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` (tensors copied onto this tracker's devices); ValueError on another layout."""
        saved = [float(s) for s in state["sigma_rels"]]
        if saved != list(self.sigma_rels):
            raise ValueError(f"the checkpoint tracks sigma_rels {saved} but this run tracks {list(self.sigma_rels)}: "
                             "expected the same list to resume (start a new run to track others)")
        for averages, stored in zip(self.averages, state["averages"]):
            if list(stored) != self.names:
                missing = sorted(set(self.names) ^ set(stored))[:3]
                raise ValueError(f"the checkpoint's averages do not match the network (differ in {missing}): "
                                 "expected the network the checkpoint was trained with")
            for average, name in zip(averages, self.names):  # copy_ crosses devices (a CPU-mapped checkpoint)
                if stored[name].shape != average.shape:
                    raise ValueError(f"the checkpoint's average of {name} has shape {tuple(stored[name].shape)}, the "
                                     f"network's {tuple(average.shape)}: expected the network it was trained with")
                average.copy_(stored[name])
        self.nimg, self.step = int(state["nimg"]), int(state["step"])


def _average_like(p: Tensor) -> Tensor:
    dtype = p.dtype if p.dtype == torch.float64 else torch.float32
    return p.detach().to(dtype=dtype, copy=True)


# -- snapshot files (written by callbacks.phema.PowerEMA, read by `diffusion-pl reconstruct-ema`) ------------

SNAPSHOT_FORMAT = "diffusion_pl.training.phema/1"
SNAPSHOT_FOLDER = "phema"  # under the run folder, beside checkpoints/
_SNAPSHOT_NAME = re.compile(r"^phema-(\d{9,})-(.+)\.pt$")


def snapshot_name(step: int, sigma_rel: float) -> str:
    """`phema-<step, 9 digits>-<sigma_rel>.pt` (repr of the float: distinct values get distinct names)."""
    return f"phema-{step:09d}-{sigma_rel!r}.pt"


def list_snapshot_files(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the snapshot files in `folder` by name, sorted; hidden temporary files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _SNAPSHOT_NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_snapshot(path: str | os.PathLike, snapshot: dict) -> None:
    """torch.save `snapshot` through a hidden temporary file, fsynced and renamed onto `path` (fileio.atomic_path):
    a write killed midway leaves only the temporary file, which `list_snapshot_files` skips."""
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        torch.save(snapshot, f)
