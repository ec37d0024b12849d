"""facebookresearch/DiT's published `.pt` state dicts -> `diffusion_pl.networks.dit.DiT` (same outputs, same weights).

`DiT`'s defaults are DiT's models.py (Peebles & Xie 2023), and its state_dict keys are models.py's
but for three:

- `t_embedder.mlp.{0,2}` (TimestepEmbedder.mlp, models.py:33-37) are `t_embedder.1.{0,2}` here, where
  `t_embedder` is (sinusoid, MLP);
- `y_embedder.embedding_table` (LabelEmbedder, models.py:74) is `y_embedder.table`;
- `pos_embed`, a frozen parameter there (models.py:174) holding the 2-D sin-cos table, is a buffer
  recomputed here: the file's table is checked against ours and dropped.

The files hold no hyperparameters. Depth, hidden size, patch size, channels, classes and the latent
size follow from the tensor shapes; the number of attention heads does not, hence `arch`, one of
models.py's `DiT_models` names (models.py:328-370), whose sizes the shapes must then match. The
image size is the pixel size the latents decode to: latent side = image_size // 8 (sample.py,
`latent_size = args.image_size // 8`; the SD VAE downsamples 8x). A label table of N + 1 rows is N
classes plus the null label (class_dropout_prob > 0, models.py:73-74).

Checkpoints of DiT's train.py ({"model", "ema", "opt", "args"}) give their EMA network, as DiT's
download.py `find_model` does, and their `args` (model, image_size, num_classes) stand in for `arch`
and `image_size`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.interop.weights import check_state_dict
from diffusion_pl.networks.dit import DiT
from diffusion_pl.networks.embeddings import sincos_2d

__all__ = ["ARCHS", "PUBLISHED", "DOWNLOAD_URL", "reference_checkpoint", "dit_kwargs_from_reference",
           "convert_dit_reference_state_dict", "dit_from_reference"]

# name -> (depth, hidden_size, patch_size, num_heads), models.py:328-362
ARCHS = {f"DiT-{size}/{patch}": (depth, hidden, patch, heads)
         for size, depth, hidden, heads in (("XL", 28, 1152, 16), ("L", 24, 1024, 16), ("B", 12, 768, 12),
                                            ("S", 12, 384, 6))
         for patch in (2, 4, 8)}
# download.py:15 and :37: the published files, their architecture and image size
PUBLISHED = {"DiT-XL-2-256x256.pt": ("DiT-XL/2", 256), "DiT-XL-2-512x512.pt": ("DiT-XL/2", 512)}
DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"
VAE_DOWNSAMPLE = 8
_RENAME = {"t_embedder.mlp.0.": "t_embedder.1.0.", "t_embedder.mlp.2.": "t_embedder.1.2.",
           "y_embedder.embedding_table.": "y_embedder.table."}


def reference_checkpoint(checkpoint: Any, source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, train.py args as a dict or {}) of a loaded DiT file: a state dict or a train.py checkpoint."""
    if isinstance(checkpoint, Mapping) and "ema" in checkpoint and isinstance(checkpoint["ema"], Mapping):
        args = checkpoint.get("args")
        return dict(checkpoint["ema"]), dict(vars(args)) if args is not None and hasattr(args, "__dict__") else {}
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise UserValueError(f"{source} holds a {type(checkpoint).__name__}, not tensors: expected a facebookresearch/"
                             "DiT state dict (DiT-XL-2-256x256.pt) or a train.py checkpoint with an 'ema' entry")
    return dict(checkpoint), {}


