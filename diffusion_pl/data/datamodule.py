"""Streaming shards into Lightning: ShardDataModule and its exactly resumable ShardStream.

Sampling. The training stream is a sequence of passes over all N stored samples. Pass e puts
the shards in a seeded permutation (seed, e), concatenates them and rotates the result by a
seeded offset o_e uniform in [0, N). Each of the R readers (rank x DataLoader worker) owns a
contiguous range of M = N // R positions of that pass; the N mod R positions past R * M are
not read in that pass, and because of the uniform rotation every sample is left out with the
same probability. So every sample is drawn equally often in expectation, whatever the shard,
rank and worker counts (exactly once per pass when R divides N), no two readers read the same
sample within a pass, and fewer shards than readers simply give ranges inside shards. (Readers
that owned whole shards instead cycled faster when they owned fewer of them.) Inside its range
a reader cuts its positions into blocks of ``shuffle_buffer`` consecutive ones (256 when not
shuffling) and emits each block in a seeded permutation of (seed, e, reader, block), from which
the flip bit of each position is drawn too. A sample thus mixes with the others of its block
and, pass to pass, lands in other blocks, ranges and readers.

Why it resumes exactly and cheaply: reader r's k-th sample (its "slot" k) is a pure function of
(seed, shard sample counts, R, r, shuffle_buffer, k): pass k // M, then the block and the place
in it, then the shard and the index in that shard. Resuming after c consumed batches gives each
worker its first slot (see ShardStream._reader), opens that block's shard at that index by
reading tar headers only (seeking past member data on local files; streams read and drop it)
and reads the blocks its first batch draws from: at most one shard of headers plus a block or
two of samples, whatever c is. Batches are groups of batch_size consecutive slots and may span
passes; a sample that cannot be read or decoded leaves its slot empty (a smaller batch), so it
never shifts the slots after it. A batch that comes out entirely empty is dropped: the one case
in which a resumed run no longer lines up with a straight one (the trainer counted one batch
fewer than the stream used).

Per-shard sample counts come from the manifest (``shards[i].count``); without one, each shard
is counted once by walking its tar headers. Validation (``infinite=False``) reads the stored
order, unrotated and unflipped, split into R contiguous ranges whose sizes differ by at most
one: every stored sample exactly once across all ranks and workers, none dropped.

A reader stops with a one-line DataError after ``max_bad_samples`` consecutive slots without a
decodable image (fewer for small data sets, see ShardStream), or when a finite read decoded
nothing, so all-undecodable data never spins; per-sample warnings are rate-limited.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import urllib.parse
from glob import glob
from itertools import islice, repeat
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

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
from diffusion_pl.data.prepare import MANIFEST
from diffusion_pl.data.tario import can_seek, read_member, skip_member, tar_entries
from diffusion_pl.errors import DataError, MissingFileError, UserValueError

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
SHARDS_HELP = ("expected a shard .tar, a directory with manifest.json, a manifest .json, a brace pattern "
               "like dir/shard-{000000..000009}.tar, an http(s):// or pipe: URL, or builtin:shapes[?size=N]")
MAX_BAD_SAMPLES = 1000  # consecutive slots without a decodable image before a reader gives up
READ_BLOCK = 256  # slots read at a time when nothing is shuffled (a block is read before it is emitted)
WARN_FIRST, WARN_EVERY = 10, 1000  # per-sample warnings: the first ones, then every WARN_EVERY-th
ORDER_VERSION = 2  # saved in checkpoints: a resumed stream continues the saved one only if this matches
Batch = tuple[torch.Tensor, torch.Tensor]


def to_signed_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]: the one place where pixel values are scaled."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def _seed(*parts: int) -> int:
    """One well-mixed 64-bit seed from several small integers."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1, np.uint64)[0])


