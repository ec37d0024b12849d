"""Training and sampling images/s of the framework against a plain PyTorch loop, fast paths on and off.

    python bench/bench_train.py --toy                       # tiny networks on the CPU, under a minute
    python bench/bench_train.py --device cuda               # the recipes' networks at their per-GPU batch
    python bench/bench_train.py --device cuda --nets dit_xl2 --fast on --json dit.json

Networks (the `model:` section of the recipe, built from its YAML with random weights):

- `ddpmpp`: configs/cifar10_edm.yaml, EDM's DDPM++ at 32x32 (EDM process and preconditioning, log-normal
  DenoisingLoss, Adam, EMA half-life, the augmentation pipe, non-finite gradients zeroed), batch 64
  (EDM's 512 over 8 GPUs);
- `dit_xl2`: configs/imagenet256_dit_xl2.yaml, DiT-XL/2 on 4x32x32 latents as cached latents train it (no VAE
  in the step), DDPMDiscrete with eps + learned variance, L_simple + L_vlb, label dropout 0.1, AdamW, EMA
  0.9999, batch 32 (DiT's 256 over 8 GPUs).

`--toy` swaps in tiny widths of the same network classes (every other recipe setting kept) on the CPU.

Training: the framework side is `DiffusionModule` fitted by a Lightning `Trainer`; the plain side is a bare
loop over the same network, the recipe's DenoisingLoss through the same `precondition`, the recipe's optimizer
(and lr warm-up, clipping, gradient NaN zeroing, augmentation) and the EMA update with `torch._foreach_lerp_`.
It reseeds torch's generator before each step as the module does, so in float32 both sides draw the same
times, noise and dropout: they start from identical weights and give the same loss at step 1 (printed as a
check). Both read one fixed batch that already lies on the device: the data pipeline is not measured
(bench/bench_data.py measures it). The first `--warmup` steps (torch.compile's compilation, allocator
warm-up) are excluded; images/s = batch / the median time of the timed steps, each from the previous step's
end to its own (the whole loop iteration, every hook included), with a device synchronisation at each end (the
framework waits for the loss every step anyway, for its finiteness check).
Peak memory is torch.cuda.max_memory_allocated over one side's run (n/a on a CPU).

Fast paths (docs/guide/training.md, "Fast paths"), `off` / `on` on both sides alike:
float32 / bf16 autocast (`bf16-mixed`), per-parameter Adam (`foreach=False`) / fused Adam (foreach where
fused is unavailable), contiguous / channels_last, eager / torch.compile of the network, TF32 matmuls and
cuDNN convolutions off / on (the TF32 callback). `--compile auto` compiles on CUDA only: on a CPU the inductor
compilation takes minutes.

Sampling: images/s of `diffusion_pl.sample` (HeunODE for DDPM++, DDIM for DiT; the network, unguided)
against a plain loop calling the same network on the same float64 time grid from the same noise (EDM's Heun
loop, DDIM's eta = 0 update), after one untimed run of each; then `--sample-reps` rounds of one run per side, the
order flipping every round, images/s = batch / median run time. The largest difference of the two sides'
samples, relative to the largest sample value, is printed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import logging
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse.typing import import_object
from torch.utils.data import DataLoader, Dataset

from diffusion_pl.prediction import precondition
from diffusion_pl.sampling.api import sample
from diffusion_pl.sampling.ode import HeunODE
from diffusion_pl.sampling.posterior import DDIM
from diffusion_pl.training.callbacks.tf32 import TF32
from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.utils.seeding import mix_seed

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
# name: (recipe, tiny widths for --toy, batch on a GPU, sampler and its steps on a GPU / with --toy)
NETS = {
    "ddpmpp": ("configs/cifar10_edm.yaml",
               dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4]),
               64, (HeunODE, 17, 2)),
    "dit_xl2": ("configs/imagenet256_dit_xl2.yaml",
                dict(img_resolution=8, hidden_size=64, depth=2, num_heads=4, num_classes=10),
                32, (DDIM, 50, 4)),
}


def build(spec):
    """A `{class_path, init_args}` value of a recipe, nested ones included, as LightningCLI would build it."""
    if isinstance(spec, dict) and "class_path" in spec:
        return import_object(spec["class_path"])(**{k: build(v) for k, v in spec.get("init_args", {}).items()})
    return spec


@dataclass
class Recipe:
    name: str
    model: dict  # the recipe's `model:` section
    net_args: dict
    clip: float | None
    process: object = field(init=False)
    prediction: object = field(init=False)

    def __post_init__(self) -> None:
        self.process, self.prediction = build(self.model["process"]), build(self.model["prediction"])

    def net(self, seed: int = 0):
        torch.manual_seed(seed)
        return import_object(self.model["net"]["class_path"])(**self.net_args)

    def optimizer(self, fast: bool, device: torch.device):
        spec = self.model["optimizer"]
        cls, args = import_object(spec["class_path"]), dict(spec.get("init_args", {}))
        return functools.partial(cls, **args, **(fast_optimizer(cls, device) if fast else {"foreach": False}))

    def module_args(self) -> dict:
        m = self.model
        return dict(loss=build(m["loss"]), augment=build(m.get("augment")), lr_warmup_steps=m.get("lr_warmup_steps", 0),
                    ema_decay=m.get("ema_decay", 0.9999), ema_warmup=m.get("ema_warmup", False),
                    ema_half_life_images=m.get("ema_half_life_images"), ema_rampup_ratio=m.get("ema_rampup_ratio"),
                    grad_nan_to_num=m.get("grad_nan_to_num", False))


def load_recipe(name: str, toy: bool) -> Recipe:
    path, tiny, _, _ = NETS[name]
    config = yaml.safe_load((ROOT / path).read_text())
    net_args = {**config["model"]["net"].get("init_args", {}), **(tiny if toy else {})}
    return Recipe(name, config["model"], net_args, config["trainer"].get("gradient_clip_val"))


def fast_optimizer(cls, device: torch.device) -> dict:
    """fused=True where this torch runs it on `device`, else foreach=True."""
    try:
        param = torch.nn.Parameter(torch.zeros(2, device=device))
        param.grad = torch.ones(2, device=device)
        cls([param], fused=True).step()
        return {"fused": True}
    except (RuntimeError, ValueError):
        return {"foreach": True}


def set_tf32(on: bool) -> None:
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on


def make_batch(net, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    c, (h, w) = net.in_channels, (net.img_resolution,) * 2
    x0 = (torch.rand(batch, c, h, w, generator=g) * 2 - 1).to(device)  # pixels in [-1, 1] or latents alike
    labels = torch.randint(0, net.num_classes or 1, (batch,), generator=g).to(device)
    return x0, labels


def fingerprint(net) -> torch.Tensor:
    """Per-tensor sums and sums of squares in float64: equal weights give bit-equal fingerprints."""
    return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in net.parameters()]).cpu()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


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


class Repeat(Dataset):
    """The same on-device batch `length` times: the data pipeline is not what is measured."""

    def __init__(self, batch, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.batch


class Probe(L.Callback):
    """The loss of every step and the time at its end: a step's time is from the previous step's end to its own, the
    whole loop iteration with every hook."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.losses, self.ends = device, [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())
        sync(self.device)  # the framework syncs each step anyway (its finiteness check)
        self.ends.append(time.perf_counter())


