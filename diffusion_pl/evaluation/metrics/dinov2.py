"""FD_DINOv2 (Stein et al. 2023; EDM2, Karras et al. 2024): the Frechet distance in DINOv2 ViT-L/14 features.

EDM2's detector (NVlabs/edm2 calculate_metrics.py:52-83) loads `dinov2_vitl14` from torch hub
(facebookresearch/dinov2) and feeds it uint8 images (N, 3, H, W) as

    float32 -> bicubic resize to 224 x 224 with antialias (F.interpolate, its default resize_mode 'torch',
    calculate_metrics.py:53,70) -> / 255 -> ImageNet mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225)
    (calculate_metrics.py:75-77) -> the model's normalised class token, 1024 features

and takes the Frechet distance of their mean and covariance, the FID formula (calculate_metrics.py:266-269).
Here the network is timm's `vit_large_patch14_dinov2` built at 224 x 224, loaded from the same weights file
torch hub reads (`dinov2_vitl14_pretrain.pth`, 518 x 518 position embeddings). torch hub's model resamples
its 37 x 37 position embeddings to the 16 x 16 patch grid at every call, bicubic without antialias and with a
scale factor of (16 + 0.1) / 37 (facebookresearch/dinov2 dinov2/models/vision_transformer.py:180-212, offset
0.1 and no antialias from dinov2/hub/backbones.py:27-28); timm's own loader would resample differently
(antialias, exact size), so `hub_state_dict_to_timm` does torch hub's resampling once, at load.

The weights file comes from `--dinov2_weights` / FIDCallback's `dinov2_weights`, else
$DIFFUSION_PL_DINOV2_WEIGHTS, else torch hub's cache (downloaded there once, as torch hub does); without
network loading fails in one line (DINOv2WeightsError) saying what to download.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_pl.utils.errors import UserError
from diffusion_pl.utils.hub import weights_file

__all__ = ["DINOV2_WEIGHTS_ENV", "DINOV2_URL", "DINOV2_PROTOCOL", "DINOv2WeightsError", "DINOv2Features",
           "dinov2_weights_file", "hub_state_dict_to_timm", "load_dinov2"]

DINOV2_WEIGHTS_ENV = "DIFFUSION_PL_DINOV2_WEIGHTS"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"  # torch hub's file
DINOV2_PROTOCOL = ("DINOv2 ViT-L/14 (dinov2_vitl14_pretrain.pth) class token, 1024 features, as EDM2's FD_DINOv2: "
                   "uint8 -> bicubic resize to 224x224 with antialias -> /255 -> ImageNet mean/std")
_IMAGE_SIZE = 224
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_POS_OFFSET = 0.1  # torch hub's interpolate_offset


class DINOv2WeightsError(UserError, RuntimeError):
    """The DINOv2 weights are missing or unreadable; the message says how to provide them."""


def _hub_weights_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / DINOV2_URL.rsplit("/", 1)[-1]


def _how_to_provide(reason: str) -> str:
    return (f"the FD_DINOv2 feature extractor (DINOv2 ViT-L/14) cannot be loaded: {reason}; download {DINOV2_URL} "
            f"on a machine with internet and pass it with --dinov2_weights PATH (callback: dinov2_weights: PATH) "
            f"or {DINOV2_WEIGHTS_ENV}=PATH, or copy it to {_hub_weights_file()}")


def dinov2_weights_file(path: str | Path | None = None, download_timeout: float = 10.0) -> Path:
    """The weights file: `path`, else $DIFFUSION_PL_DINOV2_WEIGHTS, else torch hub's cache (downloaded once)."""
    return weights_file(path, DINOV2_WEIGHTS_ENV, _hub_weights_file(), DINOV2_URL, download_timeout,
                        lambda reason: DINOv2WeightsError(_how_to_provide(reason)))


def hub_state_dict_to_timm(state_dict: dict[str, Tensor], net: nn.Module) -> dict[str, Tensor]:
    """A torch hub DINOv2 state_dict (518 x 518 position embeddings) as `net`'s (timm, built at 224 x 224): the
    position embeddings resampled as torch hub's model does at every call, the rest renamed by timm."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state_dict = dict(state_dict)
    pos = state_dict["pos_embed"].float()  # (1, 1 + M * M, D)
    m, grid = int(round((pos.shape[1] - 1) ** 0.5)), net.patch_embed.grid_size
    if (m, m) != tuple(grid):
        patches = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        scale = ((grid[0] + _POS_OFFSET) / m, (grid[1] + _POS_OFFSET) / m)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
        if tuple(patches.shape[-2:]) != tuple(grid):
            raise ValueError(f"position embeddings resampled to {tuple(patches.shape[-2:])}: expected {tuple(grid)}")
        pos = torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], 1)
        state_dict["pos_embed"] = pos.to(state_dict["pos_embed"].dtype)
    # timm drops torch hub's mask_token (training only) and keeps the other names
    return checkpoint_filter_fn(state_dict, net)


class DINOv2Features(nn.Module):
    """EDM2's FD_DINOv2 detector: uint8 (B, 3, H, W) -> (B, 1024) DINOv2 ViT-L/14 class-token features.

    Args:
        weights: torch hub's `dinov2_vitl14_pretrain.pth` (or a state_dict of that layout); None keeps timm's
            random initialisation (tests, timing: the same architecture and FLOPs, meaningless values).
        arch: the timm model (`vit_large_patch14_dinov2` is EDM2's; smaller ones for tests).
    """

    def __init__(self, weights: str | Path | None = None, arch: str = "vit_large_patch14_dinov2") -> None:
        super().__init__()
        self.arch = arch
        self.net = timm.create_model(arch, pretrained=False, img_size=_IMAGE_SIZE, num_classes=0)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)  # a tensor dict, never code
            self.net.load_state_dict(hub_state_dict_to_timm(state, self.net))
        self.num_features = self.net.num_features
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)
        self.eval()

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> the network's float input (B, 3, 224, 224), as EDM2's detector."""
        x = F.interpolate(images.float(), size=(_IMAGE_SIZE, _IMAGE_SIZE), mode="bicubic", antialias=True)
        return (x / 255 - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.preprocess(images))

    @cached_property
    def fingerprint(self) -> str:
        """The reference-statistics cache key: the protocol, the architecture and a sha256 of the weights."""
        h = hashlib.sha256(f"{DINOV2_PROTOCOL}|{self.arch}".encode())
        for name, tensor in sorted(self.net.state_dict().items()):
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return f"{__name__}.DINOv2Features:{h.hexdigest()}"


def load_dinov2(path: str | Path | None = None, device: str | torch.device | None = None,
                download_timeout: float = 10.0) -> DINOv2Features:
    """The FD_DINOv2 extractor, or a one-line DINOv2WeightsError saying how to provide the weights (preflight)."""
    file = dinov2_weights_file(path, download_timeout)
    try:
        extractor = DINOv2Features(file)
    except Exception as err:  # unpickling / key or shape mismatch: not torch hub's DINOv2 ViT-L/14 file
        raise DINOv2WeightsError(_how_to_provide(
            f"{file} is not torch hub's DINOv2 ViT-L/14 state_dict ({type(err).__name__})")) from err
    return extractor.to(device) if device is not None else extractor
