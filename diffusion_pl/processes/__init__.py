"""Forward processes x_t = alpha(t) x_0 + sigma(t) eps, one object each, in the (alpha, sigma)
notation of Kingma et al. 2021: base.py holds the Process interface (and what follows from the pair),
variance_preserving.py, exploding.py and interpolants.py the processes. Every name is re-exported here.
"""

from diffusion_pl.processes.base import AttributeRepr, Process, append_dims, check_nonnegative, check_positive
from diffusion_pl.processes.exploding import EDM, VE
from diffusion_pl.processes.interpolants import RectifiedFlow, Trigonometric
from diffusion_pl.processes.variance_preserving import DDPMDiscrete, OrnsteinUhlenbeck, SubVP, VPCosine, VPLinear

__all__ = [
    "Process", "OrnsteinUhlenbeck", "VPLinear", "VPCosine", "DDPMDiscrete", "SubVP", "VE", "EDM", "RectifiedFlow",
    "Trigonometric", "append_dims", "AttributeRepr", "check_positive", "check_nonnegative",
]
