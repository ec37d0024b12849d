"""The shard writer behind `diffusion-pl prepare`: write_shards, prepare, output checks, leftovers cleanup.

A source (CIFAR-10 through torchvision, a local ``cifar-10-batches-py`` folder, or an
image-folder tree / .tar / .tar.gz of one: diffusion_pl.data.sources) is listed in sorted order, put through one
fixed permutation (so every shard mixes classes and ``--max_samples`` is a class-mixed
prefix of the full set), and written as webdataset tar shards plus ``manifest.json``:

    OUT/shard-000000.tar   {key}.jpg|{key}.png  image bytes (JPEG kept as-is, else PNG)
                           {key}.cls            class index as decimal text
    OUT/manifest.json      count, skipped, image_size, mixed_sizes, channels, classes,
                           per-shard count + sha256

``--center_crop N`` (diffusion_pl.data.crop) stores ADM's N x N centre crops as PNG; ``--encode VAE``
(diffusion_pl.data.latents) stores autoencoder latents in place of the images.

Output is byte-for-byte reproducible (fixed tar mtime, owner and mode) and atomic: all
files are written into a hidden sibling directory ``.OUT.partial-<pid>@<host>`` that is
renamed to OUT at the end. A run into OUT first removes such folders (and the
``.OUT.old-<pid>@<host>`` of an interrupted swap) whose process is no longer alive, and
refuses while another prepare is still writing OUT.

Checks, each a one-line error before anything is left under OUT:

- Every image file is opened (its header is parsed, which gives size and channels) and a
  JPEG/PNG must end with its end marker, else it is decoded in full. A zero-byte, non-image
  or truncated file stops the run naming the file; ``--skip_bad`` leaves such files out and
  prints how many (the manifest's ``skipped``). Damage inside a JPEG's data that keeps its
  header and end intact is not detected here; training skips such a sample and counts it.
- Images of different sizes stop the run naming two of them; ``--mixed_sizes`` writes them
  as they are with ``"image_size": null, "mixed_sizes": true`` (training then needs an
  explicit image_size).
- ``--overwrite`` replaces only an earlier prepare output (a manifest.json of this FORMAT and
  the shards it lists, nothing else); any other non-empty OUT is refused, even with it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.utils.fileio import sha256_file, writable_folder

MANIFEST = "manifest.json"
FORMAT = "diffusion_pl.shards/1"
SHARD_PATTERN = "shard-%06d.tar"
ORDER_SEED = 0  # the one fixed permutation applied to every source's sorted order


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
    (bytes, ext, label, shape[, origin]) per sample, or an `Unreadable` for a bad image file.
    ``meta``: fields added to the manifest (what a wrapper such as the centre crop did to the images)."""

    name: str
    classes: list[str]
    size: int
    load: Callable[[Sequence[int]], Iterator[tuple]]
    meta: dict = field(default_factory=dict)


# What write_shards stores per checked sample: tar records {"__key__": key, <member ext>: bytes, ...}.
Records = Callable[[Iterator[Sample]], Iterator[dict]]


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
    writable_folder(out, "--out")
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


def _reason(err: BaseException) -> str:
    """A few words on why an image file could not be read."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image file"
    text = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def image_records(samples: Iterator[Sample]) -> Iterator[dict]:
    """The records of image shards: the image bytes as they are and the class index as decimal text."""
    for s in samples:
        yield {"__key__": s.key, s.ext: s.image, "cls": str(s.label).encode()}


def _write_tars(samples: Iterable[Sample | Unreadable], folder: Path, shard_size: int, bar: tqdm, *,
                skip_bad: bool, mixed_sizes: bool, on_skip: Callable[[Unreadable], None] | None,
                records: Records = image_records) -> dict:
    """Stream samples into folder/shard-*.tar; return what the manifest needs to know of them."""
    seen = {"count": 0, "skipped": 0, "sizes": set(), "channels": set(), "exts": set()}
    # maxsize is unbounded so a shard boundary depends on the sample count only;
    # mtime/user/group/mode are fixed so the same input gives the same sha256.
    with wds.ShardWriter(str(folder / SHARD_PATTERN), maxcount=shard_size, maxsize=1e18, verbose=0,
                         encoder=False, mtime=0, user="diffusion_pl", group="diffusion_pl") as sink:
        for record in records(_checked(samples, seen, skip_bad=skip_bad, mixed_sizes=mixed_sizes, on_skip=on_skip)):
            sink.write(record)
            seen["count"] += 1
            bar.update()
    return seen


def _checked(samples: Iterable[Sample | Unreadable], seen: dict, *, skip_bad: bool, mixed_sizes: bool,
             on_skip: Callable[[Unreadable], None] | None) -> Iterator[Sample]:
    """The readable samples (shape filled in), checked for one size; sizes, channels and formats go into seen."""
    first = None  # (origin, size) of the first sample, named when another one differs in size
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
                                   "(or other PIL-readable) image file; pass --skip_bad to leave such files out")
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
                "--mixed_sizes to write them as they are (training then needs an explicit image_size)")
        seen["sizes"].add(size)
        seen["channels"].add(shape[2])
        seen["exts"].add(s.ext)
        yield s if s.shape is not None else Sample(s.key, s.image, s.ext, s.label, shape, s.origin)


def write_shards(samples: Iterable[Sample | Unreadable], out: str | Path, *, classes: Sequence[str],
                 shard_size: int = 1000, overwrite: bool = False, source: str = "",
                 split: str | None = None, total: int | None = None, skip_bad: bool = False,
                 mixed_sizes: bool = False, on_skip: Callable[[Unreadable], None] | None = None,
                 records: Records = image_records, meta: dict | Callable[[dict], dict] | None = None) -> dict:
    """Write samples as reproducible webdataset tar shards plus manifest.json; return the manifest.

    An `Unreadable` in samples (or a sample whose bytes are no image) is a PrepareError unless
    skip_bad, which leaves it out, counts it (manifest "skipped") and passes it to on_skip.
    Samples of different sizes are a PrepareError unless mixed_sizes ("image_size": null).
    overwrite replaces only an earlier prepare output, never a folder holding anything else.
    ``records`` turns the checked samples into tar records (default: the image and its class;
    diffusion_pl.data.latents encodes them instead); ``meta`` adds manifest fields (a callable gets
    the manifest once the shards are written).
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
                               on_skip=on_skip, records=records)
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
            "shards": [{"name": name, "count": min(shard_size, count - i * shard_size),
                        "sha256": sha256_file(tmp / name)} for i, name in enumerate(names)],
        }
        manifest.update(meta(manifest) if callable(meta) else meta or {})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _finalize(tmp, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(src: Source, out: str | Path, *, split: str | None = None, max_samples: int | None = None,
            shard_size: int = 1000, overwrite: bool = False, skip_bad: bool = False, mixed_sizes: bool = False,
            on_skip: Callable[[Unreadable], None] | None = None, records: Records = image_records,
            meta: Callable[[dict], dict] | None = None) -> dict:
    """Write ``src`` (its fixed permutation, truncated to max_samples) as shards under ``out``.

    With skip_bad, unreadable files are left out and the next ones of the permutation take their
    place, so max_samples still counts written images; the manifest gets ``src.meta`` and then
    what ``meta`` returns; see `write_shards` for the other options.
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
                        on_skip=on_skip, records=records,
                        meta=lambda m: {**src.meta, **(meta(m) if meta is not None else {})})
