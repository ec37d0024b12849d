"""FSDP2 worker for tests/training/test_sharding.py (run as a script, never collected).

    PYTHONPATH=<repository root> python tests/workers/fsdp2_ema.py OUT_DIR dit|unet

Builds a DiffusionModule of a tiny network on 2 CPU processes (gloo), shards its `net` and its `ema` with
torch's FSDP2 (`fully_shard`, DTensor parameters) unit by unit as diffusion_pl.training.sharding.BlockWrapPolicy
names them (every block, then every network), moves the net's weights as an optimizer step would (the same
deterministic change on every rank, applied to the rank's shards), runs two EMA updates on the shards, and
gathers the full state dict (torch.distributed.checkpoint.state_dict, full_state_dict=True). Rank 0 writes
OUT_DIR/full.pt: the gathered state dict, and per parameter of the ema the local shard shape on each rank.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from diffusion_pl.training.sharding import BlockWrapPolicy
from tests.support.sharding import step_module


def shard(module: torch.nn.Module) -> None:
    """fully_shard every unit the policy names, innermost first (FSDP2 has no auto-wrap)."""
    classes = tuple(BlockWrapPolicy()._module_classes)
    for sub in reversed(list(module.modules())):  # children before their parents
        if isinstance(sub, classes):
            fully_shard(sub)


def run(rank: int, world: int, port: int, out: str, network: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    module = step_module(network)  # identical on every rank (seeded)
    shard(module.net)
    shard(module.ema)
    step_module(network, module)  # the optimizer step and the two EMA updates, on this rank's shards
    local = [list(p.to_local().shape) for p in module.ema.parameters()]
    shapes = [None] * world
    dist.all_gather_object(shapes, local)
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"state_dict": state, "local_shapes": shapes}, Path(out) / "full.pt")
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mp.spawn(run, args=(2, free_port(), sys.argv[1], sys.argv[2]), nprocs=2)
