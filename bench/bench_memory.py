"""Peak memory of a training step with and without activation checkpointing (`checkpoint_activations`).

    python bench/bench_memory.py                                   # DDPM CIFAR-10 U-Net and DiT-S/2, batch 8, CPU
    python bench/bench_memory.py --nets unet_ddpm_cifar10 --batch 32 --device cuda

A training step is the real one of `DiffusionModule`: DenoisingLoss of the network under the VP process
(eps prediction), backward, Adam step; a first step creates the gradients and Adam's state, the second is
measured. Memory:

- CPU: torch.distributed._tools.mem_tracker.MemTracker, PyTorch's own tracker of live tensor storages
  (a private module: CPU tensors have no allocator statistics like torch.cuda.max_memory_allocated, and
  tracemalloc or the resident set size do not see tensors exactly): the peak of all live tensors (weights,
  gradients, Adam state, activations, temporaries; recomputations included).
- CUDA: torch.cuda.max_memory_allocated over the measured step.
- Both: the bytes of the distinct tensors autograd keeps for the backward pass at the end of the forward
  (torch.autograd.graph.saved_tensors_hooks, the parameters left out; with checkpointing, the blocks'
  inputs).

Time: the mean of `--time-steps` further steps, without the tracker.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusion_pl.losses import DenoisingLoss
from diffusion_pl.networks.presets import PRESETS
from diffusion_pl.prediction import EpsPrediction, precondition
from diffusion_pl.processes.variance_preserving import VPLinear

NETS = {preset.__name__: preset for preset in PRESETS}
MiB = 2**20


def train_step(net, optimizer, x0, saved: dict[int, int] | None = None) -> None:
    """One DiffusionModule-style step; `saved` collects the storages autograd keeps for the backward."""
    process, prediction = VPLinear(), EpsPrediction()
    model = precondition(net, process, prediction)
    if saved is None:
        loss = DenoisingLoss()(model, x0, process, prediction).loss.mean()
    else:
        weights = {p.untyped_storage().data_ptr() for p in net.parameters()}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:  # activations only, not the weights a layer keeps
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = DenoisingLoss()(model, x0, process, prediction).loss.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(name: str, checkpoint: bool, batch: int, device: torch.device, time_steps: int) -> dict:
    torch.manual_seed(0)
    net = NETS[name](checkpoint_activations=checkpoint).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    x0 = torch.randn(batch, *net.image_shape, device=device)
    train_step(net, optimizer, x0)  # gradients and Adam state exist from here on
    saved: dict[int, int] = {}
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(net, optimizer, x0, saved)
        torch.cuda.synchronize()
        result.update(peak=torch.cuda.max_memory_allocated(), above_start=torch.cuda.max_memory_allocated() - base)
    else:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(net, optimizer)
        with tracker:
            train_step(net, optimizer, x0, saved)
        peak = tracker.get_tracker_snapshot("peak")[device]
        result.update(peak=peak["Total"])
    result["kept for backward"] = sum(saved.values())
    if time_steps:
        start = time.perf_counter()
        for _ in range(time_steps):
            train_step(net, optimizer, x0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["seconds"] = (time.perf_counter() - start) / time_steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", default=["unet_ddpm_cifar10", "dit_s_2"], choices=sorted(NETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--time-steps", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"batch {args.batch}, torch {torch.__version__}")
    for name in args.nets:
        off, on = (measure(name, ck, args.batch, device, args.time_steps) for ck in (False, True))
        print(f"\n{name}:")
        for key in [k for k in off if k != "seconds"]:
            print(f"  {key:>17}: {off[key] / MiB:9.1f} MiB -> {on[key] / MiB:9.1f} MiB "
                  f"with checkpointing (ratio {on[key] / off[key]:.3f})")
        if "seconds" in off:
            print(f"  {'step time':>17}: {off['seconds']:9.3f} s   -> {on['seconds']:9.3f} s "
                  f"(ratio {on['seconds'] / off['seconds']:.2f})")


if __name__ == "__main__":
    main()
