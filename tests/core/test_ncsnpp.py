"""NCSN++ (Song et al. 2021): FIR resampling, the residual input pyramid, the CIFAR-10 preset, its prediction.

The reference numbers come from yang-song/score_sde_pytorch: NCSNpp built from
configs/ve/cifar10_ncsnpp_continuous.py (with configs/default_cifar10_configs.py), parameters
counted with `sum(p.numel() for p in model.parameters())` and listed module by module in the
order of `model.all_modules`. That repository is not needed to run these tests.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_pl.networks.unet import UNet
from diffusion_pl.networks.unet_presets import unet_ncsnpp_cifar10
from diffusion_pl.networks.fir import FIRDownConv, FIRResample, ResidualInput, fir_filter
from diffusion_pl.prediction import ScaledScorePrediction, precondition
from diffusion_pl.processes.exploding import VE

A = torch.tensor([1.0, 2.0, 3.0, 4.0])
IMAGE = torch.outer(A, A)[None, None]  # (1, 1, 4, 4), separable, so each axis is worked by hand below


# -- FIR filter: hand-computed examples ---------------------------------------------------------------------


def test_fir_filter_is_normalised_outer_product():
    f = fir_filter((1, 3, 3, 1))
    k = torch.tensor([1.0, 3, 3, 1])
    assert f.shape == (4, 4) and torch.equal(f, torch.outer(k, k) / 64)


def test_fir_downsample_4x4_by_hand():
    # One axis, taps [1, 3, 3, 1] / 8, zero padding 1, stride 2 on a = [1, 2, 3, 4]:
    #   [0, 1, 2, 3] . k = (3 + 6 + 3) / 8 = 1.5,  [2, 3, 4, 0] . k = (2 + 9 + 12) / 8 = 2.875.
    down_a = torch.tensor([1.5, 2.875])
    out = FIRResample("down", (1, 3, 3, 1))(IMAGE)
    assert out.shape == (1, 1, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.outer(down_a, down_a), rtol=0, atol=1e-6)
    assert torch.allclose(out[0, 0], torch.tensor([[2.25, 4.3125], [4.3125, 8.265625]]))


def test_fir_upsample_4x4_by_hand():
    # One axis: zeros inserted, then taps 2 [1, 3, 3, 1] / 8 (gain 2 per axis, 4 in 2-D):
    #   out[2i] = 0.75 a_i + 0.25 a_(i-1),  out[2i+1] = 0.75 a_i + 0.25 a_(i+1),  zeros outside.
    up_a = torch.tensor([0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75, 3.0])
    out = FIRResample("up", (1, 3, 3, 1))(IMAGE)
    assert out.shape == (1, 1, 8, 8)
    torch.testing.assert_close(out[0, 0], torch.outer(up_a, up_a), rtol=0, atol=1e-6)
    # A constant image stays constant away from the zero-padded border (gain 1).
    assert torch.allclose(FIRResample("up")(torch.ones(1, 2, 4, 4))[..., 2:-2, 2:-2], torch.tensor(1.0))


def test_box_filter_is_nearest_up_and_average_down():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(FIRResample("up", (1, 1))(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(FIRResample("down", (1, 1))(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-7)
    assert FIRResample("none")(x) is x


def test_fused_fir_conv_equals_conv_then_fir():
    """score_sde filters then convolves with stride 2; EDM (fused_resample) convolves then filters: one map."""
    torch.manual_seed(0)
    layer = FIRDownConv(3, 5, (1, 3, 3, 1)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    f = fir_filter((1, 3, 3, 1)).double()[None, None].expand(5, 1, 4, 4)
    edm = F.conv2d(F.conv2d(x, layer.conv.weight, layer.conv.bias, padding=2), f, stride=2, groups=5)
    out = layer(x)
    assert out.shape == (2, 5, 4, 4)
    torch.testing.assert_close(out, edm, rtol=0, atol=1e-12)


def test_residual_input_adds_downsampled_pyramid():
    torch.manual_seed(0)
    level = ResidualInput(3, 4, (1, 3, 3, 1), skip_scale=math.sqrt(0.5))
    aux, h = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(level(aux, h), (h + level.down(aux)) * math.sqrt(0.5))


@pytest.mark.parametrize("taps", [(1,), (1, 2, 1), (1, 2, 3, 4), (0, 0)])
def test_bad_filter_taps_are_refused(taps):
    with pytest.raises(ValueError, match="resample_filter"):
        fir_filter(taps)


# -- the CIFAR-10 preset against score_sde's NCSNpp ---------------------------------------------------------

# score_sde NCSNpp (cifar10_ncsnpp_continuous): 62,758,915 parameters, 128 of them the frozen
# Fourier frequencies (GaussianFourierProjection.W, requires_grad=False), a buffer here.
REFERENCE_TOTAL, REFERENCE_FROZEN = 62_758_915, 128
B128, D128 = 361_344, 377_856  # BigGAN block 128 -> 128, its downsampling version
B256, R256, ATTN = 1_312_512, 1_378_304, 263_680  # 256 -> 256, resampling 256 -> 256, attention at 256
CAT512, CAT384, CAT384_128, CAT256_128 = 2_034_176, 1_706_240, 706_048, 541_952  # decoder blocks
# Parameters per module of `all_modules` after the Fourier projection, in order.
REFERENCE_LAYERS = (
    [131_584, 262_656, 3_584]  # noise-embedding MLP (256 -> 512 -> 512), input conv
    + [B128] * 4 + [D128, 3_584]  # 32x32, down, input pyramid 3 -> 128
    + [1_050_368, ATTN] + [B256, ATTN] * 3 + [R256, 295_168]  # 16x16 with attention, down, pyramid 128 -> 256
    + [B256] * 4 + [R256, 590_080]  # 8x8, down, pyramid 256 -> 256
    + [B256] * 4  # 4x4
    + [B256, ATTN, B256]  # middle
    + [CAT512] * 5 + [R256]  # decoder 4x4, up
    + [CAT512] * 5 + [R256]  # 8x8, up
    + [CAT512] * 4 + [CAT384, ATTN, R256]  # 16x16, attention after the last block, up
    + [CAT384_128] + [CAT256_128] * 4  # 32x32
    + [256, 3_459]  # output GroupNorm and conv
)


def ncsnpp_layers(net: UNet) -> list[int]:
    """Parameters per layer in the order of score_sde's all_modules (attention counted apart from its block)."""
    def n(module):
        return sum(p.numel() for p in module.parameters())

    def block(b):
        has_attn = not isinstance(b.attn, torch.nn.Identity)
        return [n(b) - n(b.attn), n(b.attn)] if has_attn else [n(b)]

    layers = [n(net.map_emb[0]), n(net.map_emb[2]), n(net.conv_in)]
    for level, blocks in enumerate(net.enc):
        if level > 0:
            layers += [n(net.downsample[level - 1]), n(net.input_pyramid[level - 1])]
        for b in blocks:
            layers += block(b)
    for b in net.mid:
        layers += block(b)
    for level, blocks in enumerate(net.dec):
        if level > 0:
            layers += [n(net.upsample[level - 1])]
        for b in blocks:
            layers += block(b)
    return layers + [n(net.norm_out), n(net.conv_out)]


