"""Callbacks of a training run: crash-safe checkpointing, the power-function EMA, the run's health scalars
(TrainingMonitor), the base of step callbacks, the TF32 policy (tf32.py).

The callbacks that evaluate during training (SampleGrid, FIDCallback) live in diffusion_pl.evaluation.
"""
