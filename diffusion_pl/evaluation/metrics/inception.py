"""The FID feature extractor: InceptionV3 of the TF FID graph (torch-fidelity's weights), found or downloaded.

The weights file comes from --inception_weights / the callback's `inception_weights`, else
$DIFFUSION_PL_INCEPTION_WEIGHTS, else torch hub's cache (downloaded there once). Without network
the download probe gives up within its timeout, and loading fails in one line
(InceptionWeightsError) that says how to provide the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

from diffusion_pl.utils.errors import UserError
from diffusion_pl.utils.hub import weights_file

__all__ = ["WEIGHTS_ENV", "INCEPTION_URL", "InceptionWeightsError", "InceptionFeatures", "inception_weights_file",
           "load_inception", "random_inception_weights"]

WEIGHTS_ENV = "DIFFUSION_PL_INCEPTION_WEIGHTS"
INCEPTION_URL = tf_inception.URL_INCEPTION_V3


class InceptionWeightsError(UserError, RuntimeError):
    """The InceptionV3 weights are missing or unreadable; the message says how to provide them."""


def _hub_weights_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[-1]


def _how_to_provide(reason: str) -> str:
    return (f"the FID feature extractor (InceptionV3) cannot be loaded: {reason}; download {INCEPTION_URL} "
            f"on a machine with internet and pass it with --inception_weights PATH (callback: "
            f"inception_weights: PATH) or {WEIGHTS_ENV}=PATH, or copy it to {_hub_weights_file()}")


def inception_weights_file(path: str | None = None, download_timeout: float = 10.0) -> Path:
    """The weights file: `path`, else $DIFFUSION_PL_INCEPTION_WEIGHTS, else torch hub's cache (downloaded once)."""
    return weights_file(path, WEIGHTS_ENV, _hub_weights_file(), INCEPTION_URL, download_timeout,
                        lambda reason: InceptionWeightsError(_how_to_provide(reason)))


class InceptionFeatures(nn.Module):
    """InceptionV3 of the TF FID graph via torch-fidelity: uint8 (B,3,H,W) -> (pool3 (B,2048), logits (B,1008))."""

    num_features = 2048

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        # torch-fidelity resizes with TF1's bilinear (no antialias), as the published FID numbers did
        self.net = tf_inception.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
        # channels_last convolutions: 1.44x the images/s on one CPU thread (5.50 vs 3.83 at batch 32), with
        # features equal to float32 rounding (relative difference 2e-7); the fingerprint is unchanged
        self.net.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = self.net(x)  # (B, 2048), (B, 1008)
        return features, logits


def load_inception(path: str | None = None, device: str | torch.device | None = None,
                   download_timeout: float = 10.0) -> InceptionFeatures:
    """The FID extractor, or a one-line InceptionWeightsError saying how to provide the weights (preflight)."""
    file = inception_weights_file(path, download_timeout)
    try:
        extractor = InceptionFeatures(file)
    except Exception as err:  # unpickling / key mismatch: the file is not what torch-fidelity expects
        raise InceptionWeightsError(_how_to_provide(
            f"{file} is not a torch-fidelity InceptionV3 state_dict ({type(err).__name__})")) from err
    return extractor.to(device) if device is not None else extractor


class _Unloaded(tf_inception.FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 whose constructor keeps its random initialisation instead of loading weights."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return None


def random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised InceptionV3 state_dict in torch-fidelity's format (tests, timing)."""
    # torch-fidelity's constructor always reads a weights file: give it an empty one, which _Unloaded skips
    path = Path(path)
    torch.save({}, path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    torch.save(net.state_dict(), path)
    return path
