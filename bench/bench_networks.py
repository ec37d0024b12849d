"""Benchmark the score networks: parameters and forward FLOPs per preset, and a training step
of the DDPM CIFAR-10 U-Net against diffusers' UNet2DModel of the same size.

    python bench/bench_networks.py                     # 2 warm-up + 10 measured steps per side
    python bench/bench_networks.py --steps 5 --batch 16
    python bench/bench_networks.py --skip-compare      # preset table only (seconds)

Throughput: the two networks are timed alternately in one process (A B, B A, A B, ...), so
drift in machine load hits both sides alike. Peak memory: each side runs its warm-up and
measured steps in a fresh spawned process and reports its peak resident set size (VmHWM),
since CPU tensors have no allocator statistics like torch.cuda.max_memory_allocated.
FLOPs come from torch.utils.flop_counter.FlopCounterMode on the meta device (2 FLOPs per
multiply-add); attention is forced onto the math kernel so its matmuls are counted.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion_pl.networks.presets import PRESETS
from diffusion_pl.networks.unet_presets import unet_ddpm_cifar10


def diffusers_ddpm_cifar10(dropout: float = 0.1) -> torch.nn.Module:
    """diffusers' UNet2DModel with the config of google/ddpm-cifar10-32 (Ho et al. 2020)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
        norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None, dropout=dropout,
    )


class DiffusersAdapter(torch.nn.Module):
    """Puts UNet2DModel behind the diffusion_pl contract net(x, noise_label) -> tensor."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, noise_label, class_labels=None):
        return self.net(x, noise_label).sample


SIDES = {"diffusion_pl UNet (unet_ddpm_cifar10)": lambda: unet_ddpm_cifar10(),
         "diffusers UNet2DModel (ddpm-cifar10-32)": lambda: DiffusersAdapter(diffusers_ddpm_cifar10())}


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def forward_flops(preset, resolution: int = 32) -> int:
    """Forward FLOPs for one image, counted on the meta device."""
    with torch.device("meta"):
        net, x = preset(img_resolution=resolution), torch.empty(1, 3, resolution, resolution)
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            net(x, torch.empty(1))
    return counter.get_total_flops()


def preset_table() -> None:
    print("| preset | params | forward GFLOPs / image (32x32) | GMACs |")
    print("|---|---:|---:|---:|")
    for preset in PRESETS:
        with torch.device("meta"):
            n = count(preset())
        flops = forward_flops(preset)
        print(f"| `{preset.__name__}` | {n:,} ({n / 1e6:.2f}M) | {flops / 1e9:.2f} | {flops / 2e9:.2f} |")


def make_step(net: torch.nn.Module, batch: int, res: int):
    """One DDPM training step: eps-prediction MSE at random integer steps, AdamW update."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 3, res, res, generator=generator)
    eps = torch.randn(batch, 3, res, res, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator).float()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-4)
    net.train()

    def step() -> float:
        start = time.perf_counter()
        loss = F.mse_loss(net(x0 + eps, t), eps)  # the noising itself is irrelevant to speed
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def peak_memory_child(name: str, batch: int, res: int, steps: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    step = make_step(SIDES[name](), batch, res)
    before = _status_kb("VmRSS")
    for _ in range(steps):
        step()
    queue.put((before, _status_kb("VmHWM")))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def compare(batch: int, res: int, warmup: int, steps: int) -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    nets = {name: build() for name, build in SIDES.items()}
    names = list(nets)
    print(f"\nTraining step (forward + backward + AdamW), batch {batch} at {res}x{res}, float32, CPU, "
          f"{threads} threads, {warmup} warm-up + {steps} measured steps per side, alternating")
    for name in names:
        print(f"  {name}: {count(nets[name]):,} parameters")
    steppers = {name: make_step(nets[name], batch, res) for name in names}
    times = {name: [] for name in names}
    for i in range(warmup + steps):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            seconds = steppers[name]()
            if i >= warmup:
                times[name].append(seconds)
    for name in names:
        print(f"  {name}: step times {', '.join(f'{s:.2f}' for s in times[name])} s; "
              f"median {statistics.median(times[name]):.2f} s = {batch / statistics.median(times[name]):.2f} img/s")
    ours, theirs = (statistics.median(times[n]) for n in names)
    print(f"  throughput ratio diffusion_pl / diffusers = {theirs / ours:.3f}")

    # Peak memory: a fresh process per side, so one side's high-water mark cannot hide the other's.
    context = multiprocessing.get_context("spawn")
    peaks = {}
    for name in names:
        queue = context.Queue()
        child = context.Process(target=peak_memory_child, args=(name, batch, res, 1 + warmup, threads, queue))
        child.start()
        before, peak = queue.get()
        child.join()
        peaks[name] = (before, peak)
        print(f"  {name}: peak RSS {peak / 1024:.0f} MiB; above pre-step RSS {(peak - before) / 1024:.0f} MiB "
              f"({1 + warmup} step(s) in a fresh process)")
    (b0, p0), (b1, p1) = (peaks[n] for n in names)
    print(f"  peak-RSS ratio diffusion_pl / diffusers = {p0 / p1:.3f}; step-memory ratio = {(p0 - b0) / (p1 - b1):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="measured training steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per side first")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--skip-compare", action="store_true", help="only the preset table")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    preset_table()
    if not args.skip_compare:
        compare(args.batch, args.resolution, args.warmup, args.steps)


if __name__ == "__main__":
    main()
