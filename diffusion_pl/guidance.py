"""Guidance options shared by `Denoiser`, `sample`, `generate`, the sampling callbacks and the commands.

- `guidance_interval` (sigma_lo, sigma_hi): guide only at noise levels sigma/alpha in that range
  (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval", eq. 5).
- `guidance_channels` K: mix only the first K channels of the mean output; the other channels (and any
  learned variance) stay the main (conditional) model's. None mixes every channel, the standard form of
  classifier-free guidance. DiT samples its released models with K = 3 of the 4 latent channels "for
  exact reproducibility" (facebookresearch/DiT models.py:258-266, `eps, rest = model_out[:, :3],
  model_out[:, 3:]`; `rest` comes from the conditional half that sample.py:64 keeps), so a DiT recipe
  sets 3 to sample as DiT does. The option is generic: it names channels, not a network.

Each check returns the normalised value or raises a one-line ValueError naming `name`, so the callers
(callback arguments, command options) report it as their own input.
"""

from __future__ import annotations

__all__ = ["check_guidance_interval", "check_guidance_channels"]


def check_guidance_interval(interval, name: str = "guidance_interval") -> tuple[float, float] | None:
    """(sigma_lo, sigma_hi) as floats, or None; a one-line ValueError naming `name` unless two levels >= 0 (not NaN)."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {interval!r} is invalid: expected two noise levels (sigma_lo, sigma_hi)") from None
    if not (lo >= 0.0 and hi >= 0.0):  # also refuses NaN
        raise ValueError(f"{name} {lo:g} {hi:g} is invalid: expected noise levels sigma/alpha >= 0 (inf allowed)")
    return lo, hi


def check_guidance_channels(channels, name: str = "guidance_channels", available: int | None = None) -> int | None:
    """K as an int, or None (all channels); a one-line ValueError naming `name` unless 1 <= K (<= `available`,
    the model's mean channels, when known)."""
    if channels is None:
        return None
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{name} {channels!r} is invalid: expected a positive number K of channels (the first K "
                         "are guided) or None for all")
    if available is not None and channels > available:
        raise ValueError(f"{name} {channels} exceeds the {available} channels the model samples: expected at most "
                         f"{available} (or None for all)")
    return channels
