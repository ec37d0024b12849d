"""The Hugging Face hub as the framework reaches it: its cache folder, offline mode, a bounded reachability check;
and weights files fetched once into torch hub's cache (`download_once`, `weights_file`: Inception, DINOv2, DiT).

The autoencoder (VAE weights) and `diffusion-pl import` (model folders) both look in the cache first,
download only when the hub answers within a timeout, and otherwise fail in one line that says what to
download and where to put it (as the Inception weights do, diffusion_pl/evaluation/metrics/inception.py).
"""

from __future__ import annotations

import os
import threading
import urllib.request
from pathlib import Path
from typing import Callable

from diffusion_pl.utils.errors import one_line

__all__ = ["HUB_URL", "hub_cache", "probe", "offline", "unreachable", "looks_like_path", "download_once", "weights_file"]

HUB_URL = "https://huggingface.co"


def hub_cache() -> str:
    """The Hugging Face cache folder ($HF_HUB_CACHE, default ~/.cache/huggingface/hub)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
        return str(HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


def probe(url: str, timeout: float) -> str | None:
    """None if `url` answers within `timeout` seconds, else the reason; never blocks longer (DNS included)."""
    result: list[str | None] = ["no answer within %.0f s" % timeout]

    def run() -> None:
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
            result[0] = None
        except Exception as err:  # any network failure means the same: nothing can be downloaded
            result[0] = one_line(err, 120)

    # a daemon thread bounds the wait even where getaddrinfo ignores socket timeouts
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return result[0]


def offline() -> bool:
    """HF_HUB_OFFLINE is set: never try the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def unreachable(timeout: float) -> str | None:
    """Why the hub cannot be reached now (offline mode, no answer within `timeout` s, DNS included), or None."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    return probe(HUB_URL, timeout)


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id `owner/name`: absolute, relative with ./ ../ ~, or not one '/'."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or os.sep != "/" and os.sep in name


def download_once(url: str, file: Path, timeout: float) -> str | None:
    """Download `url` to `file` (torch hub's downloader, a progress bar) after checking within `timeout` seconds that
    the server answers; None when done, else the one-line reason it failed (no network, a broken download)."""
    import torch

    reason = probe(url, timeout)
    if reason is None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(file), progress=True)
            return None
        except Exception as err:  # a failed download mid-way is as unusable as none
            reason = one_line(err, 120)
    return reason


def weights_file(path: str | Path | None, env: str, cached: Path, url: str, timeout: float,
                 error: Callable[[str], Exception]) -> Path:
    """A weights file: `path`, else the environment variable `env`, else `cached` (downloaded there once from `url`).
    Raises `error(reason)` (whose message says how to provide the file) when none of them gives one."""
    path = path or os.environ.get(env) or None
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise error(f"weights file {file} does not exist")
        return file
    if cached.is_file():
        return cached
    reason = download_once(url, cached, timeout)
    if reason is None:
        return cached
    raise error(f"no weights file given and the download failed ({reason})")
