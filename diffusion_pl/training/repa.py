"""REPA, representation alignment (Yu et al. 2024, "Representation Alignment for Generation: Training Diffusion
Transformers Is Easier Than You Think"): an extra loss that aligns a network block's tokens with a frozen
image encoder's patch features of the clean image.

    L = L_denoise + weight * L_align,   L_align = -E_batch mean_tokens cos(h_phi(tokens_n), y_n)

- tokens: the output of one block of the network (`block`, a submodule path such as "blocks.7", the 8th DiT
  block; REPA aligns depth 8 of SiT-XL/2, train.py `--encoder-depth` default 8), captured by a forward hook
  for the training forward pass only, so networks stay unchanged. A transformer block's (B, T, D) tokens
  lie on a square grid; a U-Net block's (B, C, H, W) feature map is read as H x W tokens of width C.
- h_phi: the projector, a 3-layer MLP with SiLU, hidden width `projector_dim` (REPA: 2048) and the encoder's
  width out (REPA's `build_mlp`, models/sit.py:16-23). It trains with the network (in the optimizer and the
  checkpoint) but has no EMA copy: REPA keeps it inside the model, so its train.py:81-91 averages it too,
  but nothing ever reads the averaged projector (sampling uses the network's output only).
- y: `ImageEncoder`, a frozen timm vision transformer (default DINOv2 ViT-B/14, REPA's `dinov2-vit-b`),
  run under no_grad and the step's autocast on the clean pixel image, resized so that its patch grid is
  the token grid (REPA's 224 = 16 x 14 for SiT/2 on 256 px images, 448 at 512 px: preprocess_raw_image,
  train.py:39-60) and normalised with the encoder's mean and std; its normalised patch tokens
  (DINOv2's `x_norm_patchtokens`, train.py:303). It is a plain object, not an nn.Module: never in the
  optimizer, the EMA or the state_dict; the checkpoint's config rebuilds it.
- L_align: negative cosine similarity per token, averaged over tokens and the batch (loss.py:80-88).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_pl.utils.errors import UserError, UserValueError, one_line
from diffusion_pl.utils.hub import hub_cache
from diffusion_pl.utils.recorded import RecordsInit

__all__ = ["ImageEncoder", "RepresentationAlignment", "EncoderWeightsError", "alignment_loss", "projector_mlp"]

DINOV2_B14 = "vit_base_patch14_dinov2.lvd142m"  # timm's DINOv2 ViT-B/14 (hub: timm/vit_base_patch14_dinov2.lvd142m)


class EncoderWeightsError(UserError):
    """The encoder's pretrained weights are neither in the Hugging Face cache nor downloadable."""


def alignment_loss(projected: Tensor, features: Tensor) -> Tensor:
    """Per-sample REPA loss (B,): minus the cosine similarity of each token's projection (B, T, E) and the
    encoder's feature (B, T, E) at that token, averaged over tokens (REPA loss.py:83-88), in float32."""
    projected = F.normalize(projected.float(), dim=-1)
    features = F.normalize(features.float(), dim=-1)
    return -(projected * features).sum(dim=-1).mean(dim=1)


