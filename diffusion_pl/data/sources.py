"""Sources for prepare: CIFAR-10 (torchvision download or local python batches) and image folders / tars.

Each is a `Source` listed in sorted order whose ``load`` yields the encoded bytes of each sample;
an image file that cannot be read (zero bytes, not an image, truncated) comes out as an
`Unreadable`, which the writer refuses or, with --skip_bad, leaves out.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import pickle
import posixpath
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from diffusion_pl.data.png import encode_png
from diffusion_pl.data.tario import tar_members
from diffusion_pl.data.writer import PrepareError, Source, Unreadable, _reason
from diffusion_pl.utils.errors import one_line
from diffusion_pl.utils.paths import cache_dir

# Extensions taken from image folders; JPEG and PNG bytes are stored as-is, others re-encoded to PNG.
IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".bmp": None, ".gif": None,
              ".ppm": None, ".tif": None, ".tiff": None, ".webp": None}


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
        reason = one_line(err, 160)
        raise PrepareError(
            f"could not download CIFAR-10 through torchvision into {root} ({reason}): on a machine without "
            "internet use the local options `prepare cifar10-batches DIR` or `prepare folder PATH`") from err
    return cifar10_batches(root / "cifar-10-batches-py", split)


def _pick(paths: Iterable[str], split: str | None) -> list[tuple[str, str | None]]:
    """(path, class) for image files laid out as [.../<split>]/<class>/<image>, sorted by path; class None for an
    image directly in the root (or in the split folder): a flat folder of unlabelled images."""
    items = []
    for path in paths:
        parts = path.split("/")
        ext = os.path.splitext(path)[1].lower()
        if ext not in IMAGE_EXTS or any(p.startswith((".", "__MACOSX")) for p in parts):
            continue
        if split is None:
            items.append((path, parts[-2] if len(parts) >= 2 else None))
        elif len(parts) >= 3 and parts[-3] == split:
            items.append((path, parts[-2]))
        elif len(parts) >= 2 and parts[-2] == split:
            items.append((path, None))
    return sorted(items, key=lambda item: item[0])


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


UNSAFE_SHOWN = 3  # unsafe tar member names kept in the manifest (and shown by prepare)


def member_path(name: str) -> str | None:
    """A tar member's path inside the archive, normalized (`./cat/x.png` and `cat//x.png` are `cat/x.png`); None
    when it leads outside the archive: absolute, or climbing out with `..` (what tarfile's "data" filter refuses)."""
    if name.startswith("/"):
        return None
    norm = posixpath.normpath(name)
    return None if norm == ".." or norm.startswith("../") else norm


def _safe_members(names: Iterable[str], unsafe: list[str]) -> dict[str, str]:
    """{normalized path: member name} of the members that stay inside the archive; the others go to `unsafe`."""
    kept = {}
    for name in names:
        norm = member_path(name)
        if norm is None:
            unsafe.append(name)
        else:
            kept.setdefault(norm, name)
    return kept


def _tar_files(path: Path, split: str | None, unsafe: list[str]) -> tuple[list[str], Callable[[str], bytes]]:
    """Member paths of a tar archive (normalized) and a function reading one member's bytes; the names of members
    whose paths lead outside the archive go to `unsafe` and are not read."""
    try:
        tf = tarfile.open(path, "r:")  # uncompressed: seekable, members are read lazily
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
        paths = _safe_members(members, unsafe)
        return list(paths), lambda name: tf.extractfile(members[paths[name]]).read()
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
            blobs = {}
            for name, data in tar_members(f):
                norm = member_path(name)
                if norm is None:
                    unsafe.append(name)
                elif _pick([norm], split):
                    blobs.setdefault(norm, data)
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise PrepareError(f"{path} is not a readable tar archive ({err}): "
                           "expected an image folder .tar/.tar.gz") from err
    return list(blobs), blobs.__getitem__


def image_folder(path: str | Path, split: str | None = None) -> Source:
    """An image-folder tree, or a .tar/.tar.gz of one: class = parent folder, classes sorted; or a flat folder of
    images (no class folders): unlabelled data, for unconditional models (the manifest lists no classes)."""
    path, unsafe = Path(path), []
    if path.is_dir():
        names = [Path(d, f).relative_to(path).as_posix() for d, _, fs in os.walk(path) for f in fs]

        def read(name: str) -> bytes:
            return (path / name).read_bytes()

        def origin(name: str) -> str:
            return str(path / name)

    elif path.is_file():
        names, read = _tar_files(path, split, unsafe)

        def origin(name: str) -> str:
            return f"{name} in {path}"

    else:
        raise PrepareError(f"image folder {path} does not exist: expected a directory or a .tar/.tar.gz")
    items = _pick(names, split)
    where = f"{path} (split {split!r})" if split else str(path)
    root = f"<root>/{split}" if split else "<root>"
    if not items:
        raise PrepareError(f"no images found in {where}: expected the layout {root}/<class>/<image> (labelled) or "
                           f"{root}/<image> (unlabelled)")
    flat = {c is None for _, c in items}
    if len(flat) > 1:
        loose = next(name for name, c in items if c is None)
        raise PrepareError(f"{where} mixes images in class folders with images outside them ({loose}): expected one "
                           f"layout, {root}/<class>/<image> (labelled) or {root}/<image> (unlabelled)")
    classes = [] if True in flat else sorted({c for _, c in items})
    index = {c: i for i, c in enumerate(classes)}
    index[None] = 0  # unlabelled images: label 0, which no conditional recipe sees (the manifest has no classes)

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

    meta = {"unsafe_tar_members": {"count": len(unsafe), "names": unsafe[:UNSAFE_SHOWN]}} if unsafe else {}
    return Source(f"folder:{path}" + (f":{split}" if split else ""), classes, len(items), load, meta)
