"""diffusers' `UNet2DModel` -> `diffusion_pl.networks.unet.UNet` (same outputs, same weights).

diffusers ports DDPM's TensorFlow U-Net (hojonathanho/diffusion diffusion_tf/models/unet.py) as
`UNet2DModel`; `google/ddpm-cifar10-32` is `unet_ddpm_cifar10` here. The layouts differ in names
and in one fused layer, each a row of `keys.UNET_KEYS` (which the export reads backwards):

- q, k and v are separate layers (`to_q/to_k/to_v`); timm's Attention fuses them as one `qkv`
  layer whose rows are [q; k; v] (each split into heads the same way), so they are stacked;
- `down_blocks.i.downsamplers.0` is the strided conv that ends encoder level i (`downsample.i`
  here), `up_blocks.i.upsamplers.0` the conv that ends decoder level i (`upsample.i`);
- a ResnetBlock2D's (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut) are a ResBlock's
  (norm0, conv0, affine.1, norm1, conv1, skip); its attention follows it (`.attn` here).

Config (diffusers models/unets/unet_2d.py): `downsample_padding=0` is TensorFlow's 'SAME' padding
(`downsample_padding="same"`), `flip_sin_to_cos=False` the [sin, cos] order, `freq_shift=1` the
endpoint frequency 1/10000, `attention_head_dim=None` one head, `norm_num_groups` the groups of every
GroupNorm (`norm_groups`; `attn_norm_num_groups` only as None or the same count), `time_embedding_dim`
`emb_mult` x block_out_channels[0]. Noise label: diffusers' `timestep`
(DDPM's step index 0..999, as `DDPMDiscrete.noise_label`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffusion_pl.interop.diffusers.keys import UNET_BLOCK_LAYERS, UNET_KEYS
from diffusion_pl.interop.weights import check_state_dict
from diffusion_pl.networks.unet import UNet
from diffusion_pl.utils.errors import UserValueError

__all__ = ["unet_kwargs_from_diffusers", "convert_unet_state_dict", "load_diffusers_unet", "unet_from_diffusers",
           "unet_from_diffusers_state"]

_DOWN, _UP = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")


def unet_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """`UNet(**kwargs)` arguments equal to a diffusers UNet2DModel config (`model.config`)."""
    expected = dict(time_embedding_type="positional", act_fn="silu", center_input_sample=False,
                    mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1, downsample_type="conv",
                    upsample_type="conv", resnet_time_scale_shift="default", add_attention=True,
                    class_embed_type=None, num_class_embeds=None)
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise UserValueError(f"diffusers UNet2DModel config {key}={config[key]!r} is not supported: "
                                 f"expected {value!r}.")
    down, up = tuple(config["down_block_types"]), tuple(config["up_block_types"])
    if any(t not in _DOWN for t in down) or any(t not in _UP for t in up) or len(down) != len(up):
        raise UserValueError(f"diffusers UNet2DModel blocks {down} / {up} are not supported: expected "
                             f"{_DOWN} down and {_UP} up blocks, as many of each.")
    attn_down = [t == "AttnDownBlock2D" for t in down]
    if attn_down != [t == "AttnUpBlock2D" for t in reversed(up)]:
        raise UserValueError(f"diffusers UNet2DModel attention in down blocks {down} and up blocks {up} is not "
                             "mirrored: expected AttnUpBlock2D exactly where AttnDownBlock2D is, reversed.")
    channels = tuple(int(c) for c in config["block_out_channels"])
    model_channels = channels[0]
    if any(c % model_channels for c in channels):
        raise UserValueError(f"diffusers UNet2DModel block_out_channels={channels}: expected multiples of the "
                             f"first, {model_channels}.")
    padding = int(config.get("downsample_padding", 1))
    if padding not in (0, 1):
        raise UserValueError(f"diffusers UNet2DModel downsample_padding={padding}: expected 0 or 1.")
    freq_shift = config.get("freq_shift", 0)
    if freq_shift not in (0, 1):
        raise UserValueError(f"diffusers UNet2DModel freq_shift={freq_shift}: expected 0 or 1.")
    size = config["sample_size"]
    size = size if isinstance(size, int) else int(size[0]) if size[0] == size[-1] else None
    if size is None:
        raise UserValueError(f"diffusers UNet2DModel sample_size={config['sample_size']}: expected square images.")
    groups = config.get("norm_num_groups", 32)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise UserValueError(f"diffusers UNet2DModel norm_num_groups={groups!r} is not supported: expected a positive "
                             "integer (one GroupNorm group count for every layer).")
    attn_groups = config.get("attn_norm_num_groups")
    if attn_groups not in (None, groups):
        raise UserValueError(f"diffusers UNet2DModel attn_norm_num_groups={attn_groups!r} is not supported: expected "
                             f"None or norm_num_groups={groups} (one group count in every GroupNorm).")
    emb_dim = config.get("time_embedding_dim") or 4 * model_channels
    if emb_dim % model_channels:
        raise UserValueError(f"diffusers UNet2DModel time_embedding_dim={emb_dim} is not supported: expected a "
                             f"multiple of block_out_channels[0]={model_channels}.")
    head_dim = config.get("attention_head_dim", 8)
    return dict(
        img_resolution=size,
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        num_classes=None,
        model_channels=model_channels,
        channel_mult=tuple(c // model_channels for c in channels),
        num_res_blocks=int(config.get("layers_per_block", 2)),
        attn_resolutions=tuple(size >> level for level, attn in enumerate(attn_down) if attn),
        attn_heads=1,
        attn_head_channels=None if head_dim is None else int(head_dim),
        dropout=float(config.get("dropout", 0.0)),
        emb_mult=emb_dim // model_channels,
        resample="conv",
        decoder_attention="every_block",
        downsample_padding="same" if padding == 0 else "symmetric",
        embedding_order="cos_sin" if config.get("flip_sin_to_cos", True) else "sin_cos",
        embedding_endpoint=freq_shift == 1,
        norm_eps=float(config.get("norm_eps", 1e-5)),
        norm_groups=groups,
        init="ddpm",
    )


def _unmapped(key: str) -> UserValueError:
    """Why a diffusers key has no row in UNET_KEYS: not a block layer at all, or an unknown layer of a block."""
    module = key.rpartition(".")[0]
    m = re.fullmatch(r"(?:(?:down|up)_blocks\.\d+|mid_block)\.(resnets|attentions)\.\d+\.(.+)", module)
    if m is None:
        return UserValueError(f"cannot map diffusers UNet2DModel key {key!r}: expected the keys of DownBlock2D, "
                              "AttnDownBlock2D, UNetMidBlock2D, UpBlock2D and AttnUpBlock2D blocks.")
    prefix = f"{m[1]}.{{i}}."
    known = sorted(row.theirs[len(prefix):] for row in UNET_BLOCK_LAYERS if row.theirs.startswith(prefix))
    return UserValueError(f"cannot map diffusers UNet2DModel key {key!r}: unknown layer {m[2]!r} in a "
                          f"{m[1][:-1]} (expected one of {known}).")


def convert_unet_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a UNet2DModel state dict into `UNet.state_dict()` layout, stacking q, k, v into qkv (`UNET_KEYS`)."""
    out, unmatched = UNET_KEYS.to_ours(state_dict)
    if unmatched:
        raise _unmapped(unmatched[0])
    return out


