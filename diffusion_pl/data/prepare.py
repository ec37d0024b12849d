"""Shard writer and the `diffusion-pl prepare` command.

A source (CIFAR-10 through torchvision, a local ``cifar-10-batches-py`` folder, or an
image-folder tree / .tar / .tar.gz of one) is listed in sorted order, put through one
fixed permutation (so every shard mixes classes and ``--max-samples`` is a class-mixed
prefix of the full set), and written as webdataset tar shards plus ``manifest.json``:

    OUT/shard-000000.tar   {key}.jpg|{key}.png  image bytes (JPEG kept as-is, else PNG)
                           {key}.cls            class index as decimal text
    OUT/manifest.json      count, skipped, image_size, mixed_sizes, channels, classes,
                           per-shard count + sha256

Output is byte-for-byte reproducible (fixed tar mtime, owner and mode) and atomic: all
files are written into a hidden sibling directory ``.OUT.partial-<pid>@<host>`` that is
renamed to OUT at the end. A run into OUT first removes such folders (and the
``.OUT.old-<pid>@<host>`` of an interrupted swap) whose process is no longer alive, and
refuses while another prepare is still writing OUT.

Checks, each a one-line error before anything is left under OUT:

- Every image file is opened (its header is parsed, which gives size and channels) and a
  JPEG/PNG must end with its end marker, else it is decoded in full. A zero-byte, non-image
  or truncated file stops the run naming the file; ``--skip-bad`` leaves such files out and
  prints how many (the manifest's ``skipped``). Damage inside a JPEG's data that keeps its
  header and end intact is not detected here; training skips such a sample and counts it.
- Images of different sizes stop the run naming two of them; ``--mixed-sizes`` writes them
  as they are with ``"image_size": null, "mixed_sizes": true`` (training then needs an
  explicit image_size).
- ``--overwrite`` replaces only an earlier prepare output (a manifest.json of this FORMAT and
  the shards it lists, nothing else); any other non-empty OUT is refused, even with it.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import pickle
import re
import shutil
import socket
import struct
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from diffusion_pl.data.tario import tar_members
from diffusion_pl.errors import UserValueError, run_command

MANIFEST = "manifest.json"
FORMAT = "diffusion_pl.shards/1"
SHARD_PATTERN = "shard-%06d.tar"
SKIPPED_SHOWN = 5  # skipped files named in the summary line of --skip-bad
ORDER_SEED = 0  # the one fixed permutation applied to every source's sorted order
# Extensions taken from image folders; JPEG and PNG bytes are stored as-is, others re-encoded to PNG.
IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".bmp": None, ".gif": None,
              ".ppm": None, ".tif": None, ".tiff": None, ".webp": None}


class PrepareError(UserValueError):
    """A bad input to prepare; the message is one line naming the input and what was expected."""


@dataclass(frozen=True)
class Sample:
    """One record of a shard: encoded image bytes, their extension ('jpg' or 'png'), a class index."""

    key: str
    image: bytes
    ext: str
    label: int
    shape: tuple[int, int, int] | None = None  # (H, W, C) when known, saves parsing the header
    origin: str = ""  # where it came from (a file name), for messages; the key when empty


@dataclass(frozen=True)
class Unreadable:
    """An input file that is not a readable image, in place of its sample in a stream."""

    origin: str
    reason: str  # a few words: "zero bytes", "not an image file", "truncated ..."


@dataclass
class Source:
    """A dataset listed in sorted order: ``load(indices)`` yields, in that order, a tuple
    (bytes, ext, label, shape[, origin]) per sample, or an `Unreadable` for a bad image file."""

    name: str
    classes: list[str]
    size: int
    load: Callable[[Sequence[int]], Iterator[tuple]]


def cache_dir() -> Path:
    """The user cache root: $DIFFUSION_PL_CACHE, else ~/.cache/diffusion_pl."""
    return Path(os.environ.get("DIFFUSION_PL_CACHE", Path.home() / ".cache" / "diffusion_pl"))


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W, 3) or (H, W) array (filter 0, zlib level 6)."""
    # Written out because PIL's per-call overhead made it ~3x slower on 32x32 images.
    h, w = array.shape[:2]
    colour = 2 if array.ndim == 3 else 0  # PNG colour type: 2 = RGB, 0 = grey
    rows = np.concatenate([np.zeros((h, 1), np.uint8), array.reshape(h, -1)], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- writer
_SHARD_NAME = re.compile(r"shard-\d{6}\.tar")


def _host() -> str:
    """This machine's name as put in temporary folder names (pids mean nothing on another host)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _sibling(out: Path, kind: str) -> Path:
    """The hidden folder beside out that this process uses while writing ('partial') or swapping ('old')."""
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}@{_host()}")


def _not_prepare_output(folder: Path) -> str | None:
    """None when folder holds an earlier prepare output and nothing else, else why it does not."""
    entries = sorted(p.name for p in folder.iterdir())
    if MANIFEST not in entries:
        return f"it holds {entries[0]!r} and no {MANIFEST}" if entries else f"it has no {MANIFEST}"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"its {MANIFEST} is not readable JSON"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("shards"), list):
        return f"its {MANIFEST} is not a {FORMAT} manifest"
    listed = {s.get("name") for s in manifest["shards"] if isinstance(s, dict)}
    extra = [e for e in entries if e != MANIFEST and e not in listed]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"it holds {extra[0]!r}{more}, which its {MANIFEST} does not list"
    directory = next((e for e in entries if (folder / e).is_dir() and not (folder / e).is_symlink()), None)
    return f"its {directory!r} is a directory" if directory else None


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"output {out} is a file: expected a directory path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    reason = _not_prepare_output(out)
    if reason is not None:
        raise PrepareError(f"output directory {out} is not empty and is not a prepare output ({reason}): refusing "
                           "to touch it, even with --overwrite; expected a new or empty directory, or the output "
                           "of an earlier `diffusion-pl prepare`")
    if not overwrite:
        raise PrepareError(f"output directory {out} holds an earlier prepare output: pass --overwrite to replace it")


def _alive(pid: int, host: str | None) -> bool:
    """Whether process pid (of host; None: this one) may still be running."""
    if host is not None and host != _host():
        return True  # another machine's process (a shared file system): there is no telling
    if pid <= 0 or pid == os.getpid():
        return False  # never a writer; or this process's own leftover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _clean_leftovers(out: Path, *, refuse_live: bool) -> None:
    """Remove the temporary folders beside out of prepares that died (kill -9, power loss).

    ``.OUT.partial-<pid>[@host]`` (shards being written) is deleted when it holds only shards and
    a manifest; ``.OUT.old-<pid>[@host]`` (the previous output set aside by an interrupted swap) is
    renamed back to OUT when OUT is missing, else deleted, and only when it is a prepare output.
    A live process's folder is left alone; with refuse_live that is a PrepareError.
    """
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)(?:@(.+))?")
    for entry in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        kind, pid, host = match[1], int(match[2]), match[3]
        if _alive(pid, host):
            if refuse_live:
                where = f"process {pid}" + (f" on {host}" if host and host != _host() else "")
                raise PrepareError(f"another prepare ({where}) is writing {out}: its temporary folder {entry} "
                                   f"exists; wait for it to finish, or delete {entry} if no prepare is running")
            continue
        if kind == "partial":
            if all(_SHARD_NAME.fullmatch(p.name) or p.name == MANIFEST for p in entry.iterdir()):
                shutil.rmtree(entry, ignore_errors=True)
        elif _not_prepare_output(entry) is None:
            try:
                if not out.exists():
                    entry.rename(out)  # the swap never finished: put the previous output back
                else:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass  # a concurrent run got there first


def _preflight(out: Path, overwrite: bool) -> None:
    """Everything about out that can fail before any input is read."""
    _clean_leftovers(out, refuse_live=True)
    _check_output(out, overwrite)


def _finalize(tmp: Path, out: Path) -> None:
    """Swap the finished temporary directory in under the final name."""
    old = _sibling(out, "old")
    if out.exists():
        # checked again: a file may have been put there while the shards were being written
        reason = _not_prepare_output(out) if out.is_dir() and any(out.iterdir()) else None
        if reason is not None:
            raise PrepareError(f"output directory {out} is no longer empty or a prepare output ({reason}): "
                               "expected nothing else to write into it while prepare runs")
        out.rename(old)  # keep the old data until the new one is in place
    try:
        tmp.rename(out)
    except OSError as err:
        if old.exists() and not out.exists():
            old.rename(out)
        raise PrepareError(f"could not move finished shards into {out}: {err}") from err
    shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _reason(err: BaseException) -> str:
    """A few words on why an image file could not be read."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image file"
    text = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def _write_tars(samples: Iterable[Sample | Unreadable], folder: Path, shard_size: int, bar: tqdm, *,
                skip_bad: bool, mixed_sizes: bool, on_skip: Callable[[Unreadable], None] | None) -> dict:
    """Stream samples into folder/shard-*.tar; return what the manifest needs to know of them."""
    seen = {"count": 0, "skipped": 0, "sizes": set(), "channels": set(), "exts": set()}
    first = None  # (origin, size) of the first sample, named when another one differs in size
    # maxsize is unbounded so a shard boundary depends on the sample count only;
    # mtime/user/group/mode are fixed so the same input gives the same sha256.
    with wds.ShardWriter(str(folder / SHARD_PATTERN), maxcount=shard_size, maxsize=1e18, verbose=0,
                         encoder=False, mtime=0, user="diffusion_pl", group="diffusion_pl") as sink:
        for s in samples:
            shape = None if isinstance(s, Unreadable) else s.shape
            if shape is None and not isinstance(s, Unreadable):
                try:
                    with Image.open(io.BytesIO(s.image)) as im:  # reads the header only
                        shape = (*im.size[::-1], 1 if im.mode == "L" else 3)
                except Exception as err:  # any failure means the bytes are not an image
                    s = Unreadable(s.origin or f"sample {s.key}", "zero bytes" if not s.image else _reason(err))
            if isinstance(s, Unreadable):
                if not skip_bad:
                    raise PrepareError(f"{s.origin} is not a readable image ({s.reason}): expected a JPEG/PNG "
                                       "(or other PIL-readable) image file; pass --skip-bad to leave such files out")
                seen["skipped"] += 1
                if on_skip is not None:
                    on_skip(s)
                continue
            size = tuple(shape[:2])
            if first is None:
                first = (s.origin or f"sample {s.key}", size)
            elif size != first[1] and not mixed_sizes:
                raise PrepareError(
                    f"images differ in size: {first[0]} is {_size_text(first[1])} but {s.origin or f'sample {s.key}'} "
                    f"is {_size_text(size)} (width x height): expected one image size; resize them, or pass "
                    "--mixed-sizes to write them as they are (training then needs an explicit image_size)")
            seen["sizes"].add(size)
            seen["channels"].add(shape[2])
            seen["exts"].add(s.ext)
            sink.write({"__key__": s.key, s.ext: s.image, "cls": str(s.label).encode()})
            seen["count"] += 1
            bar.update()
    return seen


def write_shards(samples: Iterable[Sample | Unreadable], out: str | Path, *, classes: Sequence[str],
                 shard_size: int = 1000, overwrite: bool = False, source: str = "",
                 split: str | None = None, total: int | None = None, skip_bad: bool = False,
                 mixed_sizes: bool = False, on_skip: Callable[[Unreadable], None] | None = None) -> dict:
    """Write samples as reproducible webdataset tar shards plus manifest.json; return the manifest.

    An `Unreadable` in samples (or a sample whose bytes are no image) is a PrepareError unless
    skip_bad, which leaves it out, counts it (manifest "skipped") and passes it to on_skip.
    Samples of different sizes are a PrepareError unless mixed_sizes ("image_size": null).
    overwrite replaces only an earlier prepare output, never a folder holding anything else.
    """
    out = Path(out)
    if shard_size < 1:
        raise PrepareError(f"shard size {shard_size} is invalid: expected a positive integer")
    _clean_leftovers(out, refuse_live=False)  # a concurrent writer (a DDP rank) is left to finish
    _check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Everything goes to a hidden sibling first, so a crash never leaves a partial shard
    # (or a manifest describing one) under the final name.
    tmp = _sibling(out, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with tqdm(total=total, desc=f"prepare {out.name}", unit="img", disable=None) as bar:
            seen = _write_tars(samples, tmp, shard_size, bar, skip_bad=skip_bad, mixed_sizes=mixed_sizes,
                               on_skip=on_skip)
        count = seen["count"]
        if count == 0:
            skipped = f" ({seen['skipped']} unreadable files skipped)" if seen["skipped"] else ""
            raise PrepareError(f"source {source or out} yielded no samples{skipped}: expected at least one image")
        names = [SHARD_PATTERN % i for i in range((count + shard_size - 1) // shard_size)]
        manifest = {
            "format": FORMAT, "source": source, "split": split, "count": count, "skipped": seen["skipped"],
            "image_size": list(next(iter(seen["sizes"]))) if len(seen["sizes"]) == 1 else None,
            "mixed_sizes": len(seen["sizes"]) > 1,
            "channels": 1 if seen["channels"] == {1} else 3, "image_format": sorted(seen["exts"]),
            "classes": list(classes), "num_classes": len(classes),
            "shards": [{"name": name, "count": min(shard_size, count - i * shard_size), "sha256": _sha256(tmp / name)}
                       for i, name in enumerate(names)],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _finalize(tmp, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(src: Source, out: str | Path, *, split: str | None = None, max_samples: int | None = None,
            shard_size: int = 1000, overwrite: bool = False, skip_bad: bool = False, mixed_sizes: bool = False,
            on_skip: Callable[[Unreadable], None] | None = None) -> dict:
    """Write ``src`` (its fixed permutation, truncated to max_samples) as shards under ``out``.

    With skip_bad, unreadable files are left out and the next ones of the permutation take their
    place, so max_samples still counts written images; see `write_shards` for the other options.
    """
    _preflight(Path(out), overwrite)  # fail before any slow reading
    order = np.random.default_rng(ORDER_SEED).permutation(src.size).tolist()
    limit = len(order) if max_samples is None else max(0, min(max_samples, len(order)))

    def samples() -> Iterator[Sample | Unreadable]:
        j = 0
        if limit == 0:
            return
        for record in src.load(order):  # lazily: reading stops once limit images are written
            if isinstance(record, Unreadable):
                yield record
                continue
            yield Sample(f"{j:08d}", *record)
            j += 1
            if j == limit:
                return

    return write_shards(samples(), out, classes=src.classes, shard_size=shard_size, overwrite=overwrite,
                        source=src.name, split=split, total=limit, skip_bad=skip_bad, mixed_sizes=mixed_sizes,
                        on_skip=on_skip)


# ----------------------------------------------------------------------------- sources
def _unpickle(path: Path) -> dict:
    expected = "expected a cifar-10-batches-py folder (data_batch_1..5, test_batch, batches.meta)"
    if not path.is_file():
        raise PrepareError(f"{path} not found: {expected}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as err:  # any unpickling failure is the user's file, not our bug
        raise PrepareError(f"{path} is not a CIFAR-10 python batch ({type(err).__name__}): {expected}") from err


def cifar10_batches(folder: str | Path, split: str = "train") -> Source:
    """CIFAR-10 from a local ``cifar-10-batches-py`` folder (Krizhevsky, 2009); stored as PNG."""
    folder = Path(folder)
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}.get(split)
    if names is None:
        raise PrepareError(f"split {split!r} is invalid for CIFAR-10: expected 'train' or 'test'")
    xs, ys = [], []
    for name in names:
        batch = _unpickle(folder / name)
        if b"data" not in batch or b"labels" not in batch:
            raise PrepareError(f"{folder / name} lacks 'data'/'labels': expected a CIFAR-10 python batch")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.extend(int(y) for y in batch[b"labels"])
    classes = [c.decode() for c in _unpickle(folder / "batches.meta")[b"label_names"]]
    x = np.concatenate(xs)

    def load(indices: Sequence[int]) -> Iterator[tuple]:
        for i in indices:
            yield encode_png(x[i]), "png", ys[i], (32, 32, 3)

    return Source(f"cifar10-batches:{folder}:{split}", classes, len(x), load)


def cifar10_torchvision(root: str | Path | None = None, split: str = "train") -> Source:
    """CIFAR-10 downloaded by torchvision into ``root`` (default: the cache dir), then read locally."""
    root = Path(root) if root is not None else cache_dir() / "torchvision"
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=split == "train", download=True)
    except Exception as err:  # network errors come in many types; all mean the same to the user
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise PrepareError(
            f"could not download CIFAR-10 through torchvision into {root} ({reason}): on a machine without "
            "internet use the local options `prepare cifar10-batches DIR` or `prepare folder PATH`") from err
    return cifar10_batches(root / "cifar-10-batches-py", split)


def _pick(paths: Iterable[str], split: str | None) -> list[tuple[str, str]]:
    """(path, class) for image files laid out as [.../<split>]/<class>/<image>, sorted by path."""
    items = []
    for path in paths:
        parts = path.split("/")
        ext = os.path.splitext(path)[1].lower()
        if ext not in IMAGE_EXTS or len(parts) < 2 or any(p.startswith((".", "__MACOSX")) for p in parts):
            continue
        if split is None or (len(parts) >= 3 and parts[-3] == split):
            items.append((path, parts[-2]))
    return sorted(items)


# PIL format -> (stored extension, the bytes a complete file ends with); MPO is a multi-frame JPEG
_KEPT = {"JPEG": ("jpg", b"\xff\xd9"), "MPO": ("jpg", b"\xff\xd9"), "PNG": ("png", b"IEND\xaeB`\x82")}


class _BadImage(Exception):
    """An image file that cannot be read; the message is the reason in a few words."""


def _as_image(data: bytes, ext: str) -> tuple[bytes, str, tuple[int, int, int]]:
    """JPEG/PNG bytes as-is, any other format decoded and re-encoded losslessly as PNG, with (H, W, C).

    Costs one header parse for a complete JPEG/PNG (it must end with its end marker, else it is
    decoded in full to tell a truncated file from one with trailing bytes); raises _BadImage.
    """
    if not data:
        raise _BadImage("zero bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            kept = _KEPT.get(im.format) if IMAGE_EXTS[ext] is not None else None
            if kept is not None:  # stored as-is: the content's own format, whatever the extension says
                if not data.endswith(kept[1]):
                    try:
                        im.load()  # trailing bytes after the end marker are fine; a truncated file raises
                    except Exception as err:
                        raise _BadImage(f"truncated: no {im.format} end marker and {_reason(err)}") from err
                return data, kept[0], (*im.size[::-1], 1 if im.mode == "L" else 3)
            array = np.asarray(im.convert("L" if im.mode in ("L", "1") else "RGB"))
    except _BadImage:
        raise
    except Exception as err:  # any failure to parse or decode means the file is not a readable image
        raise _BadImage(_reason(err)) from err
    return encode_png(array), "png", (*array.shape[:2], 1 if array.ndim == 2 else 3)


def _tar_files(path: Path, split: str | None) -> tuple[list[str], Callable[[str], bytes]]:
    """Member names of a tar archive and a function reading one member's bytes."""
    try:
        tf = tarfile.open(path, "r:")  # uncompressed: seekable, members are read lazily
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
        return list(members), lambda name: tf.extractfile(members[name]).read()
    except tarfile.ReadError:
        pass
    except OSError as err:
        raise PrepareError(f"{path} is not readable ({err}): expected an image folder .tar/.tar.gz") from err
    # A compressed stream cannot seek backwards cheaply, and listing it costs as much as
    # reading it: one sequential pass keeps the bytes of every image file in memory.
    with open(path, "rb") as f:
        opener = {b"\x1f\x8b": gzip.open, b"BZ": bz2.open, b"\xfd7": lzma.open}.get(f.read(2))  # magic bytes
    try:
        if opener is None:
            raise tarfile.ReadError("neither a tar nor a gzip/bzip2/xz-compressed one")
        with opener(path, "rb") as f:
            blobs = {name: data for name, data in tar_members(f) if _pick([name], split)}
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise PrepareError(f"{path} is not a readable tar archive ({err}): "
                           "expected an image folder .tar/.tar.gz") from err
    return list(blobs), blobs.__getitem__


def image_folder(path: str | Path, split: str | None = None) -> Source:
    """An image-folder tree, or a .tar/.tar.gz of one: class = parent folder, classes sorted."""
    path = Path(path)
    if path.is_dir():
        names = [Path(d, f).relative_to(path).as_posix() for d, _, fs in os.walk(path) for f in fs]

        def read(name: str) -> bytes:
            return (path / name).read_bytes()

        def origin(name: str) -> str:
            return str(path / name)

    elif path.is_file():
        names, read = _tar_files(path, split)

        def origin(name: str) -> str:
            return f"{name} in {path}"

    else:
        raise PrepareError(f"image folder {path} does not exist: expected a directory or a .tar/.tar.gz")
    items = _pick(names, split)
    if not items:
        where = f"{path} (split {split!r})" if split else str(path)
        layout = f"<root>/{split}/<class>/<image>" if split else "<root>/<class>/<image>"
        raise PrepareError(f"no images found in {where}: expected the layout {layout}")
    classes = sorted({c for _, c in items})
    index = {c: i for i, c in enumerate(classes)}

    def load(indices: Sequence[int]) -> Iterator[tuple | Unreadable]:
        for i in indices:
            name, cls = items[i]
            try:
                data = read(name)
            except OSError as err:
                yield Unreadable(origin(name), f"cannot be read: {err.strerror or err}")
                continue
            try:
                image, ext, shape = _as_image(data, os.path.splitext(name)[1].lower())
            except _BadImage as err:
                yield Unreadable(origin(name), str(err))
                continue
            yield image, ext, index[cls], shape, origin(name)

    return Source(f"folder:{path}" + (f":{split}" if split else ""), classes, len(items), load)


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    common.add_argument("--split", default=None, help="split subfolder (image folders) or train/test (CIFAR)")
    common.add_argument("--max-samples", type=int, default=None, help="keep only this many (for tests)")
    common.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    common.add_argument("--overwrite", action="store_true",
                        help="replace an earlier prepare output in --out (a manifest.json and its shards, nothing "
                        "else); any other non-empty directory is refused, even with this flag")
    parser = argparse.ArgumentParser(
        prog="diffusion-pl prepare", description="Write reproducible webdataset tar shards + manifest.json from "
        "CIFAR-10 or an image folder. Temporary folders (.OUT.partial-*, .OUT.old-*) left beside --out by a "
        "killed prepare are removed by the next run into --out.")
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("cifar10", parents=[common], help="CIFAR-10 downloaded through torchvision")
    p.add_argument("--root", default=None, help="download folder (default: <cache>/torchvision)")
    p.set_defaults(source=lambda a: cifar10_torchvision(a.root, a.split or "train"))
    p = sub.add_parser("cifar10-batches", parents=[common], help="a local cifar-10-batches-py folder")
    p.add_argument("path")
    p.set_defaults(source=lambda a: cifar10_batches(a.path, a.split or "train"))
    p = sub.add_parser("folder", parents=[common], help="an image-folder tree or a .tar/.tar.gz of one",
                       description="An image folder <root>/[<split>/]<class>/<image> or a .tar/.tar.gz of one. "
                       "A zero-byte, non-image or truncated file and images of different sizes stop the run "
                       "with one line naming the files, unless --skip-bad / --mixed-sizes.")
    p.add_argument("path")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out files that are not readable images (zero bytes, not an image, truncated) "
                   "instead of stopping; their count is printed and recorded as 'skipped' in manifest.json")
    p.add_argument("--mixed-sizes", action="store_true",
                   help="accept images of different sizes: written as they are, manifest.json gets "
                   '"image_size": null, "mixed_sizes": true, and training needs an explicit image_size')
    p.set_defaults(source=lambda a: image_folder(a.path, a.split))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``diffusion-pl prepare``; returns a process exit code."""
    args = _parser().parse_args(argv)
    return run_command("prepare", lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    if args.max_samples is not None and args.max_samples < 1:
        raise PrepareError(f"--max-samples {args.max_samples} is invalid: expected a positive integer")
    _preflight(Path(args.out), args.overwrite)  # refuse before reading a large source
    skipped: list[Unreadable] = []
    m = prepare(args.source(args), args.out, split=args.split, max_samples=args.max_samples,
                shard_size=args.shard_size, overwrite=args.overwrite, skip_bad=getattr(args, "skip_bad", False),
                mixed_sizes=getattr(args, "mixed_sizes", False), on_skip=skipped.append)
    print(f"wrote {m['count']} images ({m['num_classes']} classes) in {len(m['shards'])} shards to {args.out}")
    if skipped:
        shown = "; ".join(f"{u.origin} ({u.reason})" for u in skipped[:SKIPPED_SHOWN])
        more = f"; and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
        print(f"skipped {len(skipped)} unreadable image file{'s' if len(skipped) > 1 else ''} (--skip-bad): "
              f"{shown}{more}")


if __name__ == "__main__":
    sys.exit(main())
