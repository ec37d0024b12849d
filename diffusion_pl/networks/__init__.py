"""Score networks: `net(x, noise_label, class_labels=None) -> tensor shaped like x`.

x is (B, C, H, W); noise_label is one float per sample (1000 t, a DDPM step index, or EDM's
c_noise = log(sigma) / 4); class_labels is (B,) int64 or None. A class-conditional network
(num_classes set) has num_classes + 1 label embeddings: index num_classes is the null label
of classifier-free guidance, used when class_labels is None (ADM's table, `UNet(class_null_row=False)`,
has none: its `null_label` is None and it needs labels). Unconditional networks ignore
class_labels. Networks know nothing of processes or losses.
"""

from diffusion_pl.networks.dit import DiT, dit_b_2, dit_l_2, dit_s_2, dit_tiny, dit_xl_2
from diffusion_pl.networks.unet import UNet
from diffusion_pl.networks.unet_presets import (unet_adm_cifar10, unet_ddpm_cifar10, unet_ddpmpp_cifar10,
                                                unet_ddpmpp_score_sde, unet_ncsnpp_cifar10, unet_tiny)

__all__ = [
    "UNet",
    "DiT",
    "unet_ddpm_cifar10",
    "unet_ddpmpp_cifar10",
    "unet_ddpmpp_score_sde",
    "unet_adm_cifar10",
    "unet_ncsnpp_cifar10",
    "unet_tiny",
    "dit_s_2",
    "dit_b_2",
    "dit_l_2",
    "dit_xl_2",
    "dit_tiny",
    "PRESETS",
]

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
)
"""Every preset function, so tests and the benchmark cover a new preset once it is listed here."""
