"""Latent diffusion inside DiffusionModule: batches to latents, the data check, decoding samples.

With `DiffusionModule(autoencoder=...)` the diffusion model lives in the autoencoder's normalized
latent space; nothing else in the training path changes. A training batch `x` is either

- images (B, 3, H, W) in [-1, 1] (image shards, on-the-fly encoding): encoded under no_grad, then one
  posterior sample is drawn; or
- a raw posterior (B, 2C, h, w) = cat([mean, std]) (latent shards written by `prepare --encode`): one
  posterior sample is drawn;

told apart by channel count. The draw uses the step's reseeded global generator (training) or the
validation generator, so training stays a pure function of (seed, rank, step) and resumes bit-exactly.
The network's `in_channels` / `img_resolution` are the latent ones; samples are decoded to pixels
(`decode_samples`) before anything scores or writes them.

A checkpoint records the autoencoder it was trained with (`Autoencoder.spec()` under
`checkpoint["autoencoder_spec"]`, `save_autoencoder_spec`); loading it (`load_module`, resuming `fit`)
rebuilds the autoencoder from the saved config and refuses, in one line, one that no longer gives the
same latent space (`check_checkpoint_autoencoder`): a local VAE folder whose weights changed, another
scale or latent-statistics file. Checkpoints without the key (written before it existed) load as before.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from diffusion_pl.codecs.autoencoder import SPEC_IDENTITY_KEYS, spec_mismatch
from diffusion_pl.utils.errors import UserValueError

__all__ = ["check_autoencoder", "to_latents", "data_is_latent", "check_latent_data", "encoded_view", "decode_samples",
           "sample_shape", "reference_size", "pixel_shape", "latent_space", "SPEC_KEY", "save_autoencoder_spec",
           "check_checkpoint_autoencoder", "check_resumed_autoencoder"]

SPEC_KEY = "autoencoder_spec"  # where a checkpoint keeps the training autoencoder's spec()
# what fixes the network's latent space besides the VAE itself (spec_mismatch checks SPEC_IDENTITY_KEYS)
_NORMALIZATION_KEYS = ("scale", "shift", "latent_stats_sha256")


def check_autoencoder(net: nn.Module, autoencoder: Any, augment: Any) -> None:
    """Refuse, in one line, an autoencoder that is not one, a net that does not take its latents, or augment."""
    if autoencoder is None:
        return
    if not all(hasattr(autoencoder, a) for a in ("encode", "decode", "sample_latents", "latent_channels", "spec")):
        raise UserValueError(f"autoencoder is a {type(autoencoder).__name__}: expected a "
                             "diffusion_pl.codecs.autoencoder.Autoencoder")
    channels = getattr(net, "in_channels", None)
    if channels is not None and channels != autoencoder.latent_channels:
        raise UserValueError(f"{type(net).__name__} in_channels={channels} but the autoencoder has "
                             f"{autoencoder.latent_channels} latent channels: expected equal values (set "
                             f"model.net in_channels: {autoencoder.latent_channels})")
    if augment is not None:
        raise UserValueError("augment is set with an autoencoder: expected augment: null (the augmentation acts on "
                             "pixels; latent recipes keep the data's random flip)")


def to_latents(autoencoder: Any, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The diffusion model's data for a batch: `x` itself without an autoencoder, else one posterior sample."""
    if autoencoder is None:
        return x
    c = autoencoder.latent_channels
    if x.ndim == 4 and x.shape[1] == 2 * c:  # latent shards: the raw posterior (mean, std)
        mean, std = x.float().chunk(2, dim=1)
    elif x.ndim == 4 and x.shape[1] == autoencoder.image_channels:  # image shards: encode on the fly
        mean, std = autoencoder.encode(x)
    else:
        raise UserValueError(f"a training batch is {tuple(x.shape)}: expected images (B, "
                             f"{autoencoder.image_channels}, H, W) or a latent posterior (B, {2 * c}, h, w) = "
                             "(mean, std) for the autoencoder's latents")
    return autoencoder.sample_latents(mean, std, generator)


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    return (value, value) if isinstance(value, int) else tuple(int(v) for v in value)


def data_is_latent(datamodule: Any) -> bool:
    """Whether a datamodule streams latent shards (ShardDataModule's `latent`: the manifest's latent block)."""
    return getattr(datamodule, "latent", None) is not None


def check_latent_data(net: nn.Module, datamodule: Any, autoencoder: Any) -> None:
    """Refuse, in one line, data that does not give the net its latents (channels, size, autoencoder identity).

    Latent shards (a datamodule with a `latent` block {shape: [C, h, w]} and `autoencoder_spec`) must come
    from the module's autoencoder (`spec_mismatch`) and have the net's latent shape; image data must
    encode to it.
    """
    net_name = type(net).__name__
    if data_is_latent(datamodule):
        data_spec = getattr(datamodule, "autoencoder_spec", None)
        if autoencoder is None:
            source = (data_spec or {}).get("pretrained") or "a config-built VAE"
            raise UserValueError(f"the data is latent shards (encoded by {source}) but the module has no autoencoder: "
                                 "expected model.autoencoder with the VAE that encoded them (the manifest's "
                                 "'autoencoder')")
        problem = spec_mismatch(data_spec, autoencoder.spec())
        if problem is not None:
            raise UserValueError(f"{problem}: expected the autoencoder that encoded the data (re-encode it with "
                                 "`diffusion-pl prepare --encode`, or set model.autoencoder to that VAE)")
        shape, what = tuple(datamodule.latent["shape"]), "latent shards"
    else:
        channels = getattr(datamodule, "channels", None)
        if channels is not None and channels != autoencoder.image_channels:
            raise UserValueError(f"the data has {channels}-channel images but the autoencoder encodes "
                                 f"{autoencoder.image_channels}-channel ones: expected equal values")
        size = _size(getattr(datamodule, "output_size", None))
        shape, what = (autoencoder.latent_shape(size), f"{size[0]}x{size[1]} images") if size else (None, "")
    if shape is None:
        return
    channels, resolution = getattr(net, "in_channels", None), _size(getattr(net, "img_resolution", None))
    if channels is not None and channels != shape[0]:
        raise UserValueError(f"{net_name} in_channels={channels} but the {what} give {shape[0]}-channel latents: "
                             f"expected equal values (set model.net in_channels: {shape[0]})")
    if resolution is not None and resolution != tuple(shape[1:]):
        raise UserValueError(f"{net_name} img_resolution={resolution[0]}x{resolution[1]} but the {what} give "
                             f"{shape[1]}x{shape[2]} latents: expected equal sizes (set model.net img_resolution: "
                             f"{shape[1]})")


