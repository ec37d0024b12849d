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
(configs/overrides/fsdp.yaml). Activation checkpointing stays the networks' own switch
(`checkpoint_activations`), not FSDPStrategy's `activation_checkpointing_policy`: setting both would
checkpoint each block twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from diffusion_pl.networks.base import ScoreNetwork
from diffusion_pl.networks.dit import DiTBlock
from diffusion_pl.networks.unet_blocks import ResBlock

__all__ = ["BLOCK_CLASSES", "BlockWrapPolicy", "FlatShards", "global_grad_norm", "is_sharded", "unwrapped_name"]

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


_WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})  # torch's wrapper attributes


def unwrapped_name(name: str) -> str:
    """A parameter or buffer name of an FSDP-wrapped module as the unwrapped module names it (FSDP1's and
    activation checkpointing's wrapper attributes left out; FSDP1 cleans names only inside summon_full_params)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


class FlatShards:
    """Where a list of tensors (a network's parameters) lies on the ranks of an FSDP shard group, to gather them
    whole and to cut whole ones back into this rank's slices.

    Under Lightning's FSDPStrategy (FSDP1, `use_orig_params=True`) a rank sees each parameter of a unit as a
    1-D view of its part of the unit's flat parameter (empty if it holds none of it). The flat parameter is the
    unit's parameters flattened and concatenated (with alignment padding between them), cut into equal
    contiguous pieces in group-rank order; so a parameter's flattened value is the concatenation of the ranks'
    views of it in rank order. That is all this class relies on, no FSDP internals: the ranks exchange their
    views' sizes once and they must add up to each full shape, else a ValueError (another layout).

    torch's own gathering (`FSDP.state_dict` / `summon_full_params`) gathers the module's parameters, not tensors
    shaped like them: it would need the averages copied into the training weights for the gather (rounded to
    their dtype under `bf16-true`) and back, so a power-function EMA gathers with this instead.

    Args:
        local: this rank's views, e.g. `list(net.parameters())` of an FSDP-wrapped network (1-D).
        shapes: the full shape of each tensor (from the network before wrapping).
        group: the shard group (the FSDP module's `process_group`; None for the whole world).
        device: where the collectives run (the strategy's root device: CUDA under NCCL, CPU under gloo).

    A collective: every rank of `group` constructs it, and calls `gather` together.
    """

    def __init__(self, local: Sequence[Tensor], shapes: Sequence[torch.Size], group=None,
                 device: torch.device | str = "cpu", bucket_numel: int = 1 << 24) -> None:
        self.group, self.device, self.bucket_numel = group, torch.device(device), int(bucket_numel)
        self.shapes = [torch.Size(s) for s in shapes]
        if len(local) != len(self.shapes):
            raise ValueError(f"{len(local)} local tensors for {len(self.shapes)} shapes: expected one shape per tensor")
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        counts = torch.tensor([t.numel() for t in local], dtype=torch.int64, device=self.device)
        table = [torch.empty_like(counts) for _ in range(self.world)]
        dist.all_gather(table, counts, group=group)
        self.counts = torch.stack(table).cpu()  # (ranks, tensors): numel of each rank's slice
        totals = self.counts.sum(0).tolist()
        wrong = [i for i, (n, s) in enumerate(zip(totals, self.shapes)) if n != s.numel()]
        if wrong:
            i = wrong[0]
            raise ValueError(f"the ranks' slices of tensor {i} hold {totals[i]} elements, its full shape "
                             f"{tuple(self.shapes[i])} {self.shapes[i].numel()}: expected flat slices that partition "
                             "each parameter (FSDPStrategy with use_orig_params=True)")
        self.offsets = (self.counts.cumsum(0) - self.counts)[self.rank].tolist()  # where this rank's slice starts
        self.includes_global_zero = 0 in (dist.get_process_group_ranks(group) if group is not None
                                          else range(self.world))

    def local(self, full: Sequence[Tensor]) -> list[Tensor]:
        """This rank's slices of the whole tensors `full` (views of them, flattened)."""
        counts = self.counts[self.rank].tolist()
        return [f.reshape(-1)[o:o + n] for f, o, n in zip(full, self.offsets, counts)]

    @torch.no_grad()
    def gather(self, local: Sequence[Tensor]) -> list[Tensor] | None:
        """The whole tensors, in their full shapes on the CPU, on group rank 0 (None on the others).

        Bucketed (at most about `bucket_numel` elements gathered at a time, one dtype per bucket), each bucket
        one `dist.gather` of the ranks' concatenated slices padded to the longest."""
        full: list[Tensor] | None = [] if self.rank == 0 else None
        for bucket in self._buckets(local):
            counts = self.counts[:, bucket]  # (ranks, bucket)
            length = int(counts.sum(1).max())
            dtype = local[bucket[0]].dtype
            send = torch.zeros(length, dtype=dtype, device=self.device)
            pieces = [local[i].reshape(-1) for i in bucket]
            if pieces:
                mine = torch.cat(pieces).to(self.device)
                send[:mine.numel()] = mine
            received = [torch.empty_like(send) for _ in range(self.world)] if self.rank == 0 else None
            dist.gather(send, received, group=self.group, group_dst=0)
            if full is None:
                continue
            per_rank = [r.cpu().split([*counts[k].tolist(), length - int(counts[k].sum())])
                        for k, r in enumerate(received)]
            for j, i in enumerate(bucket):
                full.append(torch.cat([parts[j] for parts in per_rank]).view(self.shapes[i]))
        return full

    def _buckets(self, local: Sequence[Tensor]) -> list[list[int]]:
        buckets: list[list[int]] = []
        size = 0
        for i, tensor in enumerate(local):
            if buckets and size + self.shapes[i].numel() <= self.bucket_numel \
                    and local[buckets[-1][0]].dtype == tensor.dtype:
                buckets[-1].append(i)
                size += self.shapes[i].numel()
            else:
                buckets.append([i])
                size = self.shapes[i].numel()
        return buckets
