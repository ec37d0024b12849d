"""Shard writer and the `diffusion-pl prepare` command.

A source (CIFAR-10 through torchvision, a local ``cifar-10-batches-py`` folder, or an
image-folder tree / .tar / .tar.gz of one) is listed in sorted order, put through one
fixed permutation (so every shard mixes classes and ``--max-samples`` is a class-mixed
prefix of the full set), and written as webdataset tar shards plus ``manifest.json``:

    OUT/shard-000000.tar   {key}.jpg|{key}.png  image bytes (JPEG kept as-is, else PNG)
                           {key}.cls            class index as decimal text
    OUT/manifest.json      count, image_size, channels, classes, per-shard count + sha256

Output is byte-for-byte reproducible (fixed tar mtime, owner and mode) and atomic: all
files are written into a hidden sibling directory that is renamed to OUT at the end.
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
import shutil
import struct
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from diffusion_pl.errors import UserValueError, run_command

MANIFEST = "manifest.json"
FORMAT = "diffusion_pl.shards/1"
SHARD_PATTERN = "shard-%06d.tar"
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


@dataclass
class Source:
    """A dataset listed in sorted order: ``load(indices)`` yields (bytes, ext, label, shape) in that order."""

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
def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"output {out} is a file: expected a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PrepareError(f"output directory {out} is not empty: pass --overwrite to replace it")


def _finalize(tmp: Path, out: Path) -> None:
    """Swap the finished temporary directory in under the final name."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)  # keep the old data until the new one is in place
    try:
        tmp.rename(out)
    except OSError as err:
        raise PrepareError(f"could not move finished shards into {out}: {err}") from err
    shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_tars(samples: Iterable[Sample], folder: Path, shard_size: int, bar: tqdm) -> dict:
    """Stream samples into folder/shard-*.tar; return what the manifest needs to know of them."""
    seen = {"count": 0, "sizes": set(), "channels": set(), "exts": set()}
    # maxsize is unbounded so a shard boundary depends on the sample count only;
    # mtime/user/group/mode are fixed so the same input gives the same sha256.
    with wds.ShardWriter(str(folder / SHARD_PATTERN), maxcount=shard_size, maxsize=1e18, verbose=0,
                         encoder=False, mtime=0, user="diffusion_pl", group="diffusion_pl") as sink:
        for s in samples:
            if s.shape is None:
                with Image.open(io.BytesIO(s.image)) as im:  # reads the header only
                    seen["sizes"].add(im.size[::-1])
                    seen["channels"].add(1 if im.mode == "L" else 3)
            else:
                seen["sizes"].add(s.shape[:2])
                seen["channels"].add(s.shape[2])
            seen["exts"].add(s.ext)
            sink.write({"__key__": s.key, s.ext: s.image, "cls": str(s.label).encode()})
            seen["count"] += 1
            bar.update()
    return seen


