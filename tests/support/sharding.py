"""Lightning's FSDPStrategy on CPU processes, for the sharded-training workers (tests/workers/fsdp_fit.py).

Lightning 2.6 refuses `strategy="fsdp"` and an `FSDPStrategy` instance with accelerator="cpu" ("The strategy
`fsdp` requires a GPU accelerator"): the check compares the strategy's exact type, so a subclass passes it.
torch's FullyShardedDataParallel itself runs on CPU with gloo given `device_id=torch.device("cpu")`, where
Lightning passes the root device's index (None on CPU, which FSDP refuses without an accelerator). That one
argument is all this subclass changes: wrapping, auto-wrap policy, use_orig_params, state-dict contexts and
checkpoint saving are Lightning's own code, the code a GPU run executes.
"""

from __future__ import annotations

import torch
import torch.distributed.fsdp as torch_fsdp
from lightning.pytorch.strategies import FSDPStrategy

_FSDP = torch_fsdp.FullyShardedDataParallel


class _CPUFullyShardedDataParallel(_FSDP):
    def __init__(self, module, *args, device_id=None, **kwargs) -> None:
        super().__init__(module, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy whose FullyShardedDataParallel units live on the CPU (see the module docstring)."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        torch_fsdp.FullyShardedDataParallel = _CPUFullyShardedDataParallel  # Lightning imports it inside the method
        try:
            return super()._setup_model(model)
        finally:
            torch_fsdp.FullyShardedDataParallel = _FSDP


def step_module(network: str, module=None):
    """A seeded tiny DiffusionModule (`dit` or `unet`) when `module` is None; else, on `module` (sharded or
    not), the same optimizer step of its net and two EMA updates (tests/workers/fsdp2_ema.py and its test)."""
    from diffusion_pl.networks.dit import dit_tiny
    from diffusion_pl.processes.variance_preserving import VPLinear
    from diffusion_pl.training.module import DiffusionModule
    from tests.support.training import make_net

    if module is None:
        torch.manual_seed(0)
        net = dit_tiny(img_resolution=8, num_classes=3) if network == "dit" else make_net()
        return DiffusionModule(net, VPLinear(), ema_decay=0.75)
    with torch.no_grad():
        for i, p in enumerate(module.net.parameters()):  # a change that depends on the value only
            p.mul_(0.5).add_(0.01 * (i + 1))
    module.averaging.update(module.ema, module.net, step=0, images=8)
    with torch.no_grad():
        for p in module.net.parameters():
            p.sub_(0.02)
    module.averaging.update(module.ema, module.net, step=1, images=8)
    return module