def _is_url(spec: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", spec) is not None  # 2+ letters: not a drive "C:"


def _check_int(name: str, value, minimum: int, *, optional: bool = False) -> None:
    """One-line UserValueError unless value is an integer >= minimum (or None when optional)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        none = " or null" if optional else ""
        raise UserValueError(f"data {name}={value!r} is invalid: expected an integer >= {minimum}{none}")


def _names(urls: Sequence[str], shown: int = 3) -> str:
    """A few shard names for a message: 'a.tar, b.tar, c.tar and 7 more'."""
    names = ", ".join(urls[:shown])
    return f"{names} and {len(urls) - shown} more" if len(urls) > shown else names


def _reason(err: BaseException, width: int = 120) -> str:
    text = str(err).strip().splitlines()[0][:width] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_manifest(where: str) -> dict:
    """Read and check a manifest.json written by ``diffusion-pl prepare`` (local path or URL)."""
    expected = "expected the manifest.json written by `diffusion-pl prepare`"
    if not _is_url(where) and not Path(where).is_file():
        raise MissingFileError(f"manifest {where} does not exist: {expected}")
    try:
        with wds.gopen(where, "rb") as f:
            m = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise UserValueError(f"manifest {where} is not readable JSON ({_reason(err, 80)}): {expected}") from None
    except OSError as err:
        raise DataError(f"manifest {where} could not be read ({_reason(err, 80)}): {expected}") from None
    shards = m.get("shards") if isinstance(m, dict) else None
    if not shards or not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards) \
            or not isinstance(m.get("classes", []), list):
        raise UserValueError(f"manifest {where} is malformed: expected a JSON object with a non-empty 'shards' "
                             "list of {name, count, sha256} and a 'classes' list")
    return m


def resolve_shards(spec: str) -> tuple[list[str], dict | None]:
    """Shard URLs of a ``shards`` string, and the manifest when one is found beside them."""
    spec = spec.strip()
    if not spec:
        raise UserValueError(f"shards is empty: {SHARDS_HELP}")
    if not _is_url(spec) and Path(spec).is_dir():
        if not (Path(spec) / MANIFEST).is_file():
            raise MissingFileError(f"shards directory {spec} has no {MANIFEST}: {SHARDS_HELP}")
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
            raise MissingFileError(f"shards pattern {url!r} matched no files: {SHARDS_HELP}")
        missing = [p for p in matches if not Path(p).is_file()]
        if missing:
            raise MissingFileError(f"shard {missing[0]} does not exist (from shards={spec!r}): {SHARDS_HELP}")
        urls.extend(matches)
    local = [u for u in urls if not _is_url(u)]
    folders = {Path(u).parent for u in local}
    beside = folders.pop() / MANIFEST if len(folders) == 1 and len(local) == len(urls) else None
    return urls, load_manifest(str(beside)) if beside and beside.is_file() else None


# ----------------------------------------------------------------------------- tar reading
def _open(url: str) -> BinaryIO:
    return open(url, "rb") if not _is_url(url) else wds.gopen(url, "rb")


def _split_key(name: str) -> tuple[str, str] | None:
    """(key, ext) of a member name as webdataset splits it: at the basename's first dot."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name[:dot], name[dot + 1:].lower()) if dot >= 0 else None


def tar_samples(url: str, start: int = 0, stats: dict | None = None) -> Iterator[dict]:
    """Samples {__key__, __url__, <ext>: bytes} of one tar shard: consecutive members grouped by key.

    The first ``start`` samples are passed over by their headers (their data is never read on
    local files). ``stats`` (optional) counts members 'read' and 'passed' over. Replaces
    webdataset's reader, whose Python tarfile costs ~100 us per member (more than decoding a
    32x32 JPEG).
    """
    index, key, sample = -1, None, None
    f = _open(url)
    try:
        seekable = can_seek(f)
        for name, size in tar_entries(f, seekable):
            split = _split_key(name)
            if split is None:
                skip_member(f, size, seekable)
                continue
            if split[0] != key:
                if sample is not None:
                    yield sample
                index, key = index + 1, split[0]
                sample = {"__key__": key, "__url__": url} if index >= start else None
            if sample is None:
                skip_member(f, size, seekable)
                if stats is not None:
                    stats["passed"] += 1
            else:
                sample[split[1]] = read_member(f, size)
                if stats is not None:
                    stats["read"] += 1
        if sample is not None:
            yield sample
    finally:  # closed early (a span read, a resume), a pipe's writer may exit on SIGPIPE: that is fine,
        with contextlib.suppress(Exception):  # and read errors surface in read(), not here
            f.close()


def count_samples(url: str) -> int:
    """Number of samples (distinct consecutive keys) in a tar shard, from its headers alone.

    An unreadable or truncated shard counts the samples before the damage (with a warning).
    """
    count, key = 0, None
    try:
        f = _open(url)
    except Exception as err:  # noqa: BLE001 - reported, the shard then holds no samples
        log.warning("cannot open shard %s to count its samples: %s", url, _reason(err))
        return 0
    try:
        seekable = can_seek(f)
        for name, size in tar_entries(f, seekable):
            split = _split_key(name)
            if split is not None and split[0] != key:
                count, key = count + 1, split[0]
            skip_member(f, size, seekable)
    except Exception as err:  # noqa: BLE001 - a damaged shard: its readable part still counts
        log.warning("counted %d samples in shard %s before %s", count, url, _reason(err))
    finally:
        with contextlib.suppress(Exception):
            f.close()
    return count


def shard_counts(urls: Sequence[str], manifest: dict | None = None) -> list[int]:
    """Samples per shard: the manifest's ``count`` (matched by file name), else counted from the tar."""
    known = {}
    for s in (manifest or {}).get("shards", []):
        count = s.get("count")
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            known[str(s["name"]).rsplit("/", 1)[-1]] = count
    return [known[u.rsplit("/", 1)[-1]] if u.rsplit("/", 1)[-1] in known else count_samples(u) for u in urls]


# ----------------------------------------------------------------------------- the order
class SampleOrder:
    """Which stored sample fills slot k of reader r: a pure function of the seeds and counts.

    Stored sample (shard s, index i) has id ``starts[s] + i`` (its position in the stored order).
    See the module docstring for the design; this class has no I/O, so it is tested directly.
    """

    def __init__(self, counts: Sequence[int], readers: int, *, seed: int = 0, shuffle_buffer: int = 0,
                 infinite: bool = True, random_flip: bool = True):
        self.counts = np.asarray(list(counts), dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.total, self.readers, self.seed, self.infinite = int(self.starts[-1]), readers, seed, infinite
        self.shuffle = infinite and shuffle_buffer > 1
        self.block = shuffle_buffer if self.shuffle else READ_BLOCK
        self.flip = infinite and random_flip
        self._layout: tuple[int, tuple] | None = None

    def reader_range(self, r: int) -> tuple[int, int]:
        """[lo, hi) positions of a pass read by reader r."""
        if self.infinite:  # equal ranges; the N mod R positions past R * M are left out this pass
            m = self.total // self.readers
            return r * m, (r + 1) * m
        base, extra = divmod(self.total, self.readers)  # finite: split the remainder, drop nothing
        lo = r * base + min(r, extra)
        return lo, lo + base + (r < extra)

    def length(self, r: int) -> int:
        lo, hi = self.reader_range(r)
        return hi - lo

    def layout(self, e: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(shard order, start of each in the concatenation (S + 1), rotation offset) of pass e."""
        if self._layout is None or self._layout[0] != e:
            if self.infinite:
                rng = np.random.default_rng(_seed(self.seed, 1, e))
                order = rng.permutation(len(self.counts))
                offset = int(rng.integers(self.total)) if self.total else 0
            else:
                order, offset = np.arange(len(self.counts)), 0
            self._layout = (e, (order, np.concatenate([[0], np.cumsum(self.counts[order])]), offset))
        return self._layout[1]

    def spans(self, e: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Positions [lo, hi) of pass e as (shard, first index, count) runs, in reading order."""
        order, starts, offset = self.layout(e)
        n, c0 = hi - lo, (lo + offset) % self.total if self.total else 0
        pieces = [(c0, c0 + n)] if c0 + n <= self.total else [(c0, self.total), (0, c0 + n - self.total)]
        out = []
        for x, y in pieces:
            j = int(np.searchsorted(starts, x, side="right")) - 1
            while j < len(order) and starts[j] < y:
                first, end = max(x, starts[j]) - starts[j], min(y, starts[j + 1]) - starts[j]
                if end > first:
                    out.append((int(order[j]), int(first), int(end - first)))
                j += 1
        return out

    def block_plan(self, e: int, r: int, b: int, n: int) -> tuple[list[int], list[bool]]:
        """(emission order of the n positions of block b, flip bit of each position)."""
        if not self.shuffle and not self.flip:
            return list(range(n)), [False] * n
        rng = np.random.default_rng(_seed(self.seed, 2, e, r, b))
        perm = rng.permutation(n).tolist() if self.shuffle else list(range(n))
        flips = (rng.random(n) < 0.5).tolist() if self.flip else [False] * n
        return perm, flips

    def locate(self, r: int, k: int) -> tuple[int, int]:
        """(pass, slot within the pass) of reader r's slot k."""
        m = self.length(r)
        return divmod(k, m) if self.infinite else (0, k)

    def pass_ids(self, e: int, r: int) -> np.ndarray:
        """Stored ids of reader r's slots in pass e, in emission order (for tests and tools)."""
        order, starts, offset = self.layout(e)
        lo, hi = self.reader_range(r)
        c = (np.arange(lo, hi) + offset) % max(self.total, 1)
        j = np.searchsorted(starts, c, side="right") - 1
        ids = self.starts[order[j]] + (c - starts[j])
        out = []
        for b, a in enumerate(range(0, hi - lo, self.block)):
            perm, _ = self.block_plan(e, r, b, min(self.block, hi - lo - a))
            out.append(ids[a:a + len(perm)][perm])
        return np.concatenate(out) if out else ids


# ----------------------------------------------------------------------------- the stream
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
                 max_bad_samples: int = MAX_BAD_SAMPLES):
        super().__init__()
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
            raise DataError(f"shards {_names(self.urls)} hold no samples: expected tar shards of <key>.jpg/.png "
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
                            f"{_names(self.urls)}: expected JPEG/PNG images ({'/'.join(IMAGE_KEYS)} members); "
                            "see the warnings above for why")

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

    def _collate(self, batch: list[tuple[dict | None, bool]], reader: int = 0, readers: int = 1,
                 bound: int = MAX_BAD_SAMPLES) -> Batch | None:
        """Decode, flip and stack one batch; empty slots are dropped and counted, undecodable ones logged."""
        images, labels = [], []
        for sample, flip in batch:
            try:
                if sample is None:  # unreadable: already reported by _read_spans
                    raise EOFError("the sample could not be read from its shard")
                image, label = self._decode(sample)
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
                        f"row of shards {_names(self.urls)} (last: {where}: {_reason(err)}): expected JPEG/PNG "
                        f"images ({'/'.join(IMAGE_KEYS)} members); raise data max_bad_samples to tolerate more"
                    ) from None
                continue
            self._bad_run = 0
            self.decoded += 1
            images.append(image.flip(-1) if flip else image)
            labels.append(label)
        if not images:  # the whole batch was empty: drop it (the only case a batch goes missing)
            return None
        return to_signed_unit(torch.stack(images)), torch.tensor(labels, dtype=torch.int64)


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


class ShardDataModule(L.LightningDataModule):
    """Webdataset shards as batches (images float32 (B, C, H, W) in [-1, 1], labels int64 (B,)).

    Training is an infinite stream (run length = max_steps), split over nodes, ranks and
    workers, every sample drawn equally often, resumed exactly from a checkpoint at a cost
    independent of the step; validation is finite, in stored order, unflipped, each sample once.
    """

    def __init__(self, shards: str = "builtin:shapes", batch_size: int = 128, num_workers: int = 2,
                 image_size: int | None = None, random_flip: bool = True, seed: int = 0,
                 shuffle_buffer: int = 1000, val_shards: str | None = None, val_batch_size: int | None = None,
                 manifest: str | None = None, max_bad_samples: int = MAX_BAD_SAMPLES):
        """``shards``: a shard path, folder with manifest.json, brace pattern, http(s)/pipe: URL or
        builtin:shapes[?size=N&count=N]; ``image_size``: output size (resize + centre crop when the
        data differs; required for a manifest of mixed sizes); ``shuffle_buffer``: samples shuffled
        together (blocks of consecutive samples of a reader's range); ``manifest``: path/URL of a
        manifest for remote shards (classes, size, per-shard counts); ``max_bad_samples``:
        consecutive undecodable samples after which a reader stops with a DataError."""
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
        self.shards, self.batch_size, self.num_workers, self.seed = shards, batch_size, num_workers, seed
        self.random_flip, self.shuffle_buffer, self.manifest = random_flip, shuffle_buffer, manifest
        self.val_shards, self.val_batch_size, self.max_bad_samples = val_shards, val_batch_size, max_bad_samples
        self._image_size, self._meta_cache, self._meta_done = image_size, None, False
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
        expected = "expected builtin:shapes[?size=N&count=N&seed=N] with size >= 8, count >= 1"
        if name != "shapes" or set(args) - {"size", "count", "seed"} or not all(v.isdigit() for v in args.values()):
            raise UserValueError(f"built-in dataset {self.shards!r} is unknown: {expected}")
        out = {"size": int(args.get("size", self._image_size or 32)), "count": int(args.get("count", 10_000)),
               "seed": int(args.get("seed", 0))}
        if out["size"] < 8 or out["count"] < 1:
            raise UserValueError(f"built-in dataset {self.shards!r} is invalid: {expected}")
        return out

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

    def _resolve(self, spec: str) -> tuple[list[str], dict | None]:
        if spec.startswith("builtin:"):
            return resolve_shards(str(builtin.ensure_shapes(**self._builtin())))
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
        meta = self._meta() or {}
        if self._image_size:
            self._size = (self._image_size,) * 2
        elif meta.get("mixed_sizes") or ("image_size" in meta and not meta["image_size"]):
            # resizing everything to whatever image comes first would silently pick the training size
            raise UserValueError(f"shards {self.shards} holds images of mixed sizes (its manifest says so): set data "
                                 "image_size to the side to train at")
        else:
            self._size = tuple(meta["image_size"]) if meta.get("image_size") else self._peek_size()

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
            manifest = self._manifests.get(split) or (self._meta() if split == "train" else None)
            self._counts[split] = shard_counts(self._urls[split], manifest)
        return self._counts[split]

    def _stream(self, split: str, **kwargs) -> ShardStream:
        if split not in self._urls:
            self.setup("fit")
        return ShardStream(self._urls[split], rank=self._rank, world_size=self._world, seed=self.seed,
                           image_size=self._size, channels=self.channels, counts=self._sample_counts(split),
                           max_bad_samples=self.max_bad_samples, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Infinite, shuffled, flipped, exactly resumable batches."""
        stream = self._stream("train", batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer,
                              random_flip=self.random_flip, infinite=True)
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
