"""Sharded training (FSDP): the wrap policy of the networks, and what the module needs to know of a sharded run.

Under Lightning's `FSDPStrategy` (torch's FullyShardedDataParallel, Zhao et al. 2023, "PyTorch FSDP") every
rank keeps 1/N of each wrapped unit's parameters, gradients and optimizer state, and gathers a unit's full
weights only while it runs. `BlockWrapPolicy` is the auto-wrap policy for the project's networks:

- each transformer block (`DiTBlock`) and each residual block (`ResBlock`, with its attention) is a unit:
  what is gathered at a time is one block, and activation-free memory falls as 1/N;
- each network (`ScoreNetwork`: DiT, UNet and subclasses) is a unit of its own, holding what is left outside
  its blocks (embeddings, the final layer). This is what makes the EMA shard like the weights: the module's
  `net` and `ema` are two copies of one architecture, so the policy wraps them identically and every rank
  holds the same slice of both; the EMA update (training/ema.py) is then a foreach lerp over the rank's
  local slices, with no communication. Without the network as a unit, the rest of both networks would
  share the LightningModule's root unit, whose flat slice does not split them alike; the update refuses that.

It is the one place that lists the block classes, so the recipes' YAML names the policy rather than the
classes: `auto_wrap_policy: {class_path: diffusion_pl.training.sharding.BlockWrapPolicy}`
(configs/strategies/fsdp.yaml). Activation checkpointing stays the networks' own switch
(`checkpoint_activations`), not FSDPStrategy's `activation_checkpointing_policy`: setting both would
checkpoint each block twice.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from diffusion_pl.networks.base import ScoreNetwork
from diffusion_pl.networks.dit import DiTBlock
from diffusion_pl.networks.unet_blocks import ResBlock

__all__ = ["BLOCK_CLASSES", "BlockWrapPolicy", "global_grad_norm", "is_sharded"]

BLOCK_CLASSES: tuple[type[nn.Module], ...] = (DiTBlock, ResBlock)


class BlockWrapPolicy(ModuleWrapPolicy):
    """FSDP auto-wrap policy: every `DiTBlock` and `ResBlock`, and every network (`ScoreNetwork`), is a unit.

    A `torch.distributed.fsdp.wrap.ModuleWrapPolicy` of those classes (matched with isinstance, so
    subclasses are wrapped too); give it as FSDPStrategy's `auto_wrap_policy`.
    """

    def __init__(self) -> None:
        super().__init__({*BLOCK_CLASSES, ScoreNetwork})

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def is_sharded(strategy: object) -> bool:
    """Whether each rank of `strategy` holds only a slice of the parameters (FSDP other than NO_SHARD,
    DeepSpeed, model parallel): then a parameter as a rank sees it is its local shard."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, FSDPStrategy):
        return getattr(strategy.sharding_strategy, "name", str(strategy.sharding_strategy)) != "NO_SHARD"
    return isinstance(strategy, (DeepSpeedStrategy, ModelParallelStrategy))


def global_grad_norm(local_grads: list[Tensor], strategy: object) -> Tensor:
    """The 2-norm of the whole gradient from each rank's `local_grads`.

    Unsharded, a rank's gradients are the whole gradient. Sharded, the ranks' slices partition it (per
    replica: HYBRID_SHARD repeats the partition on every node), so the norm is the square root of the sum
    of the ranks' squared norms over the replicas. A collective under sharding: every rank calls it.
    """
    squares = [torch.linalg.vector_norm(g.float()) ** 2 for g in local_grads if g.numel()]
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if not is_sharded(strategy):
        return total.sqrt()
    device = getattr(strategy, "root_device", total.device)
    total = strategy.reduce(total.to(device), reduce_op="sum")
    replicas = strategy.world_size // _shard_size(strategy)
    return (total / replicas).sqrt()


def _shard_size(strategy: object) -> int:
    """How many ranks one copy of the parameters is split over (the world, but per node under HYBRID_SHARD)."""
    model = getattr(strategy, "model", None)
    size = getattr(model, "world_size", None)  # FullyShardedDataParallel: its sharding group's size
    return size if isinstance(size, int) and size > 0 else strategy.world_size
