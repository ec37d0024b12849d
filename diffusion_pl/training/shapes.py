"""The network's shapes against the data's and against another network's: every such check and fill, in one place.

What a network takes is its declared interface (`diffusion_pl.networks.base.ScoreNetwork`: in_channels,
img_resolution, num_classes, augment_dim); what data gives is a `DataShape`, read from a datamodule
(`DataShape.of`: ShardDataModule's `channels`, `image_size` / `output_size`, `num_classes`; a datamodule
without one of them leaves it unchecked). Used by

    DiffusionModule.setup          check_network_fits (via check_data_fits)
    DiffusionModule.__init__       check_augment_labels
    `diffusion-pl fit`             network_fill: the unset in_channels / img_resolution of a recipe
    generation.guide_mismatch      network_mismatch: a guide must generate the same shape and classes

The latent side (latent shards, the autoencoder's latent shape and identity) is the codec's
(diffusion_pl/codecs/latent.py); channels and size are compared here in the codec's view of the data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from diffusion_pl.codecs.base import Codec, Pixels
from diffusion_pl.networks.base import ScoreNetwork
from diffusion_pl.utils.errors import UserValueError

__all__ = ["DataShape", "check_data_fits", "check_network_fits", "check_augment_labels", "network_fill", "network_mismatch",
           "FILLED"]

FILLED = ("in_channels", "img_resolution")  # the network options `diffusion-pl fit` fills from the data
_ABSENT = object()  # a datamodule without a num_classes attribute: labels not checked


@dataclass(frozen=True)
class DataShape:
    """What data gives a network. None: not known (not checked, not filled).

    channels: image channels; size: (H, W) of the images the loaders yield; num_classes: the number
    of classes, None for unlabelled data; labelled_known: whether the data says if it is labelled
    (a datamodule with a `num_classes` attribute), else num_classes is not checked.
    """

    channels: int | None = None
    size: tuple[int, int] | None = None
    num_classes: int | None = None
    labelled_known: bool = False
    name: str = "the data"

    @classmethod
    def of(cls, datamodule: Any, size: bool = True) -> "DataShape":
        """A datamodule's shape: ShardDataModule's attributes (or an object with the same names).

        size=False leaves the size out (None): a datamodule not set up may have to read an image for it.
        """
        hw = None
        if size:  # the manifest's square side first: output_size may read an image (and equals it when both exist)
            side = getattr(datamodule, "image_size", None)
            hw = (side, side) if side is not None else getattr(datamodule, "output_size", None)
        channels, classes = getattr(datamodule, "channels", None), getattr(datamodule, "num_classes", _ABSENT)
        return cls(channels=None if channels is None else int(channels),
                   size=None if hw is None else (int(hw[0]), int(hw[1])),
                   num_classes=None if classes is _ABSENT else classes, labelled_known=classes is not _ABSENT,
                   name=type(datamodule).__name__)


def check_network_fits(net: ScoreNetwork, data: DataShape) -> None:
    """Refuse, in one line naming both values, data whose channels, size or classes the network does not take."""
    name = type(net).__name__
    if data.channels is not None and net.in_channels != data.channels:
        raise UserValueError(f"{name} in_channels={net.in_channels} but the data has {data.channels}-channel images: "
                             f"expected equal values (set model.net in_channels: {data.channels}, or leave it unset)")
    if data.size is not None and (net.img_resolution,) * 2 != data.size:
        h, w = data.size
        raise UserValueError(f"{name} img_resolution={net.img_resolution}x{net.img_resolution} but the data yields "
                             f"{h}x{w} images: expected equal sizes (set data image_size: {net.img_resolution} to "
                             f"resize the data, or model.net img_resolution: {h})")
    if net.num_classes is None or not data.labelled_known:
        return
    if data.num_classes is None:
        raise UserValueError(f"{name} num_classes={net.num_classes} but the data {data.name} has no class labels: "
                             "expected labelled data (a manifest with 'classes') or num_classes: null")
    if data.num_classes != net.num_classes:
        raise UserValueError(f"{name} num_classes={net.num_classes} but the data has {data.num_classes} classes: "
                             f"expected equal values (set model.net num_classes: {data.num_classes}, or null for an "
                             "unconditional model)")


def check_augment_labels(net: ScoreNetwork, label_dim: int) -> None:
    """Refuse, in one line, augmentation labels of another length than the network's augment_dim."""
    if net.augment_dim != label_dim:
        raise UserValueError(f"augment gives {label_dim} augmentation labels but {type(net).__name__} "
                             f"augment_dim={net.augment_dim}: expected equal values (set model.net augment_dim: "
                             f"{label_dim})")


def network_fill(unset: Iterable[str], data: DataShape) -> dict[str, int]:
    """Values of the network options in `unset` (of FILLED) that the data gives; a non-square size is refused."""
    unset, values = set(unset), {}
    if "in_channels" in unset and data.channels is not None:
        values["in_channels"] = data.channels
    if "img_resolution" in unset and data.size is not None:
        h, w = data.size
        if h != w:
            raise UserValueError(f"the data yields {h}x{w} images but model.net img_resolution is unset: expected "
                                 "square images; set data image_size to a side to resize them to")
        values["img_resolution"] = h
    return values


def network_mismatch(net: ScoreNetwork, other: ScoreNetwork) -> tuple[str, Any, Any] | None:
    """(what, net's value, other's value) of the first shape or class difference between two networks, else None.

    Mixing two networks' outputs (autoguidance) needs the same generated shape and the same classes.
    """
    checks = (("image shape (channels, resolution)", (net.in_channels, net.img_resolution),
               (other.in_channels, other.img_resolution)),
              ("num_classes", net.num_classes, other.num_classes))
    return next(((what, own, theirs) for what, own, theirs in checks if own != theirs), None)


def check_data_fits(net: ScoreNetwork, datamodule: Any, codec: Codec | None = None) -> None:
    """Refuse, in one line naming both values, data whose channels, size or classes the network does not take.

    The network's declared shapes against the data's (above), channels and size in the
    codec's space (default `Pixels`): what the network sees of the data; classes from the datamodule itself.
    """
    codec = codec if codec is not None else Pixels()
    codec.check_data(net, datamodule)  # the space's own rules (a latent space: the VAE's identity, latent shapes)
    seen = codec.network_view(datamodule)  # pixels as they are, images as their latents, latent shards as they are
    labels = DataShape.of(datamodule, size=False)
    size, channels = getattr(seen, "output_size", None), getattr(seen, "channels", None)
    check_network_fits(net, dataclasses.replace(labels, channels=None if channels is None else int(channels),
                                                size=None if size is None else (int(size[0]), int(size[1]))))
