"""The space the process runs in, as one object every DiffusionModule has: `Codec`, and `Pixels`, the identity.

A module's codec (`module.codec`) is asked everything that differs between pixel-space and latent
diffusion, so no caller asks whether there is an autoencoder:

- `encode` turns a training batch into the diffusion model's data, `decode` turns samples into images
  in [-1, 1] before anything scores or writes them;
- `sample_shape` (what the network samples, from a batch's shape), `pixel_shape` (what `decode`
  gives), `reference_size` (the side FID compares at) and `network_view` (what the network sees of a
  datamodule, for filling and checking its shape) are the shapes;
- `check_module` / `check_data` refuse, in one line, a network or data the space does not fit;
- `space` names the space for reports and for comparing two models (autoguidance); `spec`, saved into
  checkpoints by `save_spec` and compared on load / resume by `check_checkpoint`, is its identity.

`Pixels` is the neutral default: the process runs on the images themselves and everything is the
identity. The latent codec (diffusion_pl/codecs/latent.py) runs it in a frozen autoencoder's
normalized latents (Rombach et al. 2022).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

from torch import Tensor, nn

from diffusion_pl.utils.errors import UserValueError

__all__ = ["Codec", "Pixels"]


class Codec(ABC):
    """What the module, the data checks, generation and the commands ask of the space the process runs in."""

    @property
    @abstractmethod
    def space(self) -> str:
        """The space as a short string: equal strings mean models whose outputs can be mixed (autoguidance)."""

    @abstractmethod
    def encode(self, x: Tensor, generator: Any = None) -> Tensor:
        """The diffusion model's data for a training batch `x`; random draws come from `generator` (the global
        generator when None, which a training step has reseeded)."""

    @abstractmethod
    def decode(self, x: Tensor) -> Tensor:
        """Samples of the diffusion model as images in [-1, 1]."""

    def pixels(self, batch: Tensor, data: Tensor) -> Tensor:
        """The clean images (B, 3, H, W) in [-1, 1] behind a training `batch` whose data (`encode`'s output, after
        any augmentation) is `data`, for losses on images (REPA's encoder); here the data itself."""
        return data

    @abstractmethod
    def sample_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        """The (C, h, w) the network samples, from the shape of one example of a training batch."""

    @abstractmethod
    def pixel_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The (C, H, W) of the images `decode` gives for samples of `shape`."""

    @abstractmethod
    def reference_size(self, datamodule: Any) -> int | None:
        """The side of the images FID compares samples with (None: the reference images' own size)."""

    @abstractmethod
    def network_view(self, datamodule: Any) -> Any:
        """What the network sees of `datamodule`: an object with its `channels`, `image_size`, `output_size`."""

    @abstractmethod
    def spec(self) -> dict[str, Any] | None:
        """The space's identity as JSON-able values (None: nothing to record)."""

    @abstractmethod
    def save_spec(self, checkpoint: dict) -> None:
        """Record `spec()` in a checkpoint being saved."""

    @abstractmethod
    def check_checkpoint(self, checkpoint: dict, ckpt_path: str | None = None) -> None:
        """Refuse, in one line, a checkpoint trained in another space than this one."""

    @abstractmethod
    def check_module(self, net: nn.Module, augment: Any) -> None:
        """Refuse, in one line, a network or an augmentation that cannot work in this space."""

    @abstractmethod
    def check_data(self, net: nn.Module, datamodule: Any) -> None:
        """Refuse, in one line, data this space cannot give `net` (the rules only this space knows)."""

    @abstractmethod
    def check_pixel_likelihood(self, what: str) -> None:
        """Refuse `what` (a likelihood option) in one line unless likelihoods of samples are those of images."""

    @staticmethod
    def data_is_latent(datamodule: Any) -> bool:
        """Whether a datamodule streams latent shards (ShardDataModule's `latent`: the manifest's latent block)."""
        return getattr(datamodule, "latent", None) is not None


class Pixels(Codec):
    """Pixel space: the process runs on the images; encode, decode and every shape are the identity."""

    @property
    def space(self) -> str:
        return "pixels"

    def encode(self, x: Tensor, generator: Any = None) -> Tensor:
        return x

    def decode(self, x: Tensor) -> Tensor:
        return x

    def sample_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(data_shape)

    def pixel_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape)

    def reference_size(self, datamodule: Any) -> int | None:
        return getattr(datamodule, "image_size", None)

    def network_view(self, datamodule: Any) -> Any:
        return datamodule

    def spec(self) -> None:
        return None

    def save_spec(self, checkpoint: dict) -> None:
        pass  # a pixel-space checkpoint records nothing (as before codecs existed)

    def check_checkpoint(self, checkpoint: dict, ckpt_path: str | None = None) -> None:
        pass  # the module was rebuilt from the checkpoint's own config: pixel space there too

    def check_module(self, net: nn.Module, augment: Any) -> None:
        pass  # any network and augmentation work on pixels (the module checks their own arguments)

    def check_data(self, net: nn.Module, datamodule: Any) -> None:
        if self.data_is_latent(datamodule):
            source = (getattr(datamodule, "autoencoder_spec", None) or {}).get("pretrained") or "a config-built VAE"
            raise UserValueError(f"the data is latent shards (encoded by {source}) but the module has no autoencoder: "
                                 "expected model.autoencoder with the VAE that encoded them (the manifest's "
                                 "'autoencoder')")

    def check_pixel_likelihood(self, what: str) -> None:
        pass

    def __repr__(self) -> str:
        return "Pixels()"
