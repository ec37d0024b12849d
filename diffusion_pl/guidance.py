"""Guidance: one value object from the CLI, YAML and Python down to the `Denoiser`.

`Guidance(weight, guide, interval, channels, clip_x0, null_label)` holds every option of guided sampling,
validates itself in its constructor (one-line ValueErrors naming the field), and is passed whole: the
commands build one from their flags, the callbacks take one from YAML (`guidance: {weight: 1.5,
interval: [0.28, 2.9]}`), `generate` / `sample` / `Denoiser` take one. Nothing unpacks it on the way.

- `weight` w: classifier-free guidance F = F_u + w (F_c - F_u) (Ho & Salimans 2022), or autoguidance
  F = F_guide + w (F_main - F_guide) with `guide` (Karras et al. 2024, "Guiding a Diffusion Model with a Bad
  Version of Itself", eq. 1). w = 1 is no guidance.
- `guide`: the autoguidance model. In Python a model in the model contract (x_t, t, class_labels) -> F or a
  DiffusionModule; from the CLI or YAML a checkpoint path, loaded once by the caller (`trust_guide_config`
  allows a guide checkpoint whose saved config names classes outside the trusted packages).
- `interval` (sigma_lo, sigma_hi): guide only at noise levels sigma/alpha in that range (Kynkäänniemi et al.
  2024, "Applying Guidance in a Limited Interval", eq. 5); lo > hi is refused (it would never guide).
- `channels` K: mix only the first K channels of the mean output; the other channels (and any learned
  variance) stay the main model's. None mixes every channel. DiT samples its released models with K = 3 of
  the 4 latent channels "for exact reproducibility" (facebookresearch/DiT models.py:258-266, `eps, rest =
  model_out[:, :3], model_out[:, 3:]`), so a DiT recipe sets 3 to sample as DiT does.
- `clip_x0`: clamp x0_hat to [-clip_x0, clip_x0] at every evaluation (DDPM's clipping, Ho et al. 2020).
- `null_label`: the index of the network's unconditional label embedding; None takes the network's own
  (`Guidance.for_model`), which is what every caller wants unless the network has none.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["Guidance"]


@dataclass(frozen=True)
class Guidance:
    """Every option of guided sampling, validated; `Guidance()` is plain sampling (no guidance, no clipping)."""

    weight: float = 1.0
    guide: Any = None
    interval: tuple[float, float] | None = None
    channels: int | None = None
    clip_x0: float | None = None
    null_label: int | None = None
    trust_guide_config: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised values are written once, here
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(f"guidance weight {self.weight!r} is invalid: expected a finite number (1 = no guidance)")
        set_(self, "weight", float(self.weight))
        set_(self, "interval", _check_interval(self.interval))
        if self.channels is not None and (isinstance(self.channels, bool) or not isinstance(self.channels, int)
                                          or self.channels < 1):
            raise ValueError(f"guidance channels {self.channels!r} is invalid: expected a positive number K of "
                             "channels (the first K are guided) or None for all")
        if self.clip_x0 is not None:
            if isinstance(self.clip_x0, bool) or not isinstance(self.clip_x0, (int, float)) or not self.clip_x0 > 0:
                raise ValueError(f"clip_x0 {self.clip_x0!r} is invalid: expected a positive number (1 for data in "
                                 "[-1, 1]) or None")
            set_(self, "clip_x0", float(self.clip_x0))
        if self.null_label is not None and (isinstance(self.null_label, bool) or not isinstance(self.null_label, int)
                                            or self.null_label < 0):
            raise ValueError(f"guidance null_label {self.null_label!r} is invalid: expected a label index >= 0")
        if self.guide is not None and isinstance(self.guide, str) and not self.guide:
            raise ValueError("guidance guide '' is invalid: expected a checkpoint path, a model or None")

    @property
    def active(self) -> bool:
        """Whether any output is mixed: a weight other than 1."""
        return self.weight != 1.0

    @property
    def guide_path(self) -> str | None:
        """The guide's checkpoint path when the guide is still one (CLI, YAML), else None."""
        return os.fsdecode(self.guide) if isinstance(self.guide, (str, bytes, os.PathLike)) else None

    def replace(self, **changes: Any) -> "Guidance":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def for_model(self, null_label: int | None) -> "Guidance":
        """This guidance with the network's null label filled in where none was given."""
        return self if self.null_label is not None or null_label is None else self.replace(null_label=null_label)

    def check_channels(self, available: int) -> int:
        """K, the number of mean channels mixed; a one-line ValueError when K exceeds the model's `available`."""
        if self.channels is None:
            return available
        if self.channels > available:
            raise ValueError(f"guidance channels {self.channels} exceeds the {available} channels the model samples: "
                             f"expected at most {available} (or None for all)")
        return self.channels


def _check_interval(interval: Any) -> tuple[float, float] | None:
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval {interval!r} is invalid: expected two noise levels (sigma_lo, sigma_hi)"
                         ) from None
    if not (lo >= 0.0 and hi >= 0.0):  # also refuses NaN
        raise ValueError(f"guidance interval {lo:g} {hi:g} is invalid: expected noise levels sigma/alpha >= 0 "
                         "(inf allowed)")
    if lo > hi:
        raise ValueError(f"guidance interval {lo:g} {hi:g} is invalid: sigma_lo > sigma_hi never guides; expected "
                         f"{hi:g} {lo:g}")
    return lo, hi
