"""The floor bench/bench_train.py measures the framework against: a bare PyTorch training loop and plain Heun /
DDIM sampling loops over the same network, and the timing helpers both sides share.

The training loop does what `DiffusionModule` does in a step, in the same order and with the same random draws
(the module's per-step reseed), so in float32 it gives the framework's losses, weights and EMA exactly; the
sampling loops are EDM's Heun loop (Karras et al. 2022, Alg. 1) and DDIM's eta = 0 update (Song et al. 2021a,
eq. 12) written against the network.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
import time

import torch

from diffusion_pl.prediction import precondition
from diffusion_pl.utils.seeding import mix_seed

MiB = 2**20


def set_tf32(on: bool) -> None:
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on


def fingerprint(net) -> torch.Tensor:
    """Per-tensor sums and sums of squares in float64: equal weights give bit-equal fingerprints."""
    return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in net.parameters()]).cpu()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MiB if device.type == "cuda" else None


def step_times(ends: list[float], warmup: int) -> list[float]:
    """The times of the steps after the first `warmup`."""
    return [b - a for a, b in zip(ends[warmup - 1:-1], ends[warmup:])]


def train_plain(recipe, fast: bool, compile_: bool, batch, steps: int, warmup: int, device) -> dict:
    """The floor: the same step in a bare loop (module docstring)."""
    fresh(device)
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    set_tf32(fast)
    args = recipe.module_args()
    net = recipe.net()
    start_weights = fingerprint(net)
    net = net.to(device).train()
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    if fast:
        net, ema = net.to(memory_format=torch.channels_last), ema.to(memory_format=torch.channels_last)
    model = precondition(torch.compile(net) if fast and compile_ else net, recipe.process, recipe.prediction)
    params, ema_params = list(net.parameters()), list(ema.parameters())
    net_buffers, ema_buffers = list(net.buffers()), list(ema.buffers())
    optimizer = recipe.optimizer(fast, device)(params)
    warm_lr = args["lr_warmup_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(s / warm_lr, 1.0)) if warm_lr else None
    loss_fn, augment, null_label = args["loss"], args["augment"], net.null_label
    x0_batch, labels = batch
    labels = labels if net.num_classes is not None else None
    losses, ends, seen = [], [], 0
    for step in range(steps):
        torch.manual_seed(mix_seed(0, 0, step, 0))  # the module's per-step reseed: the same draws
        x0, step_model = x0_batch, model
        if augment is not None:
            x0, augment_labels = augment(x0)
            step_model = functools.partial(model, augment_labels=augment_labels)
        if fast:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            loss = loss_fn(step_model, x0, recipe.process, recipe.prediction, labels, null_label).loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args["grad_nan_to_num"]:
            for p in params:
                torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
        if recipe.clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.clip)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        # EMA: a fixed decay, or EDM's half-life in images with its ramp-up
        if args["ema_half_life_images"] is None:
            beta = min(args["ema_decay"], (1 + step) / (10 + step)) if args["ema_warmup"] else args["ema_decay"]
        else:
            half_life = args["ema_half_life_images"]
            if args["ema_rampup_ratio"] is not None:
                half_life = min(half_life, seen * args["ema_rampup_ratio"])
            beta = 0.5 ** (x0.shape[0] / max(half_life, 1e-8))
        seen += x0.shape[0]
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - beta)
            for b_ema, b_net in zip(ema_buffers, net_buffers):
                b_ema.copy_(b_net)
        losses.append(loss.detach())
        sync(device)  # as the framework's side: its finiteness check waits for the loss every step
        ends.append(time.perf_counter())
    precision, torch.backends.cudnn.allow_tf32 = previous
    torch.set_float32_matmul_precision(precision)
    return dict(steps=len(losses), step_times=step_times(ends, warmup),
                losses=torch.stack(losses).float().cpu().tolist(),
                start_weights=start_weights, end_weights=fingerprint(net), end_ema=fingerprint(ema),
                peak_mib=peak(device))


def plain_heun(net, sd: float, prior_std: float, times: torch.Tensor, noise, labels):
    """EDM's deterministic Heun loop (Karras et al. 2022, Alg. 1) on sigma = t, written against the network;
    x_T = prior_std x noise as `sample` draws it."""
    def denoise(x, s):
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2), 1 / math.sqrt(s**2 + sd**2)
        label = torch.full((x.shape[0],), 0.25 * math.log(s), device=x.device, dtype=x.dtype)
        return c_skip * x + c_out * net(c_in * x, label, labels).to(x.dtype)

    sigmas = times.tolist()
    x = noise * prior_std
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoise(x, s)) / s
        x_next = x + (s_next - s) * d
        x = x + (s_next - s) * 0.5 * (d + (x_next - denoise(x_next, s_next)) / s_next)
    return denoise(x, sigmas[-1])


def plain_ddim(net, process, prediction, times: torch.Tensor, noise, labels):
    """DDIM with eta = 0 (Song et al. 2021a, eq. 12) on an eps network; the last evaluation steps to x0_hat."""
    t = times.to(torch.float64)
    alpha, sigma = process.alpha(t).tolist(), process.sigma(t).tolist()
    noise_labels = [prediction.c_noise(ti.reshape(1), process).to(noise) for ti in t]
    x = noise * process.prior_std()
    for i in range(len(alpha)):
        out = net(x, noise_labels[i].expand(x.shape[0]), labels).to(x.dtype)
        eps = out[:, :x.shape[1]]  # the mean half of a learned-variance output
        x0 = (x - sigma[i] * eps) / alpha[i]
        x = x0 if i == len(alpha) - 1 else alpha[i + 1] * x0 + sigma[i + 1] * eps
    return x
