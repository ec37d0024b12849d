"""The guidance tests' oracle: a 2-D Gaussian mixture whose labels select one component or, with NULL, the whole
mixture, seeded noise for it, and a tiny class-conditional module (tests/core/conftest.py hands them to the bodies
of tests/core/test_guidance.py and test_guidance_channels.py)."""

from __future__ import annotations

import torch

from diffusion_pl.oracle import GaussianMixture
from diffusion_pl.processes.variance_preserving import VPLinear

MIX = GaussianMixture(torch.tensor([0.2, 0.3, 0.5]), torch.tensor([[-1.5, -0.5], [1.2, -1.0], [0.0, 1.5]]),
                      torch.tensor([0.15, 0.25, 0.2]))
NULL = 3  # labels 0..2 select one component, label 3 is the whole mixture


class ConditionalOracle:
    """Class-conditional oracle of a mixture: label k is component k alone, label NULL the whole mixture."""

    def __init__(self, mix: GaussianMixture, process, prediction) -> None:
        parts = [GaussianMixture(torch.ones(1), mix.means[k:k + 1], mix.stds[k:k + 1]) for k in range(3)]
        self.models = [m.model(process, prediction) for m in [*parts, mix]]
        self.batch_sizes: list[int] = []

    def __call__(self, x_t, t, class_labels):
        self.batch_sizes.append(len(x_t))
        outs = torch.stack([m(x_t, t, None) for m in self.models])  # (4, B, D)
        return outs[class_labels, torch.arange(len(x_t))]


def mixture_noise(n: int, seed: int = 0) -> torch.Tensor:
    """Seeded standard normal noise of n points in 2-D, the oracle's dimension."""
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def guidance_module(process=None, seed=0, resolution=8):
    """A tiny class-conditional (2 classes) DiffusionModule in eval mode; networks of different seeds differ."""
    from diffusion_pl.training.module import DiffusionModule
    from diffusion_pl.networks.unet import UNet

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = UNet(img_resolution=resolution, in_channels=3, num_classes=2, model_channels=8, channel_mult=(1,),
                   num_res_blocks=1, attn_resolutions=(), dropout=0.0)
        with torch.no_grad():  # the output layer starts at zero: make the seeds' networks differ
            net.conv_out.weight.normal_(0.0, 0.05)
        return DiffusionModule(net, process or VPLinear()).eval()
