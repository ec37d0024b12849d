"""ShardStream: batches read from shards in the SampleOrder, and ResumableLoader, which tells it where to start.

The order and why resuming costs the same at any step: diffusion_pl.data.order.

Latent shards (diffusion_pl.data.latents) stream the same way: with ``latent_shape`` set, a sample's
``latent.npy`` (or, in a flipped slot, ``latent_flip.npy``, the encoding of the flipped image: a
latent tensor is never flipped) becomes float32 (2 C, h, w), the raw posterior mean then std; with
``latent_images`` the image kept beside it (``prepare --encode --keep_images``) comes too, flipped with it.

A reader stops with a one-line DataError after ``max_bad_samples`` consecutive slots without a
decodable image (fewer for small data sets, see ShardStream), or when a finite read decoded
nothing, so all-undecodable data never spins; per-sample warnings are rate-limited.
"""

from __future__ import annotations

import io
import logging
from itertools import islice, repeat
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

try:  # torchvision's libjpeg-turbo decoder: ~3x faster than PIL on 32x32 JPEGs
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # deprecated in torchvision 0.29 (for TorchCodec); PIL below still works
    decode_image = None

from diffusion_pl.data.pixels import to_signed_unit
from diffusion_pl.data.latents import FLIP_MEMBER, LATENT_MEMBER, decode_latent
from diffusion_pl.data.order import SampleOrder
from diffusion_pl.data.shards import _names, _reason, shard_counts, tar_samples
from diffusion_pl.utils.errors import DataError, UserValueError

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
MAX_BAD_SAMPLES = 1000  # consecutive slots without a decodable image before a reader gives up
WARN_FIRST, WARN_EVERY = 10, 1000  # per-sample warnings: the first ones, then every WARN_EVERY-th
Batch = tuple[torch.Tensor, ...]  # (data, labels) or, with latent_images, (latents, labels, images)


def _check_int(name: str, value, minimum: int, *, optional: bool = False) -> None:
    """One-line UserValueError unless value is an integer >= minimum (or None when optional)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        none = " or null" if optional else ""
        raise UserValueError(f"data {name}={value!r} is invalid: expected an integer >= {minimum}{none}")



def _resize_crop(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 (C, H, W) so it covers ``size``, then centre-crop to it."""
    h, w = size
    scale = max(h / image.shape[1], w / image.shape[2])
    resized = [max(h, round(image.shape[1] * scale)), max(w, round(image.shape[2] * scale))]
    return TF.center_crop(TF.resize(image, resized, antialias=True), [h, w])


def _loud(n: int) -> bool:
    """Whether the n-th warning of a kind is logged: the first few, then every WARN_EVERY-th."""
    return n <= WARN_FIRST or n % WARN_EVERY == 0