def _shape(state_dict: Mapping[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise UserValueError(f"{source} has no {key}: expected a facebookresearch/DiT state dict (models.py keys)")
    return tuple(state_dict[key].shape)


def dit_kwargs_from_reference(state_dict: Mapping[str, Tensor], arch: str, image_size: int | None,
                              source: str) -> dict[str, Any]:
    """`DiT(**kwargs)` equal to models.py's DiT_models[arch] holding `state_dict`, refusing sizes that differ."""
    if arch not in ARCHS:
        raise UserValueError(f"--arch {arch} is not a DiT architecture: expected one of {', '.join(ARCHS)}")
    depth, hidden, patch, heads = ARCHS[arch]
    embed = _shape(state_dict, "x_embedder.proj.weight", source)  # (hidden, C_in, p, p)
    if len(embed) != 4 or embed[0] != hidden or embed[2:] != (patch, patch):
        raise UserValueError(f"{source} x_embedder.proj.weight has shape {embed}: expected {arch}'s "
                             f"({hidden}, C, {patch}, {patch}) (another --arch?)")
    blocks = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    if blocks != depth:
        raise UserValueError(f"{source} has {blocks} blocks: expected {arch}'s {depth} (another --arch?)")
    in_channels = embed[1]
    rows = _shape(state_dict, "final_layer.linear.weight", source)[0]
    if rows % (patch * patch):
        raise UserValueError(f"{source} final_layer.linear.weight has {rows} rows: expected a multiple of "
                             f"{patch * patch} (patch {patch})")
    out_channels = rows // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserValueError(f"{source} outputs {out_channels} channels for {in_channels} input channels: expected "
                             f"{in_channels} or {2 * in_channels} (learn_sigma)")
    table = _shape(state_dict, "y_embedder.embedding_table.weight", source)[0]
    tokens = _shape(state_dict, "pos_embed", source)[1] if "pos_embed" in state_dict else None
    if image_size is not None:
        latent = image_size // VAE_DOWNSAMPLE
        if image_size % VAE_DOWNSAMPLE or latent % patch:
            raise UserValueError(f"--image_size {image_size}: expected a multiple of {VAE_DOWNSAMPLE * patch} "
                                 f"(the VAE's {VAE_DOWNSAMPLE}x and the patch size {patch})")
        if tokens is not None and tokens != (latent // patch) ** 2:
            side = round(tokens**0.5) * patch
            raise UserValueError(f"{source} has {tokens} position tokens, a {side}x{side} latent of "
                                 f"{side * VAE_DOWNSAMPLE}px images: expected --image_size {side * VAE_DOWNSAMPLE}, "
                                 f"not {image_size}")
    elif tokens is not None:
        latent = round(tokens**0.5) * patch
    else:
        raise UserValueError(f"{source} has no pos_embed to tell the latent size: expected --image_size")
    return dict(img_resolution=latent, in_channels=in_channels, out_channels=out_channels, num_classes=table - 1,
                patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads, mlp_ratio=4.0,
                frequency_embedding_size=_shape(state_dict, "t_embedder.mlp.0.weight", source)[1], augment_dim=0,
                frequency_endpoint=False, mlp_norm_eps=1e-6)


def convert_dit_reference_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """models.py keys -> `DiT.state_dict()` keys (pos_embed dropped: see `dit_from_reference`)."""
    out = {}
    for key, value in state_dict.items():
        if key == "pos_embed":
            continue
        for old, new in _RENAME.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def dit_from_reference(checkpoint: Any, arch: str | None = None, image_size: int | None = None,
                       source: str = "the DiT file") -> tuple[DiT, dict[str, Any]]:
    """(our DiT with the file's weights in float32, eval mode; its constructor kwargs).

    `arch` / `image_size` default to a train.py checkpoint's args; `arch` is required otherwise.
    """
    state_dict, args = reference_checkpoint(checkpoint, source)
    for name, value, saved in (("--arch", arch, args.get("model")), ("--image_size", image_size,
                                                                      args.get("image_size"))):
        if value is not None and saved is not None and value != saved:
            raise UserValueError(f"{name} {value} but {source} was trained with {saved}: expected the same "
                                 "(or leave it out)")
    arch = arch if arch is not None else args.get("model")
    image_size = image_size if image_size is not None else args.get("image_size")
    if arch is None:
        raise UserValueError(f"{source} does not say its architecture: expected --arch, one of {', '.join(ARCHS)} "
                             "(DiT-XL/2 for the published DiT-XL-2-*.pt)")
    kwargs = dit_kwargs_from_reference(state_dict, arch, image_size, source)
    if args.get("num_classes") is not None and args["num_classes"] != kwargs["num_classes"]:
        raise UserValueError(f"{source} has a {kwargs['num_classes'] + 1}-row label table but was trained with "
                             f"num_classes={args['num_classes']}: expected num_classes + 1 rows (the null label)")
    net = DiT(**kwargs)
    if "pos_embed" in state_dict:
        grid = kwargs["img_resolution"] // kwargs["patch_size"]
        ours = sincos_2d(kwargs["hidden_size"], grid)[None]
        diff = float((state_dict["pos_embed"].float() - ours).abs().max())
        if diff > 1e-6:
            raise UserValueError(f"{source} pos_embed differs from the 2-D sin-cos table by {diff:.2g}: expected DiT's "
                                 "fixed positions (models.py get_2d_sincos_pos_embed)")
    converted = {k: v.float() for k, v in convert_dit_reference_state_dict(state_dict).items()}
    check_state_dict(net, converted, source, f"the state dict of {arch} at {kwargs['img_resolution']}x"
                                             f"{kwargs['img_resolution']} latents")
    net.load_state_dict(converted, strict=True)
    return net.eval(), kwargs
