"""diffusers' DiTTransformer2DModel and our DiT with converted weights give the same outputs.

The reference is built at a small DiT-S/2-like size (6 heads of 64 channels, 2 blocks, 8x8 latents
of 4 channels, patch 2, 1000 classes, learned sigma: 8 output channels) with every parameter
re-randomised, zero-initialised layers included, so that no layer can hide a wrong mapping.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_pl.interop.diffusers.dit import convert_dit_state_dict, dit_from_diffusers, dit_kwargs_from_diffusers
from diffusion_pl.networks.dit import DiT

diffusers = pytest.importorskip("diffusers")

TIMESTEPS = torch.tensor([0.0, 1.0, 250.5, 999.0])
LABELS = torch.tensor([0, 7, 999, 1000])  # 1000 is the null (classifier-free guidance) label


@pytest.fixture(scope="module")
def pair(dit_reference):
    model = dit_reference()
    return model, dit_from_diffusers(model)


def outputs(model, net, dtype):
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
    t = TIMESTEPS.to(dtype)
    with torch.no_grad():
        return model(x, timestep=t, class_labels=LABELS).sample, net(x, t, LABELS)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_converted_dit_matches_diffusers(pair, dtype, tol):
    model, net = pair
    # .double()/.float(): diffusers' own .to(dtype) logs a warning about float32 modules.
    model, net = (model.double(), net.double()) if dtype == torch.float64 else (model.float(), net.float())
    expected, out = outputs(model, net, dtype)
    assert out.dtype == dtype and out.shape == expected.shape == (4, 8, 8, 8)  # learned sigma: 2 x 4 channels
    assert expected.abs().max() > 0.5  # a non-trivial output
    assert (out - expected).abs().max() <= tol


def test_converter_maps_config(dit_reference):
    kwargs = dit_kwargs_from_diffusers(dit_reference().config)
    assert kwargs == dict(img_resolution=8, in_channels=4, out_channels=8, num_classes=1000, patch_size=2,
                          hidden_size=384, depth=2, num_heads=6, mlp_ratio=4.0, frequency_embedding_size=256,
                          frequency_endpoint=True, mlp_norm_eps=1e-5)
    # The parameters here: diffusers' minus the duplicated embedder of every block after the first.
    model, net = dit_reference(), dit_from_diffusers(dit_reference())
    per_block = sum(p.numel() for p in model.transformer_blocks[1].norm1.emb.parameters())
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters()) - per_block


def test_diffusers_options_are_needed(pair):
    """Our DiT's defaults (DiT's models.py) differ from diffusers in the sinusoid and one LayerNorm eps."""
    model, net = pair
    model, net = model.double(), net.double()
    expected, _ = outputs(model, net, torch.float64)
    state = net.state_dict()
    for option in (dict(frequency_endpoint=False), dict(mlp_norm_eps=1e-6)):
        kwargs = {**dit_kwargs_from_diffusers(model.config), **option}
        other = DiT(**kwargs).double().eval()
        other.load_state_dict(state)
        _, out = outputs(model, other, torch.float64)
        assert (out - expected).abs().max() > 1e-6, option


def test_learned_sigma_off_and_unshared_embedders(dit_reference):
    model = dit_reference(out_channels=None)  # out_channels = in_channels
    net = dit_from_diffusers(model)
    assert net.out_channels == 4
    expected, out = outputs(model, net, torch.float32)
    assert out.shape == (4, 4, 8, 8) and (out - expected).abs().max() <= 1e-5
    with torch.no_grad():
        model.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    with pytest.raises(ValueError, match="differs from block 0"):
        convert_dit_state_dict(model.state_dict(), num_layers=2)


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="norm_elementwise_affine"):
        dit_kwargs_from_diffusers(dict(num_embeds_ada_norm=10, norm_elementwise_affine=True))
    with pytest.raises(ValueError, match="num_embeds_ada_norm"):
        dit_kwargs_from_diffusers(dict(num_embeds_ada_norm=None))


def test_timestep_sinusoid_frequencies():
    """DiT: f_k = 10000^(-k / 128) for k < 128; diffusers (endpoint): 10000^(-k / 127), the last exactly 1e-4."""
    from diffusion_pl.networks.dit_blocks import TimestepSinusoid

    for endpoint, n in ((False, 128), (True, 127)):
        features = TimestepSinusoid(256, endpoint=endpoint)(torch.tensor([1.0]))[0]  # t = 1: angle = f_k
        freqs = torch.atan2(features[128:], features[:128])  # [cos, sin] halves
        expected = 10000.0 ** (-torch.arange(128, dtype=torch.float64) / n)
        torch.testing.assert_close(freqs.double(), expected, rtol=1e-6, atol=0)