class ShardStream(IterableDataset):
    """Batches (images float32 (B, C, H, W) in [-1, 1], labels int64 (B,)) streamed from shards.

    With ``latent_shape`` (C, h, w) the shards are latent shards and a batch is (float32 (B, 2 C, h, w):
    the raw posterior mean and std concatenated on dim 1, labels int64 (B,)); a flipped slot reads the
    flipped image's encoding; ``image_size`` must then be None. ``latent_images``: a third element, the images
    stored beside the latents (float32 (B, C, H, W) in [-1, 1], flipped where the slot is), for losses that need
    the pixels (REPA) without a VAE decode.

    A deterministic function of (seed, shard counts, rank, world_size, worker) that starts at
    batch ``start_batch`` (set by ResumableLoader just before each iterator is made) at a cost
    that does not depend on it. ``counts``: samples per shard (counted from the tars when None).
    ``max_bad_samples``: a reader raises DataError after this many consecutive slots without a
    decodable image (at most twice the data set's size, so a small all-bad set stops sooner;
    any 2N consecutive slots of a lone reader hold a whole pass).
    """

    def __init__(self, urls: list[str], batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, random_flip: bool = True, image_size: tuple[int, int] | None = None,
                 channels: int = 3, infinite: bool = True, counts: Sequence[int] | None = None,
                 max_bad_samples: int = MAX_BAD_SAMPLES, latent_shape: Sequence[int] | None = None,
                 latent_images: bool = False):
        super().__init__()
        if latent_images and latent_shape is None:
            raise UserValueError("data latent_images=true is given for image shards: expected latent shards "
                                 "(`prepare --encode VAE --keep_images`); image shards are the images already")
        if latent_shape is not None and image_size is not None:
            raise UserValueError(f"data image_size={image_size} is given for latent shards: expected none (latents "
                                 "are not resized; encode the images at the size to train at)")
        _check_int("batch_size", batch_size, 1)
        _check_int("shuffle_buffer", shuffle_buffer, 0)
        _check_int("max_bad_samples", max_bad_samples, 1)
        _check_int("world_size", world_size, 1)
        if not 0 <= rank < world_size:
            raise UserValueError(f"data rank={rank} is invalid: expected 0 <= rank < world_size={world_size}")
        self.urls, self.batch_size, self.rank, self.world_size, self.seed = urls, batch_size, rank, world_size, seed
        self.shuffle_buffer, self.random_flip, self.image_size = shuffle_buffer, random_flip, image_size
        self.channels, self.infinite, self.max_bad_samples = channels, infinite, max_bad_samples
        self.counts = list(counts) if counts is not None else None
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.latent_images = latent_images
        self.start_batch = 0
        self.skipped = 0  # empty slots (undecodable or unreadable samples) met by this copy (one per worker)
        self.decoded = 0  # images decoded by this copy
        self.io = {"read": 0, "passed": 0}  # tar members whose data was read / passed over, by this copy
        self._bad_run = 0  # consecutive empty slots
        self._shard_warnings = 0

    # ---------------------------------------------------------------- order
    def sample_counts(self) -> list[int]:
        """Samples per shard (counted once from the tar headers when not given)."""
        if self.counts is None:
            self.counts = shard_counts(self.urls)
        return self.counts

    def order(self, readers: int) -> SampleOrder:
        """The sample order for `readers` readers; one-line errors when it cannot exist."""
        counts = self.sample_counts()
        if len(counts) != len(self.urls):
            raise UserValueError(f"{len(counts)} shard counts for {len(self.urls)} shards: expected one per shard")
        total = sum(counts)
        if total == 0:
            raise DataError(f"shards {_names(self.urls)} hold no samples: expected tar shards of {self._members()} "
                            "(+ <key>.cls) members, as written by `diffusion-pl prepare`")
        if self.infinite and total < readers:
            raise UserValueError(f"the training data holds {total} samples, fewer than its {readers} readers "
                                 "(ranks x num_workers): expected at least one sample per reader; lower num_workers")
        return SampleOrder(counts, readers, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                           infinite=self.infinite, random_flip=self.random_flip)

    def _reader(self) -> tuple[int, int, int]:
        """(reader index, number of readers, batches to skip) for the calling worker."""
        info = get_worker_info()
        workers, w = (info.num_workers, info.id) if info is not None else (1, 0)
        # The DataLoader takes batch k from worker k % W and always starts at worker 0. After
        # `start` consumed batches the next one came from worker start % W, so worker w now
        # plays role (w + start) % W, which had delivered (start + w) // W batches already.
        role, skip = (w + self.start_batch) % workers, (self.start_batch + w) // workers
        return self.rank * workers + role, self.world_size * workers, skip

    # ---------------------------------------------------------------- reading
    def _read_spans(self, spans: list[tuple[int, int, int]]) -> Iterator[dict | None]:
        """One undecoded sample (None where it cannot be read) per position of the spans."""
        for shard, first, n in spans:
            url, got, problem = self.urls[shard], 0, None
            samples = tar_samples(url, start=first, stats=self.io)
            try:
                for sample in samples:
                    yield sample
                    got += 1
                    if got == n:
                        break
            except Exception as err:  # noqa: BLE001 - an unreadable or truncated shard leaves slots empty
                problem = _reason(err, 200)
            finally:
                samples.close()
            if got < n:
                self._shard_warnings += 1
                if _loud(self._shard_warnings):
                    log.warning("shard %s: %d of the %d samples from index %d could not be read (%s); their slots "
                                "stay empty", url, n - got, n, first,
                                problem or f"the shard ends early: expected {first + n} samples, as counted")
                yield from repeat(None, n - got)

    def _pass_slots(self, order: SampleOrder, e: int, r: int, start: int) -> Iterator[tuple[dict | None, bool]]:
        """(sample, flip) of reader r's slots start, start + 1, ... of pass e."""
        lo, hi = order.reader_range(r)
        size, first_block = order.block, start // order.block
        items = self._read_spans(order.spans(e, lo + first_block * size, hi))
        try:
            for b in range(first_block, -(-(hi - lo) // size)):
                n = min(size, hi - lo - b * size)
                block = list(islice(items, n))  # a whole block is read before any of it is emitted
                perm, flips = order.block_plan(e, r, b, n)
                for p in perm[start - b * size if b == first_block else 0:]:
                    yield block[p], flips[p]
        finally:
            items.close()

    def _slots(self, order: SampleOrder, r: int, k: int) -> Iterator[tuple[dict | None, bool]]:
        """Reader r's slots from slot k on: forever (pass after pass), or its one finite range."""
        e, j = order.locate(r, k)
        if not order.infinite:
            if j < order.length(r):
                yield from self._pass_slots(order, 0, r, j)
            return
        while True:
            yield from self._pass_slots(order, e, r, j)
            e, j = e + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        reader, readers, skip = self._reader()
        order = self.order(readers)
        # Twice the data set: any 2N consecutive slots of a lone reader contain one of its whole passes.
        bound = min(self.max_bad_samples, 2 * order.total)
        self._bad_run, seen, decoded = 0, 0, 0
        slots = self._slots(order, reader, skip * self.batch_size)
        while batch := list(islice(slots, self.batch_size)):
            seen += len(batch)
            out = self._collate(batch, reader, readers, bound)
            if out is not None:
                decoded += out[0].shape[0]
                yield out
        if seen and not decoded:  # a finite range (validation, a size probe) with nothing decodable
            raise DataError(f"data reader {reader} of {readers} decoded none of its {seen} samples of shards "
                            f"{_names(self.urls)}: expected {self._expected()}; see the warnings above for why")

    def _members(self) -> str:
        return f"<key>.{LATENT_MEMBER}" if self.latent_shape is not None else "<key>.jpg/.png"

    def _expected(self) -> str:
        if self.latent_shape is not None:
            images = f" and the images kept beside them ({'/'.join(IMAGE_KEYS)})" if self.latent_images else ""
            return f"latents ({LATENT_MEMBER} members of shape {(2, *self.latent_shape)}, as the manifest says){images}"
        return f"JPEG/PNG images ({'/'.join(IMAGE_KEYS)} members)"

    def _decode(self, sample: dict, flip: bool = False) -> tuple[torch.Tensor, ...]:
        """(uint8 (C, H, W) image or float32 (2 C, h, w) latent, flipped if asked, class index (-1 when no 'cls')),
        with latent_images the latent's kept image (uint8, flipped with it) last."""
        label = int(sample["cls"]) if "cls" in sample else -1
        if self.latent_shape is not None:
            member = FLIP_MEMBER if flip else LATENT_MEMBER
            if member not in sample:
                raise ValueError(f"no {member} member: expected the latent shards `prepare --encode` writes")
            latent = decode_latent(sample[member], self.latent_shape)
            if not self.latent_images:
                return latent, label
            image = self._image(sample, "no image beside the latent: expected shards of `prepare --encode "
                                        "--keep_images`", channels=3)  # RGB, as REPA's encoder takes it
            return latent, label, image.flip(-1) if flip else image
        image = self._image(sample, f"no image field: expected one of {IMAGE_KEYS}", self.channels)
        return image.flip(-1) if flip else image, label

    def _image(self, sample: dict, missing: str, channels: int) -> torch.Tensor:
        """The sample's image member as uint8 (channels, H, W), resized and cropped to image_size when it is set."""
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise ValueError(missing)
        if decode_image is not None:
            mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
        else:
            with Image.open(io.BytesIO(data)) as im:
                array = np.array(im.convert("RGB" if channels == 3 else "L"))
            image = torch.from_numpy(array).reshape(*array.shape[:2], -1).permute(2, 0, 1)
        if self.image_size is not None and tuple(image.shape[1:]) != self.image_size:
            image = _resize_crop(image, self.image_size)
        return image

    def _collate(self, batch: list[tuple[dict | None, bool]], reader: int = 0, readers: int = 1,
                 bound: int = MAX_BAD_SAMPLES) -> Batch | None:
        """Decode, flip and stack one batch; empty slots are dropped and counted, undecodable ones logged."""
        images, labels, kept = [], [], []
        for sample, flip in batch:
            try:
                if sample is None:  # unreadable: already reported by _read_spans
                    raise EOFError("the sample could not be read from its shard")
                image, label, *extra = self._decode(sample, flip)
            except Exception as err:  # noqa: BLE001 - a corrupt sample must not stop a run...
                self.skipped += 1
                self._bad_run += 1
                where = f"sample {sample.get('__key__')!r} in {sample.get('__url__')}" if sample else "a sample"
                if sample is not None and _loud(self.skipped):
                    more = f"; further ones are logged every {WARN_EVERY}th" if self.skipped == WARN_FIRST else ""
                    log.warning("skipping undecodable %s (%s); %d skipped so far by this reader%s",
                                where, _reason(err), self.skipped, more)
                if self._bad_run >= bound:  # ...but data with nothing decodable must not spin forever
                    raise DataError(
                        f"data reader {reader} of {readers} found no decodable image in {self._bad_run} samples in a "
                        f"row of shards {_names(self.urls)} (last: {where}: {_reason(err)}): expected "
                        f"{self._expected()}; raise data max_bad_samples to tolerate more"
                    ) from None
                continue
            self._bad_run = 0
            self.decoded += 1
            images.append(image)
            labels.append(label)
            kept.extend(extra)
        if not images:  # the whole batch was empty: drop it (the only case a batch goes missing)
            return None
        x, y = torch.stack(images), torch.tensor(labels, dtype=torch.int64)
        if self.latent_shape is None:
            return to_signed_unit(x), y
        return (x, y, to_signed_unit(torch.stack(kept))) if self.latent_images else (x, y)


class ResumableLoader(DataLoader):
    """A DataLoader that tells its ShardStream where to start each time an iterator is made."""

    def __init__(self, dataset: ShardStream, start_fn: Callable[[], int], **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)  # the stream yields whole batches
        self.start_fn = start_fn

    def __iter__(self):
        # Workers get a copy of the stream when the iterator is made (so persistent_workers
        # must stay False): this is the moment to tell them where to start. The order is
        # checked here, in the main process, so its errors are not wrapped in worker tracebacks,
        # and shard counts are computed once here rather than in every worker.
        self.dataset.order(self.dataset.world_size * max(1, self.num_workers))
        self.dataset.start_batch = self.start_fn()
        return super().__iter__()
