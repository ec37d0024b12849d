"""An analytic oracle: Gaussian-mixture data, whose noisy marginals are closed form.

If x0 ~ sum_k w_k N(mu_k, s_k^2 I) then x_t = alpha x0 + sigma eps has
p_t = sum_k w_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I) for every process, so the exact
score, the exact posterior means E[x0 | x_t] and E[eps | x_t] (hence the exact output of
every parameterization) and the exact log-density are known. Plugging `model()` into a
sampler or into the likelihood tests them against exact answers instead of golden numbers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_pl.prediction import Model, Prediction
from diffusion_pl.processes.base import Process

__all__ = ["GaussianMixture", "GuidedMixture", "field_average_velocity", "output_for"]

LAMBDA_FLOOR = -30.0  # where GaussianMixture.flow_to_t_min starts from alpha = 0 (lambda = -inf)


class GaussianMixture:
    """Isotropic Gaussian mixture sum_k w_k N(mu_k, s_k^2 I) in D dimensions, the exact 'perfect network'."""

    def __init__(self, weights: Tensor, means: Tensor, stds: Tensor) -> None:
        weights, means, stds = (torch.as_tensor(v, dtype=torch.float64) for v in (weights, means, stds))
        if means.ndim != 2 or weights.shape != (means.shape[0],) or stds.shape != (means.shape[0],):
            raise ValueError("expected weights (K,), means (K, D) and stds (K,), got "
                             f"{tuple(weights.shape)}, {tuple(means.shape)}, {tuple(stds.shape)}")
        if (weights <= 0).any() or (stds <= 0).any():
            raise ValueError("mixture weights and stds must be positive")
        self.weights = weights / weights.sum()
        self.means = means
        self.stds = stds

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def random(cls, num_components: int = 3, dim: int = 2, seed: int = 0, spread: float = 1.0,
               std_range: tuple[float, float] = (0.1, 0.3)) -> "GaussianMixture":
        """A reproducible mixture with unequal weights; means ~ N(0, spread^2 I)."""
        g = torch.Generator().manual_seed(seed)
        weights = torch.linspace(1.0, 2.0, num_components, dtype=torch.float64)  # unequal on purpose
        means = spread * torch.randn(num_components, dim, generator=g, dtype=torch.float64)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(num_components, generator=g, dtype=torch.float64)
        return cls(weights, means, stds)

    def sample(self, n: int, generator: torch.Generator | None = None, return_components: bool = False):
        """Exact samples (n, D) in float64 (and their component indices if asked)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[k] + self.stds[k, None] * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (x, k) if return_components else x

    # -- closed-form marginals ------------------------------------------------------------------
    def _marginal(self, x_t: Tensor, t: Tensor, process: Process):
        """Per-component quantities at (x_t, t): responsibilities r (B, K) and the pieces below."""
        x = x_t.reshape(x_t.shape[0], -1).to(torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        alpha = process.alpha(t)[:, None]  # (B, 1)
        sigma = process.sigma(t)[:, None]
        var = alpha**2 * self.stds[None] ** 2 + sigma**2  # (B, K)
        diff = x[:, None, :] - alpha[:, :, None] * self.means[None]  # (B, K, D)
        logp_k = (torch.log(self.weights)[None] - 0.5 * (diff**2).sum(-1) / var
                  - 0.5 * self.dim * torch.log(2 * math.pi * var))  # (B, K)
        return x, alpha, sigma, var, diff, logp_k

    def log_prob(self, x_t: Tensor, t: Tensor | float | None = None, process: Process | None = None) -> Tensor:
        """Exact log p_t(x_t) (B,); with t=None, the data density log p_0(x)."""
        if t is None:
            x = x_t.reshape(x_t.shape[0], -1).to(torch.float64)
            diff = x[:, None, :] - self.means[None]
            var = self.stds[None] ** 2
            logp_k = torch.log(self.weights)[None] - 0.5 * (diff**2).sum(-1) / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
            return torch.logsumexp(logp_k, 1)
        return torch.logsumexp(self._marginal(x_t, t, process)[-1], 1)

    def posterior_means(self, x_t: Tensor, t: Tensor | float, process: Process) -> tuple[Tensor, Tensor]:
        """E[x0 | x_t] and E[eps | x_t], shaped like x_t (float64); finite even where alpha = 0."""
        x, alpha, sigma, var, diff, logp_k = self._marginal(x_t, t, process)
        r = torch.softmax(logp_k, 1)[:, :, None]  # (B, K, 1)
        # Gaussian conditioning per component: x0 | x_t, k ~ mean mu_k + alpha s_k^2 / var (x_t - alpha mu_k)
        x0_k = self.means[None] + (alpha[:, :, None] * self.stds[None, :, None] ** 2 / var[:, :, None]) * diff
        eps_k = (sigma[:, :, None] / var[:, :, None]) * diff
        x0 = (r * x0_k).sum(1).reshape(x_t.shape)
        eps = (r * eps_k).sum(1).reshape(x_t.shape)
        return x0, eps

    def score(self, x_t: Tensor, t: Tensor | float, process: Process) -> Tensor:
        """Exact grad log p_t(x_t), shaped like x_t (float64)."""
        x, alpha, sigma, var, diff, logp_k = self._marginal(x_t, t, process)
        r = torch.softmax(logp_k, 1)[:, :, None]
        return (-(r * diff / var[:, :, None]).sum(1)).reshape(x_t.shape)

    def flow_to_t_min(self, x_t: Tensor, t: Tensor | float, process: Process, rtol: float = 1e-10,
                      atol: float = 1e-10) -> Tensor:
        """x(t_min) of this mixture's probability-flow ODE from each (x_t, t) (float64, x_t's shape).

        Integrated by scipy's DOP853 in lambda = log(alpha / sigma), where the ODE reads d(x / sigma) / d lambda =
        e^lambda E[x0 | x] (Lu et al. 2022b, eq. 9): E[x0 | x] depends on t only through alpha and sigma, so the
        right-hand side is smooth in lambda even where alpha(t) is not (DDPMDiscrete's kinks at each of its 1000
        steps, which cost an integrator in t thousands of evaluations). All samples form one system over u in [0, 1],
        lambda running from each sample's own value to lambda(t_min). Where alpha(t) = 0 (rectified flow and TrigFlow
        at t = 1) lambda starts at LAMBDA_FLOOR instead of -inf: the dropped part of the integral is at most
        e^LAMBDA_FLOOR |E[x0 | x]|, about 1e-13 of the data's scale. lambda(t_min) must be finite.
        """
        from scipy.integrate import solve_ivp  # float64 adaptive RK; torchdiffeq is an optional extra

        x = x_t.reshape(x_t.shape[0], -1).to(torch.float64).cpu()
        b, d = x.shape
        t = torch.as_tensor(t, dtype=torch.float64).cpu().expand(b)
        t_min = torch.full((b,), process.t_min, dtype=torch.float64)
        lam0, lam1 = (0.5 * process.log_snr(t)).clamp_min(LAMBDA_FLOOR), 0.5 * process.log_snr(t_min)
        if not (torch.isfinite(lam0).all() and torch.isfinite(lam1).all()):
            raise ValueError("the exact probability-flow ODE is integrated in lambda = log(alpha / sigma): expected it "
                             f"finite at t_min and t, got {lam1[0].item()} and {lam0.min().item()}")
        span = lam1 - lam0  # (B,) >= 0

        def rhs(u, y):
            lam = lam0 + u * span
            tt = process.t_from_log_snr(2.0 * lam)
            x0 = self.posterior_means(torch.from_numpy(y).reshape(b, d) * process.sigma(tt)[:, None], tt, process)[0]
            return ((span * torch.exp(lam))[:, None] * x0).reshape(-1).numpy()

        y0 = (x / process.sigma(t)[:, None]).reshape(-1).numpy()
        sol = solve_ivp(rhs, (0.0, 1.0), y0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"the exact probability-flow ODE did not converge: {sol.message}")
        x_min = torch.from_numpy(sol.y[:, -1]).reshape(b, d) * process.sigma(t_min)[:, None]
        return x_min.reshape(x_t.shape).to(x_t.device)

    def consistency_function(self, x_t: Tensor, t: Tensor | float, process: Process, rtol: float = 1e-10,
                             atol: float = 1e-10) -> Tensor:
        """The exact consistency function f(x_t, t) = x(t_min) / alpha(t_min) (float64, x_t's shape): the
        probability-flow ODE of this mixture from each (x_t, t) down to t_min (`flow_to_t_min`)."""
        alpha_min = float(process.alpha(torch.tensor([process.t_min], dtype=torch.float64))[0])
        return self.flow_to_t_min(x_t, t, process, rtol, atol) / alpha_min

    def model(self, process: Process, prediction: Prediction) -> Model:
        """The exact network for `prediction`: F = E[target | x_t], in the model contract (x_t, t, y) -> F.

        Every target is linear in (x0, eps), so its posterior mean is the target of the posterior means.
        """

        def exact(x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
            t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
            x0, eps = self.posterior_means(x_t, t, process)
            return prediction.target(x0, eps, t.to(torch.float64), process).to(x_t.dtype)

        return exact

    def velocity(self, x_t: Tensor, t: Tensor, process: Process) -> Tensor:
        """Exact probability-flow velocity alpha'(t) E[x0 | x_t] + sigma'(t) E[eps | x_t], shaped like x_t (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])
        x0, eps = self.posterior_means(x_t, t, process)
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        return process.d_alpha(t).reshape(shape) * x0 + process.d_sigma(t).reshape(shape) * eps

    def average_velocity(self, x_t: Tensor, t: Tensor, r: Tensor, process: Process, steps: int = 64) -> Tensor:
        """MeanFlow's u(x_t, r, t) = (x_t - x_r) / (t - r) of the exact ODE (Geng et al. 2025, eq. 3), float64
        (`field_average_velocity` of `velocity`); tests/core/test_meanflow.py checks it against an adaptive solver."""
        return field_average_velocity(lambda z, tau: self.velocity(z, tau, process), x_t, t, r, steps)

    def mean_flow_model(self, process: Process, prediction: Prediction, steps: int = 64) -> Model:
        """The exact average-velocity network for `prediction`, in the model contract with the keyword r:
        F such that the prediction's velocity of F (`prediction.average_velocity_of`) is `average_velocity`;
        without r (r = t) it is `model`'s output."""
        exact_at_t = self.model(process, prediction)

        def exact(x_t: Tensor, t: Tensor, class_labels: Tensor | None = None, r: Tensor | None = None) -> Tensor:
            t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
            if r is None:
                return exact_at_t(x_t, t, class_labels)
            u = self.average_velocity(x_t, t, r, process, steps)
            return _output_of_velocity(u, x_t, t, process, prediction)

        return exact

    def consistency_model(self, process: Process, prediction: Prediction, steps: int = 64) -> Model:
        """The exact consistency function f(x_t, t) = x_{t_min} of the probability-flow ODE (Song et al. 2023) as a
        network for `prediction`: F such that the prediction's x0_hat of F is f (the sCM loss reads f that way).

        x_{t_min} = x_t - (t - t_min) u(x_t, t_min, t) with `average_velocity` (RK4, differentiable, so the sCM
        loss's JVP runs through it).
        """

        def exact(x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
            t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0]).to(torch.float64)
            t_min = torch.full_like(t, process.t_min)
            shape = (-1,) + (1,) * (x_t.ndim - 1)
            x = x_t.to(torch.float64)
            f = x - (t - t_min).reshape(shape) * self.average_velocity(x, t, t_min, process, steps)
            return output_for(f, x_t, t, process, prediction)  # the output whose x0_hat is f

        return exact


class GuidedMixture:
    """Class-conditional data of a mixture: label k is its component k alone, the null label K the whole mixture.

    `velocity` is the exact classifier-free guided field w v(x | k) + (1 - w) v(x) (Ho & Salimans 2022) for a
    label k, the unconditional v(x) for the null label; `mean_flow_model` is the exact average velocity of that
    field (MeanFlow with guidance, Geng et al. 2025, Sec. 4.2), the network a guided MeanFlow loss should learn.
    """

    def __init__(self, mixture: GaussianMixture, weight: float = 1.0) -> None:
        self.mixture, self.weight = mixture, float(weight)
        self.parts = [GaussianMixture(torch.ones(1), mixture.means[k:k + 1], mixture.stds[k:k + 1])
                      for k in range(len(mixture.weights))]

    @property
    def null_label(self) -> int:
        return len(self.parts)

    def _per_label(self, values: list[Tensor], labels: Tensor) -> Tensor:
        """values[k] (B, ...) for k <= K, each sample's own by its label."""
        return torch.stack(values)[labels.to(torch.long), torch.arange(len(labels))]

    def posterior_means(self, x_t: Tensor, t: Tensor, labels: Tensor, process: Process) -> tuple[Tensor, Tensor]:
        """E[x0 | x_t, label] and E[eps | x_t, label] (float64): the component's, or the mixture's for the null label."""
        pairs = [m.posterior_means(x_t, t, process) for m in [*self.parts, self.mixture]]
        return (self._per_label([p[0] for p in pairs], labels), self._per_label([p[1] for p in pairs], labels))

    def velocity(self, x_t: Tensor, t: Tensor, labels: Tensor, process: Process) -> Tensor:
        """The guided velocity w v(x_t | k) + (1 - w) v(x_t) of each sample's label k; v(x_t) for the null label."""
        v_u = self.mixture.velocity(x_t, t, process)
        guided = [self.weight * part.velocity(x_t, t, process) + (1.0 - self.weight) * v_u for part in self.parts]
        return self._per_label([*guided, v_u], labels)

    def mean_flow_model(self, process: Process, prediction: Prediction, steps: int = 64) -> Model:
        """The exact average velocity of the guided field as a network for `prediction`, in the model contract
        (x_t, t, class_labels, r=None); r = None is the guided velocity itself."""

        def exact(x_t: Tensor, t: Tensor, class_labels: Tensor | None = None, r: Tensor | None = None) -> Tensor:
            t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
            labels = class_labels if class_labels is not None else torch.full((x_t.shape[0],), self.null_label)
            if r is None:
                u = self.velocity(x_t.to(torch.float64), t, labels, process)
            else:
                u = field_average_velocity(lambda z, tau: self.velocity(z, tau, labels, process), x_t, t, r, steps)
            return _output_of_velocity(u, x_t, t, process, prediction)

        return exact


def field_average_velocity(velocity, x_t: Tensor, t: Tensor, r: Tensor, steps: int = 64) -> Tensor:
    """u(x_t, r, t) = (x_t - x_r) / (t - r) of the ODE dx/dtau = velocity(x, tau) (float64), x_r by classical
    Runge-Kutta (RK4) with `steps` equal steps from t to r per sample, in plain differentiable tensor operations,
    so that forward-mode AD (the MeanFlow loss's JVP) runs through it; where r = t it is the velocity itself."""
    x = x_t.to(torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
    r = torch.as_tensor(r, dtype=torch.float64).expand(x.shape[0])
    shape = (-1,) + (1,) * (x.ndim - 1)
    h = ((r - t) / steps).reshape(shape)  # (B, 1, ...) signed step
    dt = (r - t) / steps
    z, tau = x, t
    for _ in range(steps):
        k1 = velocity(z, tau)
        k2 = velocity(z + 0.5 * h * k1, tau + 0.5 * dt)
        k3 = velocity(z + 0.5 * h * k2, tau + 0.5 * dt)
        k4 = velocity(z + h * k3, tau + dt)
        z, tau = z + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4), tau + dt
    # (x_t - x_r) / (t - r) = the mean of the steps' slopes: finite and exact also at r = t
    return (x - z) / torch.where(r == t, torch.ones_like(r), t - r).reshape(shape) + \
        torch.where((r == t).reshape(shape), velocity(x, t), torch.zeros_like(x))


def output_for(value: Tensor, x_t: Tensor, t: Tensor, process: Process, prediction: Prediction,
               c_x0: Tensor | float = 1.0, c_eps: Tensor | float = 0.0) -> Tensor:
    """The network output F whose c_x0 x0_hat + c_eps eps_hat is `value` at (x_t, t) (B,): `Prediction.to_x0_eps`
    inverted along one combination, in float64, returned in x_t's dtype. (1, 0): the output whose x0_hat is `value`
    (an exact consistency function as a network); (alpha'(t), sigma'(t)): the output whose velocity is `value`
    (`prediction.average_velocity_of` inverted). x0_hat = a_x0 x_t + b_x0 F and eps_hat = a_eps x_t + b_eps F make
    the combination a x_t + b F."""
    x, t64 = x_t.to(torch.float64), t.to(torch.float64)
    shape = (-1,) + (1,) * (x.ndim - 1)
    a_x0, b_x0, a_eps, b_eps = (c.reshape(shape) for c in prediction.coefficients(t64, process))
    c_x0, c_eps = (torch.as_tensor(c, dtype=torch.float64).expand_as(t64).reshape(shape) for c in (c_x0, c_eps))
    a, b = c_x0 * a_x0 + c_eps * a_eps, c_x0 * b_x0 + c_eps * b_eps
    return ((value.to(torch.float64) - a * x) / b).to(x_t.dtype)


def _output_of_velocity(u: Tensor, x_t: Tensor, t: Tensor, process: Process, prediction: Prediction) -> Tensor:
    """The network output F whose velocity alpha' x0_hat + sigma' eps_hat under `prediction` is u."""
    t64 = t.to(torch.float64)
    return output_for(u, x_t, t64, process, prediction, process.d_alpha(t64), process.d_sigma(t64))
