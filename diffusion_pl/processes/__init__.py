"""Forward processes x_t = alpha(t) x_0 + sigma(t) eps, one object each, in the (alpha, sigma)
notation of Kingma et al. 2021:

    base.py                  the Process interface and what follows from the pair (f, g2, log-SNR, prior)
    variance_preserving.py   OrnsteinUhlenbeck, VPLinear, VPCosine, DDPMDiscrete, SubVP
    exploding.py             VE, EDM
    interpolants.py          RectifiedFlow, Trigonometric

Import a process from its module, or from the package root (`from diffusion_pl import VPLinear`).
"""
