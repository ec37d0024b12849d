"""`unet_ddpm_cifar10` is diffusers' UNet2DModel of google/ddpm-cifar10-32, weight for weight.

diffusers ports DDPM's TensorFlow U-Net (hojonathanho/diffusion diffusion_tf/models/unet.py); the
config (DDPM_CIFAR10 in tests/support/interop.py) is google/ddpm-cifar10-32's config.json. Every weight,
including the zero-initialised ones, is re-randomised so that no layer hides behind a zero. The network part
is compared in float64 (small config of the same structure) and float32 (full config); diffusers' timestep
sinusoid is compared on its own, in float32, which is the precision both compute it in.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.interop.diffusers.unet import (convert_unet_state_dict, load_diffusers_unet, unet_from_diffusers,
                                                 unet_kwargs_from_diffusers)
from diffusion_pl.networks.unet import UNet
from diffusion_pl.networks.unet_presets import unet_ddpm_cifar10
from diffusion_pl.processes.variance_preserving import DDPMDiscrete
from tests.support.interop import DDPM_CIFAR10, SMALL, randomise

diffusers = pytest.importorskip("diffusers")

# DDPMDiscrete's noise label is the step index 0..999, diffusers' timestep the same.
TIMESTEPS = torch.tensor([0, 1, 250, 999])


def pair(config: dict, dtype: torch.dtype):
    """(diffusers model, our UNet with its converted weights), eval mode, one shared timestep sinusoid."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: no .to(dtype) cast, which diffusers warns about
    try:
        theirs = randomise(diffusers.UNet2DModel(**config)).eval()
    finally:
        torch.set_default_dtype(default)
    ours = unet_from_diffusers(theirs)

    class OurSinusoid(torch.nn.Module):  # compared to diffusers' own in test_timestep_embedding
        def forward(self, timesteps):
            return ours.noise_order(ours.map_noise(timesteps.to(torch.float32)))

    theirs.time_proj = OurSinusoid()
    return theirs, ours


