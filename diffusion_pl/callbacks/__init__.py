"""Lightning callbacks: crash-safe checkpointing, sample grids, FID / KID / IS."""

from diffusion_pl.callbacks.checkpointing import AtomicCheckpointIO, PreemptionCheckpoint, find_resume_checkpoint

__all__ = ["AtomicCheckpointIO", "PreemptionCheckpoint", "find_resume_checkpoint"]