def write_shards(samples: Iterable[Sample], out: str | Path, *, classes: Sequence[str],
                 shard_size: int = 1000, overwrite: bool = False, source: str = "",
                 split: str | None = None, total: int | None = None) -> dict:
    """Write samples as reproducible webdataset tar shards plus manifest.json; return the manifest."""
    out = Path(out)
    if shard_size < 1:
        raise PrepareError(f"shard size {shard_size} is invalid: expected a positive integer")
    _check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Everything goes to a hidden sibling first, so a crash never leaves a partial shard
    # (or a manifest describing one) under the final name.
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with tqdm(total=total, desc=f"prepare {out.name}", unit="img", disable=None) as bar:
            seen = _write_tars(samples, tmp, shard_size, bar)
        count = seen["count"]
        if count == 0:
            raise PrepareError(f"source {source or out} yielded no samples: expected at least one image")
        names = [SHARD_PATTERN % i for i in range((count + shard_size - 1) // shard_size)]
        manifest = {
            "format": FORMAT, "source": source, "split": split, "count": count,
            "image_size": list(seen["sizes"].pop()) if len(seen["sizes"]) == 1 else None,
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
            shard_size: int = 1000, overwrite: bool = False) -> dict:
    """Write ``src`` (its fixed permutation, truncated to max_samples) as shards under ``out``."""
    _check_output(Path(out), overwrite)  # fail before any slow reading
    order = np.random.default_rng(ORDER_SEED).permutation(src.size)
    if max_samples is not None:
        order = order[:max_samples]
    samples = (Sample(f"{j:08d}", *record) for j, record in enumerate(src.load(order.tolist())))
    return write_shards(samples, out, classes=src.classes, shard_size=shard_size, overwrite=overwrite,
                        source=src.name, split=split, total=len(order))


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


def _as_image(data: bytes, ext: str) -> tuple[bytes, str]:
    """JPEG/PNG bytes as-is; any other format decoded and re-encoded losslessly as PNG."""
    kind = IMAGE_EXTS[ext]
    if kind is not None:
        return data, kind
    with Image.open(io.BytesIO(data)) as im:
        return encode_png(np.asarray(im.convert("L" if im.mode in ("L", "1") else "RGB"))), "png"


def _header_name(header: bytes) -> str:
    name = header[:100].rstrip(b"\0").decode()
    prefix = header[345:500].rstrip(b"\0") if header[257:263] == b"ustar\0" else b""  # POSIX ustar only
    return f"{prefix.decode()}/{name}" if prefix else name


def tar_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each regular file in a tar stream: ustar, GNU long names, pax paths.

    Written here because Python's tarfile spends ~100 us of pure Python per member, more than
    decoding a 32x32 JPEG; this reads headers with slicing and works on any forward-only stream.
    """
    long_name = None
    while len(header := f.read(512)) == 512 and header.strip(b"\0"):  # two zero blocks end a tar
        size, kind = int(header[124:136].rstrip(b"\0 ").decode() or "0", 8), header[156:157]
        data = f.read((size + 511) // 512 * 512)
        if len(data) < size:
            raise EOFError(f"truncated tar member after {len(data)} of {size} bytes")
        data = data[:size]
        if kind in (b"L", b"x"):  # GNU long name / pax records "N path=...\n": name of the next member
            paths = [r.split(b"=", 1)[1] for r in data.split(b"\n") if b" path=" in r] if kind == b"x" else [data]
            long_name = paths[0].rstrip(b"\0").decode() if paths else long_name
            continue
        name, long_name = long_name or _header_name(header), None
        if kind in (b"0", b"\0"):
            yield name, data


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

    elif path.is_file():
        names, read = _tar_files(path, split)
    else:
        raise PrepareError(f"image folder {path} does not exist: expected a directory or a .tar/.tar.gz")
    items = _pick(names, split)
    if not items:
        where = f"{path} (split {split!r})" if split else str(path)
        layout = f"<root>/{split}/<class>/<image>" if split else "<root>/<class>/<image>"
        raise PrepareError(f"no images found in {where}: expected the layout {layout}")
    classes = sorted({c for _, c in items})
    index = {c: i for i, c in enumerate(classes)}

    def load(indices: Sequence[int]) -> Iterator[tuple]:
        for i in indices:
            name, cls = items[i]
            yield (*_as_image(read(name), os.path.splitext(name)[1].lower()), index[cls], None)

    return Source(f"folder:{path}" + (f":{split}" if split else ""), classes, len(items), load)


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    common.add_argument("--split", default=None, help="split subfolder (image folders) or train/test (CIFAR)")
    common.add_argument("--max-samples", type=int, default=None, help="keep only this many (for tests)")
    common.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    common.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser = argparse.ArgumentParser(prog="diffusion-pl prepare", description="Write reproducible webdataset "
                                     "tar shards + manifest.json from CIFAR-10 or an image folder.")
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("cifar10", parents=[common], help="CIFAR-10 downloaded through torchvision")
    p.add_argument("--root", default=None, help="download folder (default: <cache>/torchvision)")
    p.set_defaults(source=lambda a: cifar10_torchvision(a.root, a.split or "train"))
    p = sub.add_parser("cifar10-batches", parents=[common], help="a local cifar-10-batches-py folder")
    p.add_argument("path")
    p.set_defaults(source=lambda a: cifar10_batches(a.path, a.split or "train"))
    p = sub.add_parser("folder", parents=[common], help="an image-folder tree or a .tar/.tar.gz of one")
    p.add_argument("path")
    p.set_defaults(source=lambda a: image_folder(a.path, a.split))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``diffusion-pl prepare``; returns a process exit code."""
    args = _parser().parse_args(argv)
    return run_command("prepare", lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    if args.max_samples is not None and args.max_samples < 1:
        raise PrepareError(f"--max-samples {args.max_samples} is invalid: expected a positive integer")
    _check_output(Path(args.out), args.overwrite)  # refuse before reading a large source
    m = prepare(args.source(args), args.out, split=args.split, max_samples=args.max_samples,
                shard_size=args.shard_size, overwrite=args.overwrite)
    print(f"wrote {m['count']} images ({m['num_classes']} classes) in {len(m['shards'])} shards to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
