"""Time one FID evaluation: generation vs feature extraction, and the speed-up from 1 to 2 ranks.

The network is `unet_tiny` (32x32, 1.1M parameters, untrained), sampled with HeunODE(steps=17)
(35 NFE); the extractor is the real InceptionV3 architecture of torch-fidelity with random
weights (no download needed; the same FLOPs as the published one). Each rank runs one CPU
thread, as each GPU would be one device, so the speed-up measures the work split over ranks;
'cpu s/rank' is the slowest rank's CPU time for generation + extraction, whose ratio shows the
split even when other jobs share the cores. The reduce step (all-reduce of the feature sums, then
the 2048x2048 matrix square root on every rank) does not shrink with more ranks. Reference
statistics (computed once, then cached) are timed separately.

usage: python bench/bench_fid.py [--num-samples 256] [--batch-size 64] [--devices 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args: argparse.Namespace) -> None:
    """One evaluation under Fabric with `args.world` ranks; rank 0 prints a JSON line of timings."""
    import lightning as L

    from diffusion_pl.evaluation.metrics.statistics import SampleMetrics, reference_stats
    from diffusion_pl.evaluation.generation import generate, rank_indices
    from diffusion_pl.evaluation.metrics.inception import load_inception
    from diffusion_pl.data.reference import reference_images
    from diffusion_pl.training.module import DiffusionModule
    from diffusion_pl.networks.unet_presets import unet_tiny
    from diffusion_pl.processes.variance_preserving import VPLinear
    from diffusion_pl.sampling.ode import HeunODE

    torch.set_num_threads(1)
    fabric = L.Fabric(accelerator="cpu", devices=args.world, strategy="ddp" if args.world > 1 else "auto")
    fabric.launch()
    torch.manual_seed(0)
    module = DiffusionModule(unet_tiny(img_resolution=32), VPLinear()).eval()
    extractor = load_inception(args.weights).eval()
    start = time.perf_counter()
    images, key, info = reference_images(args.data, batch_size=args.batch_size)
    reference = reference_stats(images, key, extractor, total=info["count"], progress=False)
    fabric.barrier()
    t_reference = time.perf_counter() - start

    mine = rank_indices(args.num_samples, fabric.global_rank, fabric.world_size)
    fabric.barrier()
    # wall time, and this process's CPU time: the CPU time shows how the work splits over ranks even
    # when other jobs share the cores (then the wall-time speed-up is capped by the free cores)
    wall, cpu = time.perf_counter(), time.process_time()
    batches = [u8 for _, u8, _, _ in generate(module, HeunODE(steps=17), mine, (3, 32, 32), seed=0,
                                              batch_size=args.batch_size)]
    t_generate, c_generate = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = SampleMetrics(extractor, reference)
    for u8 in batches:
        metrics.update(u8)
    t_extract, c_extract = time.perf_counter() - wall, time.process_time() - cpu
    fabric.barrier()  # the slowest rank decides the wall time
    wall = time.perf_counter()
    fid = metrics.compute()["fid"]
    t_reduce = time.perf_counter() - wall
    times = torch.tensor([t_generate, t_extract, t_reduce, c_generate + c_extract])
    slowest = fabric.all_reduce(times, reduce_op="max") if fabric.world_size > 1 else times
    if fabric.global_rank == 0:
        print("RESULT " + json.dumps({"world": fabric.world_size, "n": args.num_samples, "fid": fid,
                                      "reference_s": t_reference, "reference_n": reference.n,
                                      "generate_s": float(slowest[0]), "extract_s": float(slowest[1]),
                                      "reduce_s": float(slowest[2]), "cpu_s": float(slowest[3])}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reference-count", type=int, default=256, help="built-in shapes images as reference")
    parser.add_argument("--world", type=int, default=None, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.world is not None:
        return worker(args)

    from diffusion_pl.evaluation.metrics.inception import random_inception_weights

    tmp = Path(tempfile.mkdtemp(prefix="bench_fid_"))
    weights = random_inception_weights(tmp / "inception_random.pth")
    data = f"builtin:shapes?size=32&count={args.reference_count}"
    env = {**os.environ, "DIFFUSION_PL_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    print(f"FID of {args.num_samples} samples: unet_tiny 32x32 (HeunODE 17 steps = 35 NFE, batch "
          f"{args.batch_size}/rank) + InceptionV3 (random weights), 1 CPU thread per rank; "
          f"reference: {args.reference_count} built-in shapes images; load average {os.getloadavg()[0]:.1f}")
    rows = []
    for world in args.devices:
        cmd = [sys.executable, __file__, "--world", str(world), "--weights", str(weights), "--data", data,
               "--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            sys.exit(f"bench worker with {world} rank(s) failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[0][len("RESULT "):]))
    first = rows[0]
    print(f"reference statistics (once, then cached): {first['reference_s']:.1f} s for {first['reference_n']} images")
    print(f"{'ranks':>5} {'generate s':>11} {'extract s':>10} {'reduce s':>9} {'total s':>8} {'img/s':>7} "
          f"{'speed-up':>8} {'cpu s/rank':>11} {'cpu speed-up':>12} {'fid':>10}")
    base = base_cpu = None
    for r in rows:
        total = r["generate_s"] + r["extract_s"] + r["reduce_s"]
        base, base_cpu = base or total, base_cpu or r["cpu_s"]
        print(f"{r['world']:>5} {r['generate_s']:>11.1f} {r['extract_s']:>10.1f} {r['reduce_s']:>9.2f} {total:>8.1f} "
              f"{r['n'] / total:>7.2f} {base / total:>7.2f}x {r['cpu_s']:>11.1f} {base_cpu / r['cpu_s']:>11.2f}x "
              f"{r['fid']:>10.6g}")
    print(f"extrapolated to 10k samples on {rows[-1]['world']} rank(s) like these: "
          f"{total * 10_000 / rows[-1]['n'] / 60:.0f} min")


if __name__ == "__main__":
    main()
