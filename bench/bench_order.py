"""Early training loss under two data orders: the stream's block shuffle against a global permutation.

One run trains a small EDM-style DDPM++ U-Net (441,875 parameters: `unet_ddpmpp_cifar10` with 16
base channels, channel_mult [1, 2, 2], 2 blocks per resolution, dropout 0.13) with EDM's loss,
Adam (lr 1e-3 ramped over 200 steps, eps 1e-8 / 3,072 as in configs/cifar10_edm.yaml), no
gradient clipping, batch 32, on CIFAR-10 shards streamed by ShardDataModule, and writes its
per-step training loss, the gradient norm and the classes per batch to a JSON file. The order is
either the default one (``--shuffle_buffer 1000``: blocks of 1,000 consecutive samples of the
pass, each permuted) or a global permutation of the whole data set every pass
(``--shuffle_buffer`` >= the data set's size: one block). With the same ``--seed`` the two runs
share the network's initial weights and every noise, sigma and dropout draw (the module reseeds
every step), so they differ in the data order only.

usage:
  diffusion-pl prepare folder ../shared/data/cifar10-jpeg.tar.gz --split train --out /tmp/cifar
  python bench/bench_order.py --shards /tmp/cifar --seed 0 --shuffle_buffer 1000 --out a0.json
  python bench/bench_order.py --shards /tmp/cifar --seed 0 --shuffle_buffer 50000 --out b0.json
  python bench/bench_order.py --summary a0.json b0.json ...   # window means per order and seed
"""

from __future__ import annotations

import argparse
import json
import statistics

import lightning as L
import torch

from diffusion_pl.data.datamodule import ShardDataModule
from diffusion_pl.losses import DenoisingLoss, LogNormalNoise, OutputMSE
from diffusion_pl.networks.unet_presets import unet_ddpmpp_cifar10
from diffusion_pl.prediction import EDMPreconditioning
from diffusion_pl.processes.exploding import EDM
from diffusion_pl.training.module import DiffusionModule

WINDOWS = ((1, 49), (50, 99), (100, 199), (200, 250))  # step windows, both ends included, steps counted from 1


def train(shards: str, seed: int, shuffle_buffer: int, steps: int, threads: int, clip: float | None) -> dict:
    torch.set_num_threads(threads)
    L.seed_everything(seed, verbose=False)
    net = unet_ddpmpp_cifar10(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2)
    module = DiffusionModule(
        net, EDM(sigma_min=0.002, sigma_max=80.0), EDMPreconditioning(sigma_data=0.5),
        DenoisingLoss(proposal=LogNormalNoise(p_mean=-1.2, p_std=1.2), weighting=OutputMSE()),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3, eps=1e-8 / 3072),
        lr_warmup_steps=200, ema_half_life_images=10_000, seed=seed)
    data = ShardDataModule(shards, batch_size=32, num_workers=0, seed=seed, shuffle_buffer=shuffle_buffer)
    record = {"loss": [], "grad_norm": [], "classes": []}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            record["loss"].append(float(outputs["loss"]))
            record["classes"].append(len(set(batch[1].tolist())))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            norms = [p.grad.norm() for p in pl_module.net.parameters() if p.grad is not None]
            record["grad_norm"].append(float(torch.linalg.vector_norm(torch.stack(norms))))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=clip, callbacks=[Record()])
    trainer.fit(module, datamodule=data)
    return {"seed": seed, "shuffle_buffer": shuffle_buffer, "clip": clip, **record}


def window_mean(values: list[float], lo: int, hi: int) -> float:
    return statistics.fmean(values[lo - 1:hi])


def summary(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    head = " ".join(f"{lo:>4}-{hi:<4}" for lo, hi in WINDOWS)
    print(f"{'buffer':>7} {'clip':>5} {'seed':>4} | mean loss in steps {head} | classes/batch")
    for r in sorted(runs, key=lambda r: (r["shuffle_buffer"], str(r["clip"]), r["seed"])):
        cells = " ".join(f"{window_mean(r['loss'], lo, hi):9.4f}" for lo, hi in WINDOWS)
        print(f"{r['shuffle_buffer']:>7} {str(r['clip']):>5} {r['seed']:>4} |                    {cells} | "
              f"{statistics.fmean(r['classes']):.2f}")
    # Paired differences: runs of one seed differ in one setting only; the standard error treats the
    # per-step differences of a window as independent.
    print("\npaired difference (first - second run of a seed), mean +- standard error per window")
    by_seed: dict[int, list[dict]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], []).append(r)
    for seed, pair in sorted(by_seed.items()):
        for other in pair[1:]:
            first = pair[0]
            cells = []
            for lo, hi in WINDOWS:
                d = [x - y for x, y in zip(first["loss"][lo - 1:hi], other["loss"][lo - 1:hi])]
                cells.append(f"{statistics.fmean(d):+.4f} +- {statistics.stdev(d) / len(d) ** 0.5:.4f}")
            label = f"({first['shuffle_buffer']}, {first['clip']}) - ({other['shuffle_buffer']}, {other['clip']})"
            print(f"seed {seed} {label}: " + "  ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", help="prepared CIFAR-10 train shards (a folder with manifest.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle_buffer", type=int, default=1000)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clip", type=float, default=None, help="gradient_clip_val (default: none, as EDM)")
    p.add_argument("--out", help="JSON file for the run's per-step records")
    p.add_argument("--summary", nargs="+", help="print window means of these JSON files instead of training")
    args = p.parse_args()
    if args.summary:
        return summary(args.summary)
    if not args.shards or not args.out:
        raise SystemExit("bench_order: --shards and --out are required to train (or --summary FILES)")
    with open(args.out, "w") as f:
        json.dump(train(args.shards, args.seed, args.shuffle_buffer, args.steps, args.threads, args.clip), f)


if __name__ == "__main__":
    main()
