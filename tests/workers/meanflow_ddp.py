"""Subprocess entry for tests/training/test_meanflow_ddp.py: one MeanFlow gradient on 2 CPU ranks (gloo).

Each rank takes half of a fixed global batch (x0, t, r, eps) and backpropagates the MeanFlow loss in two ways:
'module': DDP wraps a module whose forward computes the whole loss, JVP included (what Lightning does: its DDP
wrapper's forward runs DiffusionModule.training_step); 'bare': DDP wraps the network but the loss calls the
unwrapped `ddp.module` (the JVP's usual escape from DDP), which skips the gradient all-reduce. Each rank
saves its gradients of both; the test compares them with one process on the global batch.

usage: PYTHONPATH=<repository root> python tests/workers/meanflow_ddp.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from diffusion_pl.meanflow import MeanFlowLoss, MeanFlowTimes
from diffusion_pl.networks.unet import UNet
from diffusion_pl.prediction import VelocityPrediction, precondition
from diffusion_pl.processes.interpolants import RectifiedFlow

PROCESS, PREDICTION = RectifiedFlow(), VelocityPrediction()
LOSS = MeanFlowLoss(MeanFlowTimes(ratio=1.0))
GLOBAL_BATCH = 8


def make_net() -> UNet:
    torch.manual_seed(0)
    net = UNet(img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), dropout=0.0, interval_embedding=True)
    with torch.no_grad():  # the output convolution starts at zero: give it weights so every gradient is non-trivial
        net.conv_out.weight.normal_(0.0, 0.1)
    return net


def global_batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g)
    t, r = LOSS.times.sample(GLOBAL_BATCH, PROCESS, g)
    return x0, t, r, torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g)


class LossModule(nn.Module):
    """The network with the loss in forward, as a LightningModule's training_step under DDP."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x0, t, r, eps):
        model = precondition(self.net, PROCESS, PREDICTION)
        return LOSS(model, x0, PROCESS, PREDICTION, t=t, r=r, eps=eps).loss.mean()


def grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in net.named_parameters()}


def rank_main(rank: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=2)
    half = slice(rank * GLOBAL_BATCH // 2, (rank + 1) * GLOBAL_BATCH // 2)
    batch = [v[half] for v in global_batch()]
    ddp = DistributedDataParallel(LossModule(make_net()))
    ddp(*batch).backward()
    through_ddp = grads(ddp.module.net)
    bare = DistributedDataParallel(make_net())
    LossModule(bare.module)(*batch).backward()
    torch.save({"module": through_ddp, "bare": grads(bare.module)}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(rank_main, args=(out,), nprocs=2)


if __name__ == "__main__":
    main()
