"""The parts of `DiT` (dit.py): timestep sinusoid, transformer block, final layer, and the block options of
LightningDiT (Yao et al. 2025, "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion
Models", hustvl/LightningDiT models/lightningdit.py).

PatchEmbed, the fused attention (`Attention`, `AttentionRope`), `Mlp`, `GluMlp` (SwiGLU), `RmsNorm` and the
rotary table (`build_rotary_pos_embed`) come from timm; what is written here is what timm lacks: adaLN(-Zero)
modulation and the block that wires the options together.

Block options (defaults: DiT's block, Peebles & Xie 2023; the others: LightningDiT's):

- norm "layernorm": LayerNorm without affine (DiT models.py:106-109); "rmsnorm": RMSNorm with a learned scale,
  eps 1e-6 (LightningDiT models/rmsnorm.py:34-77, used at lightningdit.py:195-200 and :258-261), for the two
  block norms, the final norm and, with qk_norm, the query/key norms.
- mlp "gelu": Linear-GELU(tanh)-Linear, hidden mlp_ratio * D (DiT models.py:110-111); "swiglu":
  W3 (SiLU(x W1) * (x W2)) with biases and hidden int(2/3 * mlp_ratio * D), 3072 for XL (lightningdit.py:215-217,
  models/swiglu_ffn.py:9-29; W1 and W2 packed in one linear, first half the gate, as its w12).
- qk_norm: normalise queries and keys per head before the attention product (lightningdit.py:60-61, :70): a
  LayerNorm with affine, eps 1e-5 (timm's default there) under norm "layernorm", an RMSNorm under "rmsnorm".
- rope: 2-D rotary position embedding of queries and keys after qk_norm (lightningdit.py:72-74, :316-323;
  models/pos_embed.py:73-111, EVA-02's VisionRotaryEmbeddingFast). Layout, per head of d channels: the first d/2
  channels rotate by the token's row, the last d/2 by its column; in each half, the interleaved pair
  (x_{2i}, x_{2i+1}) turns by the angle pos * theta^(-4i/d), i < d/4, theta 10000, pos the integer row or column
  0..grid-1. The absolute sin-cos table of DiT is still added to the tokens, as LightningDiT does (:402).
- adaln_shift False: the adaLN modulation regresses scale and gate only, no shift (LightningDiT's wo_shift,
  lightningdit.py:227-249); the final layer keeps its shift, as there.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import Attention, AttentionRope, GluMlp, Mlp, RmsNorm, build_rotary_pos_embed
from torch import Tensor, nn

from diffusion_pl.utils.errors import UserValueError

__all__ = ["NORMS", "MLPS", "modulate", "TimestepSinusoid", "DiTBlock", "FinalLayer", "check_block_options",
           "rope_table", "swiglu_hidden"]

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")


def modulate(x: Tensor, shift: Tensor | None, scale: Tensor) -> Tensor:
    """Adaptive LayerNorm modulation x * (1 + scale) + shift, broadcast over tokens (DiT, Sec. 3.2)."""
    # x: (B, T, D), shift/scale: (B, D); shift None: no shift (LightningDiT's wo_shift)
    if shift is None:
        return x * (1 + scale[:, None, :])
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def check_block_options(hidden_size: int, num_heads: int, norm: object, mlp: object, qk_norm: object,
                        rope: object, adaln_shift: object) -> None:
    """One-line errors for the block options of `DiT`."""
    if norm not in NORMS:
        raise UserValueError(f"DiT: norm={norm!r}: expected one of {', '.join(NORMS)}")
    if mlp not in MLPS:
        raise UserValueError(f"DiT: mlp={mlp!r}: expected one of {', '.join(MLPS)}")
    for name, value in (("qk_norm", qk_norm), ("rope", rope), ("adaln_shift", adaln_shift)):
        if not isinstance(value, bool):
            raise UserValueError(f"DiT: {name}={value!r}: expected true or false")
    if rope and (hidden_size // num_heads) % 4:
        raise UserValueError(f"DiT: rope needs a head width (hidden_size / num_heads = {hidden_size // num_heads}) "
                             "divisible by 4: two axes of rotated channel pairs")


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    """SwiGLU's hidden width: two thirds of the GELU MLP's, int(2/3 * int(mlp_ratio * D)) (lightningdit.py:213-217)."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


