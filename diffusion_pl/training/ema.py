"""EMA: the update rule of DiffusionModule's averaged network, and the run's one images-seen counter.

After every optimizer step the averaged copy moves towards the trained network,
ema <- beta ema + (1 - beta) net, with beta from one of two schedules:

- a fixed decay per optimizer step (DDPM, Ho et al. 2020: 0.9999), optionally with score_sde's warm-up
  beta = min(decay, (1 + n) / (10 + n)) after n earlier steps (Song et al. 2021, models/ema.py);
- a half-life counted in training images (EDM, Karras et al. 2022: 500k images), beta = 0.5^(B / h) for a
  step of B images, with EDM's ramp-up h <= ratio x images seen before the step (NVlabs/edm
  training/training_loop.py, "Update EMA": `cur_nimg` before `cur_nimg += batch_size`).

`images_seen` counts the training images of every optimizer step so far (all ranks, all micro-batches).
It is the run's training time: the ramp-up reads it, and the power-function EMA (callbacks/power_ema.py)
takes its time t and each step's length from it instead of counting batches itself. It is saved in every
checkpoint (`DiffusionModule.on_save_checkpoint`, under `STATE_KEY`) and restored exactly. A checkpoint
written before the counter was saved has no such entry; the counter is then unknown until the first step,
which sets it to (resumed step) x (that step's images): the value the step-based rule of those checkpoints
used, so their runs continue with the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_pl.utils.errors import UserValueError

__all__ = ["EMA", "STATE_KEY", "local_pairs"]

STATE_KEY = "ema_state"  # the checkpoint entry holding `EMA.state_dict()`


class EMA:
    """The EMA schedule of a training run and its images-seen counter.

    Args:
        decay: per-step decay, used when `half_life_images` is None (DDPM: 0.9999).
        warmup: use min(decay, (1 + n) / (10 + n)) after n optimizer steps, so the early average tracks the
            network (score_sde); ignored with `half_life_images`.
        half_life_images: half-life of the average counted in training images (EDM: 500k); replaces `decay`.
        rampup_ratio: EDM's ramp-up, half-life <= ratio x images seen (EDM: 0.05); None disables; ignored
            without `half_life_images`.

    The messages name the arguments as DiffusionModule (and the recipes' `model:` section) spells them.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = False, half_life_images: float | None = None,
                 rampup_ratio: float | None = None) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise UserValueError(f"ema_decay is {decay}: expected a value in [0, 1)")
        if not isinstance(warmup, bool):
            raise UserValueError(f"ema_warmup is {warmup!r}: expected true or false")
        if half_life_images is not None and not _positive(half_life_images):
            raise UserValueError(f"ema_half_life_images is {half_life_images}: expected a positive number "
                                 "(images) or None")
        if rampup_ratio is not None and not _positive(rampup_ratio):
            raise UserValueError(f"ema_rampup_ratio is {rampup_ratio}: expected a positive number or None")
        self.decay, self.warmup = float(decay), warmup
        self.half_life_images = None if half_life_images is None else float(half_life_images)
        self.rampup_ratio = None if rampup_ratio is None else float(rampup_ratio)
        self.images_seen: int | None = 0  # None: resumed from a checkpoint without the counter (module docstring)
        self.step_images = 0  # images of the latest update (not saved: read right after an update)
        self.last_beta: float | None = None  # the decay of the latest update (logged as train/ema_decay)

    def beta(self, step: int, images_seen: int, images: int) -> float:
        """The decay of an optimizer step of `images` images taken after `step` steps and `images_seen` images."""
        if self.half_life_images is None:
            if self.warmup:
                return min(self.decay, (1.0 + step) / (10.0 + step))
            return self.decay
        half_life = self.half_life_images
        if self.rampup_ratio is not None:  # EDM: the half-life grows with the images seen
            half_life = min(half_life, images_seen * self.rampup_ratio)
        return 0.5 ** (images / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, averaged: nn.Module, net: nn.Module, step: int, images: int) -> float:
        """After optimizer step `step + 1` of `images` images: averaged <- beta averaged + (1 - beta) net, buffers
        copied; counts the images and returns beta. `step` is the number of earlier steps (Lightning's
        global_step inside `optimizer_step`)."""
        if images <= 0:
            raise RuntimeError(f"EMA update after optimizer step {step + 1} with {images} images counted: expected > 0")
        if self.images_seen is None:  # resumed from a checkpoint without the counter (module docstring)
            self.images_seen = step * images
        beta = self.beta(step, self.images_seen, images)
        averaged_params, net_params = local_pairs(averaged, net)
        if averaged_params:  # a rank of a sharded run may hold no slice of any parameter
            torch._foreach_lerp_(averaged_params, net_params, 1.0 - beta)
        for b_avg, b_net in zip(averaged.buffers(), net.buffers()):
            b_avg.copy_(b_net)
        self.images_seen += images
        self.step_images, self.last_beta = images, beta
        return beta

    def state_dict(self) -> dict[str, Any]:
        """The counter, as plain numbers (loadable with weights_only); empty while it is unknown."""
        return {} if self.images_seen is None else {"images_seen": int(self.images_seen)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict()`; None or a state without the counter (an older checkpoint) leaves it unknown."""
        images_seen = (state or {}).get("images_seen")
        self.images_seen = None if images_seen is None else int(images_seen)
        self.step_images = 0


def local_pairs(averaged: nn.Module, net: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters of `averaged` and of `net` in pairs, as this rank holds them.

    Unsharded these are the full tensors. Under FSDP they are the rank's local shards: DTensors (FSDP2,
    `fully_shard`) or views of the rank's slice of a flat parameter (FSDP1 with use_orig_params, Lightning's
    FSDPStrategy). Both networks wrapped alike (diffusion_pl.training.sharding.BlockWrapPolicy), the rank holds
    the same slice of each parameter in both, so the update is elementwise on the shards, with no
    communication; a pair whose local shapes differ is refused in one line.
    """
    averaged_params = [p.detach() for p in averaged.parameters()]
    net_params = [p.detach() for p in net.parameters()]
    mismatch = len(averaged_params) != len(net_params) or next(
        (i for i, (a, b) in enumerate(zip(averaged_params, net_params)) if a.shape != b.shape), None) is not None
    if mismatch:
        raise RuntimeError(f"EMA update: the averaged network's {len(averaged_params)} parameters on this rank do not "
                           f"match the network's {len(net_params)} shape for shape: expected two networks sharded "
                           "alike (under FSDP: auto_wrap_policy diffusion_pl.training.sharding.BlockWrapPolicy, "
                           "which makes each network a unit of its own)")
    return averaged_params, net_params


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0
