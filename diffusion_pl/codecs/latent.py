"""Latent diffusion's codec: the process runs in a frozen autoencoder's normalized latents (Rombach et al. 2022).

`LatentCodec` wraps an `Autoencoder` (diffusion_pl/codecs/autoencoder.py). A training batch `x` is either

- images (B, 3, H, W) in [-1, 1] (image shards, on-the-fly encoding): encoded under no_grad, then one
  posterior sample is drawn; or
- a raw posterior (B, 2C, h, w) = cat([mean, std]) (latent shards written by `prepare --encode`): one
  posterior sample is drawn;

told apart by channel count (DiT's train.py draws `latent_dist.sample()` each step the same way). The
draw uses the step's reseeded global generator (training) or the validation generator, so training
stays a pure function of (seed, rank, step) and resumes bit-exactly. The network's `in_channels` /
`img_resolution` are the latent ones; samples are decoded to pixels before anything scores or writes them.

Shapes come from the autoencoder's config (latent channels, downsampling factor): nothing here that
only needs a shape loads or hashes weights. The weights load when first encoding or decoding, or when
the identity is needed (`spec`: data checks, saving and checking checkpoints, `space`).

A checkpoint records the autoencoder it was trained with (`Autoencoder.spec()` under
`checkpoint["autoencoder_spec"]`, `save_spec`); loading it (`load_module`, resuming `fit`) rebuilds the
autoencoder from the saved config and refuses, in one line, one that no longer gives the same latent
space (`check_checkpoint`): a local VAE folder whose weights changed, another scale or latent-statistics
file. Checkpoints without the key (written before it existed) load as before.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import torch
from torch import Tensor

from diffusion_pl.codecs.autoencoder import SPEC_IDENTITY_KEYS, Autoencoder, spec_mismatch
from diffusion_pl.codecs.base import Codec, Pixels
from diffusion_pl.networks.base import ScoreNetwork
from diffusion_pl.utils.errors import UserValueError

__all__ = ["LatentCodec", "codec_for", "SPEC_KEY"]

SPEC_KEY = "autoencoder_spec"  # where a checkpoint keeps the training autoencoder's spec()
# what fixes the network's latent space besides the VAE itself (spec_mismatch checks SPEC_IDENTITY_KEYS)
_NORMALIZATION_KEYS = ("scale", "shift", "latent_stats_sha256")
_AUTOENCODER_API = ("encode", "decode", "sample_latents", "latent_shape", "image_shape", "latent_channels", "spec")


def codec_for(autoencoder: Autoencoder | None) -> Codec:
    """The codec of DiffusionModule's `autoencoder` argument: its latents, or `Pixels` when it is None.

    The one place that tells the two apart; everything else asks the codec."""
    return LatentCodec(autoencoder) if autoencoder is not None else Pixels()


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    return (value, value) if isinstance(value, int) else tuple(int(v) for v in value)


def _source(spec: dict) -> str:
    if spec.get("pretrained"):
        sub = f" (subfolder {spec['subfolder']})" if spec.get("subfolder") else ""
        return f"pretrained: {spec['pretrained']}{sub}"
    return "a config-built VAE"


class LatentCodec(Codec):
    """The normalized latents of a frozen `Autoencoder`: batches are posterior samples, samples are decoded."""

    def __init__(self, autoencoder: Autoencoder) -> None:
        if not all(hasattr(autoencoder, a) for a in _AUTOENCODER_API):
            raise UserValueError(f"autoencoder is a {type(autoencoder).__name__}: expected a "
                                 "diffusion_pl.codecs.autoencoder.Autoencoder")
        self.autoencoder = autoencoder

    # -- batches and samples ------------------------------------------------------------------------
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        ae = self.autoencoder
        if self._is_posterior(x.shape[1:]):  # latent shards: the raw posterior (mean, std)
            mean, std = x.float().chunk(2, dim=1)
        elif x.ndim == 4 and x.shape[1] == ae.image_channels:  # image shards: encode on the fly
            mean, std = ae.encode(x)
        else:
            raise self._bad_batch(tuple(x.shape))
        return ae.sample_latents(mean, std, generator)

    def decode(self, x: Tensor) -> Tensor:
        return self.autoencoder.decode(x)

    def pixels(self, batch: Tensor, data: Tensor) -> Tensor:
        """Image batches as they are; latent shards' posterior decoded at its mean (one VAE decode per batch)."""
        if self._is_posterior(batch.shape[1:]):
            mean = batch.float().chunk(2, dim=1)[0]
            return self.autoencoder.decode(self.autoencoder.normalize(mean))
        return batch

    def _is_posterior(self, data_shape: Sequence[int]) -> bool:
        return len(data_shape) == 3 and data_shape[0] == 2 * self.autoencoder.latent_channels

    def _bad_batch(self, shape: tuple[int, ...]) -> UserValueError:
        ae = self.autoencoder
        return UserValueError(f"a training batch is {shape}: expected images (B, {ae.image_channels}, H, W) or a "
                              f"latent posterior (B, {2 * ae.latent_channels}, h, w) = (mean, std) for the "
                              "autoencoder's latents")

    # -- shapes (from the autoencoder's config: no weights) -------------------------------------------
    def sample_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        ae, data_shape = self.autoencoder, tuple(int(v) for v in data_shape)
        if self._is_posterior(data_shape):
            return (ae.latent_channels, *data_shape[1:])
        if len(data_shape) == 3 and data_shape[0] == ae.image_channels:
            return ae.latent_shape(data_shape[1:])
        raise self._bad_batch(("B", *data_shape))

    def pixel_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return self.autoencoder.image_shape(tuple(shape[1:]))

    def reference_size(self, datamodule: Any) -> int | None:
        view = self.network_view(datamodule)
        channels, size = getattr(view, "channels", None), _size(getattr(view, "output_size", None))
        if channels is None or size is None:
            return getattr(datamodule, "image_size", None)
        _, h, w = self.pixel_shape((channels, *size))
        return h if h == w else None

    def network_view(self, datamodule: Any) -> Any:
        """Latent shards as they are; image data as its latents under the autoencoder (on-the-fly encoding)."""
        if self.data_is_latent(datamodule):
            return datamodule
        side = getattr(datamodule, "image_size", None)
        size = _size(side) or _size(getattr(datamodule, "output_size", None))
        if size is None:
            return SimpleNamespace(channels=self.autoencoder.latent_channels, image_size=None, output_size=None)
        c, h, w = self.autoencoder.latent_shape(size)
        return SimpleNamespace(channels=c, image_size=h if h == w else None, output_size=(h, w))

    # -- identity -----------------------------------------------------------------------------------
    @property
    def space(self) -> str:
        """`latents` and the autoencoder's identity, scale, shift and latent statistics (hashes loaded weights)."""
        spec = self.spec()
        return "latents " + " ".join(f"{k}={str(spec.get(k))[:12]}" for k in (*SPEC_IDENTITY_KEYS,
                                                                               *_NORMALIZATION_KEYS))

    def spec(self) -> dict[str, Any]:
        return self.autoencoder.spec()

    def save_spec(self, checkpoint: dict) -> None:
        checkpoint[SPEC_KEY] = self.spec()

    def check_checkpoint(self, checkpoint: dict, ckpt_path: str | None = None) -> None:
        """The raw latents must come from the same VAE (config and weights hashes) and be normalized the same way
        (scale, shift, latent statistics file); a checkpoint without a saved spec (older) is not checked."""
        saved = checkpoint.get(SPEC_KEY) if isinstance(checkpoint, dict) else None
        if saved is None:
            return
        spec = self.spec()
        key = next((k for k in (*SPEC_IDENTITY_KEYS, *_NORMALIZATION_KEYS) if saved.get(k) != spec.get(k)), None)
        if key is None:
            return
        what = key.replace("_sha256", " sha256").replace("_", " ")
        name = f"checkpoint {ckpt_path}" if ckpt_path else "the checkpoint"
        raise UserValueError(f"{name} was trained with autoencoder {_source(saved)} ({what} "
                             f"{str(saved.get(key))[:12]}) but {_source(spec)} now gives {str(spec.get(key))[:12]}: "
                             "expected the same VAE, scale, shift and latent_stats as in training (restore them, or "
                             "retrain)")

    # -- checks -------------------------------------------------------------------------------------
    def check_module(self, net: ScoreNetwork, augment: Any) -> None:
        latent_channels = self.autoencoder.latent_channels
        channels = net.in_channels
        if channels != latent_channels:
            raise UserValueError(f"{type(net).__name__} in_channels={channels} but the autoencoder has "
                                 f"{latent_channels} latent channels: expected equal values (set model.net "
                                 f"in_channels: {latent_channels})")
        if augment is not None:
            raise UserValueError("augment is set with an autoencoder: expected augment: null (the augmentation acts "
                                 "on pixels; latent recipes keep the data's random flip)")

    def check_data(self, net: ScoreNetwork, datamodule: Any) -> None:
        """Latent shards (a datamodule with a `latent` block {shape: [C, h, w]} and `autoencoder_spec`) must come
        from this autoencoder (`spec_mismatch`) and have the net's latent shape; image data must encode to it."""
        ae = self.autoencoder
        if self.data_is_latent(datamodule):
            problem = spec_mismatch(getattr(datamodule, "autoencoder_spec", None), ae.spec())
            if problem is not None:
                raise UserValueError(f"{problem}: expected the autoencoder that encoded the data (re-encode it with "
                                     "`diffusion-pl prepare --encode`, or set model.autoencoder to that VAE)")
            shape, what = tuple(datamodule.latent["shape"]), "latent shards"
        else:
            channels = getattr(datamodule, "channels", None)
            if channels is not None and channels != ae.image_channels:
                raise UserValueError(f"the data has {channels}-channel images but the autoencoder encodes "
                                     f"{ae.image_channels}-channel ones: expected equal values")
            size = _size(getattr(datamodule, "output_size", None))
            shape, what = (ae.latent_shape(size), f"{size[0]}x{size[1]} images") if size else (None, "")
        if shape is not None:
            self._check_net_shape(net, shape, what)

    @staticmethod
    def _check_net_shape(net: ScoreNetwork, shape: tuple[int, ...], what: str) -> None:
        net_name = type(net).__name__
        channels, resolution = net.in_channels, _size(net.img_resolution)
        if channels != shape[0]:
            raise UserValueError(f"{net_name} in_channels={channels} but the {what} give {shape[0]}-channel latents: "
                                 f"expected equal values (set model.net in_channels: {shape[0]})")
        if resolution != tuple(shape[1:]):
            raise UserValueError(f"{net_name} img_resolution={resolution[0]}x{resolution[1]} but the {what} give "
                                 f"{shape[1]}x{shape[2]} latents: expected equal sizes (set model.net img_resolution: "
                                 f"{shape[1]})")

    def check_pixel_likelihood(self, what: str) -> None:
        raise UserValueError(f"{what}, a latent diffusion model: expected a pixel-space model (bits/dim of latents is "
                             "not the images' likelihood)")

    def __repr__(self) -> str:
        return f"LatentCodec({self.autoencoder!r})"
