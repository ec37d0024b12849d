"""ShardDataModule: webdataset shards as Lightning batches, infinite and exactly resumable for training.

The pieces it puts together: ``shards`` (where the shards are, reading them), ``order`` (the
sampling order, and the design of the stream), ``stream`` (ShardStream, ResumableLoader). Their
names stay importable from here.

Latent shards (``prepare --encode``, diffusion_pl.data.latents) stream through the same order, split,
resume and corrupt-sample handling; a batch is then (float32 (B, 2 C, h, w) = [mean, std] of the raw
posterior concatenated on dim 1, labels int64 (B,)). ``channels`` and ``output_size`` then describe the
latents the network sees (C and (h, w)); ``latent`` and ``autoencoder_spec`` are the manifest's blocks,
``pixel_size`` the encoded images' (H, W).
"""

from __future__ import annotations

import logging
import urllib.parse
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader

from diffusion_pl.data import builtin
from diffusion_pl.data.latents import latent_meta
from diffusion_pl.data.order import ORDER_VERSION
from diffusion_pl.data.shards import (SHARDS_HELP, _names, _reason, load_manifest, resolve_shards, shard_counts,
                                      tar_samples)
from diffusion_pl.data.stream import IMAGE_KEYS, MAX_BAD_SAMPLES, ResumableLoader, ShardStream, _check_int
from diffusion_pl.utils.errors import DataError, UserValueError

# Without val_shards, val_dataloader returns no loaders ([]) on purpose; Lightning warns that the list is empty
warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")

__all__ = ["ShardDataModule"]

log = logging.getLogger(__name__)