def encoded_view(datamodule: Any, autoencoder: Any) -> Any:
    """What the network sees of `datamodule` (`channels`, `image_size`, `output_size`): latent shards as they are,
    image data as its latents under `autoencoder` (on-the-fly encoding), for filling unset network shapes."""
    if data_is_latent(datamodule):
        return datamodule
    side = getattr(datamodule, "image_size", None)
    c, h, w = autoencoder.latent_shape(side if side is not None else datamodule.output_size)
    return SimpleNamespace(channels=c, image_size=h if h == w else None, output_size=(h, w))


def sample_shape(module: Any, batch_x: Tensor) -> tuple[int, ...]:
    """The shape the network samples: the latent (C, h, w) of a latent module, else a training batch's (C, H, W)."""
    if getattr(module, "autoencoder", None) is None:
        return tuple(batch_x.shape[1:])
    net = module.net
    return (int(net.in_channels), *_size(net.img_resolution))


def pixel_shape(module: Any, shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of the images `module` outputs for a sampled `shape`: decoded pixels of a latent module."""
    autoencoder = getattr(module, "autoencoder", None)
    return tuple(shape) if autoencoder is None else autoencoder.image_shape(tuple(shape[1:]))


def reference_size(module: Any, datamodule: Any) -> int | None:
    """Side of the images FID compares against: a latent module's decoded samples, else the data's image_size."""
    autoencoder = getattr(module, "autoencoder", None)
    if autoencoder is None:
        return getattr(datamodule, "image_size", None)
    _, h, w = pixel_shape(module, sample_shape(module, None))
    return h if h == w else None


def latent_space(module: Any) -> str | None:
    """The latent space a module's network works in (autoencoder identity, scale, shift, latent statistics) as a short
    string, None for a pixel-space module: models mix outputs (autoguidance) only within one space."""
    autoencoder = getattr(module, "autoencoder", None)
    if autoencoder is None:
        return None
    spec = autoencoder.spec()
    return " ".join(f"{k}={str(spec.get(k))[:12]}" for k in (*SPEC_IDENTITY_KEYS, *_NORMALIZATION_KEYS))


def decode_samples(module: Any, x: Tensor) -> Tensor:
    """Samples of `module` as images in [-1, 1]: decoded by its autoencoder when it has one."""
    autoencoder = getattr(module, "autoencoder", None)
    return x if autoencoder is None else autoencoder.decode(x)


def save_autoencoder_spec(autoencoder: Any, checkpoint: dict) -> None:
    """Record `autoencoder.spec()` in a checkpoint being saved (nothing for a pixel-space module)."""
    if autoencoder is not None:
        checkpoint[SPEC_KEY] = autoencoder.spec()


def _source(spec: dict) -> str:
    if spec.get("pretrained"):
        sub = f" (subfolder {spec['subfolder']})" if spec.get("subfolder") else ""
        return f"pretrained: {spec['pretrained']}{sub}"
    return "a config-built VAE"


def check_checkpoint_autoencoder(checkpoint: dict, autoencoder: Any, ckpt_path: str | None = None) -> None:
    """Refuse, in one line, a rebuilt `autoencoder` that differs from the one `checkpoint` was trained with.

    The raw latents must come from the same VAE (`spec_mismatch`: config and weights hashes) and be
    normalized the same way (scale, shift, latent statistics file); a checkpoint without a saved spec
    (older) or a pixel-space module is not checked.
    """
    saved = checkpoint.get(SPEC_KEY) if isinstance(checkpoint, dict) else None
    if saved is None or autoencoder is None:
        return
    spec = autoencoder.spec()
    key = next((k for k in (*SPEC_IDENTITY_KEYS, *_NORMALIZATION_KEYS) if saved.get(k) != spec.get(k)), None)
    if key is None:
        return
    what = key.replace("_sha256", " sha256").replace("_", " ")
    name = f"checkpoint {ckpt_path}" if ckpt_path else "the checkpoint"
    raise UserValueError(f"{name} was trained with autoencoder {_source(saved)} ({what} {str(saved.get(key))[:12]}) "
                         f"but {_source(spec)} now gives {str(spec.get(key))[:12]}: expected the same VAE, scale, "
                         "shift and latent_stats as in training (restore them, or retrain)")


def check_resumed_autoencoder(module: Any, checkpoint: dict) -> None:
    """`check_checkpoint_autoencoder` for a checkpoint a Trainer restores (resuming `fit`); `load_module` checks
    what it loads itself (it knows the path; `load_from_checkpoint` has no trainer)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        check_checkpoint_autoencoder(checkpoint, getattr(module, "autoencoder", None), trainer.ckpt_path)