def step_times(ends: list[float], warmup: int) -> list[float]:
    """The times of the steps after the first `warmup`."""
    return [b - a for a, b in zip(ends[warmup - 1:-1], ends[warmup:])]


def train_framework(recipe: Recipe, fast: bool, compile_: bool, batch, steps: int, warmup: int, device) -> dict:
    fresh(device)
    net = recipe.net()
    start_weights = fingerprint(net)
    module = DiffusionModule(net, recipe.process, recipe.prediction, optimizer=recipe.optimizer(fast, device),
                             channels_last=fast, compile=fast and compile_, seed=0, **recipe.module_args())
    probe = Probe(device)
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=steps, precision="bf16-mixed" if fast else "32-true",
                        gradient_clip_val=recipe.clip, callbacks=[probe, TF32(matmul=fast, cudnn=fast)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(Repeat(batch, steps), batch_size=None))
    losses = torch.stack(probe.losses).float().cpu()
    return dict(steps=trainer.global_step, step_times=step_times(probe.ends, warmup), losses=losses.tolist(),
                start_weights=start_weights, end_weights=fingerprint(module.net), end_ema=fingerprint(module.ema),
                peak_mib=peak(device))


def train_plain(recipe: Recipe, fast: bool, compile_: bool, batch, steps: int, warmup: int, device) -> dict:
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
        losses.append(loss.detach())
        sync(device)  # as the framework's side: its finiteness check waits for the loss every step
        ends.append(time.perf_counter())
    precision, torch.backends.cudnn.allow_tf32 = previous
    torch.set_float32_matmul_precision(precision)
    return dict(steps=len(losses), step_times=step_times(ends, warmup), losses=torch.stack(losses).float().cpu().tolist(),
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
        eps = net(x, noise_labels[i].expand(x.shape[0]), labels).to(x.dtype)[:, :x.shape[1]]  # mean half of learned sigma
        x0 = (x - sigma[i] * eps) / alpha[i]
        x = x0 if i == len(alpha) - 1 else alpha[i + 1] * x0 + sigma[i + 1] * eps
    return x


@torch.no_grad()
def wake(net):
    """Random weights (std 0.02) for the tensors the recipes initialise at or near zero (DiT's adaLN-zero and
    output layer, EDM's 1e-5 output scale), so that the sampled networks' outputs are not ~0 and comparing the
    two sides' samples checks the loops."""
    for p in net.parameters():
        if p.abs().max() < 1e-3:
            p.normal_(0.0, 0.02)
    return net


@torch.no_grad()
def bench_sampling(recipe: Recipe, fast: bool, compile_: bool, batch: int, steps: int, sampler_cls, reps: int, device):
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    set_tf32(fast)
    net = wake(recipe.net()).to(device).eval()
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(batch, net.in_channels, net.img_resolution, net.img_resolution, generator=g).to(device)
    labels = torch.randint(0, net.num_classes, (batch,), generator=g).to(device) if net.num_classes else None
    if fast:
        net = net.to(memory_format=torch.channels_last)
    net = torch.compile(net) if fast and compile_ else net  # one network (and compilation) for both sides
    sampler = sampler_cls(steps=steps)
    times = sampler.times(recipe.process)
    model = precondition(net, recipe.process, recipe.prediction)
    sides = {
        "framework": lambda: sample(model, recipe.process, recipe.prediction, sampler, noise.shape, noise=noise,
                                    class_labels=labels),
        "plain": (lambda: plain_heun(net, recipe.prediction.sigma_data, recipe.process.prior_std(), times, noise, labels)) if sampler_cls is HeunODE
        else (lambda: plain_ddim(net, recipe.process, recipe.prediction, times, noise, labels)),
    }
    result, samples, run_times = {}, {}, {"framework": [], "plain": []}
    order = list(sides)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
        for name, run in sides.items():
            out = run()  # warm-up (compilation)
            samples[name] = (out.x if name == "framework" else out).float()
            if name == "framework":
                result["nfe"] = out.nfe
        for i in range(reps):  # one run of each side per round, the order flipping every round
            for name in order if i % 2 == 0 else order[::-1]:
                sync(device)
                start = time.perf_counter()
                sides[name]()
                sync(device)
                run_times[name].append(time.perf_counter() - start)
    for name in sides:
        result[name] = batch / statistics.median(run_times[name])
    # relative to the samples' scale: random weights give large x0_hat and both loops round differently
    result["max_diff"] = ((samples["framework"] - samples["plain"]).abs().max() / samples["framework"].abs().max()).item()
    precision, torch.backends.cudnn.allow_tf32 = previous
    torch.set_float32_matmul_precision(precision)
    return result


def fmt(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny networks, small batches, few steps, on the CPU")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, cpu with --toy)")
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--fast", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="torch.compile among the fast paths (auto: on CUDA only)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: per network, 8 with --toy)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 30, 4 with --toy)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps, >= 1 (default 10, 2 with --toy)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="training runs per side, alternating which side goes first (default 1)")
    parser.add_argument("--sample-batch", type=int, default=None, help="default 64 (8 with --toy)")
    parser.add_argument("--sample-reps", type=int, default=None, help="timed sampling runs (default 3, 1 with --toy)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's; 1 with --toy, where tiny layers gain nothing from more)")
    parser.add_argument("--json", default=None, help="also write every number (and the checks) to this file")
    args = parser.parse_args(argv)
    # Lightning's per-Trainer notices (GPU available, tips) and two warnings about what is meant here: the module
    # has a validation_step and no validation data is given; Lightning 2.6's own use of torch's pytree API
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", "You defined a `validation_step` but have no `val_dataloader`")
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.toy else "cpu"))
    toy = args.toy
    if args.threads or toy:
        torch.set_num_threads(args.threads or 1)
    steps, warmup = args.steps or (4 if toy else 30), args.warmup or (2 if toy else 10)
    if steps < 1 or warmup < 1 or args.rounds < 1:
        parser.error(f"--steps {steps}, --warmup {warmup}, --rounds {args.rounds}: expected integers >= 1")
    sample_batch, reps = args.sample_batch or (8 if toy else 64), args.sample_reps or (1 if toy else 3)
    compile_ = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {name}; torch {torch.__version__}, lightning {L.__version__}; {'toy networks' if toy else 'recipe networks'}; "
          f"fast paths on = bf16 autocast + {'fused' if 'fused' in fast_optimizer(torch.optim.Adam, device) else 'foreach'} "
          f"Adam + channels_last + TF32{' + torch.compile' if compile_ else ' (torch.compile off: --compile on)'}")
    print(f"training: one fixed batch on the device (the data pipeline is not measured), {warmup} warm-up + {steps} "
          f"timed steps per side and round, {args.rounds} round(s); images/s = batch / median step time\n")
    report = dict(device=name, toy=toy, compile=compile_, warmup=warmup, steps=steps, rounds=args.rounds, train=[],
                  sample=[], checks=[])
    print("| network | fast paths | batch | steps trained fw / plain | framework img/s | plain img/s | framework / plain "
          "| peak MiB fw | peak MiB plain |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for net_name in args.nets:
        recipe = load_recipe(net_name, toy)
        batch_size = args.batch or (8 if toy else NETS[net_name][2])
        batch = make_batch(recipe.net(), batch_size, device)
        for mode in args.fast:
            fast = mode == "on"
            runs: dict = {"framework": [], "plain": []}
            sides = [("framework", train_framework), ("plain", train_plain)]
            for r in range(args.rounds):  # the order flips every round: a machine's slow drift hits both sides
                for side, train in sides if r % 2 == 0 else sides[::-1]:
                    runs[side].append(train(recipe, fast, compile_, batch, warmup + steps, warmup, device))
            fw, plain = runs["framework"][0], runs["plain"][0]
            # images/s from the median step time over all rounds: robust to a shared machine's pauses
            fw_ips, plain_ips = (batch_size / statistics.median(t for run in runs[side] for t in run["step_times"])
                                 for side in ("framework", "plain"))
            print(f"| {net_name} | {mode} | {batch_size} | {fw['steps']} / {plain['steps']} | {fw_ips:.1f} | "
                  f"{plain_ips:.1f} | {fw_ips / plain_ips:.3f} | {fmt(fw['peak_mib'], '.0f')} | "
                  f"{fmt(plain['peak_mib'], '.0f')} |", flush=True)
            report["train"].append(dict(net=net_name, fast=mode, batch=batch_size, framework_steps=fw["steps"],
                                        plain_steps=plain["steps"], framework_img_s=fw_ips, plain_img_s=plain_ips,
                                        ratio=fw_ips / plain_ips, framework_peak_mib=fw["peak_mib"],
                                        plain_peak_mib=plain["peak_mib"], framework_losses=fw["losses"],
                                        plain_losses=plain["losses"]))
            if not fast:
                report["checks"].append(dict(
                    net=net_name, same_start=torch.equal(fw["start_weights"], plain["start_weights"]),
                    loss1_framework=fw["losses"][0], loss1_plain=plain["losses"][0],
                    end_weights_rel_diff=rel_diff(fw["end_weights"], plain["end_weights"]),
                    end_ema_rel_diff=rel_diff(fw["end_ema"], plain["end_ema"])))
    print("\n| network | sampler | NFE | fast paths | batch | framework img/s | plain img/s | framework / plain "
          "| max diff / max abs |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for net_name in args.nets:
        recipe = load_recipe(net_name, toy)
        sampler_cls, gpu_steps, toy_steps = NETS[net_name][3]
        for mode in args.fast:
            r = bench_sampling(recipe, mode == "on", compile_, sample_batch, toy_steps if toy else gpu_steps,
                               sampler_cls, reps, device)
            print(f"| {net_name} | {sampler_cls.__name__} | {r['nfe']} | {mode} | {sample_batch} | {r['framework']:.1f} | "
                  f"{r['plain']:.1f} | {r['framework'] / r['plain']:.3f} | {r['max_diff']:.1e} |", flush=True)
            report["sample"].append(dict(net=net_name, sampler=sampler_cls.__name__, fast=mode, batch=sample_batch,
                                         framework_img_s=r["framework"], plain_img_s=r["plain"], nfe=r["nfe"],
                                         ratio=r["framework"] / r["plain"], max_diff=r["max_diff"]))
    print("\nchecks (float32, fast paths off): both sides start from the same weights and give the same step-1 loss")
    for c in report["checks"]:
        print(f"  {c['net']}: same initial weights {'yes' if c['same_start'] else 'NO'}; step-1 loss framework "
              f"{c['loss1_framework']:.7g}, plain {c['loss1_plain']:.7g}; after the last step the weights' and the "
              f"EMA's fingerprints differ by {c['end_weights_rel_diff']:.1e} and {c['end_ema_rel_diff']:.1e} (relative)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
