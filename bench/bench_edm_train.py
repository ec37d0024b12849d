"""NVlabs/edm's own train.py on one CPU thread, the small DDPM++ of bench/bench_order.py, per-step training loss.

Needs a checkout of NVlabs/edm (https://github.com/NVlabs/edm), passed as ``--edm PATH``, and a data set zip made
by its dataset_tool.py. The script is not imported by the tests. It runs EDM's ``train.py`` command (its
options, seeding, data loader, InfiniteSampler, loss and training loop) in this process with CPU shims that
leave the arithmetic alone: the process group uses gloo instead of nccl (torch_utils/distributed.py:26-28),
``DistributedDataParallel`` gets no device_ids (training_loop.py:89), the CUDA memory statistics of the
progress line read 0 (training_loop.py:166-168), ``torch.utils.data.Sampler`` accepts the data set that
EDM's InfiniteSampler passes it (torch_utils/misc.py:116; recent torch takes no argument there), and psutil,
read for that line only, is stubbed when absent.
train.py has no options for these, so the training loop gets them here: device cpu, num_blocks 2 (the
network of bench/bench_order.py, 441,875 parameters) and lr_rampup_kimg = 200 steps x batch / 1000 (the
200-step ramp). Every ``Loss/loss`` report (training_loop.py:131) is recorded: its mean is the step's
training loss, comparable with the ``loss`` of bench/bench_order.py (both the mean of EDM's weighted squared
error over the batch and the pixels).

usage:
  git clone https://github.com/NVlabs/edm /tmp/edm
  tar xzf cifar10-jpeg.tar.gz -C /tmp
  python /tmp/edm/dataset_tool.py --source=/tmp/cifar10-jpeg/train --dest=/tmp/cifar10-edm.zip
  python bench/bench_edm_train.py --edm /tmp/edm --data /tmp/cifar10-edm.zip --seed 0 --out edm0.json
  python bench/bench_edm_train.py --summary edm0.json ... ours0.json ...   # with bench_order.py's JSON files
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import types

# bench/bench_order.py's windows, and steps 65-193, where the earlier comparison saw the gap
WINDOWS = ((1, 49), (50, 99), (100, 199), (200, 250), (65, 193))


def train(edm: str, data: str, seed: int, steps: int, batch: int, xflip: bool, augment: float) -> list[float]:
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
    sys.path.insert(0, edm)
    if importlib.util.find_spec("psutil") is None:  # only the progress line's memory figure reads it
        sys.modules["psutil"] = types.SimpleNamespace(
            Process=lambda pid: types.SimpleNamespace(memory_info=lambda: types.SimpleNamespace(rss=0)))
    import train as edm_train  # noqa: PLC0415 (EDM's train.py)
    from torch_utils import distributed, training_stats  # noqa: PLC0415
    from training import training_loop  # noqa: PLC0415

    def init() -> None:  # distributed.py:14-31 with gloo and no CUDA device
        os.environ.setdefault("MASTER_ADDR", "localhost")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        torch.distributed.init_process_group(backend="gloo", init_method="env://")
        training_stats.init_multiprocessing(rank=0, sync_device=None)

    class CPUDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module, device_ids=None, **kwargs):
            super().__init__(module, **kwargs)

    losses: list[float] = []
    report = training_stats.report

    def record(name, value):
        if name == "Loss/loss":
            losses.append(float(value.detach().mean()))
        return report(name, value)

    loop = training_loop.training_loop

    def shimmed_loop(**c):
        c["network_kwargs"]["num_blocks"] = 2
        return loop(**c, device=torch.device("cpu"), lr_rampup_kimg=200 * batch / 1000)

    distributed.init = init
    training_stats.report = record
    training_loop.training_loop = shimmed_loop
    torch.nn.parallel.DistributedDataParallel = CPUDDP
    torch.cuda.max_memory_allocated = torch.cuda.max_memory_reserved = lambda *a, **k: 0
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.utils.data.Sampler.__init__ = lambda self, data_source=None: None  # EDM passes the data set (misc.py:116)
    with tempfile.TemporaryDirectory() as outdir:
        args = ["--outdir", outdir, "--data", data, "--cond", "0", "--arch", "ddpmpp", "--precond", "edm",
                "--duration", str(steps * batch / 1e6), "--batch", str(batch), "--cbase", "16", "--cres", "1,2,2",
                "--lr", "1e-3", "--dropout", "0.13", "--augment", str(augment), "--xflip", str(int(xflip)),
                "--fp16", "0", "--seed", str(seed), "--tick", "1000", "--snap", "1000", "--dump", "1000",
                "--workers", "1", "--nosubdir"]
        edm_train.main.main(args, standalone_mode=False)
    torch.distributed.destroy_process_group()
    return losses


def window_mean(values: list[float], lo: int, hi: int) -> float:
    return statistics.fmean(values[lo - 1:hi])


def summary(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    sides: dict[str, list[dict]] = {}
    for r in runs:
        sides.setdefault(r.get("side", "diffusion_pl"), []).append(r)
    head = " ".join(f"{lo:>4}-{hi:<4}" for lo, hi in WINDOWS)
    print(f"{'side':>13} {'seed':>4} | {head}")
    for side, rs in sides.items():
        for r in sorted(rs, key=lambda r: r["seed"]):
            print(f"{side:>13} {r['seed']:>4} | " + " ".join(f"{window_mean(r['loss'], lo, hi):9.4f}"
                                                            for lo, hi in WINDOWS))
        cells = []
        for lo, hi in WINDOWS:
            means = [window_mean(r["loss"], lo, hi) for r in rs]
            sd = statistics.stdev(means) if len(means) > 1 else float("nan")
            cells.append(f"{statistics.fmean(means):.4f}+-{sd:.4f}")
        print(f"{side:>13} mean | " + " ".join(cells) + "   (mean +- sd over seeds)")
    if len(sides) == 2:  # difference of the two sides' means, +- its standard error (seeds independent)
        (a, ra), (b, rb) = sides.items()
        cells = []
        for lo, hi in WINDOWS:
            ma, mb = ([window_mean(r["loss"], lo, hi) for r in rs] for rs in (ra, rb))
            se = (statistics.variance(ma) / len(ma) + statistics.variance(mb) / len(mb)) ** 0.5 \
                if min(len(ma), len(mb)) > 1 else float("nan")
            cells.append(f"{statistics.fmean(ma) - statistics.fmean(mb):+.4f}+-{se:.4f}")
        print(f"{a} - {b}: " + " ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edm", help="path of an NVlabs/edm checkout")
    p.add_argument("--data", help="data set zip written by EDM's dataset_tool.py")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--xflip", type=int, choices=(0, 1), default=1,
                   help="EDM's dataset x-flips (default 1: as the project's random_flip default)")
    p.add_argument("--augment", type=float, default=0.0, help="EDM's augment probability (its default: 0.12)")
    p.add_argument("--out", help="JSON file for the per-step losses")
    p.add_argument("--summary", nargs="+", help="print window means of these JSON files (this script's and "
                                                "bench_order.py's) instead of training")
    args = p.parse_args()
    if args.summary:
        return summary(args.summary)
    if not (args.edm and args.data and args.out):
        raise SystemExit("bench_edm_train: --edm, --data and --out are required to train (or --summary FILES)")
    losses = train(args.edm, args.data, args.seed, args.steps, args.batch, bool(args.xflip), args.augment)
    with open(args.out, "w") as f:
        json.dump({"side": "edm", "seed": args.seed, "xflip": bool(args.xflip), "augment": args.augment,
                   "loss": losses}, f)


if __name__ == "__main__":
    main()
