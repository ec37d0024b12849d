"""Training and sampling images/s of the framework against a plain PyTorch loop, fast paths on and off.

    python bench/bench_train.py --toy                       # tiny networks on the CPU, under a minute
    python bench/bench_train.py --device cuda               # the recipes' networks at their per-GPU batch
    python bench/bench_train.py --device cuda --nets dit_xl2 --fast on --json dit.json

Networks: `ddpmpp`, EDM's DDPM++ of configs/cifar10_edm.yaml at 32x32, batch 64; `dit_xl2`, DiT-XL/2 of
configs/imagenet256_dit_xl2.yaml on 4x32x32 cached latents (no VAE in the step), batch 32; each with the
recipe's process, prediction, loss, optimizer, EMA and extras, random weights. `--toy`: tiny widths on the CPU.

Training: `DiffusionModule` under a Lightning `Trainer` against a bare loop over the same network, loss,
`precondition`, optimizer and `torch._foreach_lerp_` EMA, reseeded before each step as the module reseeds, so in
float32 both give the same losses, weights and EMA (checked and printed). One fixed batch on the device (the
data pipeline is not measured); images/s = batch / median step time after `--warmup` steps. Sampling:
`diffusion_pl.sample` (HeunODE / DDIM) against a plain loop calling the same network on the same grid from the
same noise. Fast paths off / on alike on both sides: float32 / bf16 autocast, per-parameter / fused Adam,
contiguous / channels_last, eager / torch.compile (CUDA only unless --compile on), TF32 off / on.
What each number means, and the numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
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
from train_floor import fingerprint, fresh, peak, plain_ddim, plain_heun, set_tf32, step_times, sync, train_plain

ROOT = Path(__file__).resolve().parents[1]
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


def make_batch(net, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    c, (h, w) = net.in_channels, (net.img_resolution,) * 2
    x0 = (torch.rand(batch, c, h, w, generator=g) * 2 - 1).to(device)  # pixels in [-1, 1] or latents alike
    labels = torch.randint(0, net.num_classes or 1, (batch,), generator=g).to(device)
    return x0, labels


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


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


def train_framework(recipe: Recipe, fast: bool, compile_: bool, batch, steps: int, warmup: int, device) -> dict:
    fresh(device)
    net = recipe.net()
    start_weights = fingerprint(net)
    module = DiffusionModule(net, recipe.process, recipe.prediction, optimizer=recipe.optimizer(fast, device),
                             channels_last=fast, compile=fast and compile_, seed=0, **recipe.module_args())
    probe = Probe(device)
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=steps,
                        precision="bf16-mixed" if fast else "32-true",
                        gradient_clip_val=recipe.clip, callbacks=[probe, TF32(matmul=fast, cudnn=fast)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(Repeat(batch, steps), batch_size=None))
    losses = torch.stack(probe.losses).float().cpu()
    return dict(steps=trainer.global_step, step_times=step_times(probe.ends, warmup), losses=losses.tolist(),
                start_weights=start_weights, end_weights=fingerprint(module.net), end_ema=fingerprint(module.ema),
                peak_mib=peak(device))


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
    process, prediction = recipe.process, recipe.prediction
    if sampler_cls is HeunODE:
        def plain():
            return plain_heun(net, prediction.sigma_data, process.prior_std(), times, noise, labels)
    else:
        def plain():
            return plain_ddim(net, process, prediction, times, noise, labels)
    sides = {"framework": lambda: sample(model, process, prediction, sampler, noise.shape, noise=noise,
                                         class_labels=labels),
             "plain": plain}
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
    difference = (samples["framework"] - samples["plain"]).abs().max()
    result["max_diff"] = (difference / samples["framework"].abs().max()).item()
    precision, torch.backends.cudnn.allow_tf32 = previous
    torch.set_float32_matmul_precision(precision)
    return result


# the tables' columns: (header, key of the row, format; a pair of keys prints "a / b")
TRAIN_COLUMNS = [("network", "net", "s"), ("fast paths", "fast", "s"), ("batch", "batch", "d"),
                 ("steps trained fw / plain", ("framework_steps", "plain_steps"), "d"),
                 ("framework img/s", "framework_img_s", ".1f"), ("plain img/s", "plain_img_s", ".1f"),
                 ("framework / plain", "ratio", ".3f"), ("peak MiB fw", "framework_peak_mib", ".0f"),
                 ("peak MiB plain", "plain_peak_mib", ".0f")]
SAMPLE_COLUMNS = [("network", "net", "s"), ("sampler", "sampler", "s"), ("NFE", "nfe", "d"),
                  ("fast paths", "fast", "s"), ("batch", "batch", "d"), ("framework img/s", "framework_img_s", ".1f"),
                  ("plain img/s", "plain_img_s", ".1f"), ("framework / plain", "ratio", ".3f"),
                  ("max diff / max abs", "max_diff", ".1e")]


def print_header(columns) -> None:
    print("\n| " + " | ".join(c[0] for c in columns) + " |")
    print("|" + "|".join("---" if c[2] == "s" else "---:" for c in columns) + "|")


def print_row(columns, row: dict) -> dict:
    """Print `row` as a line of the table; n/a for a missing value (peak memory on a CPU). Returns the row."""
    def cell(key, spec):
        if isinstance(key, tuple):
            return " / ".join(cell(k, spec) for k in key)
        return "n/a" if row[key] is None else format(row[key], spec)

    print("| " + " | ".join(cell(key, spec) for _, key, spec in columns) + " |", flush=True)
    return row


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
    adam = "fused" if "fused" in fast_optimizer(torch.optim.Adam, device) else "foreach"
    print(f"device {name}; torch {torch.__version__}, lightning {L.__version__}; "
          f"{'toy networks' if toy else 'recipe networks'}; fast paths on = bf16 autocast + {adam} "
          f"Adam + channels_last + TF32{' + torch.compile' if compile_ else ' (torch.compile off: --compile on)'}")
    print(f"training: one fixed batch on the device (the data pipeline is not measured), {warmup} warm-up + {steps} "
          f"timed steps per side and round, {args.rounds} round(s); images/s = batch / median step time")
    report = dict(device=name, toy=toy, compile=compile_, warmup=warmup, steps=steps, rounds=args.rounds, train=[],
                  sample=[], checks=[])
    print_header(TRAIN_COLUMNS)
    for net_name in args.nets:
        recipe = load_recipe(net_name, toy)
        batch_size = args.batch or (8 if toy else NETS[net_name][2])
        batch = make_batch(recipe.net(), batch_size, device)
        for mode in args.fast:
            runs: dict = {"framework": [], "plain": []}
            sides = [("framework", train_framework), ("plain", train_plain)]
            for r in range(args.rounds):  # the order flips every round: a machine's slow drift hits both sides
                for side, train in sides if r % 2 == 0 else sides[::-1]:
                    runs[side].append(train(recipe, mode == "on", compile_, batch, warmup + steps, warmup, device))
            fw, plain = runs["framework"][0], runs["plain"][0]
            # images/s from the median step time over all rounds: robust to a shared machine's pauses
            fw_ips, plain_ips = (batch_size / statistics.median(t for run in runs[side] for t in run["step_times"])
                                 for side in ("framework", "plain"))
            report["train"].append(print_row(TRAIN_COLUMNS, dict(
                net=net_name, fast=mode, batch=batch_size, framework_steps=fw["steps"], plain_steps=plain["steps"],
                framework_img_s=fw_ips, plain_img_s=plain_ips, ratio=fw_ips / plain_ips,
                framework_peak_mib=fw["peak_mib"], plain_peak_mib=plain["peak_mib"], framework_losses=fw["losses"],
                plain_losses=plain["losses"])))
            if mode == "off":
                report["checks"].append(dict(
                    net=net_name, same_start=torch.equal(fw["start_weights"], plain["start_weights"]),
                    loss1_framework=fw["losses"][0], loss1_plain=plain["losses"][0],
                    end_weights_rel_diff=rel_diff(fw["end_weights"], plain["end_weights"]),
                    end_ema_rel_diff=rel_diff(fw["end_ema"], plain["end_ema"])))
    print_header(SAMPLE_COLUMNS)
    for net_name in args.nets:
        recipe = load_recipe(net_name, toy)
        sampler_cls, gpu_steps, toy_steps = NETS[net_name][3]
        for mode in args.fast:
            r = bench_sampling(recipe, mode == "on", compile_, sample_batch, toy_steps if toy else gpu_steps,
                               sampler_cls, reps, device)
            report["sample"].append(print_row(SAMPLE_COLUMNS, dict(
                net=net_name, sampler=sampler_cls.__name__, nfe=r["nfe"], fast=mode, batch=sample_batch,
                framework_img_s=r["framework"], plain_img_s=r["plain"], ratio=r["framework"] / r["plain"],
                max_diff=r["max_diff"])))
    if report["checks"]:
        print("\nchecks (float32, fast paths off): both sides start from the same weights and give the same step-1 "
              "loss")
    for c in report["checks"]:
        print(f"  {c['net']}: same initial weights {'yes' if c['same_start'] else 'NO'}; step-1 loss framework "
              f"{c['loss1_framework']:.7g}, plain {c['loss1_plain']:.7g}; after the last step the weights' and the "
              f"EMA's fingerprints differ by {c['end_weights_rel_diff']:.1e} and {c['end_ema_rel_diff']:.1e} "
              "(relative)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
