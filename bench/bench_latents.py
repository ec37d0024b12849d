"""Latent data on the CPU: `prepare --encode` throughput, and a training step on latent shards vs on-the-fly encoding.

    python bench/bench_latents.py [--images 512] [--size 32] [--batch 32] [--steps 30] [--rounds 4] [--vae small]

1. Encoding: an image folder of seeded noise PNGs (--size square) is prepared three times by the
   functions `diffusion-pl prepare folder` runs: as image shards (no encoding), with `--encode`
   (the image and its mirror image encoded) and with `--encode --no-flips`. Images per second of
   each, and the ratios to the image-shard rate, all measured in this run. The autoencoder is
   built once beforehand (its construction time is printed separately).
2. Training step: DiffusionModule(dit_tiny on the latents, autoencoder=the same VAE) under a
   Lightning Trainer, fed one in-memory batch over and over: the raw posterior (B, 2C, h, w) a
   latent shard gives, or the images (B, 3, H, W), which the module encodes under no_grad each step.
   Rounds alternate which side runs first (ABBA); the ratio is median(on-the-fly) / median(latent).

The VAEs are diffusers AutoencoderKL configs with random weights (no download): `tiny` is the test
VAE (8/16 channels, downsample 2), `small` a 3-level one (32/64/64 channels, downsample 4).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bench_module import Repeat, Timer  # the same loop timer as the module benchmark (bench/ is on sys.path)
from diffusion_pl.codecs.autoencoder import Autoencoder
from diffusion_pl.data.sources import image_folder
from diffusion_pl.data.writer import prepare
from diffusion_pl.data.latents import LatentEncoder
from diffusion_pl.losses import DenoisingLoss, LogNormalNoise
from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.networks.dit import dit_tiny
from diffusion_pl.prediction import EDMPreconditioning
from diffusion_pl.processes.exploding import EDM

VAES = {
    "tiny": {"block_out_channels": [8, 16], "norm_num_groups": 8, "layers_per_block": 1, "latent_channels": 4,
             "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2},
    "small": {"block_out_channels": [32, 64, 64], "norm_num_groups": 32, "layers_per_block": 1, "latent_channels": 4,
              "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3},
}


def make_folder(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return root


def prepare_rate(folder: Path, out: Path, encoder: LatentEncoder | None) -> float:
    """Images per second of one prepare run into a fresh folder."""
    extra = {} if encoder is None else {"records": encoder.records, "meta": encoder.manifest_fields}
    t = time.perf_counter()
    m = prepare(image_folder(folder), out, shard_size=1000, overwrite=True, **extra)
    return m["count"] / (time.perf_counter() - t)


def step_times(ae: Autoencoder, batch: tuple[torch.Tensor, torch.Tensor], latent_shape, steps: int) -> list[float]:
    torch.manual_seed(0)
    net = dit_tiny(img_resolution=latent_shape[1], in_channels=latent_shape[0])
    module = DiffusionModule(net, EDM(), EDMPreconditioning(), DenoisingLoss(LogNormalNoise()), ema_decay=0.999,
                             autoencoder=ae)
    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], log_every_n_steps=50)
    trainer.fit(module, DataLoader(Repeat(batch, steps), batch_size=None))
    return timer.times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--encode-batch", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--vae", choices=sorted(VAES), default="small")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # one Trainer per side and round: no banners
    warnings.filterwarnings("ignore", module="lightning")
    t = time.perf_counter()
    ae = Autoencoder(config=VAES[args.vae], seed=0)
    shape = ae.latent_shape(args.size)
    print(f"VAE {args.vae}: {sum(p.numel() for p in ae.vae.encoder.parameters()):,} encoder parameters, "
          f"latents {'x'.join(map(str, shape))} of {args.size}x{args.size} images, built in "
          f"{time.perf_counter() - t:.2f} s; {torch.get_num_threads()} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "images", args.images, args.size)
        rates = {}
        for name, encoder in [("image shards", None),
                              ("--encode", LatentEncoder(ae, args.encode_batch, "cpu", flips=True)),
                              ("--encode --no-flips", LatentEncoder(ae, args.encode_batch, "cpu", flips=False))]:
            prepare_rate(folder, Path(tmp) / "warm", encoder)  # warm-up (file cache, allocator)
            rates[name] = prepare_rate(folder, Path(tmp) / "out", encoder)
        base = rates["image shards"]
        for name, rate in rates.items():
            print(f"prepare {name:20s}: {rate:8.1f} images/s ({rate / base:.3f} x image shards)")

    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.zeros(args.batch, dtype=torch.long)
    posterior = torch.cat(ae.encode(images), 1)
    sides = {"latent shards": (posterior, labels), "on-the-fly": (images, labels)}
    warm, times, paired = 5, {k: [] for k in sides}, []
    for r in range(args.rounds):
        got = {}
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            got[name] = step_times(ae, sides[name], shape, args.steps)[warm:]
            times[name] += got[name]
        paired.append(statistics.median(got["on-the-fly"]) / statistics.median(got["latent shards"]))
        print(f"round {r + 1}: latent shards {statistics.median(got['latent shards']) * 1e3:.1f} ms, on-the-fly "
              f"{statistics.median(got['on-the-fly']) * 1e3:.1f} ms per step, ratio {paired[-1]:.3f}", flush=True)
    lat, fly = (statistics.median(times[k]) for k in sides)
    print(f"dit_tiny on {'x'.join(map(str, shape))} latents, batch {args.batch}, {args.rounds} rounds x "
          f"{args.steps - warm} timed steps per side: step on latent shards {lat * 1e3:.1f} ms, with on-the-fly "
          f"encoding {fly * 1e3:.1f} ms; on-the-fly / latent shards = {fly / lat:.3f} (per-round range "
          f"{min(paired):.3f}-{max(paired):.3f})")


if __name__ == "__main__":
    main()
