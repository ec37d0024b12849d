"""Latent shards: `diffusion-pl prepare ... --encode VAE` stores autoencoder posteriors in place of images.

A latent shard is an image shard whose image member is replaced by the frozen autoencoder's raw
posterior (diffusion_pl.codecs.autoencoder; scale and shift are applied at training time, not here):

    {key}.latent.npy        float16 (2, C, h, w): [mean, std] of the posterior of the image, stacked
    {key}.latent_flip.npy   the same for the horizontally flipped image (absent with --no_flips)
    {key}.cls               class index as decimal text, as in image shards
    {key}.png / .jpg        with --keep_images: the encoded image itself (the centre crop with --center_crop),
                            its bytes as an image shard stores them, for losses that need the pixels (REPA)

Both orientations are encoded because flipping a latent tensor is not the latent of the flipped image;
the stream's random flip picks ``latent_flip.npy`` (DiT's extract_features-style pre-extracted latents
lose the flip otherwise), and flips the kept image with it. Keeping the image costs its bytes (a 256x256
RGB image is 196 KB before PNG compression, the float16 posteriors of both orientations 32 KB) and saves
a VAE decode per training step where a loss needs the pixels. REPA keeps its images the same way: the
256x256 centre crops beside their SD-VAE latents, both loaded per index (sihyun-yu/REPA
preprocessing/README.md, dataset.py `CustomDataset.__getitem__`). Storing the posterior's mean and std
rather than one sample lets training draw a fresh posterior sample every step (DiT's train.py:203
encodes with ``latent_dist.sample()``).

The manifest is the image manifest (``image_size`` and ``channels`` are those of the encoded images)
plus ``"autoencoder": Autoencoder.spec()`` (source, config / weights hashes, scale, shift, latent
channels, downsampling) and ``"latent"``: {"shape": [C, h, w], "dtype": "float16", "stats": ["mean",
"std"], "flip": true | false, "members": [...], "images": true | false}.

Everything else is the writer's (diffusion_pl.data.writer): the fixed order, the checks, ``--skip_bad``,
the atomic output folder, per-shard sha256 and the ``--overwrite`` rules. Encoding is deterministic:
the same input, autoencoder, device and batch size give byte-identical shards (npy bytes of fixed
layout, tar metadata fixed, cuDNN's autotuner off and its deterministic kernels on while encoding).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from diffusion_pl.data.pixels import to_signed_unit
from diffusion_pl.data.writer import PrepareError, Sample
from diffusion_pl.utils.errors import UserValueError

__all__ = ["FLIP_MEMBER", "LATENT_MEMBER", "LatentEncoder", "decode_latent", "latent_meta", "load_autoencoder",
           "npy_bytes"]
LATENT_MEMBER, FLIP_MEMBER = "latent.npy", "latent_flip.npy"
LATENT_DTYPE = "float16"


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of an array (format 1.0, C order, no pickle): the same array gives the same bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def decode_latent(data: bytes, shape: tuple[int, int, int]) -> torch.Tensor:
    """A ``{key}.latent*.npy`` member as float32 (2 C, h, w): the posterior mean's C channels, then the std's.

    Raises ValueError when the bytes are no npy array of shape (2, C, h, w) with finite values and std >= 0
    (the stream then skips the sample and counts it, as it does an undecodable image).
    """
    array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if array.shape != (2, *shape):
        raise ValueError(f"latent of shape {array.shape}: expected {(2, *shape)} (mean and std) as the manifest says")
    out = torch.from_numpy(array.astype(np.float32)).reshape(2 * shape[0], *shape[1:])
    if not torch.isfinite(out).all() or (out[shape[0]:] < 0).any():
        raise ValueError("latent holds non-finite values or a negative std")
    return out


def load_autoencoder(spec: str):
    """The `Autoencoder` that ``--encode SPEC`` names, its weights loaded (a missing VAE is refused before any
    image is read).

    SPEC is a hub id (``stabilityai/sd-vae-ft-ema``) or a local diffusers folder, or the Autoencoder's
    constructor arguments as a JSON object, inline or in a .json file: ``{"pretrained": "...",
    "subfolder": "vae"}``, or ``{"config": {...AutoencoderKL arguments...}, "seed": 0}`` for random weights.
    """
    from diffusion_pl.codecs.autoencoder import Autoencoder

    text = spec.strip()
    if text.endswith(".json") and Path(text).is_file():
        text = Path(text).read_text()
    if not text.startswith("{"):
        return Autoencoder(pretrained=spec).load()
    try:
        args = json.loads(text)
    except ValueError as err:
        raise PrepareError(f"--encode {spec[:80]!r} is not valid JSON ({err}): expected a hub id, a local folder, "
                           "or a JSON object of Autoencoder arguments") from None
    if not isinstance(args, dict):
        raise PrepareError(f"--encode {spec[:80]!r} is not a JSON object: expected Autoencoder arguments")
    try:
        autoencoder = Autoencoder(**args)
    except TypeError as err:  # an unknown argument name
        raise PrepareError(f"--encode arguments are invalid ({err}): expected the arguments of "
                           "diffusion_pl.codecs.autoencoder.Autoencoder (pretrained, subfolder, config, seed, dtype, ...)")
    return autoencoder.load()


@contextlib.contextmanager
def _deterministic_kernels(device: torch.device) -> Iterator[None]:
    """cuDNN without its autotuner and with deterministic algorithms, for as long as the block runs."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before