def load_diffusers_unet(net: UNet, state_dict: Mapping[str, Tensor]) -> UNet:
    """Load a UNet2DModel state dict into `net` (in place; also returned), refusing any mismatch."""
    converted = convert_unet_state_dict(state_dict)
    check_state_dict(net, converted, "diffusers UNet2DModel", "the state dict of a UNet2DModel with this config")
    net.load_state_dict(converted, strict=True)
    return net


def unet_from_diffusers(model: torch.nn.Module) -> UNet:
    """A `UNet` with the architecture and weights of a diffusers UNet2DModel (its dtype, eval mode).

    Call the result as `net(x, timestep)`: the noise label is diffusers' `timestep`.
    """
    return unet_from_diffusers_state(model.config, model.state_dict(), dtype=next(model.parameters()).dtype)


def unet_from_diffusers_state(config: Mapping[str, Any], state_dict: Mapping[str, Tensor],
                              dtype: torch.dtype = torch.float32) -> UNet:
    """`unet_from_diffusers` from a UNet2DModel's config (config.json) and state dict, without diffusers."""
    kwargs = unet_kwargs_from_diffusers(config)
    try:
        net = UNet(**kwargs).to(dtype)
    except ValueError as error:  # e.g. norm_num_groups not dividing a width: diffusers cannot build it either
        raise UserValueError(f"diffusers UNet2DModel config does not build a UNet: {error}") from None
    return load_diffusers_unet(net, state_dict).eval()