def test_preset_parameter_count_equals_score_sde():
    with torch.device("meta"):
        net = unet_ncsnpp_cifar10()
    assert sum(REFERENCE_LAYERS) + REFERENCE_FROZEN == REFERENCE_TOTAL
    assert sum(p.numel() for p in net.parameters()) == REFERENCE_TOTAL - REFERENCE_FROZEN == 62_758_787
    assert net.map_noise.freqs.numel() == REFERENCE_FROZEN  # the frozen frequencies, as a buffer


def test_preset_layers_equal_score_sde():
    with torch.device("meta"):
        net = unet_ncsnpp_cifar10()
    # score_sde resamples at the end of a level, we at the start of the next: the same sequence.
    assert ncsnpp_layers(net) == REFERENCE_LAYERS
    fir_blocks = [m for m in net.modules() if isinstance(m, FIRResample) and m.mode != "none"]
    assert len(fir_blocks) == 6 and len(net.input_pyramid) == 3  # 3 down and 3 up BigGAN blocks, 3 pyramid levels


def test_preset_forward_shapes():
    with torch.device("meta"):
        assert unet_ncsnpp_cifar10()(torch.empty(2, 3, 32, 32), torch.empty(2)).shape == (2, 3, 32, 32)
    net = unet_ncsnpp_cifar10(img_resolution=16, model_channels=16, num_res_blocks=1, attn_resolutions=(8,),
                              out_channels=6).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = net(x, torch.log(torch.tensor([0.02, 50.0])))
    assert out.shape == (2, 6, 16, 16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_mult=0), "noise_mult"),
        (dict(progressive_input="skip"), "progressive_input"),
        (dict(resample="conv", resample_filter=(1, 3, 3, 1)), "resample_filter"),
        (dict(resample="resblock", resample_filter=(1, 2, 1)), "resample_filter"),
    ],
)
def test_bad_ncsnpp_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), **kwargs)


# -- scale_by_sigma and the log(sigma) label -------------------------------------------------------------------


def test_scaled_score_prediction_is_score_sde_parameterization():
    """F = sigma * score = -eps, and the network sees log(sigma / 2) (score_sde's sigma on [0, 1] data)."""
    process, prediction = VE(sigma_min=0.02, sigma_max=100.0), ScaledScorePrediction()
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    sigma = process.sigma(t)
    torch.testing.assert_close(prediction.c_noise(t, process), torch.log(sigma / 2))
    seen = {}

    def net(x_in, noise_label, class_labels):
        seen["label"] = noise_label
        return -x_in / (1 + sigma[:, None] ** 2)  # any F

    x_t = torch.randn(3, 4, dtype=torch.float64)
    out = precondition(net, process, prediction)(x_t, t)
    torch.testing.assert_close(seen["label"], torch.log(sigma / 2))
    x0_hat, eps_hat = prediction.to_x0_eps(out, x_t, t, process)
    torch.testing.assert_close(eps_hat, -out)  # score = -eps_hat / sigma = F / sigma: score_sde's h / sigma
    torch.testing.assert_close(x0_hat, x_t + sigma[:, None] * out)