def inputs(config: dict, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    return torch.randn(len(TIMESTEPS), 3, size, size, generator=generator, dtype=torch.float64).to(dtype)


def test_ddpm_noise_label_is_the_diffusers_timestep():
    process = DDPMDiscrete()
    times = process.discrete_times()[TIMESTEPS]  # t_i = (k + 1) / N for step index k
    assert torch.equal(process.noise_label(times), TIMESTEPS.to(torch.float64))


def test_preset_is_the_diffusers_ddpm_cifar10_config():
    kwargs = unet_kwargs_from_diffusers(DDPM_CIFAR10)
    with torch.device("meta"):
        from_config, preset = UNet(**kwargs), unet_ddpm_cifar10()
        theirs = diffusers.UNet2DModel(**DDPM_CIFAR10)
    shapes = {k: v.shape for k, v in preset.state_dict().items()}
    assert {k: v.shape for k, v in from_config.state_dict().items()} == shapes
    assert {k: v.shape for k, v in convert_unet_state_dict(theirs.state_dict()).items()} == shapes
    # 35,746,307 in all three (Ho et al. 2020, App. B: 35.7M).
    assert sum(p.numel() for p in preset.parameters()) == sum(p.numel() for p in theirs.parameters()) == 35_746_307
    for key in ("downsample_padding", "embedding_order", "embedding_endpoint", "norm_eps", "attn_heads",
                "attn_head_channels", "dropout", "decoder_attention"):
        assert kwargs[key] == {"downsample_padding": "same", "embedding_order": "sin_cos", "embedding_endpoint": True,
                               "norm_eps": 1e-6, "attn_heads": 1, "attn_head_channels": None, "dropout": 0.1,
                               "decoder_attention": "every_block"}[key]
    assert preset.downsample[0].pad == (0, 1, 0, 1) and preset.downsample[0].conv.padding == (0, 0)


def test_timestep_embedding():
    """Ours vs diffusers' Timesteps(128, flip_sin_to_cos=False, freq_shift=1) and the exact sinusoid."""
    from diffusers.models.embeddings import Timesteps

    ours = unet_ddpm_cifar10(img_resolution=8, model_channels=128, channel_mult=(1,), num_res_blocks=1,
                             attn_resolutions=())
    t = torch.tensor([0, 1, 10, 250, 999])
    mine = ours.noise_order(ours.map_noise(t.float()))
    theirs = Timesteps(128, flip_sin_to_cos=False, downscale_freq_shift=1)(t)
    angle = t.double()[:, None] * 10000.0 ** (-torch.arange(64, dtype=torch.float64) / 63)  # DDPM nn.py:90-104
    exact = torch.cat([angle.sin(), angle.cos()], dim=1)
    # float32 rounds an angle of ~999 by ~6e-5 rad, and each code rounds the frequencies differently.
    torch.testing.assert_close(mine.double(), exact, rtol=0, atol=2e-4)
    torch.testing.assert_close(theirs.double(), exact, rtol=0, atol=2e-4)


def test_small_config_float64_matches_diffusers():
    theirs, ours = pair(SMALL, torch.float64)
    x = inputs(SMALL, torch.float64)
    with torch.no_grad():
        reference = theirs(x, TIMESTEPS).sample
        out = ours(x, TIMESTEPS)
    assert 0.1 < reference.abs().max() < 1e3  # a non-trivial output
    assert (out - reference).abs().max() <= 1e-10
    # Symmetric padding of the strided conv (as before) is a different network.
    other = UNet(**{**unet_kwargs_from_diffusers(SMALL), "downsample_padding": "symmetric"}).double().eval()
    load_diffusers_unet(other, theirs.state_dict())
    with torch.no_grad():
        assert (other(x, TIMESTEPS) - reference).abs().max() > 1e-3


@pytest.mark.slow
def test_full_config_float32_matches_diffusers():
    theirs, ours = pair(DDPM_CIFAR10, torch.float32)
    preset = load_diffusers_unet(unet_ddpm_cifar10(), theirs.state_dict()).eval()
    x = inputs(DDPM_CIFAR10, torch.float32)
    with torch.no_grad():
        reference = theirs(x, TIMESTEPS).sample
        out = preset(x, TIMESTEPS)
    assert 0.1 < reference.abs().max() < 1e2
    assert (out - reference).abs().max() <= 1e-5


def test_bad_weights_and_configs_are_refused():
    theirs = diffusers.UNet2DModel(**SMALL)
    sd = dict(theirs.state_dict())
    with pytest.raises(UserValueError, match="cannot map diffusers UNet2DModel key 'mid_block.foo.weight'"):
        convert_unet_state_dict({**sd, "mid_block.foo.weight": torch.zeros(1)})
    with pytest.raises(UserValueError, match="unknown layer 'norm3'"):
        convert_unet_state_dict({**sd, "mid_block.resnets.0.norm3.weight": torch.zeros(1)})
    net = UNet(**unet_kwargs_from_diffusers(SMALL))
    bad = {**sd, "conv_out.weight": torch.zeros(3, 128, 1, 1)}
    with pytest.raises(UserValueError, match=r"shape mismatches \(file vs network\) conv_out.weight \(3, 128, 1, 1\)"):
        load_diffusers_unet(net, bad)
    with pytest.raises(UserValueError, match="missing keys conv_out"):
        load_diffusers_unet(net, {k: v for k, v in sd.items() if not k.startswith("conv_out")})
    with pytest.raises(UserValueError, match="resnet_time_scale_shift='scale_shift'"):
        unet_kwargs_from_diffusers({**SMALL, "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(UserValueError, match="not mirrored"):
        unet_kwargs_from_diffusers({**SMALL, "up_block_types": ("AttnUpBlock2D", "UpBlock2D")})
