"""diffusers' `DiTTransformer2DModel` -> `diffusion_pl.networks.dit.DiT` (same outputs, same weights).

diffusers ports facebookresearch/DiT (models.py) with four differences in layout, each mapped here (the
weight names are the rows of `keys.DIT_KEYS`, which the export reads backwards):

- q, k and v are separate layers (`attn1.to_q/to_k/to_v`); DiT and timm fuse them as one `qkv`
  layer whose rows are [q; k; v], so the three weight matrices are stacked;
- every block's `norm1.emb` holds its own copy of the timestep MLP and class table, and the final
  layer uses block 0's (diffusers models/transformers/dit_transformer_2d.py, `forward`): checkpoints
  converted from DiT hold identical copies, which become the one shared embedder here (copies that
  differ cannot be represented and are refused);
- the timestep sinusoid has its last frequency exactly 1/10000 (`Timesteps(downscale_freq_shift=1)`
  in `CombinedTimestepLabelEmbeddings`), DiT's stops one step short: `DiT(frequency_endpoint=True)`;
- the LayerNorm before each MLP (`norm3`) uses the config's `norm_eps` (default 1e-5), DiT's 1e-6:
  `DiT(mlp_norm_eps=norm_eps)`.

Class labels: diffusers' table has num_embeds_ada_norm + 1 rows (class_dropout_prob 0.1), the last
being the null label, as here. Label dropout (training mode only) is not part of the network here;
outputs agree in eval mode. diffusers' `dropout` (0 in DiT) has no counterpart and is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffusion_pl.interop.diffusers.keys import DIT_KEYS
from diffusion_pl.interop.weights import check_state_dict
from diffusion_pl.networks.dit import DiT
from diffusion_pl.utils.errors import UserValueError

__all__ = ["dit_kwargs_from_diffusers", "convert_dit_state_dict", "dit_from_diffusers", "dit_from_diffusers_state"]


def dit_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """`DiT(**kwargs)` arguments equal to a diffusers DiTTransformer2DModel config (`model.config`)."""
    expected = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                    norm_elementwise_affine=False)
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise UserValueError(f"diffusers DiT config {key}={config[key]!r} is not supported: expected {value!r}.")
    if config.get("num_embeds_ada_norm") is None:
        raise UserValueError("diffusers DiT config num_embeds_ada_norm is None: expected the number of classes.")
    in_channels = int(config.get("in_channels", 4))
    out_channels = config.get("out_channels")
    heads, head_dim = int(config.get("num_attention_heads", 16)), int(config.get("attention_head_dim", 72))
    return dict(
        img_resolution=int(config.get("sample_size", 32)),
        in_channels=in_channels,
        out_channels=in_channels if out_channels is None else int(out_channels),
        num_classes=int(config["num_embeds_ada_norm"]),
        patch_size=int(config.get("patch_size", 2)),
        hidden_size=heads * head_dim,
        depth=int(config.get("num_layers", 28)),
        num_heads=heads,
        mlp_ratio=4.0,  # diffusers' FeedForward(mult=4)
        frequency_embedding_size=256,  # CombinedTimestepLabelEmbeddings: Timesteps(num_channels=256)
        frequency_endpoint=True,
        mlp_norm_eps=float(config.get("norm_eps", 1e-5)),
    )


def convert_dit_state_dict(state_dict: Mapping[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Rename and stack a DiTTransformer2DModel state dict into `DiT.state_dict()` layout (`DIT_KEYS`).

    The per-block embedder copies must be equal (one shared embedder here); keys no row maps are left out,
    as are those of blocks from `num_layers` on (`dit_from_diffusers_state` refuses those first).
    """
    out, _ = DIT_KEYS.to_ours({k: v for k, v in state_dict.items() if _block(k) < num_layers})
    return out


def _block(key: str) -> int:
    """The transformer block a diffusers key belongs to (-1: none)."""
    parts = key.split(".")
    return int(parts[1]) if parts[0] == "transformer_blocks" and parts[1].isdigit() else -1


def dit_from_diffusers(model: torch.nn.Module) -> DiT:
    """A `DiT` with the architecture and weights of a diffusers DiTTransformer2DModel (its dtype, eval mode).

    Call the result as `net(x, timestep, class_labels)`: the noise label is diffusers' `timestep`
    (DDPM's step index 0..999 in DiT).
    """
    return dit_from_diffusers_state(model.config, model.state_dict(), dtype=next(model.parameters()).dtype)


def dit_from_diffusers_state(config: Mapping[str, Any], state_dict: Mapping[str, Tensor],
                             dtype: torch.dtype = torch.float32, source: str = "diffusers DiT") -> DiT:
    """`dit_from_diffusers` from a DiTTransformer2DModel's config (config.json) and state dict, without diffusers."""
    kwargs = dit_kwargs_from_diffusers(config)
    net = DiT(**kwargs).to(dtype)
    missing = [k for k in ("pos_embed.proj.weight", "proj_out_2.weight", "transformer_blocks.0.norm1.emb."
                           "timestep_embedder.linear_1.weight") if k not in state_dict]
    if missing:
        raise UserValueError(f"{source} weights have no {', '.join(missing)}: expected a DiTTransformer2DModel "
                             "state dict")
    extra = sorted(k for k in state_dict if _block(k) >= kwargs["depth"])
    if extra:
        raise UserValueError(f"{source} weights have {extra[0]}: expected only the {kwargs['depth']} blocks "
                             "num_layers says")
    # the diffusers keys this config has: our network's, through the table the export writes with
    expected, _ = DIT_KEYS.to_theirs(net.state_dict(), copies={"block": range(kwargs["depth"])})
    absent = [k for k in expected if k not in state_dict]
    if absent:
        raise UserValueError(f"{source} weights have no {absent[0]}: expected the {kwargs['depth']} blocks "
                             "num_layers says")
    converted = convert_dit_state_dict(state_dict, kwargs["depth"])
    check_state_dict(net, converted, source, "the DiTTransformer2DModel its config.json describes")
    net.load_state_dict(converted, strict=True)
    return net.eval()
