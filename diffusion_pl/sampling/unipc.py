"""UniPC: the unified predictor-corrector multistep solver in lambda, data prediction (Zhao et al. 2023).

Each grid interval t -> s (h = lambda_s - lambda_t) is a UniP-p predictor step from the current and
the p - 1 previous x0_hat evaluations (Zhao et al. 2023, Alg. 2 with B(h)):

    x_s = (sigma_s/sigma_t) x_t - alpha_s (e^-h - 1) m_t - alpha_s B(h) sum_k rho_k D_k,
    D_k = (m_k - m_t) / r_k,  r_k = (lambda_k - lambda_t) / h,

where rho solves the order conditions R rho = b (R_ik = r_k^(i-1), b_i = i! phi_{i+1}(-h) / B(h) with
h phi_1 = e^-h - 1, phi_{k+1} = (phi_k - 1/k!) / (-h)), rho = 1/2 for p = 2, and B(h) = e^-h - 1
("bh2") or -h ("bh1"). After each step except the last, the UniC corrector reuses the evaluation at
the predicted x_s, which the next step needs anyway, to correct x_s by the same formula with that
evaluation added as r = 1 (Alg. 3): order p + 1 at no extra network evaluation. The corrected x_s
is carried on while m_s stays the evaluation at the predicted one, as in diffusers'
UniPCMultistepScheduler (schedulers/scheduling_unipc_multistep.py:833-960 `multistep_uni_p_bh_update`,
962-1098 `multistep_uni_c_bh_update`, 1153-1232 `step`; predict_x0=True), which is followed here step
by step: the warm-up orders, `lower_order_final` (interval i has order at most n - i in a run of n network
evaluations, so the last interval is at most second order before the final denoise), the corrector of a step p using that step's
order, and `disable_corrector` (indices of predictor steps whose result is not corrected). The final
denoise is diffusers' last step to sigma = 0. A step from alpha_t = 0 (lambda = -inf) is first
order and not corrected, and no later step reaches back across it.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np

from diffusion_pl.sampling.base import Point, Sampler
from diffusion_pl.sampling.grids import TimeGrid

__all__ = ["UniPC"]


def _weights(h: float, rks: list[float], variant: str, corrector: bool) -> tuple[float, float, list[float]]:
    """(e^-h - 1, B(h), rho) of a step: rho for the differences at rks (the corrector's last rk is 1)."""
    hh = -h
    h_phi_1 = math.expm1(hh) if math.isfinite(hh) else -1.0
    b_h = hh if variant == "bh1" else h_phi_1
    p = len(rks) if corrector else len(rks) + 1  # the order: the predictor's rks exclude the r = 1 column
    if p == 1 and not corrector:
        return h_phi_1, b_h, []
    if p == (1 if corrector else 2):  # diffusers' simplified weight of the lowest orders
        return h_phi_1, b_h, [0.5]
    r = np.array(list(rks) + ([] if corrector else [1.0]), dtype=np.float64)
    h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1, []
    for i in range(1, p + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    big_r = np.stack([r ** (i - 1) for i in range(1, p + 1)])
    b = np.array(b, dtype=np.float64)
    rho = np.linalg.solve(big_r, b) if corrector else np.linalg.solve(big_r[:-1, :-1], b[:-1])
    return h_phi_1, b_h, rho.tolist()


class UniPC(Sampler):
    """UniPC-p with B(h) = e^-h - 1 ("bh2", the default) or -h ("bh1") (Zhao et al. 2023; diffusers
    UniPCMultistepScheduler, predict_x0=True). NFE = steps + final_denoise. The default order 2 is diffusers'
    default and the better one on the sampler benchmark (docs/guide/sampling.md)."""

    def __init__(self, steps: int = 20, grid: TimeGrid | None = None, final_denoise: bool = True, order: int = 2,
                 variant: Literal["bh1", "bh2"] = "bh2", lower_order_final: bool = True,
                 disable_corrector: Sequence[int] = ()) -> None:
        if isinstance(order, bool) or order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
        super().__init__(steps, grid, final_denoise)
        self.order, self.variant, self.lower_order_final = int(order), variant, lower_order_final
        self.disable_corrector = [int(i) for i in disable_corrector]

    def _update(self, x_t, p_t: Point, p_s: Point, history: list, order: int, m_s=None):
        """UniP-order (m_s None) or UniC-order (m_s the evaluation at the predicted x_s) from x_t at p_t."""
        lam_t, m_t = history[-1]
        h = p_s.lam - lam_t
        earlier = history[-order:-1] if order > 1 else []
        rks = [(lam_k - lam_t) / h for lam_k, _ in reversed(earlier)]
        diffs = [(m_k - m_t) / r for (_, m_k), r in zip(reversed(earlier), rks)]
        corrector = m_s is not None
        if corrector:
            rks, diffs = rks + [1.0], diffs + [m_s - m_t]
        h_phi_1, b_h, rho = _weights(h, rks, self.variant, corrector)
        x_s = (p_s.sigma / p_t.sigma) * x_t + (-p_s.alpha * h_phi_1) * m_t
        if rho:
            x_s = x_s - (p_s.alpha * b_h) * sum(c * d for c, d in zip(rho, diffs))
        return x_s

    def solve(self, denoiser, x, points, noise, class_labels, bar):
        history: list = []
        evaluations = len(points) - 1 + int(self.final_denoise)
        x_prev, p_prev, prev_order = None, None, 0
        for i, (p_t, p_s) in enumerate(zip(points[:-1], points[1:])):
            m_t = denoiser(x, p_t.t, class_labels).x0
            if (x_prev is not None and i - 1 not in self.disable_corrector and math.isfinite(p_prev.lam)):
                x = self._update(x_prev, p_prev, p_t, history, prev_order, m_s=m_t)
            history = history[len(history) - self.order + 1:] + [(p_t.lam, m_t)]
            order = min(self.order, evaluations - i) if self.lower_order_final else self.order
            order = min(order, len(history)) if math.isfinite(p_t.lam) else 1
            x_prev, p_prev, prev_order = x, p_t, order
            x = self._update(x, p_t, p_s, history, order)
            if not math.isfinite(p_t.lam):
                history = []  # no later step reaches back across alpha = 0
            bar.update()
        return x
