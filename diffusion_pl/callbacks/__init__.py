"""Lightning callbacks: crash-safe checkpointing, sample grids, FID / KID / IS, power-function EMA.

FIDCallback is imported on first use (`diffusion_pl.callbacks.FIDCallback`), so that checkpointing
and sample grids load without the metrics stack (diffusion_pl.metrics, torch-fidelity).
"""

from diffusion_pl.callbacks.checkpointing import AtomicCheckpointIO, PreemptionCheckpoint, find_resume_checkpoint
from diffusion_pl.callbacks.phema import PowerEMA
from diffusion_pl.callbacks.sample_grid import SampleGrid

__all__ = ["AtomicCheckpointIO", "PreemptionCheckpoint", "find_resume_checkpoint", "PowerEMA", "SampleGrid",
           "FIDCallback"]


def __getattr__(name: str):
    if name == "FIDCallback":
        from diffusion_pl.callbacks.fid import FIDCallback

        return FIDCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