def rope_table(head_dim: int, grid: int, theta: float = 10000.0) -> Tensor:
    """(grid * grid, 2 * head_dim) float32: [sin | cos] of the rotary angles of each token (row-major), for
    timm's `apply_rot_embed_cat` (interleaved pairs; the layout in this module's docstring)."""
    # in_pixels=False: integer positions 0..grid-1 per axis and bands theta^(-i / (head_dim / 4)); 'ij': rows first.
    sin, cos = build_rotary_pos_embed([grid, grid], dim=head_dim, temperature=theta, in_pixels=False)
    return torch.cat([sin, cos], dim=-1)


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    # DiT's LayerNorm has no affine (the modulation supplies scale and shift); LightningDiT's RMSNorm keeps one.
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps) if kind == "layernorm" else RmsNorm(dim, eps=eps)


class TimestepSinusoid(nn.Module):
    """DiT's timestep features [cos(t f_k), sin(t f_k)], f_k = exp(-ln(max_period) k / n), float32.

    n = half (DiT, facebookresearch/DiT models.py:51-56) or half - 1 with endpoint=True
    (diffusers' CombinedTimestepLabelEmbeddings: Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=1), models/embeddings.py). The float32 operations are those of both
    references, so the features agree bit for bit.
    """

    def __init__(self, num_channels: int, max_period: float = 10000.0, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels, self.max_period, self.endpoint = num_channels, max_period, endpoint

    def forward(self, t: Tensor) -> Tensor:
        # t: (B,) -> (B, num_channels), float32
        half = self.num_channels // 2
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - (1 if self.endpoint and half > 1 else 0)))  # (half,)
        angle = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: conditioning regresses shift, scale and a gate per branch (DiT, Fig. 3)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, mlp_norm_eps: float = 1e-6,
                 norm: str = "layernorm", mlp: str = "gelu", qk_norm: bool = False, rope: bool = False,
                 adaln_shift: bool = True) -> None:
        super().__init__()
        self.norm1 = _norm(norm, hidden_size, 1e-6)
        qk = dict(qk_norm=True, norm_layer=RmsNorm if norm == "rmsnorm" else nn.LayerNorm) if qk_norm else {}
        if rope:
            self.attn = AttentionRope(hidden_size, num_heads=num_heads, qkv_bias=True, num_prefix_tokens=0, **qk)
        else:
            self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, **qk)
        self.attn.fused_attn = True  # always F.scaled_dot_product_attention
        self.rope = rope
        self.norm2 = _norm(norm, hidden_size, mlp_norm_eps)
        if mlp == "swiglu":  # GluMlp's hidden_features is the packed [gate; value] width
            self.mlp = GluMlp(hidden_size, 2 * swiglu_hidden(hidden_size, mlp_ratio), act_layer=nn.SiLU,
                              gate_last=False)
        else:
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.chunks = 6 if adaln_shift else 4
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, self.chunks * hidden_size))

    def forward(self, x: Tensor, c: Tensor, rope: Tensor | None = None) -> Tensor:
        # x: (B, T, D) tokens, c: (B, D) conditioning, rope: (T, 2 * head_dim) [sin | cos] or None -> (B, T, D)
        if self.chunks == 6:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        else:
            (scale1, gate1, scale2, gate2), shift1, shift2 = self.adaLN_modulation(c).chunk(4, dim=1), None, None
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1[:, None, :] * (self.attn(h, rope=rope) if self.rope else self.attn(h))
        x = x + gate2[:, None, :] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patches (DiT, Sec. 3.1 "Transformer decoder")."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str = "layernorm") -> None:
        super().__init__()
        self.norm_final = _norm(norm, hidden_size, 1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # x: (B, T, D), c: (B, D) -> (B, T, p * p * C_out)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
