"""Where the shards are and what they hold: manifest / shard-list resolution and tar sample reading.

``resolve_shards`` turns a ``shards`` string (a .tar, a folder with manifest.json, a manifest,
a brace pattern, an http(s):// or pipe: URL) into shard URLs and the manifest found beside them;
``tar_samples`` reads one shard's samples, passing over the first ones by their headers alone.
Per-shard sample counts come from the manifest (``shards[i].count``); without one, each shard
is counted once by walking its tar headers (``shard_counts``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from glob import glob
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import webdataset as wds

from diffusion_pl.data.tario import can_seek, read_member, skip_member, tar_entries
from diffusion_pl.data.writer import MANIFEST
from diffusion_pl.utils.errors import DataError, MissingFileError, UserValueError

log = logging.getLogger(__name__)
SHARDS_HELP = ("expected a shard .tar, a directory with manifest.json, a manifest .json, a brace pattern "
               "like dir/shard-{000000..000009}.tar, an http(s):// or pipe: URL, or builtin:shapes[?size=N]")


def _is_url(spec: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", spec) is not None  # 2+ letters: not a drive "C:"


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
