"""Data streaming throughput on shards made from the CIFAR-10 JPEG tar (not a test).

    python bench/bench_data.py [--tar ../shared/data/cifar10-jpeg.tar.gz] [--workers 0 1 2]

Prints prepare time, then for each worker count the decoded images per second (tar read,
shuffle buffer, JPEG decode, flip, scale to [-1, 1], batching): by wall clock in total, and
per CPU-second of the processes doing the work, which is the per-core rate and does not
depend on what else the machine runs. Last, the fast-forward rate used on resume.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from diffusion_pl.data.stream import ShardStream
from diffusion_pl.data.sources import image_folder
from diffusion_pl.data.writer import prepare
from diffusion_pl.data.shards import resolve_shards
from diffusion_pl.data.stream import ResumableLoader

ROOT = Path(__file__).resolve().parents[1]


def _cpu(workers: int) -> float:
    """CPU seconds of this process (no workers) or of its finished children (workers)."""
    who = resource.RUSAGE_CHILDREN if workers else resource.RUSAGE_SELF
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def throughput(urls: list[str], batch_size: int, workers: int, batches: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of the loading processes)."""
    stream = ShardStream(urls, batch_size, shuffle_buffer=1000, random_flip=True)
    cpu0 = _cpu(workers)
    it = iter(ResumableLoader(stream, lambda: 0, num_workers=workers))
    next(it)  # warm-up: worker start and shuffle-buffer fill are not throughput
    t = time.perf_counter()
    n = sum(next(it)[0].shape[0] for _ in range(batches))
    wall = time.perf_counter() - t
    del it  # workers exit here, so their CPU time is counted in RUSAGE_CHILDREN
    gc.collect()
    # CPU includes the warm-up and prefetched batches: count them, or the per-core rate is understated
    produced = n + batch_size * (1 + (2 * workers if workers else 0))
    return n / wall, produced / (_cpu(workers) - cpu0)


def main() -> None:
    """Prepare (or reuse) shards, then print the throughput table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tar", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "diffusion_pl_bench_cifar10"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=80)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    torch.set_num_threads(1)
    if not (Path(args.out) / "manifest.json").is_file():
        t = time.perf_counter()
        m = prepare(image_folder(args.tar, "train"), args.out, split="train", shard_size=1000)
        print(f"prepare: {m['count']} CIFAR-10 JPEGs -> {len(m['shards'])} shards in {time.perf_counter() - t:.1f} s")
    urls = resolve_shards(args.out)[0]
    print(f"shards: {args.out} ({len(urls)} shards), batch {args.batch_size}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    for workers in args.workers:
        wall, per_cpu = throughput(urls, args.batch_size, workers, args.batches)
        label = "main process" if workers == 0 else f"{workers} workers"
        print(f"stream+decode, {label:12s}: {wall:7.0f} images/s wall total, {per_cpu:7.0f} images/s per core")


if __name__ == "__main__":
    main()
