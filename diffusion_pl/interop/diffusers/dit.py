"""diffusers' `DiTTransformer2DModel` -> `diffusion_pl.networks.dit.DiT` (same outputs, same weights).

diffusers ports facebookresearch/DiT (models.py) with four differences in layout, each mapped here:

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

from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.interop.weights import check_state_dict
from diffusion_pl.networks.dit import DiT

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
    """Rename and stack a DiTTransformer2DModel state dict into `DiT.state_dict()` layout."""
    sd = dict(state_dict)
    emb = "transformer_blocks.{}.norm1.emb."
    shared = [name[len(emb.format(0)):] for name in sd if name.startswith(emb.format(0))]
    for i in range(1, num_layers):
        for name in shared:
            if not torch.equal(sd[emb.format(i) + name], sd[emb.format(0) + name]):
                raise UserValueError(f"diffusers DiT block {i}'s {emb.format(i) + name} differs from block 0's: "
                                 "expected the identical per-block embedder copies of a converted DiT.")
    e0 = emb.format(0)
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_embedder.1.0.weight": sd[e0 + "timestep_embedder.linear_1.weight"],
        "t_embedder.1.0.bias": sd[e0 + "timestep_embedder.linear_1.bias"],
        "t_embedder.1.2.weight": sd[e0 + "timestep_embedder.linear_2.weight"],
        "t_embedder.1.2.bias": sd[e0 + "timestep_embedder.linear_2.bias"],
        "y_embedder.table.weight": sd[e0 + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    for i in range(num_layers):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = torch.cat([sd[src + f"attn1.to_{n}.{kind}"] for n in "qkv"])  # [q; k; v]
            out[dst + f"attn.proj.{kind}"] = sd[src + f"attn1.to_out.0.{kind}"]
            out[dst + f"mlp.fc1.{kind}"] = sd[src + f"ff.net.0.proj.{kind}"]
            out[dst + f"mlp.fc2.{kind}"] = sd[src + f"ff.net.2.{kind}"]
            out[dst + f"adaLN_modulation.1.{kind}"] = sd[src + f"norm1.linear.{kind}"]
    return out


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
    try:
        converted = convert_dit_state_dict(state_dict, kwargs["depth"])
    except KeyError as err:  # a key of a block the config has but the weights lack
        raise UserValueError(f"{source} weights have no {err.args[0]}: expected the {kwargs['depth']} blocks "
                             "num_layers says") from err
    extra = sorted(k for k in state_dict if k.startswith("transformer_blocks.")
                   and int(k.split(".")[1]) >= kwargs["depth"])
    if extra:
        raise UserValueError(f"{source} weights have {extra[0]}: expected only the {kwargs['depth']} blocks "
                             "num_layers says")
    check_state_dict(net, converted, source, "the DiTTransformer2DModel its config.json describes")
    net.load_state_dict(converted, strict=True)
    return net.eval()
