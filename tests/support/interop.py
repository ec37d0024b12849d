"""Reference models of the interop tests, built from configs with random weights (no download): diffusers'
UNet2DModel at google/ddpm-cifar10-32's config and smaller sizes of the same structure, and a small DiT-S/2-like
DiTTransformer2DModel. diffusers is imported when a builder runs: the modules that use them skip without it."""

from __future__ import annotations

import math

import torch

# google/ddpm-cifar10-32 config.json (diffusers UNet2DModel); Ho et al. 2020 App. B.
DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
    norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None, resnet_time_scale_shift="default",
    act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, dropout=0.1,
)
# The same structure at 16x16 with two levels (attention at the first, 8x8 middle).
SMALL = {**DDPM_CIFAR10, "sample_size": 16, "block_out_channels": (128, 128), "layers_per_block": 1,
         "down_block_types": ("AttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "AttnUpBlock2D")}
# 8x8, one level of 128 channels: the 1000-step sampling and the fine-tuning runs on the CPU.
TINY = {**DDPM_CIFAR10, "sample_size": 8, "block_out_channels": (128,), "layers_per_block": 1,
        "down_block_types": ("AttnDownBlock2D",), "up_block_types": ("AttnUpBlock2D",)}
TIMESTEPS = torch.tensor([0, 1, 250, 999])  # several noise levels (diffusers timesteps = our noise labels)
LABELS = torch.tensor([0, 7, 999, 1000])  # 1000: the null label
DIT = dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, sample_size=8, patch_size=2,
           num_embeds_ada_norm=1000, norm_type="ada_norm_zero")


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (zero-initialised layers too), scaled to keep activations O(1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def dit_reference(out_channels: int = 8, num_layers: int = 2, **config) -> torch.nn.Module:
    """A randomised DiTTransformer2DModel whose per-block embedder copies equal block 0's, as in converted DiTs."""
    import diffusers

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = diffusers.DiTTransformer2DModel(
            num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=out_channels, num_layers=num_layers,
            sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", **config,
        ).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        block0 = dict(model.transformer_blocks[0].norm1.emb.named_parameters())
        for block in model.transformer_blocks[1:]:
            for name, p in block.norm1.emb.named_parameters():
                p.copy_(block0[name])
    return model


def dit_reference_model(num_layers=2, norm_eps=1e-5):
    """A randomised DiTTransformer2DModel (the DIT config) whose per-block embedder copies are identical."""
    return dit_reference(num_layers=num_layers, norm_eps=norm_eps)


def save_unet(folder, config, seed=0, scheduler=None, layout="pipeline", weights="safetensors"):
    """A randomised UNet2DModel saved as a pipeline (unet/ + scheduler/) or flat (hub google/ddpm-*) folder."""
    import diffusers

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = randomise(diffusers.UNet2DModel(**config), seed).eval()
    model.save_pretrained(folder / "unet" if layout == "pipeline" else folder,
                          safe_serialization=weights == "safetensors")
    if scheduler is not None:
        scheduler.save_pretrained(folder / "scheduler" if layout == "pipeline" else folder)
    return model


class OurSinusoid(torch.nn.Module):
    """Our UNet's timestep sinusoid in diffusers' `time_proj` slot."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.map_noise, self.noise_order = unet.map_noise, unet.noise_order

    def forward(self, timesteps):
        return self.noise_order(self.map_noise(timesteps.to(torch.float32)))
