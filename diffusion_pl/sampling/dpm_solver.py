"""DPM-Solver++ multistep (2M, 3M) on the probability-flow ODE, and its SDE variant (Lu et al. 2022b).

With lambda = log(alpha/sigma) and the data prediction x0_hat, the ODE solution from t to s is
x_s = (sigma_s/sigma_t) x_t + sigma_s int e^lambda x0_hat dlambda, and the SDE's (gamma = 1 below)
x_s = (sigma_s/sigma_t) e^-h x_t + 2 sigma_s int e^{2 lambda - lambda_s} x0_hat dlambda + noise, with
h = lambda_s - lambda_t. Both integrals are taken with x0_hat a polynomial in lambda through the
current and the previous evaluations (r_i = h_i / h, h_i the earlier steps, H = (1 + gamma) h):

    order 1:  x_s = (sigma_s/sigma_t) e^{-gamma h} x_t + alpha_s (1 - e^-H) D0          (D0 = x0_hat_t)
    order 2:  + alpha_s (1 - e^-H) D1 / 2                        (D1 = (D0 - x0_hat_prev) / r0; "midpoint")
    order 3:  + alpha_s ((e^-H - 1)/H + 1) D1' + alpha_s (1/2 - (e^-H - 1 + H)/H^2) D2
              with D1_0, D1_1 the two first differences, D1' = D1_0 + r0/(r0 + r1) (D1_0 - D1_1),
              D2 = (D1_0 - D1_1) / (r0 + r1);
    SDE:      + sigma_s sqrt(1 - e^{-2h}) z.

The 3M weights are those of the reference code (LuChengTHU/dpm-solver dpm_solver_pytorch.py:854-904
`multistep_dpm_solver_third_update`; diffusers schedulers/scheduling_dpmsolver_multistep.py:1047-1131),
which take the D2 term at half the weight that makes the step exact for x0_hat quadratic in lambda
(the step is exact for x0_hat linear in lambda); the published weights are the default, for parity.
`exact_quadratic=True` gives D2 its full weight. The derivation (ODE; u = lambda - lambda_t, and
sigma_s e^lambda_t = alpha_s e^-h): for x0_hat = a + b u + c u^2,

    sigma_s int_0^h e^(lambda_t + u) x0_hat du = alpha_s [ (1 - e^-h) a + (h - 1 + e^-h) b
                                                           + (h^2 - 2h + 2 - 2 e^-h) c ],

from int_0^h u^k e^(u - h) du = 1 - e^-h, h - 1 + e^-h, h^2 - 2h + 2 - 2 e^-h for k = 0, 1, 2. The
evaluations at lambda_t - r0 h and lambda_t - (r0 + r1) h give, for that quadratic, D1_0 = b h - c r0 h^2,
D1_1 = b h - c (2 r0 + r1) h^2, so D1' = b h and D2 = c h^2 exactly (the Newton interpolant through the
three evaluations is the quadratic itself). Hence the exact step is

    x_s = (sigma_s/sigma_t) x_t + alpha_s [ (1 - e^-h) D0 + (h - 1 + e^-h)/h D1'
                                            + (h^2 - 2h + 2 - 2 e^-h)/h^2 D2 ],

whose D2 weight is alpha_s (1 - 2 (e^-h - 1 + h)/h^2), twice the published alpha_s (1/2 - (e^-h - 1 + h)/h^2).
For the SDE, 2 sigma_s int e^(2 lambda - lambda_s) x0_hat dlambda with v = 2u is the same integral in v
over [0, H], H = 2h, with b -> b/2 and c -> c/4: the weights above with h -> H, the D2 weight again
doubled. tests/core/test_multistep_solvers.py checks both sets of weights by quadrature and a run of
exact third-order steps against the exact ODE solution. For the SDE the published 3M weights are
k-diffusion's `sample_dpmpp_3m_sde` (crowsonkb/k-diffusion k_diffusion/sampling.py:656-700, eta = 1),
the ODE weights with H = 2h: diffusers' sde-dpmsolver++ third-order branch
(scheduling_dpmsolver_multistep.py:1133-1141) has the sign of its 1/2 flipped, so its D2 weight tends
to -alpha_s instead of 0 as h -> 0, and is not followed. Order 2 and the first-order step are
diffusers' exactly (scheduling_dpmsolver_multistep.py:895-911, 981-1028).

Lower orders: the first steps use the evaluations there are; a step from alpha_t = 0
(lambda = -inf, e^-h = 0 computed as alpha_t sigma_s / (sigma_t alpha_s)) is first order (DDIM's step)
and no later step reaches back across it; with `lower_order_final`, a run of n < 15 network
evaluations takes interval i at order at most n - i, so the last evaluation (the final denoise, or
the last interval without it) is first order and the one before at most second (diffusers'
`lower_order_final`, step() at scheduling_dpmsolver_multistep.py:1239-1246). The final denoise is
diffusers' last step to sigma = 0 (final_sigmas_type="zero"); without it the grid's last time is
diffusers' final_sigmas_type="sigma_min".
"""

