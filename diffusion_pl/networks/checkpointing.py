"""Activation checkpointing of a network's blocks (Chen et al. 2016, "Training Deep Nets with Sublinear
Memory Cost"): a checkpointed block keeps only its inputs for the backward pass and runs its forward
again there, trading about one extra forward pass for the memory of its intermediate activations.

`UNet(checkpoint_activations=True)` and `DiT(checkpoint_activations=True)` wrap each residual /
transformer block in `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`. The option adds no
module and no parameter, so state_dict keys are those of the network without it. Non-reentrant
checkpointing restores the random-number state for the recomputation (preserve_rng_state=True), so
dropout draws the same masks and outputs and gradients equal those without checkpointing.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion_pl.utils.errors import UserValueError

__all__ = ["check_checkpoint_option", "run_block"]


def check_checkpoint_option(network: str, value: object) -> bool:
    """`value` when it is a bool; else one line naming the option and what it takes."""
    if not isinstance(value, bool):
        raise UserValueError(f"{network}: checkpoint_activations={value!r}: expected true or false")
    return value


def run_block(owner: nn.Module, enabled: bool, fn: Callable[..., Tensor], *args: Tensor | None) -> Tensor:
    """`fn(*args)`, checkpointed when `enabled` and `owner` trains with gradients on.

    Evaluation, sampling and `torch.no_grad()` keep nothing for a backward pass, so there the block runs
    as is (checkpointing would only add overhead).
    """
    if enabled and owner.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