class ShardDataModule(L.LightningDataModule):
    """Webdataset shards as batches (images float32 (B, C, H, W) in [-1, 1], labels int64 (B,)).

    Training is an infinite stream (run length = max_steps), split over nodes, ranks and
    workers, every sample drawn equally often, resumed exactly from a checkpoint at a cost
    independent of the step; validation is finite, in stored order, unflipped, each sample once.
    Latent shards give (float32 (B, 2 C, h, w) raw posterior [mean, std], labels) the same way; a
    flipped slot reads the flipped image's encoding. With ``latent_images`` their training batches carry a third
    element, the images kept beside the latents (``prepare --encode --keep_images``), for REPA's encoder.
    """

    def __init__(self, shards: str = "builtin:shapes", batch_size: int = 128, num_workers: int = 2,
                 image_size: int | None = None, random_flip: bool = True, seed: int = 0,
                 shuffle_buffer: int = 1000, val_shards: str | None = None, val_batch_size: int | None = None,
                 manifest: str | None = None, max_bad_samples: int = MAX_BAD_SAMPLES, latent_images: bool = False):
        """``shards``: a shard path, folder with manifest.json, brace pattern, http(s)/pipe: URL or
        builtin:shapes[?size=N&count=N]; ``image_size``: output size (resize + centre crop when the
        data differs; required for a manifest of mixed sizes; refused for latent shards); ``random_flip``: latent
        shards need flipped encodings for it; ``shuffle_buffer``: samples shuffled
        together (blocks of consecutive samples of a reader's range); ``manifest``: path/URL of a
        manifest for remote shards (classes, size, per-shard counts); ``max_bad_samples``:
        consecutive undecodable samples after which a reader stops with a DataError; ``latent_images``: latent
        shards written with ``--keep_images`` also give their images in training batches (REPA: no VAE decode)."""
        super().__init__()
        if not isinstance(shards, str):
            raise UserValueError(f"data shards={shards!r} is invalid: {SHARDS_HELP}")
        _check_int("batch_size", batch_size, 1)
        _check_int("val_batch_size", val_batch_size, 1, optional=True)
        _check_int("num_workers", num_workers, 0)
        _check_int("image_size", image_size, 1, optional=True)
        _check_int("shuffle_buffer", shuffle_buffer, 0)
        _check_int("seed", seed, -(2**63))
        _check_int("max_bad_samples", max_bad_samples, 1)
        if not isinstance(random_flip, bool):
            raise UserValueError(f"data random_flip={random_flip!r} is invalid: expected true or false")
        if not isinstance(latent_images, bool):
            raise UserValueError(f"data latent_images={latent_images!r} is invalid: expected true or false")
        self.latent_images = latent_images
        self.shards, self.batch_size, self.num_workers, self.seed = shards, batch_size, num_workers, seed
        self.random_flip, self.shuffle_buffer, self.manifest = random_flip, shuffle_buffer, manifest
        self.val_shards, self.val_batch_size, self.max_bad_samples = val_shards, val_batch_size, max_bad_samples
        self._image_size, self._manifest_cache, self._manifest_loaded = image_size, None, False
        self._rank, self._world = 0, 1
        self._urls: dict[str, list[str]] = {}
        self._manifests: dict[str, dict | None] = {}
        self._counts: dict[str, list[int]] = {}
        self._size: tuple[int, int] | None = None
        self._restored: int | None = None

    # -------------------------------------------------------------- what recipes read
    @property
    def num_classes(self) -> int | None:
        """Number of classes (from the manifest), or None when unknown."""
        classes = (self._train_manifest() or {}).get("classes")
        return len(classes) if classes else None

    @property
    def image_size(self) -> int | None:
        """Side of the (square) output images: the argument, else the manifest's size (latent shards: the latents')."""
        if self._image_size is not None:
            return self._image_size
        latent = self.latent
        size = latent["shape"][1:] if latent else (self._train_manifest() or {}).get("image_size")
        return size[0] if size and size[0] == size[1] else None

    @property
    def latent(self) -> dict | None:
        """The manifest's latent block ({shape: [C, h, w], dtype, flip, ...}) for latent shards, else None."""
        return latent_meta(self._train_manifest())

    @property
    def latent_shape(self) -> tuple[int, int, int] | None:
        """(C, h, w) of the latents of latent shards (batches hold (2 C, h, w): mean and std), else None."""
        latent = self.latent
        return tuple(latent["shape"]) if latent else None

    @property
    def autoencoder_spec(self) -> dict | None:
        """The spec of the autoencoder that encoded latent shards (the manifest's 'autoencoder'), else None."""
        return (self._train_manifest() or {}).get("autoencoder") if self.latent else None

    @property
    def pixel_size(self) -> tuple[int, int] | None:
        """(H, W) of the stored images, or of the encoded ones for latent shards (manifest image_size); else None."""
        size = (self._train_manifest() or {}).get("image_size")
        return tuple(size) if size else None

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) of the images the loaders yield, after any resize (reads one image when no manifest says)."""
        if self._size is None:
            self.setup()
        return self._size

    @property
    def channels(self) -> int:
        """Image channels: 1 for a grey-scale manifest, else 3; latent shards: latent channels C (batches hold 2 C)."""
        latent = self.latent
        return int(latent["shape"][0]) if latent else int((self._train_manifest() or {}).get("channels") or 3)

    def _builtin_args(self) -> dict:
        name, _, query = self.shards[len("builtin:"):].partition("?")
        args = dict(urllib.parse.parse_qsl(query))
        expected = "expected builtin:shapes[?size=N&count=N&seed=N] with size >= 8, count >= 1"
        if name != "shapes" or set(args) - {"size", "count", "seed"} or not all(v.isdigit() for v in args.values()):
            raise UserValueError(f"built-in dataset {self.shards!r} is unknown: {expected}")
        out = {"size": int(args.get("size", self._image_size or 32)), "count": int(args.get("count", 10_000)),
               "seed": int(args.get("seed", 0))}
        if out["size"] < 8 or out["count"] < 1:
            raise UserValueError(f"built-in dataset {self.shards!r} is invalid: {expected}")
        return out

    def _train_manifest(self) -> dict | None:
        """The training data's manifest (classes, image_size, channels), or the built-in dataset's; None if absent."""
        if not self._manifest_loaded:  # lazy: no I/O in __init__, yet readable right after it
            if self.manifest:
                self._manifest_cache = load_manifest(self.manifest)
            elif self.shards.startswith("builtin:"):
                self._manifest_cache = builtin.shapes_meta(self._builtin_args()["size"])
            else:
                self._manifest_cache = resolve_shards(self.shards)[1]
            self._manifest_loaded = True
        return self._manifest_cache

    # -------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Generate the built-in dataset once per node (Lightning runs this on local rank 0)."""
        if self.shards.startswith("builtin:"):
            builtin.ensure_shapes(**self._builtin_args())

    def _resolve(self, spec: str) -> tuple[list[str], dict | None]:
        if spec.startswith("builtin:"):
            return resolve_shards(str(builtin.ensure_shapes(**self._builtin_args())))
        return resolve_shards(spec)

    def setup(self, stage: str | None = None) -> None:
        """Resolve shard lists and take rank and world size from the trainer, explicitly."""
        if self.trainer is not None:
            # Passed explicitly: webdataset's node splitter raises with several ranks, and
            # split_by_node under spawned workers was seen to give every rank all the data.
            self._rank, self._world = self.trainer.global_rank, self.trainer.world_size
        self._urls["train"], self._manifests["train"] = self._resolve(self.shards)
        if self.val_shards:
            self._urls["val"], self._manifests["val"] = self._resolve(self.val_shards)
        meta = self._train_manifest() or {}
        if self.latent:
            self._size = self._check_latents()
        elif self.latent_images:
            raise UserValueError(f"data latent_images=true but {self.shards} holds images, not latents: expected "
                                 "latent shards (`prepare --encode VAE --keep_images`), or latent_images: false")
        elif self._image_size:
            self._size = (self._image_size,) * 2
        elif meta.get("mixed_sizes") or ("image_size" in meta and not meta["image_size"]):
            # resizing everything to whatever image comes first would silently pick the training size
            raise UserValueError(f"shards {self.shards} holds images of mixed sizes (its manifest says so): set data "
                                 "image_size to the side to train at")
        else:
            self._size = tuple(meta["image_size"]) if meta.get("image_size") else self._peek_size()

    def _check_latents(self) -> tuple[int, int]:
        """(h, w) of latent shards, after one-line refusals of the options that cannot apply to them."""
        latent = self.latent
        if self._image_size is not None:
            raise UserValueError(f"data image_size={self._image_size} is given for the latent shards {self.shards}: "
                                 "expected null (latents are not resized; prepare --encode at the size to train at)")
        if self.random_flip and not latent.get("flip"):
            raise UserValueError(f"data random_flip=true but the latent shards {self.shards} hold no flipped "
                                 "encodings (prepared with --no_flips): expected random_flip: false, or shards "
                                 "prepared without --no_flips (a flipped latent is not the latent of a flipped image)")
        if self.latent_images and not latent.get("images"):
            raise UserValueError(f"data latent_images=true but the latent shards {self.shards} keep no images: "
                                 "expected shards prepared with `--encode VAE --keep_images`, or latent_images: false")
        if self.val_shards:
            val = latent_meta(self._manifests.get("val"))
            if val is None or val["shape"] != latent["shape"]:
                found = f"latents of shape {val['shape']}" if val else "no latent manifest"
                raise UserValueError(f"data val_shards {self.val_shards} has {found} but the training shards hold "
                                     f"latents of shape {latent['shape']}: expected latent shards of the same shape")
        return tuple(latent["shape"][1:])

    def _peek_size(self) -> tuple[int, int]:
        """Size of the first decodable image, for shards without a manifest (all images must share it)."""
        decoder = ShardStream(self._urls["train"], 1, channels=self.channels, counts=[])
        tried, last = 0, "no sample could be read"
        for url in self._urls["train"]:
            samples = tar_samples(url)
            try:
                for sample in samples:
                    try:
                        return tuple(decoder._decode(sample)[0].shape[1:])
                    except Exception as err:  # noqa: BLE001 - try the next one, up to max_bad_samples
                        tried, last = tried + 1, f"{sample['__key__']!r} in {url}: {_reason(err)}"
                    if tried >= self.max_bad_samples:
                        break
            except Exception as err:  # noqa: BLE001 - an unreadable shard: try the next one
                last = f"{url}: {_reason(err)}"
            finally:
                samples.close()
            if tried >= self.max_bad_samples:
                break
        raise DataError(f"shards {_names(self._urls['train'])} have no manifest and no decodable image ({tried} "
                        f"tried; last: {last}): expected JPEG/PNG images ({'/'.join(IMAGE_KEYS)} members), as "
                        "written by `diffusion-pl prepare`")

    def _sample_counts(self, split: str) -> list[int]:
        """Samples per shard of a split: its manifest (the `manifest` option for training), else counted."""
        if split not in self._counts:
            # the `manifest` option describes the training shards only: val shards may share their file names
            manifest = self._manifests.get(split) or (self._train_manifest() if split == "train" else None)
            self._counts[split] = shard_counts(self._urls[split], manifest)
        return self._counts[split]

    def _stream(self, split: str, **kwargs) -> ShardStream:
        if split not in self._urls:
            self.setup("fit")
        latent = self.latent
        return ShardStream(self._urls[split], rank=self._rank, world_size=self._world, seed=self.seed,
                           image_size=None if latent else self._size, channels=self.channels,
                           counts=self._sample_counts(split), max_bad_samples=self.max_bad_samples,
                           latent_shape=latent["shape"] if latent else None, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Infinite, shuffled, flipped, exactly resumable batches."""
        stream = self._stream("train", batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer,
                              random_flip=self.random_flip, infinite=True, latent_images=self.latent_images)
        stream.order(self._world * max(1, self.num_workers))  # too little data: say so before training
        return ResumableLoader(stream, self._start_batch, num_workers=self.num_workers,
                               pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader | list:
        """Finite, deterministic, unflipped batches of val_shards (none when it is not set)."""
        if not self.val_shards:
            return []
        stream = self._stream("val", batch_size=self.val_batch_size or self.batch_size, shuffle_buffer=0,
                              random_flip=False, infinite=False)
        stream.order(self._world * max(1, self.num_workers))
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    # -------------------------------------------------------------- exact resume
    def _consumed(self) -> int:
        """Training batches the trainer has taken: the fit loop's total 'processed' batch count."""
        if self.trainer is None:
            return self._restored or 0
        # 'processed' is incremented right after training_step, before on_train_batch_end,
        # so it is right whether the checkpoint is written there, at validation end or after fit.
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def _start_batch(self) -> int:
        if self._restored is not None:  # first iterator after a resume
            start, self._restored = self._restored, None
            return start
        return self._consumed()

    def state_dict(self) -> dict:
        """Saved into checkpoints by Lightning: where the training stream stands, and its settings."""
        return {"batches_consumed": self._consumed(), **self._stream_settings()}

    def _stream_settings(self) -> dict:
        return {"seed": self.seed, "world_size": self._world, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer, "shards": self.shards,
                "stream_order": ORDER_VERSION}

    def load_state_dict(self, state: dict) -> None:
        """Restored by Lightning from a checkpoint: the next training iterator starts after the consumed batches."""
        changed = [k for k, v in self._stream_settings().items()
                   if (k in state and state[k] != v) or (k == "stream_order" and state.get(k) != v)]
        if changed:
            log.warning("data stream settings %s differ from the checkpoint's: the resumed stream is not the "
                        "continuation of the saved one (it still starts after %d batches)", changed,
                        state["batches_consumed"])
        self._restored = int(state["batches_consumed"])
