"""The Hugging Face hub as the framework reaches it: its cache folder, offline mode, a bounded reachability check.

The autoencoder (VAE weights) and `diffusion-pl import` (model folders) both look in the cache first,
download only when the hub answers within a timeout, and otherwise fail in one line that says what to
download and where to put it (as the Inception weights do, diffusion_pl/evaluation/metrics/inception.py).
"""

from __future__ import annotations

import os

__all__ = ["HUB_URL", "hub_cache", "offline", "unreachable", "looks_like_path"]

HUB_URL = "https://huggingface.co"


def hub_cache() -> str:
    """The Hugging Face cache folder ($HF_HUB_CACHE, default ~/.cache/huggingface/hub)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
        return str(HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


def offline() -> bool:
    """HF_HUB_OFFLINE is set: never try the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def unreachable(timeout: float) -> str | None:
    """Why the hub cannot be reached now (offline mode, no answer within `timeout` s, DNS included), or None."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    from diffusion_pl.evaluation.metrics.inception import _probe

    return _probe(HUB_URL, timeout)


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id `owner/name`: absolute, relative with ./ ../ ~, or not one '/'."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or os.sep != "/" and os.sep in name
