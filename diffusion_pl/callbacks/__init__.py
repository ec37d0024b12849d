"""Lightning callbacks: crash-safe checkpointing, sample grids, FID / KID / IS."""

from diffusion_pl.callbacks.checkpointing import AtomicCheckpointIO, PreemptionCheckpoint, find_resume_checkpoint
from diffusion_pl.callbacks.fid import FIDCallback
from diffusion_pl.callbacks.sample_grid import SampleGrid

__all__ = ["AtomicCheckpointIO", "PreemptionCheckpoint", "find_resume_checkpoint", "SampleGrid", "FIDCallback"]
