"""diffusion_pl: a PyTorch Lightning framework for training image diffusion models.

Two abstractions carry everything (see README, "Design"):

- a forward process (`diffusion_pl.processes.Process`) given by alpha(t), sigma(t):
  x_t = alpha(t) x0 + sigma(t) eps;
- a parameterization (`diffusion_pl.prediction.Prediction`) that turns any network output
  into (x0_hat, eps_hat), wrapped with guidance by `diffusion_pl.prediction.Denoiser`.

Glossary (names follow the papers):
    x0, x_t      clean sample, noisy sample at time t
    eps          standard Gaussian noise, x_t = alpha x0 + sigma eps
    alpha, sigma signal and noise scales; d_alpha, d_sigma their time derivatives
    f, g2        drift f = alpha'/alpha and squared diffusion g^2 of dx = f x dt + g dW
    log_snr      log(alpha^2 / sigma^2); EDM's sigma is the noise level sigma / alpha
    score        grad_x log p_t(x) = -eps_hat / sigma
    v            alpha eps - sigma x0 (Salimans & Ho 2022)
    velocity     u = alpha' x0 + sigma' eps (flow matching, Lipman et al. 2022)
    c_skip, c_out, c_in, c_noise   EDM preconditioning (Karras et al. 2022, Table 1)
    nfe          number of network evaluations
"""

__version__ = "0.1.0"
