"""`ScoreNetwork`: the interface every score network declares (UNet, DiT, and any network of your own).

The framework never looks inside a network; what it needs to know about one is declared here and set
once, by this base class's constructor:

    img_resolution   side of the square images (or latents) it takes and returns
    in_channels      channels of its input x
    out_channels     channels of its output: in_channels, or 2 * in_channels for a learned variance
                     (Nichol & Dhariwal 2021; `prediction.split_variance` reads it from the output)
    num_classes      None for unconditional; else labels 0..num_classes-1
    null_label       the label index of the unconditional embedding (classifier-free guidance, Ho &
                     Salimans 2022): num_classes, or None for a class table without one (ADM's) and
                     for unconditional networks
    augment_dim      length of the augmentation-label vector it takes (EDM's non-leaking augmentation,
                     Karras et al. 2022, App. B.6); 0: none

and its call is `net(x, noise_label, class_labels=None, augment_labels=None) -> (B, out_channels, H, W)`
for x of shape (B, in_channels, H, W), H = W = img_resolution.

A network with a second time input (MeanFlow's average velocity u(z, r, t), Geng et al. 2025) sets
`takes_interval = True` and also takes `interval=` (B,), the noise label of t minus that of r (0 at r = t,
also when it is None); UNet and DiT do with `interval_embedding=True`. Every other network keeps False.

A base class rather than a `typing.Protocol`: the declared values are set and checked in one
constructor (the resolution a recipe must give, in_channels defaulting to RGB, the null-label rule,
positive sizes), which a Protocol cannot hold, and `isinstance(net, ScoreNetwork)` then means the
values exist and were checked, where a runtime-checkable Protocol only tests that attribute names
exist. A network of your own subclasses it and calls `super().__init__(img_resolution, in_channels,
...)` first, as UNet and DiT do.
"""

from __future__ import annotations

from numbers import Integral

from torch import nn

from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.utils.recorded import RecordsInit

__all__ = ["ScoreNetwork", "check_score_network"]


class ScoreNetwork(RecordsInit, nn.Module):
    """Base of the score networks: declares their shapes, classes and augmentation labels (see the module docstring).

    Args:
        img_resolution: side of the square images; required (None is refused: `diffusion-pl fit` fills an
            unset one from the data before building the network).
        in_channels: input channels; None: 3 (RGB), or the data's channels under `diffusion-pl fit`.
        out_channels: output channels; None: in_channels (2 * in_channels for a learned variance).
        num_classes: None for unconditional; else the number of classes (>= 1).
        augment_dim: length of the augmentation-label vector; 0: none.
        class_null_row: whether the class table has the null label num_classes; False for ADM's table,
            whose `null_label` is None (class labels are then required).
    """

    img_resolution: int
    in_channels: int
    out_channels: int
    num_classes: int | None
    null_label: int | None
    augment_dim: int
    takes_interval: bool = False  # whether forward takes `interval=` (MeanFlow); see the module docstring

    def __init__(self, img_resolution: int | None, in_channels: int | None = None, out_channels: int | None = None,
                 num_classes: int | None = None, augment_dim: int = 0, class_null_row: bool = True) -> None:
        super().__init__()
        name = type(self).__name__
        if img_resolution is None:
            raise UserValueError(f"{name}: img_resolution is not set: expected the side of the square images "
                                 "(`diffusion-pl fit` fills it from the data when a recipe leaves it out)")
        in_channels = 3 if in_channels is None else in_channels
        out_channels = in_channels if out_channels is None else out_channels
        for option, value in (("img_resolution", img_resolution), ("in_channels", in_channels),
                              ("out_channels", out_channels)):
            _check_int(name, option, value, 1, "a positive integer")
        if num_classes is not None:
            _check_int(name, "num_classes", num_classes, 1, "a positive integer or None (unconditional)")
        _check_int(name, "augment_dim", augment_dim, 0, "an integer >= 0 (0: no augmentation labels)")
        self.img_resolution, self.in_channels, self.out_channels = int(img_resolution), int(in_channels), \
            int(out_channels)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.null_label = self.num_classes if class_null_row else None
        self.augment_dim = int(augment_dim)

    @property
    def learned_variance(self) -> bool:
        """Whether the output carries a learned variance: twice the input's channels (`prediction.split_variance`)."""
        return self.out_channels == 2 * self.in_channels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample the network takes and generates (a latent network's: the latent shape)."""
        return self.in_channels, self.img_resolution, self.img_resolution


def _check_int(network: str, option: str, value, low: int, expected: str) -> None:
    # bool is an Integral: num_classes=True is a typo, not one class
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise UserValueError(f"{network}: {option}={value!r}: expected {expected}")


def check_score_network(net: object, where: str = "net") -> ScoreNetwork:
    """`net` itself when it declares the interface (a `ScoreNetwork`); else one line saying what is expected."""
    if not isinstance(net, ScoreNetwork):
        kind = type(net)
        raise UserValueError(f"{where} {kind.__module__}.{kind.__qualname__} declares no network interface: expected a "
                             "diffusion_pl.networks.base.ScoreNetwork (UNet, DiT, or a subclass that calls "
                             "ScoreNetwork.__init__ with its img_resolution, in_channels, out_channels, num_classes, "
                             "augment_dim)")
    return net