from __future__ import annotations

import math

from diffusion_pl.sampling.base import Point, Sampler
from diffusion_pl.sampling.grids import TimeGrid

__all__ = ["DPMSolverPP", "DPMSolverPPSDE"]

LOWER_ORDER_FINAL_NFE = 15  # diffusers lowers the final orders on schedules of fewer timesteps


def _check_order(order: int) -> int:
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    return int(order)


def step_orders(points: list[Point], order: int, lower_order_final: bool, final_denoise: bool) -> list[int]:
    """The order of each grid interval: at most the evaluations since the last alpha = 0 point and, when
    `lower_order_final` and the run makes n < 15 network evaluations, at most n - i at interval i."""
    n = len(points) - 1 + int(final_denoise)
    orders, available = [], 0
    for i, p in enumerate(points[:-1]):
        available = available + 1 if math.isfinite(p.lam) else 0  # evaluations with finite lambda so far
        k = min(order, max(available, 1))
        if lower_order_final and n < LOWER_ORDER_FINAL_NFE:
            k = min(k, n - i)
        orders.append(k)
    return orders


def dpm_update(x, p_t: Point, p_s: Point, history: list, order: int, gamma: float, exact_quadratic: bool = False):
    """x at p_s from x at p_t: the DPM-Solver++ step above (gamma = 0 ODE, 1 SDE) without its noise;
    `exact_quadratic` doubles the published D2 weight of the 3M step (see the module docstring).

    history: (lambda, x0_hat) of the evaluations so far, the newest (at p_t) last.
    """
    lam_t, d0 = history[-1]
    exp_neg_h = p_t.alpha * p_s.sigma / (p_t.sigma * p_s.alpha)  # e^-h, 0 where alpha_t = 0
    h = p_s.lam - lam_t
    big_h = (1.0 + gamma) * h
    em1 = math.expm1(-big_h) if math.isfinite(big_h) else -1.0  # e^-H - 1
    x_s = ((p_s.sigma / p_t.sigma) * exp_neg_h**gamma) * x + (-p_s.alpha * em1) * d0
    if order >= 2:
        lam_1, m1 = history[-2]
        r0 = (lam_t - lam_1) / h
        d1_0 = (d0 - m1) / r0
        if order == 2:
            return x_s + (-0.5 * p_s.alpha * em1) * d1_0
        lam_2, m2 = history[-3]
        r1 = (lam_1 - lam_2) / h
        d1_1 = (m1 - m2) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        c1 = p_s.alpha * (em1 / big_h + 1.0)
        c2 = p_s.alpha * (0.5 - (em1 + big_h) / big_h**2) * (2.0 if exact_quadratic else 1.0)
        x_s = x_s + c1 * d1 + c2 * d2
    return x_s


class DPMSolverPP(Sampler):
    """DPM-Solver++(2M) or (3M), data prediction, multistep in lambda (Lu et al. 2022b, Alg. 2 and its
    third-order form). NFE = steps + final_denoise. `exact_quadratic=True` takes the 3M step's second
    difference at the weight that integrates an x0_hat quadratic in lambda exactly (the published step,
    the default, takes half of it; module docstring)."""

    gamma = 0.0

    def __init__(self, steps: int = 20, grid: TimeGrid | None = None, final_denoise: bool = True, order: int = 2,
                 lower_order_final: bool = True, exact_quadratic: bool = False) -> None:
        super().__init__(steps, grid, final_denoise)
        self.order = _check_order(order)
        self.lower_order_final = lower_order_final
        self.exact_quadratic = bool(exact_quadratic)

    def solve(self, denoiser, x, points, noise, class_labels, bar):
        history: list = []
        orders = step_orders(points, self.order, self.lower_order_final, self.final_denoise)
        for p_t, p_s, k in zip(points[:-1], points[1:], orders):
            x0 = denoiser(x, p_t.t, class_labels).x0
            history = history[-2:] + [(p_t.lam, x0)]
            x_new = dpm_update(x, p_t, p_s, history, k, self.gamma, self.exact_quadratic)
            if self.gamma > 0 and p_s.sigma > 0:
                x_new = x_new + (p_s.sigma * math.sqrt(-math.expm1(-2.0 * (p_s.lam - p_t.lam)))) * noise.randn_like(x)
            x = x_new
            if not math.isfinite(p_t.lam):
                history = []  # no later step reaches back across alpha = 0
            bar.update()
        return x


class DPMSolverPPSDE(DPMSolverPP):
    """SDE-DPM-Solver++(2M) or (3M) (Lu et al. 2022b, Sec. 5 / App.; diffusers algorithm_type="sde-dpmsolver++",
    k-diffusion `sample_dpmpp_2m_sde` / `sample_dpmpp_3m_sde` with eta = 1). One noise draw per grid interval
    from the sampler's `Noise`, so seeds work as in the other stochastic samplers. NFE = steps + final_denoise."""

    gamma = 1.0
