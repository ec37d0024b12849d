"""Every network preset, so that the tests and the benchmark cover a new preset once it is listed here."""

from diffusion_pl.networks.dit import dit_b_2, dit_l_2, dit_s_2, dit_tiny, dit_xl_2, lightningdit_b_1, lightningdit_xl_1
from diffusion_pl.networks.unet_presets import (unet_adm_cifar10, unet_ddpm_cifar10, unet_ddpmpp_cifar10,
                                                unet_ddpmpp_score_sde, unet_ncsnpp_cifar10, unet_tiny)

__all__ = ["PRESETS"]

PRESETS = (
    unet_ddpm_cifar10,
    unet_ddpmpp_cifar10,
    unet_ddpmpp_score_sde,
    unet_adm_cifar10,
    unet_ncsnpp_cifar10,
    unet_tiny,
    dit_s_2,
    dit_b_2,
    dit_l_2,
    dit_xl_2,
    dit_tiny,
    lightningdit_b_1,
    lightningdit_xl_1,
)
