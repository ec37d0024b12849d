"""Step-time overhead of DiffusionModule under a Lightning Trainer against a bare PyTorch loop.

Both sides train the same network (same process, parameterization, loss, Adam, gradient clipping
and EMA update) on the same in-memory batch, so the difference is what Lightning and the module
add per step (hooks, logging, the per-step reseed, the finiteness check). Each round runs both
sides, and the order flips every round (ABBA...): whichever side runs first in a fresh round was
measured a few per cent slower on this CPU, so a fixed order biases the ratio. The reported ratio
is median(Lightning step) / median(bare step) over all rounds; the median and range of the
per-round ratios show how far the machine's drift moves it.

usage: python bench/bench_module.py [--steps 30] [--rounds 4] [--batch 32] [--size 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from diffusion_pl.losses import DenoisingLoss, LogNormalNoise
from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.networks.unet_presets import unet_tiny
from diffusion_pl.prediction import EDMPreconditioning, precondition
from diffusion_pl.processes.exploding import EDM


class Repeat(Dataset):
    """The same batch over and over: data loading is not what is measured."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.batch


class Timer(L.Callback):
    """Time between consecutive batch starts: the whole loop iteration, every hook included."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, *args) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def lightning_steps(batch, steps: int) -> list[float]:
    torch.manual_seed(0)
    module = DiffusionModule(unet_tiny(img_resolution=batch[0].shape[-1]), EDM(), EDMPreconditioning(),
                             DenoisingLoss(LogNormalNoise()), ema_decay=0.999)
    timer = Timer()
    loader = DataLoader(Repeat(batch, steps), batch_size=None)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[timer], log_every_n_steps=50)
    trainer.fit(module, loader)
    return timer.times


def bare_steps(batch, steps: int) -> list[float]:
    torch.manual_seed(0)
    net = unet_tiny(img_resolution=batch[0].shape[-1])
    ema = unet_tiny(img_resolution=batch[0].shape[-1]).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    process, prediction, loss_fn = EDM(), EDMPreconditioning(), DenoisingLoss(LogNormalNoise())
    model = precondition(net, process, prediction)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x0, _labels = batch
        loss = loss_fn(model, x0, process, prediction).loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1e-3)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    batch = (torch.rand(args.batch, 3, args.size, args.size) * 2 - 1, torch.zeros(args.batch, dtype=torch.long))
    warm = 5  # the first steps include allocator warm-up on both sides
    lit, bare, paired = [], [], []
    for r in range(args.rounds):
        round_times: dict[str, list[float]] = {}
        sides = [("lightning", lightning_steps), ("bare", bare_steps)]
        for name, run in sides if r % 2 == 0 else sides[::-1]:
            round_times[name] = run(batch, args.steps)[warm:]
        lit += round_times["lightning"]
        bare += round_times["bare"]
        # the two sides of one round ran back to back, so their ratio is free of the slow drift
        paired.append(statistics.median(round_times["lightning"]) / statistics.median(round_times["bare"]))
        print(f"round {r + 1}: lightning median {statistics.median(round_times['lightning']) * 1e3:.1f} ms, "
              f"bare median {statistics.median(round_times['bare']) * 1e3:.1f} ms, ratio {paired[-1]:.3f}", flush=True)
    ratio = statistics.median(lit) / statistics.median(bare)
    print(f"unet_tiny {args.size}x{args.size}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps - warm} timed steps per side")
    print(f"DiffusionModule + Trainer step / bare loop step = {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%); "
          f"per-round ratios: median {statistics.median(paired):.3f}, range {min(paired):.3f}-{max(paired):.3f}")


if __name__ == "__main__":
    main()