class LatentEncoder:
    """The ``records`` and ``meta`` of `prepare` / `write_shards` that store latents (see the module doc).

    Args:
        autoencoder: a diffusion_pl.codecs.autoencoder.Autoencoder (its ``encode`` gives the raw (mean, std)).
        batch_size: images encoded at once.
        device: where the autoencoder runs (default: CUDA when available, else the CPU).
        flips: also encode the horizontally flipped images (``latent_flip.npy``).
        images: also store each image itself (``png`` / ``jpg``, the bytes as given) beside its latents.
    """

    def __init__(self, autoencoder: Any, batch_size: int = 64, device: str | torch.device | None = None,
                 flips: bool = True, images: bool = False) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise PrepareError(f"--batch_size {batch_size!r} is invalid: expected a positive integer")
        try:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available")
        except RuntimeError as err:
            raise PrepareError(f"--accelerator {device!r} is invalid ({err}): expected cpu, cuda or cuda:N "
                               "on a machine that has it") from None
        self.autoencoder, self.batch_size, self.flips, self.images = autoencoder, batch_size, flips, images
        self.latent_shape: tuple[int, int, int] | None = None

    def members(self) -> list[str]:
        return [LATENT_MEMBER, FLIP_MEMBER] if self.flips else [LATENT_MEMBER]

    def records(self, samples: Iterator[Sample]) -> Iterator[dict]:
        """Tar records {__key__, latent.npy[, latent_flip.npy][, png | jpg], cls} of the samples, encoded batch by
        batch."""
        batch: list[Sample] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield from self._encode(batch)
                batch = []
        if batch:
            yield from self._encode(batch)

    def _pixels(self, sample: Sample) -> np.ndarray:
        """uint8 (H, W, C) of a sample, in the autoencoder's channel count (grey images repeated to RGB)."""
        from PIL import Image

        mode = "RGB" if self.autoencoder.image_channels == 3 else "L"
        try:
            with Image.open(io.BytesIO(sample.image)) as im:
                array = np.asarray(im.convert(mode))
        except Exception as err:  # noqa: BLE001 - the header was fine but the data is damaged
            raise PrepareError(f"{sample.origin or f'sample {sample.key}'} could not be decoded for encoding "
                               f"({type(err).__name__}: {str(err)[:120]}): expected a readable image") from None
        return array.reshape(*array.shape[:2], -1)

    def _encode(self, batch: list[Sample]) -> Iterator[dict]:
        pixels = np.stack([self._pixels(s) for s in batch])  # the writer checked that all share one size
        shape = self.autoencoder.latent_shape(tuple(pixels.shape[1:3]))  # one-line error if sizes do not divide
        self.latent_shape = tuple(int(v) for v in shape)
        images = to_signed_unit(torch.from_numpy(pixels).permute(0, 3, 1, 2)).to(self.device)
        encoded = [self._posterior(images)] + ([self._posterior(images.flip(-1))] if self.flips else [])
        for i, s in enumerate(batch):
            record = {"__key__": s.key}
            for member, stats in zip(self.members(), encoded):
                record[member] = npy_bytes(stats[i])
            if self.images:
                record[s.ext] = s.image
            record["cls"] = str(s.label).encode()
            yield record

    def _posterior(self, images: torch.Tensor) -> np.ndarray:
        """float16 (B, 2, C, h, w): the raw posterior mean and std of each image."""
        with _deterministic_kernels(self.device):
            mean, std = self.autoencoder.encode(images)
        return torch.stack([mean, std], dim=1).to("cpu", torch.float16).numpy()

    def manifest_fields(self, manifest: dict) -> dict:
        """What a latent manifest adds to the image manifest (written once the shards are)."""
        return {"autoencoder": self.autoencoder.spec(),
                "latent": {"shape": list(self.latent_shape), "dtype": LATENT_DTYPE, "stats": ["mean", "std"],
                           "flip": self.flips, "members": self.members(), "images": self.images}}


def latent_meta(manifest: dict | None) -> dict | None:
    """The ``latent`` block of a manifest, checked (None for image shards); a malformed one is a one-line error."""
    block = (manifest or {}).get("latent")
    if block is None:
        return None
    shape = block.get("shape") if isinstance(block, dict) else None
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)) \
            or block.get("dtype") != LATENT_DTYPE:
        raise UserValueError(f"manifest latent block {block!r} is malformed: expected {{'shape': [C, h, w], 'dtype': "
                           f"'{LATENT_DTYPE}', 'flip': true|false}} as `prepare --encode` writes it")
    return block
