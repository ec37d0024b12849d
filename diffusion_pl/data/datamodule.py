"""Streaming shards into Lightning: ShardDataModule and its exactly resumable ShardStream.

Why the stream resumes bit-exactly: each DataLoader worker is one *reader*; reader r of R
owns a fixed share of the shards (whole shards when there are at least R, else every R-th
sample of each), and walks it forever in an order drawn from seeds that depend only on
(seed, rank, world_size, worker count, worker role). Samples are shuffled, given their
flip bit and grouped into batches *before* decoding, so batch k of a reader is a pure
function of those numbers. Resuming after c consumed batches skips, per worker, the
batches it had already delivered, without decoding them (see ShardStream._reader).
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import urllib.parse
from glob import glob
from pathlib import Path
from typing import Callable, Iterator

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

try:  # torchvision's libjpeg-turbo decoder: ~3x faster than PIL on 32x32 JPEGs
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # deprecated in torchvision 0.29 (for TorchCodec); PIL below still works
    decode_image = None

from diffusion_pl.data import builtin
from diffusion_pl.data.prepare import MANIFEST, tar_members

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
SHARDS_HELP = ("expected a shard .tar, a directory with manifest.json, a manifest .json, a brace pattern "
               "like dir/shard-{000000..000009}.tar, an http(s):// or pipe: URL, or builtin:shapes[?size=N]")
Batch = tuple[torch.Tensor, torch.Tensor]


def to_signed_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]: the one place where pixel values are scaled."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def _seed(*parts: int) -> int:
    """One well-mixed 64-bit seed from several small integers."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1, np.uint64)[0])


def _is_url(spec: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", spec) is not None  # 2+ letters: not a drive "C:"


def load_manifest(where: str) -> dict:
    """Read and check a manifest.json written by ``diffusion-pl prepare`` (local path or URL)."""
    expected = "expected the manifest.json written by `diffusion-pl prepare`"
    if not _is_url(where) and not Path(where).is_file():
        raise FileNotFoundError(f"manifest {where} does not exist: {expected}")
    try:
        with wds.gopen(where, "rb") as f:
            m = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"manifest {where} is not readable JSON ({err}): {expected}") from None
    shards = m.get("shards") if isinstance(m, dict) else None
    if not shards or not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards) \
            or not isinstance(m.get("classes", []), list):
        raise ValueError(f"manifest {where} is malformed: expected a JSON object with a non-empty 'shards' "
                         "list of {name, count, sha256} and a 'classes' list")
    return m


def resolve_shards(spec: str) -> tuple[list[str], dict | None]:
    """Shard URLs of a ``shards`` string, and the manifest when one is found beside them."""
    spec = spec.strip()
    if not spec:
        raise ValueError(f"shards is empty: {SHARDS_HELP}")
    if not _is_url(spec) and Path(spec).is_dir():
        if not (Path(spec) / MANIFEST).is_file():
            raise FileNotFoundError(f"shards directory {spec} has no {MANIFEST}: {SHARDS_HELP}")
        spec = str(Path(spec) / MANIFEST)
    if spec.endswith(".json"):
        m = load_manifest(spec)
        base = spec.rsplit("/", 1)[0] if "/" in spec else "."
        return [f"{base}/{s['name']}" for s in m["shards"]], m
    urls = []
    for url in wds.shardlists.expand_urls(spec):  # '::'-separated lists and {a..b} braces
        if _is_url(url):
            urls.append(url)
            continue
        matches = sorted(glob(url)) if any(c in url for c in "*?[") else [url]
        if not matches:
            raise FileNotFoundError(f"shards pattern {url!r} matched no files: {SHARDS_HELP}")
        missing = [p for p in matches if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"shard {missing[0]} does not exist (from shards={spec!r}): {SHARDS_HELP}")
        urls.extend(matches)
    local = [u for u in urls if not _is_url(u)]
    folders = {Path(u).parent for u in local}
    beside = folders.pop() / MANIFEST if len(folders) == 1 and len(local) == len(urls) else None
    return urls, load_manifest(str(beside)) if beside and beside.is_file() else None


