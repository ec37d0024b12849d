"""Forward processes x_t = alpha(t) x_0 + sigma(t) eps, one object each (base.py: the Process
interface; variance_preserving.py, exploding.py, interpolants.py: the processes), in the
(alpha, sigma) notation of Kingma et al. 2021 (Variational Diffusion Models).

A process is fully given by (alpha(t), sigma(t)) on [t_min, t_max]. Everything a loss or a
sampler needs (drift f, squared diffusion g2, log-SNR and its inverse, the prior) follows
from that pair, so a new process is one small subclass that implements `alpha` and `sigma`
(and, where cheap, their closed-form derivatives and inverse maps).

Time arithmetic runs in float64 and is cast back to the input dtype: the log-SNR of a VE
process spans ~[-8, 9] and the DDPM grid needs exact index arithmetic, both of which lose
digits in float32 (its 24-bit mantissa holds ~7 significant digits).
"""

from diffusion_pl.processes.base import AttributeRepr, Process, append_dims, check_nonnegative, check_positive
from diffusion_pl.processes.exploding import EDM, VE
from diffusion_pl.processes.interpolants import RectifiedFlow, Trigonometric
from diffusion_pl.processes.variance_preserving import DDPMDiscrete, OrnsteinUhlenbeck, SubVP, VPCosine, VPLinear

__all__ = [
    "Process", "OrnsteinUhlenbeck", "VPLinear", "VPCosine", "DDPMDiscrete", "SubVP", "VE", "EDM", "RectifiedFlow",
    "Trigonometric", "append_dims", "AttributeRepr", "check_positive", "check_nonnegative",
]
