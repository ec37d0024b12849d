"""LightningDiT's block options of `DiT` (networks/dit_blocks.py): each against its formula, written here from
the math (RMSNorm: Zhang & Sennrich 2019; SwiGLU: Shazeer 2020; 2-D RoPE: Su et al. 2021 per axis, the layout
of hustvl/LightningDiT models/pos_embed.py), plus the behaviour a user relies on (relative positions, scale-free
queries and keys, the no-shift modulation as a special case of the shifted one).

The defaults stay DiT's weight for weight: tests/interop (facebookresearch/DiT and diffusers parity) cover them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusion_pl.networks.dit import DiT, lightningdit_xl_1
from diffusion_pl.networks.dit_blocks import rope_table, swiglu_hidden
from diffusion_pl.utils.errors import UserValueError

HEADS, HIDDEN = 4, 64  # head width 16


def small(**options) -> DiT:
    torch.manual_seed(0)
    net = DiT(8, 4, 4, 10, patch_size=1, hidden_size=HIDDEN, depth=2, num_heads=HEADS, **options).double().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights everywhere, norm scales around 1, so no zero init hides a term
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3 + ("norm" in name))
    return net


def tokens(n: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randn(2, n, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Turn each pair (x_{2i}, x_{2i+1}) by angle[..., i] (x: (..., T, d), angle: (T, d / 2))."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def rope_angles(head_dim: int, grid: int, theta: float = 10000.0) -> torch.Tensor:
    """(grid * grid, head_dim / 2) angles: pairs 0..d/4-1 by the row, d/4..d/2-1 by the column, each at
    pos * theta^(-4i / d) for its pair i within the half; tokens row-major."""
    i = torch.arange(head_dim // 4, dtype=torch.float64)
    freq = theta ** (-4 * i / head_dim)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    rows, cols = rows.reshape(-1, 1).double(), cols.reshape(-1, 1).double()
    return torch.cat([rows * freq, cols * freq], dim=1)


def test_rmsnorm_is_x_over_rms_times_a_learned_scale():
    net = small(norm="rmsnorm", qk_norm=True)
    x = tokens()

    def rms(x, weight):
        return x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * weight

    block = net.blocks[0]
    for layer in (block.norm1, block.norm2, net.final_layer.norm_final):
        torch.testing.assert_close(layer(x), rms(x, layer.weight), rtol=1e-12, atol=1e-12)
    q = x.view(2, 64, HEADS, HIDDEN // HEADS)
    torch.testing.assert_close(block.attn.q_norm(q), rms(q, block.attn.q_norm.weight), rtol=1e-12, atol=1e-12)
    # the scales are parameters: LightningDiT's RMSNorm learns one per channel
    names = {name for name, _ in net.named_parameters()}
    assert {"blocks.0.norm1.weight", "blocks.0.norm2.weight", "final_layer.norm_final.weight",
            "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"} <= names


def test_swiglu_is_silu_gate_times_value():
    net = small(mlp="swiglu")
    mlp, x = net.blocks[0].mlp, tokens()
    hidden = swiglu_hidden(HIDDEN, 4.0)
    assert mlp.fc1.weight.shape == (2 * hidden, HIDDEN) and mlp.fc2.weight.shape == (HIDDEN, hidden)
    (w_gate, w_value), (b_gate, b_value) = mlp.fc1.weight.chunk(2), mlp.fc1.bias.chunk(2)  # gate first, as w12
    expected = F.linear(F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_value, b_value), mlp.fc2.weight, mlp.fc2.bias)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)
    # two thirds of the GELU width: 3072 for XL (LightningDiT), the parameter count of the GELU MLP
    assert swiglu_hidden(1152, 4.0) == 3072 and hidden == 170


def test_rope_table_is_the_2d_layout():
    table = rope_table(16, 4).double()
    sin, cos = table.chunk(2, dim=1)
    angles = rope_angles(16, 4).repeat_interleave(2, dim=1)  # each pair's angle on both of its channels
    torch.testing.assert_close(sin, angles.sin(), rtol=0, atol=1e-6)
    torch.testing.assert_close(cos, angles.cos(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_attention_is_the_formula(qk_norm):
    """softmax(R q . R k / sqrt(d)) v with q, k rotated after the query/key norm, then the output projection."""
    net = small(rope=True, qk_norm=qk_norm)
    attn, x, d = net.blocks[0].attn, tokens(), HIDDEN // HEADS
    q, k, v = attn.qkv(x).view(2, 64, 3, HEADS, d).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    angle = rope_angles(d, 8)
    weights = (rotate(q, angle) @ rotate(k, angle).transpose(-1, -2) / d**0.5).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 64, HIDDEN))
    # the table holds float32 sines and cosines (as LightningDiT's): float32 agreement
    torch.testing.assert_close(attn(x, rope=net.rope_table), expected, rtol=1e-4, atol=1e-4)


def test_rope_logits_depend_on_relative_position_only():
    table = rope_table(16, 8).double()
    sin, cos = table.chunk(2, dim=1)
    q, k = torch.randn(2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def rotated(x, token):
        pairs = torch.stack([-x[1::2], x[0::2]], -1).flatten()  # (x0, x1) -> (-x1, x0)
        return x * cos[token] + pairs * sin[token]

    def logit(qi, kj):  # tokens as (row, col) on the 8 x 8 grid
        return rotated(q, qi[0] * 8 + qi[1]) @ rotated(k, kj[0] * 8 + kj[1])

    base = logit((1, 2), (3, 0))
    for shift in ((1, 1), (4, 3), (2, 5)):
        moved = logit((1 + shift[0], 2 + shift[1]), (3 + shift[0], 0 + shift[1]))
        torch.testing.assert_close(moved, base, rtol=1e-6, atol=1e-6)
    assert (logit((1, 2), (3, 1)) - base).abs() > 1e-3  # but the offset matters, along both axes
    assert (logit((1, 2), (2, 0)) - base).abs() > 1e-3


def test_rope_changes_the_output_and_keeps_the_weights():
    plain, rotary = small(), small(rope=True)
    assert list(plain.state_dict()) == list(rotary.state_dict())  # the table is a buffer, not saved
    rotary.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t, y = torch.tensor([10.0, 700.0]), torch.tensor([1, 10])
    with torch.no_grad():
        assert (plain(x, t, y) - rotary(x, t, y)).abs().max() > 1e-3


def test_qk_norm_makes_attention_blind_to_the_query_and_key_scale():
    for qk_norm, blind in ((True, True), (False, False)):
        net = small(qk_norm=qk_norm)
        attn, x = net.blocks[0].attn, tokens()
        before = attn(x)
        with torch.no_grad():  # scale the query and key rows of the fused projection
            attn.qkv.weight[: 2 * HIDDEN] *= 7.0
            attn.qkv.bias[: 2 * HIDDEN] *= 7.0
        change = (attn(x) - before).abs().max()
        assert change < 1e-5 if blind else change > 1e-2, change  # what is left: LayerNorm's eps


def test_no_shift_modulation_is_the_shifted_one_with_zero_shifts():
    unshifted, shifted = small(adaln_shift=False), small()
    state = shifted.state_dict()
    for i, block in enumerate(unshifted.blocks):
        scale1, gate1, scale2, gate2 = block.adaLN_modulation[1].weight.chunk(4)
        b_scale1, b_gate1, b_scale2, b_gate2 = block.adaLN_modulation[1].bias.chunk(4)
        zero_w, zero_b = torch.zeros_like(scale1), torch.zeros_like(b_scale1)
        # DiT's order: shift1, scale1, gate1, shift2, scale2, gate2
        state[f"blocks.{i}.adaLN_modulation.1.weight"] = torch.cat([zero_w, scale1, gate1, zero_w, scale2, gate2])
        state[f"blocks.{i}.adaLN_modulation.1.bias"] = torch.cat([zero_b, b_scale1, b_gate1, zero_b, b_scale2, b_gate2])
    for key, value in unshifted.state_dict().items():
        if "blocks." not in key or "adaLN_modulation" not in key:
            state[key] = value
    shifted.load_state_dict(state)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t, y = torch.tensor([10.0, 700.0]), torch.tensor([1, 10])
    with torch.no_grad():
        out = unshifted(x, t, y)
        torch.testing.assert_close(shifted(x, t, y), out, rtol=1e-10, atol=1e-10)
    assert unshifted.blocks[0].adaLN_modulation[1].out_features == 4 * HIDDEN


def test_lightningdit_preset_switches_on_its_config():
    with torch.device("meta"):
        net = lightningdit_xl_1(img_resolution=16, in_channels=32, num_classes=1000)
    block = net.blocks[0]
    assert (net.patch_size, len(net.blocks), block.attn.num_heads) == (1, 28, 16)
    assert type(block.norm1).__name__ == "RmsNorm" and block.mlp.fc2.in_features == 3072
    assert net.rope_table is not None and isinstance(block.attn.q_norm, torch.nn.Identity)
    assert block.adaLN_modulation[1].out_features == 6 * 1152


@pytest.mark.parametrize("options, words", [
    (dict(norm="batchnorm"), ("norm='batchnorm'", "layernorm, rmsnorm")),
    (dict(mlp="relu"), ("mlp='relu'", "gelu, swiglu")),
    (dict(rope="yes"), ("rope='yes'", "true or false")),
    (dict(qk_norm=1), ("qk_norm=1", "true or false")),
    (dict(adaln_shift=None), ("adaln_shift=None", "true or false")),
    (dict(rope=True, hidden_size=24, num_heads=4), ("rope", "divisible by 4", "= 6")),
])
def test_bad_options_are_refused_in_one_line(options, words):
    with pytest.raises(UserValueError) as err:
        DiT(**{**dict(img_resolution=8, hidden_size=64, depth=1, num_heads=4), **options})
    message = str(err.value)
    assert "\n" not in message and all(word in message for word in words), message