def projector_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """REPA's projector: Linear, SiLU, Linear, SiLU, Linear (models/sit.py:16-23)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
                         nn.Linear(hidden_dim, out_dim))


class ImageEncoder(RecordsInit):
    """A frozen timm vision transformer whose patch tokens REPA aligns to (any timm ViT, by name).

    Args:
        name: the timm model name (default DINOv2 ViT-B/14, `vit_base_patch14_dinov2.lvd142m`).
        pretrained: load timm's pretrained weights (from the Hugging Face cache, downloaded once); False builds
            the architecture with seeded random weights (tests, CPU recipes).
        image_size: the side the clean image is resized to; None: the token grid x the encoder's patch size,
            so that one encoder patch lies under each token (224 for DINOv2/14 on a 16 x 16 grid). Another
            size gives another grid, whose features are then resized (bilinear) to the token grid.
        seed: seed of the random weights when pretrained is False.
        model_args: further timm.create_model keywords (e.g. {"depth": 2} for a small test encoder).
    """

    def __init__(self, name: str = DINOV2_B14, pretrained: bool = True, image_size: int | None = None, seed: int = 0,
                 model_args: dict[str, Any] | None = None) -> None:
        if image_size is not None and image_size < 1:
            raise UserValueError(f"ImageEncoder image_size is {image_size}: expected a positive side or None")
        self.name, self.pretrained, self.image_size, self.seed = name, pretrained, image_size, seed
        self.model_args = dict(model_args or {})
        with torch.device("meta"):  # the architecture's widths and patch size, no weights
            shape = self._create(pretrained=False)
        self.dim, self.num_prefix_tokens = int(shape.embed_dim), int(shape.num_prefix_tokens)
        self.patch_size = int(shape.patch_embed.patch_size[0])
        config = shape.pretrained_cfg
        self.mean = tuple(config.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(config.get("std", (0.229, 0.224, 0.225)))
        self.input_size: tuple[int, int] | None = None  # set by `configure`, from the token grid
        self._model: nn.Module | None = None

    def _create(self, pretrained: bool, **extra: Any) -> nn.Module:
        import timm  # the network module imports it already; here only when an encoder is built

        try:
            return timm.create_model(self.name, pretrained=pretrained, num_classes=0, **self.model_args, **extra)
        except RuntimeError as err:  # timm: "Unknown model (...)"
            if "Unknown model" not in str(err):
                raise
            raise UserValueError(f"ImageEncoder name {self.name!r} is not a timm model: expected a timm vision "
                                 f"transformer name such as {DINOV2_B14!r}") from err

    def configure(self, grid: tuple[int, int]) -> None:
        """Fix the encoder's input size for a token grid (before the first `features`)."""
        side = self.image_size
        self.input_size = (grid[0] * self.patch_size, grid[1] * self.patch_size) if side is None else (side, side)

    def load(self) -> nn.Module:
        """The frozen timm model, built (and its weights loaded) on first use."""
        if self._model is not None:
            return self._model
        if self.input_size is None:
            raise RuntimeError("ImageEncoder.configure(grid) must run before the encoder is used")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            try:
                model = self._create(self.pretrained, img_size=self.input_size)
            except (OSError, ValueError) as err:  # huggingface_hub's cache / connection errors are OSErrors
                raise EncoderWeightsError(
                    f"the REPA encoder's weights (timm {self.name}) are not in the Hugging Face cache {hub_cache()} "
                    f"and could not be downloaded ({one_line(err, 100)}): expected them downloaded once, e.g. "
                    f"python -c \"import timm; timm.create_model('{self.name}', pretrained=True)\" "
                    "(hub id timm/<name>), or pretrained: false for random weights") from err
        self._model = model.requires_grad_(False).eval()
        return self._model

    def preprocess(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> the encoder's input: [0, 1], normalised by its mean and std, resized (bicubic) to
        its input size (REPA's preprocess_raw_image for DINOv2, train.py:48-51)."""
        x = (images.float() + 1.0) / 2.0
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic")
        return x

    @torch.no_grad()
    def features(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """The encoder's patch tokens (B, gh * gw, dim), float32, for images (B, 3, H, W) in [-1, 1]; resized
        (bilinear) to `grid` when the encoder's own grid differs."""
        model = self.load()
        if next(model.parameters()).device != images.device:
            model.to(images.device)
        x = self.preprocess(images)
        tokens = model.forward_features(x)[:, self.num_prefix_tokens:].float()  # (B, N, dim)
        own = (self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size)
        if own != tuple(grid):
            b, _, dim = tokens.shape
            fmap = tokens.transpose(1, 2).reshape(b, dim, *own)
            fmap = F.interpolate(fmap, size=tuple(grid), mode="bilinear", antialias=True)
            tokens = fmap.flatten(2).transpose(1, 2)
        return tokens

    def __repr__(self) -> str:
        return (f"ImageEncoder({self.name!r}, pretrained={self.pretrained}, image_size={self.image_size}, "
                f"dim={self.dim})")


class _Probe(Exception):
    """Stops the probing forward pass at the aligned block, carrying its output."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output


def _as_tokens(output: Any, block: str) -> tuple[Tensor, tuple[int, int]]:
    """A block's output as tokens (B, T, D) and their grid (gh, gw)."""
    if isinstance(output, Tensor) and output.ndim == 3:
        side = math.isqrt(output.shape[1])
        if side * side != output.shape[1]:
            raise UserValueError(f"repa block {block!r} gives {output.shape[1]} tokens: expected a square grid")
        return output, (side, side)
    if isinstance(output, Tensor) and output.ndim == 4:  # a feature map: one token per position
        return output.flatten(2).transpose(1, 2), (output.shape[2], output.shape[3])
    shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
    raise UserValueError(f"repa block {block!r} gives {shape}: expected tokens (B, T, D) or a feature map "
                         "(B, C, H, W)")


class RepresentationAlignment(RecordsInit, nn.Module):
    """REPA's alignment loss and projector, for `DiffusionModule(repa=...)` (see the module docstring).

    Args:
        encoder: the frozen `ImageEncoder` (default: DINOv2 ViT-B/14, pretrained).
        block: path of the network submodule whose output is aligned ("blocks.7": the 8th DiT block, REPA's
            depth 8 for SiT-XL/2; a U-Net block such as "enc.16x16_block0").
        weight: lambda, the alignment loss's weight (REPA: 0.5, train.py `--proj-coeff`).
        projector_dim: hidden width of the projector MLP (REPA: 2048, models/sit.py `projector_dim`).
    """

    def __init__(self, encoder: ImageEncoder | None = None, block: str = "blocks.7", weight: float = 0.5,
                 projector_dim: int = 2048) -> None:
        super().__init__()
        if not weight > 0:
            raise UserValueError(f"repa weight is {weight}: expected a positive number (REPA: 0.5)")
        if projector_dim < 1:
            raise UserValueError(f"repa projector_dim is {projector_dim}: expected a positive width (REPA: 2048)")
        self.encoder = encoder if encoder is not None else ImageEncoder()
        self.block, self.weight, self.projector_dim = block, weight, projector_dim
        self.projector: nn.Module | None = None  # built by `bind`, when the block's width is known
        self.grid: tuple[int, int] | None = None

    def _block(self, net: nn.Module) -> nn.Module:
        try:
            return net.get_submodule(self.block)
        except AttributeError as err:
            blocks = [n for n, _ in net.named_children()]
            raise UserValueError(f"repa block {self.block!r} is not a submodule of {type(net).__name__}: expected a "
                                 f"path such as 'blocks.7' under its children {blocks}") from err

    def bind(self, net: nn.Module) -> None:
        """Build the projector for `net`: one forward pass of a single zero input, stopped at the block, gives
        its width and token grid."""
        def stop(module: nn.Module, args: Any, output: Any) -> None:
            raise _Probe(output)

        block = self._block(net)
        param = next(net.parameters())
        x = torch.zeros(1, net.in_channels, net.img_resolution, net.img_resolution, device=param.device,
                        dtype=param.dtype)
        handle = block.register_forward_hook(stop)
        try:
            with torch.no_grad():
                net(x, torch.zeros(1, device=param.device, dtype=param.dtype), None)
            raise UserValueError(f"repa block {self.block!r} did not run in {type(net).__name__}'s forward pass: "
                                 "expected a block of its forward path")
        except _Probe as probe:
            tokens, self.grid = _as_tokens(probe.output, self.block)
        finally:
            handle.remove()
        self.encoder.configure(self.grid)
        self.projector = projector_mlp(tokens.shape[-1], self.projector_dim, self.encoder.dim)

    @contextlib.contextmanager
    def capture(self, net: nn.Module) -> Iterator[list[Tensor]]:
        """Within the block, a list that receives the block's output of the first forward pass of `net`."""
        captured: list[Tensor] = []

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            if not captured:
                captured.append(output)

        handle = self._block(net).register_forward_hook(keep)
        try:
            yield captured
        finally:
            handle.remove()

    def loss(self, captured: list[Tensor], images: Tensor) -> Tensor:
        """The alignment loss (a scalar) of the captured block output against the encoder's features of
        `images` (B, 3, H, W) in [-1, 1], the clean images the batch's data came from."""
        if not captured or self.projector is None:
            raise RuntimeError("RepresentationAlignment.loss needs bind(net) and a forward pass under capture(net)")
        tokens, grid = _as_tokens(captured[0], self.block)
        features = self.encoder.features(images, grid)  # (B, T, E), no grad
        return alignment_loss(self.projector(tokens), features).mean()

    def extra_repr(self) -> str:
        return f"block={self.block!r}, weight={self.weight}, encoder={self.encoder!r}"