def tar_samples(url: str) -> Iterator[dict]:
    """Samples {__key__, __url__, <ext>: bytes} of one tar shard: consecutive members grouped by key.

    Replaces webdataset's reader, whose Python tarfile costs ~100 us per member (more than
    decoding a 32x32 JPEG); keys follow webdataset: the path up to the basename's first dot.
    """
    sample = None
    with wds.gopen(url, "rb") as f:
        for name, data in tar_members(f):
            dot = name.find(".", name.rfind("/") + 1)
            if dot < 0:
                continue
            key, ext = name[:dot], name[dot + 1:].lower()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext] = data
    if sample is not None:
        yield sample


def _resize_crop(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 (C, H, W) so it covers ``size``, then centre-crop to it."""
    h, w = size
    scale = max(h / image.shape[1], w / image.shape[2])
    resized = [max(h, round(image.shape[1] * scale)), max(w, round(image.shape[2] * scale))]
    return TF.center_crop(TF.resize(image, resized, antialias=True), [h, w])


class ShardStream(IterableDataset):
    """Batches (images float32 (B, C, H, W) in [-1, 1], labels int64 (B,)) streamed from shards.

    A deterministic function of (seed, rank, world_size, worker) that can be fast-forwarded
    by ``start_batch`` batches (set by ResumableLoader just before each iterator is made).
    """

    def __init__(self, urls: list[str], batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, random_flip: bool = True, image_size: tuple[int, int] | None = None,
                 channels: int = 3, infinite: bool = True):
        super().__init__()
        self.urls, self.batch_size, self.rank, self.world_size, self.seed = urls, batch_size, rank, world_size, seed
        self.shuffle_buffer, self.random_flip, self.image_size = shuffle_buffer, random_flip, image_size
        self.channels, self.infinite = channels, infinite
        self.start_batch = 0
        self.skipped = 0  # undecodable samples met by this copy (each worker process has its own)

    def _reader(self) -> tuple[int, int, int]:
        """(reader index, number of readers, batches to skip) for the calling worker."""
        info = get_worker_info()
        workers, w = (info.num_workers, info.id) if info is not None else (1, 0)
        # The DataLoader takes batch k from worker k % W and always starts at worker 0. After
        # `start` consumed batches the next one came from worker start % W, so worker w now
        # plays role (w + start) % W, which had delivered (start + w) // W batches already.
        role, skip = (w + self.start_batch) % workers, (self.start_batch + w) // workers
        return self.rank * workers + role, self.world_size * workers, skip

    def _raw(self, reader: int, readers: int) -> Iterator[dict]:
        """Undecoded samples of this reader's share; infinite streams reshuffle shard order per pass."""
        if len(self.urls) >= readers:
            mine, stride = self.urls[reader::readers], 1  # whole shards per reader
        else:  # fewer shards than readers: all read every shard, each keeps every readers-th sample
            mine, stride = self.urls, readers
        rng = random.Random(_seed(self.seed, reader, readers, 1))
        while True:
            order = list(mine)
            if self.infinite:
                rng.shuffle(order)
            found = 0
            for url in order:
                try:
                    for i, sample in enumerate(tar_samples(url)):
                        if i % stride == reader % stride:
                            found += 1
                            yield sample
                except Exception as err:  # an unreadable or truncated shard is skipped, not fatal
                    log.warning("skipping the rest of shard %s: %s: %s", url, type(err).__name__,
                                str(err).splitlines()[0][:200] if str(err) else "")
            if not self.infinite:
                return
            if found == 0:  # without this an unreadable share would spin forever
                raise RuntimeError(f"data reader {reader} of {readers} read no samples from {mine[:3]}...: "
                                   f"expected readable shards with at least {stride} samples each")

    def __iter__(self) -> Iterator[Batch]:
        reader, readers, skip = self._reader()
        samples = self._raw(reader, readers)
        if self.infinite and self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, reader, readers, 2))
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        flips = random.Random(_seed(self.seed, reader, readers, 3))
        # The flip bit is drawn per sample before decoding, so a skipped batch advances this
        # RNG exactly as a decoded one would.
        tagged = ((s, self.random_flip and flips.random() < 0.5) for s in samples)
        batches = wds.batched(self.batch_size, collation_fn=None, partial=not self.infinite)(tagged)
        for k, batch in enumerate(batches):
            if k < skip:
                continue  # fast-forward on resume: the bytes are read, never decoded
            out = self._collate(batch)
            if out is not None:
                yield out

    def _decode(self, sample: dict) -> tuple[torch.Tensor, int]:
        """uint8 (C, H, W) image and class index (-1 when the shard has no 'cls')."""
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise ValueError(f"no image field: expected one of {IMAGE_KEYS}")
        if decode_image is not None:
            mode = ImageReadMode.RGB if self.channels == 3 else ImageReadMode.GRAY
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
        else:
            with Image.open(io.BytesIO(data)) as im:
                array = np.array(im.convert("RGB" if self.channels == 3 else "L"))
            image = torch.from_numpy(array).reshape(*array.shape[:2], -1).permute(2, 0, 1)
        if self.image_size is not None and tuple(image.shape[1:]) != self.image_size:
            image = _resize_crop(image, self.image_size)
        return image, int(sample["cls"]) if "cls" in sample else -1

    def _collate(self, batch: list[tuple[dict, bool]]) -> Batch | None:
        """Decode, flip and stack one batch; undecodable samples are dropped, counted and logged."""
        images, labels = [], []
        for sample, flip in batch:
            try:
                image, label = self._decode(sample)
            except Exception as err:  # a corrupt sample must never stop a training run
                self.skipped += 1
                log.warning("skipping undecodable sample %r in %s (%s: %s); %d skipped so far by this reader",
                            sample.get("__key__"), sample.get("__url__"), type(err).__name__,
                            str(err).splitlines()[0][:120] if str(err) else "", self.skipped)
                continue
            images.append(image.flip(-1) if flip else image)
            labels.append(label)
        if not images:  # the whole batch was corrupt: drop it (the only case a batch goes missing)
            return None
        return to_signed_unit(torch.stack(images)), torch.tensor(labels, dtype=torch.int64)


