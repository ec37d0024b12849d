"""Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers"), with LightningDiT's block options (RMSNorm, SwiGLU, 2-D RoPE, QK-norm, no shift;
dit_blocks.py) and the presets of both.

SiT (Ma et al. 2024, willisma/SiT) uses this network unchanged: its models.py is DiT's models.py but for
the forward dropping the learned-sigma half of the output (models.py:245-246); a SiT is `DiT` with
`out_channels = in_channels` trained with the linear interpolant and velocity prediction.

PatchEmbed comes from timm, the blocks from dit_blocks.py; what is written here is the embedders, the
position tables and the un-patchify step.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn

from diffusion_pl.networks.base import ScoreNetwork
from diffusion_pl.networks.checkpointing import check_checkpoint_option, run_block
from diffusion_pl.networks.dit_blocks import DiTBlock, FinalLayer, TimestepSinusoid, check_block_options, rope_table
from diffusion_pl.networks.embeddings import ClassEmbedding, batch_noise_label, embedding_mlp, sincos_2d

__all__ = ["DiT", "dit_s_2", "dit_b_2", "dit_l_2", "dit_xl_2", "dit_tiny", "lightningdit_b_1", "lightningdit_xl_1"]


class DiT(ScoreNetwork):
    """Diffusion Transformer (Peebles & Xie 2023); output shaped like x, with out_channels channels.

    Args:
        img_resolution: input height and width, a multiple of patch_size (required; `diffusion-pl fit`
            fills it from the data when a recipe leaves it out).
        in_channels: image (or latent) channels; None: 3, or the data's channels under `diffusion-pl fit`.
        out_channels: output channels; None means in_channels (2 * in_channels for a learned variance).
        num_classes: None for unconditional; else labels 0..num_classes-1 plus the null label num_classes.
        patch_size: side of the square patches; tokens = (img_resolution / patch_size) ** 2.
        hidden_size: token width.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of hidden_size.
        frequency_embedding_size: width of the sinusoidal noise-label embedding before its MLP.
        augment_dim: length of the augmentation-label vector (EDM's non-leaking augmentation, Karras et
            al. 2022, Sec. 5; `diffusion_pl.training.augment.AugmentPipe`); 0: none. When > 0, a bias-free
            linear map of the labels is added to the conditioning vector c (timestep embedding), as EDM's
            SongUNet adds `map_augment` to its noise embedding (NVlabs/edm training/networks.py:271, :329).
        frequency_endpoint: sinusoid frequencies from 1 down to exactly 1 / 10000 (diffusers'
            DiTTransformer2DModel, downscale_freq_shift=1); False stops one step short (DiT's models.py).
        mlp_norm_eps: eps of the LayerNorm before each MLP: 1e-6 in DiT; diffusers' norm_eps (default 1e-5).
        checkpoint_activations: recompute each transformer block in the backward pass instead of keeping its
            activations (`diffusion_pl.networks.checkpointing`): less memory, about one more forward pass
            per step; only while training with gradients. Outputs, gradients and weights are those without it.
        interval_embedding: a second timestep embedder (sinusoid + MLP) of `interval` = c_noise(t) - c_noise(r),
            added to c: MeanFlow's (t, t - r) conditioning (Geng et al. 2025, Sec. 4.3, Table 1c; the official
            code's DiT sums a second TimestepEmbedder, Gsunshine/meanflow meanflow.py:163-165 passes it h = t - r).
            Off by default (the network and its state_dict are then unchanged).
        norm: "layernorm" (DiT) or "rmsnorm" (LightningDiT: RMSNorm with a learned scale in the blocks, the final
            layer and the query/key norms).
        mlp: "gelu" (DiT) or "swiglu" (LightningDiT: SiLU-gated, two thirds as wide, same parameter count).
        qk_norm: normalise queries and keys per head (LightningDiT's use_qknorm).
        rope: 2-D rotary position embedding of queries and keys, on top of the absolute sin-cos table
            (LightningDiT's use_rope); needs hidden_size / num_heads divisible by 4.
        adaln_shift: False drops the shift of the blocks' adaLN modulation (LightningDiT's wo_shift).
        The defaults are DiT's; dit_blocks.py gives each option's formula and source lines.
    """

    def __init__(
        self,
        img_resolution: int | None = None,
        in_channels: int | None = None,
        out_channels: int | None = None,
        num_classes: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        frequency_embedding_size: int = 256,
        augment_dim: int = 0,
        frequency_endpoint: bool = False,
        mlp_norm_eps: float = 1e-6,
        checkpoint_activations: bool = False,
        interval_embedding: bool = False,
        norm: str = "layernorm",
        mlp: str = "gelu",
        qk_norm: bool = False,
        rope: bool = False,
        adaln_shift: bool = True,
    ) -> None:
        # the declared interface (networks/base.py): shapes, classes, null label, augmentation labels
        super().__init__(img_resolution, in_channels, out_channels, num_classes, augment_dim)
        img_resolution, in_channels = self.img_resolution, self.in_channels
        if patch_size < 1 or img_resolution < patch_size or img_resolution % patch_size:
            raise ValueError(
                f"img_resolution must be a positive multiple of patch_size={patch_size}, got {img_resolution}."
            )
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size must be divisible by num_heads={num_heads}, got {hidden_size}.")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}.")
        if frequency_embedding_size < 2 or frequency_embedding_size % 2:
            raise ValueError(f"frequency_embedding_size must be positive and even, got {frequency_embedding_size}.")
        check_block_options(hidden_size, num_heads, norm, mlp, qk_norm, rope, adaln_shift)
        self.patch_size = patch_size
        self.checkpoint_activations = check_checkpoint_option("DiT", checkpoint_activations)

        self.x_embedder = PatchEmbed(img_resolution, patch_size, in_channels, hidden_size, bias=True)
        # Timestep embedder: sinusoid of the noise label (no endpoint in DiT) then an MLP.
        self.t_embedder = nn.Sequential(
            TimestepSinusoid(frequency_embedding_size, endpoint=frequency_endpoint),
            embedding_mlp(frequency_embedding_size, hidden_size),
        )
        self.takes_interval = bool(interval_embedding)
        self.interval_embedder = nn.Sequential(
            TimestepSinusoid(frequency_embedding_size, endpoint=frequency_endpoint),
            embedding_mlp(frequency_embedding_size, hidden_size),
        ) if interval_embedding else None
        self.y_embedder = ClassEmbedding(num_classes, hidden_size) if num_classes is not None else None
        # Xavier-uniform like every linear layer here, which is EDM SongUNet's init of map_augment.
        self.augment_embedder = nn.Linear(augment_dim, hidden_size, bias=False) if augment_dim else None
        # Fixed sin-cos positions: a buffer, not a frozen parameter (so not counted as a parameter).
        grid = img_resolution // patch_size
        self.register_buffer("pos_embed", sincos_2d(hidden_size, grid)[None], persistent=False)  # (1, T, D)
        # Rotary angles of each token, shared by every block: a buffer like pos_embed (no weights).
        self.rope_table: Tensor | None
        if rope:
            self.register_buffer("rope_table", rope_table(hidden_size // num_heads, grid), persistent=False)
        else:
            self.rope_table = None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, mlp_norm_eps, norm, mlp, qk_norm,
                                              rope, adaln_shift) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation (Peebles & Xie 2023, Sec. 3.2 and models.py): adaLN and output zeroed."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Patch embedding initialised like a linear layer on the flattened patch.
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder[1][0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[1][2].weight, std=0.02)
        if self.interval_embedder is not None:
            nn.init.normal_(self.interval_embedder[1][0].weight, std=0.02)
            nn.init.normal_(self.interval_embedder[1][2].weight, std=0.02)
        # adaLN-Zero: every residual block starts as the identity (gates are zero)...
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # ...and the output starts at zero.
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p * p * C) tokens -> (B, C, H, W) image."""
        B, p, C = x.shape[0], self.patch_size, self.out_channels
        g = self.img_resolution // p
        x = x.reshape(B, g, g, p, p, C)  # (B, h, w, p, q, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, q)
        return x.reshape(B, C, g * p, g * p)

    def forward(
        self, x: Tensor, noise_label: Tensor, class_labels: Tensor | None = None, augment_labels: Tensor | None = None,
        interval: Tensor | None = None,
    ) -> Tensor:
        # x: (B, C_in, H, W), noise_label: (B,), class_labels: (B,) int64 or None,
        # augment_labels: (B, augment_dim) or None (no augmentation: zeros),
        # interval: (B,) c_noise(t) - c_noise(r) or None (r = t), with interval_embedding only -> (B, C_out, H, W)
        B = x.shape[0]
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, T, D), T = (H / p) * (W / p)
        frequencies = self.t_embedder[0](batch_noise_label(noise_label, B))  # (B, F) float32
        mlp = self.t_embedder[1]
        c = mlp(frequencies.to(mlp[0].weight.dtype)).to(x.dtype)  # (B, D); float64 nets get float64
        if self.interval_embedder is not None:
            interval = torch.zeros_like(noise_label) if interval is None else interval
            sinusoid, mlp = self.interval_embedder
            c = c + mlp(sinusoid(batch_noise_label(interval, B)).to(mlp[0].weight.dtype)).to(x.dtype)
        elif interval is not None:
            raise ValueError("DiT got an interval but was built without one: expected interval_embedding=True")
        if self.y_embedder is not None:
            c = c + self.y_embedder(class_labels, B).to(x.dtype)  # None -> null label
        if self.augment_embedder is not None and augment_labels is not None:
            # None means all-zero labels, whose bias-free image is exactly 0.
            weight = self.augment_embedder.weight
            c = c + self.augment_embedder(augment_labels.to(weight.dtype)).to(x.dtype)  # (B, D)
        for block in self.blocks:
            h = run_block(self, self.checkpoint_activations, block, h, c, self.rope_table)  # (B, T, D)
        h = self.final_layer(h, c)  # (B, T, p * p * C_out)
        return self.unpatchify(h)  # (B, C_out, H, W)


# Presets name the four data-dependent arguments and augment_dim (set by the training recipe's
# augmentation), so LightningCLI can set them under `class_path: diffusion_pl.networks.dit.dit_s_2`;
# from Python any other DiT argument can be overridden as a keyword (jsonargparse cannot see
# through **overrides).


def dit_s_2(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> DiT:
    """DiT-S/2: hidden 384, depth 12, 6 heads, patch 2 (Peebles & Xie 2023, Table 1)."""
    size = dict(hidden_size=384, depth=12, num_heads=6, patch_size=2)
    return DiT(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim, **{**size, **overrides})


def dit_b_2(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> DiT:
    """DiT-B/2: hidden 768, depth 12, 12 heads, patch 2 (Peebles & Xie 2023, Table 1)."""
    size = dict(hidden_size=768, depth=12, num_heads=12, patch_size=2)
    return DiT(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim, **{**size, **overrides})


def dit_l_2(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> DiT:
    """DiT-L/2: hidden 1024, depth 24, 16 heads, patch 2 (Peebles & Xie 2023, Table 1)."""
    size = dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2)
    return DiT(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim, **{**size, **overrides})


def dit_xl_2(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> DiT:
    """DiT-XL/2: hidden 1152, depth 28, 16 heads, patch 2 (Peebles & Xie 2023, Table 1)."""
    size = dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)
    return DiT(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim, **{**size, **overrides})


def dit_tiny(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> DiT:
    """A 0.33M-parameter DiT (hidden 64, depth 4, 4 heads, patch 2) for tests and quick CPU runs."""
    size = dict(hidden_size=64, depth=4, num_heads=4, patch_size=2)
    return DiT(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim, **{**size, **overrides})


# LightningDiT's block options as its ImageNet config switches them on (hustvl/LightningDiT
# configs/lightningdit_xl_vavae_f16d32.yaml:33-40): RMSNorm, SwiGLU, RoPE; no QK-norm; with the shift.
LIGHTNING = dict(norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=False, adaln_shift=True)


def lightningdit_b_1(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> DiT:
    """LightningDiT-B/1: hidden 768, depth 12, 12 heads, patch 1 (lightningdit.py:507-508), LightningDiT's blocks.

    LightningDiT trains it on VA-VAE f16d32 latents: img_resolution=16, in_channels=32, num_classes=1000.
    """
    size = dict(hidden_size=768, depth=12, num_heads=12, patch_size=1, **LIGHTNING)
    return DiT(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim, **{**size, **overrides})


def lightningdit_xl_1(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> DiT:
    """LightningDiT-XL/1: hidden 1152, depth 28, 16 heads, patch 1 (lightningdit.py:498-499), LightningDiT's blocks.

    LightningDiT trains it on VA-VAE f16d32 latents: img_resolution=16, in_channels=32, num_classes=1000.
    """
    size = dict(hidden_size=1152, depth=28, num_heads=16, patch_size=1, **LIGHTNING)
    return DiT(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim, **{**size, **overrides})