class ResumableLoader(DataLoader):
    """A DataLoader that tells its ShardStream where to start each time an iterator is made."""

    def __init__(self, dataset: ShardStream, start_fn: Callable[[], int], **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)  # the stream yields whole batches
        self.start_fn = start_fn

    def __iter__(self):
        # Workers get a copy of the stream when the iterator is made (so persistent_workers
        # must stay False): this is the moment to tell them where to start.
        self.dataset.start_batch = self.start_fn()
        return super().__iter__()


class ShardDataModule(L.LightningDataModule):
    """Webdataset shards as batches (images float32 (B, C, H, W) in [-1, 1], labels int64 (B,)).

    Training is an infinite stream (run length = max_steps), split over nodes, ranks and
    workers, resumed exactly from a checkpoint; validation is finite, in order, unflipped.
    """

    def __init__(self, shards: str = "builtin:shapes", batch_size: int = 128, num_workers: int = 2,
                 image_size: int | None = None, random_flip: bool = True, seed: int = 0,
                 shuffle_buffer: int = 1000, val_shards: str | None = None, val_batch_size: int | None = None,
                 manifest: str | None = None):
        """``shards``: a shard path, folder with manifest.json, brace pattern, http(s)/pipe: URL or
        builtin:shapes[?size=N&count=N]; ``image_size``: output size (resize + centre crop when the
        data differs); ``manifest``: path/URL of a manifest for remote shards (classes, size)."""
        super().__init__()
        self.shards, self.batch_size, self.num_workers, self.seed = shards, batch_size, num_workers, seed
        self.random_flip, self.shuffle_buffer, self.manifest = random_flip, shuffle_buffer, manifest
        self.val_shards, self.val_batch_size = val_shards, val_batch_size
        self._image_size, self._meta_cache, self._meta_done = image_size, None, False
        self._rank, self._world = 0, 1
        self._urls: dict[str, list[str]] = {}
        self._size: tuple[int, int] | None = None
        self._restored: int | None = None

    # -------------------------------------------------------------- what recipes read
    @property
    def num_classes(self) -> int | None:
        """Number of classes (from the manifest), or None when unknown."""
        classes = (self._meta() or {}).get("classes")
        return len(classes) if classes else None

    @property
    def image_size(self) -> int | None:
        """Side of the (square) output images: the argument, else the manifest's size."""
        if self._image_size is not None:
            return self._image_size
        size = (self._meta() or {}).get("image_size")
        return size[0] if size and size[0] == size[1] else None

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) of the images the loaders yield, after any resize (reads one image when no manifest says)."""
        if self._size is None:
            self.setup()
        return self._size

    @property
    def channels(self) -> int:
        """Image channels: 1 for a grey-scale manifest, else 3."""
        return int((self._meta() or {}).get("channels") or 3)

    def _builtin(self) -> dict:
        name, _, query = self.shards[len("builtin:"):].partition("?")
        args = dict(urllib.parse.parse_qsl(query))
        if name != "shapes" or set(args) - {"size", "count", "seed"} or not all(v.isdigit() for v in args.values()):
            raise ValueError(f"built-in dataset {self.shards!r} is unknown: "
                             "expected builtin:shapes[?size=N&count=N&seed=N]")
        return {"size": int(args.get("size", self._image_size or 32)), "count": int(args.get("count", 10_000)),
                "seed": int(args.get("seed", 0))}

    def _meta(self) -> dict | None:
        if not self._meta_done:  # lazy: no I/O in __init__, yet readable right after it
            if self.manifest:
                self._meta_cache = load_manifest(self.manifest)
            elif self.shards.startswith("builtin:"):
                self._meta_cache = builtin.shapes_meta(self._builtin()["size"])
            else:
                self._meta_cache = resolve_shards(self.shards)[1]
            self._meta_done = True
        return self._meta_cache

    # -------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Generate the built-in dataset once per node (Lightning runs this on local rank 0)."""
        if self.shards.startswith("builtin:"):
            builtin.ensure_shapes(**self._builtin())

    def _resolve(self, spec: str) -> list[str]:
        if spec.startswith("builtin:"):
            return resolve_shards(str(builtin.ensure_shapes(**self._builtin())))[0]
        return resolve_shards(spec)[0]

    def setup(self, stage: str | None = None) -> None:
        """Resolve shard lists and take rank and world size from the trainer, explicitly."""
        if self.trainer is not None:
            # Passed explicitly: webdataset's node splitter raises with several ranks, and
            # split_by_node under spawned workers was seen to give every rank all the data.
            self._rank, self._world = self.trainer.global_rank, self.trainer.world_size
        self._urls["train"] = self._resolve(self.shards)
        if self.val_shards:
            self._urls["val"] = self._resolve(self.val_shards)
        size = (self._meta() or {}).get("image_size")
        self._size = (self._image_size,) * 2 if self._image_size else tuple(size) if size else self._peek_size()

    def _peek_size(self) -> tuple[int, int]:
        """Size of the first image, for shards without a manifest (all images must share it)."""
        stream = ShardStream(self._urls["train"][:1], 1, shuffle_buffer=0, random_flip=False, infinite=False)
        images, _ = next(iter(stream))
        return tuple(images.shape[2:])

    def _stream(self, split: str, **kwargs) -> ShardStream:
        if split not in self._urls:
            self.setup("fit")
        return ShardStream(self._urls[split], rank=self._rank, world_size=self._world, seed=self.seed,
                           image_size=self._size, channels=self.channels, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Infinite, shuffled, flipped, exactly resumable batches."""
        stream = self._stream("train", batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer,
                              random_flip=self.random_flip, infinite=True)
        return ResumableLoader(stream, self._start_batch, num_workers=self.num_workers,
                               pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader | list:
        """Finite, deterministic, unflipped batches of val_shards (none when it is not set)."""
        if not self.val_shards:
            return []
        stream = self._stream("val", batch_size=self.val_batch_size or self.batch_size, shuffle_buffer=0,
                              random_flip=False, infinite=False)
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
                "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer, "shards": self.shards}

    def load_state_dict(self, state: dict) -> None:
        """Restored by Lightning from a checkpoint: the next training iterator skips the consumed batches."""
        changed = [k for k, v in self._stream_settings().items() if k in state and state[k] != v]
        if changed:
            log.warning("data stream settings %s differ from the checkpoint's: the resumed stream is not the "
                        "continuation of the saved one (it still skips %d batches)", changed, state["batches_consumed"])
        self._restored = int(state["batches_consumed"])
