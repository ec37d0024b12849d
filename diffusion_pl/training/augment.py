"""EDM's non-leaking augmentation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Sec. 5, augmentation regularization; the pipeline of ADA, Karras et al. 2020).

Each training image is augmented with some probability, and the network is told how: a vector of
*augmentation labels* per image enters its noise embedding through a bias-free linear layer
(`augment_dim`). Sampling passes no labels (all zeros), so the model generates un-augmented
images; the augmentations cannot leak into the samples. Reference: NVlabs/edm training/augment.py
(the pipe), train.py:143-146 (the CIFAR-10 setting), training/loss.py:76-77 (EDMLoss feeds the
labels to the network).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.processes.base import AttributeRepr

__all__ = ["AugmentPipe"]

# Low-pass decomposition filter of the symlet-6 wavelet (the published coefficients, as in PyWavelets'
# `sym6` dec_lo); EDM resamples geometric transforms through it (NVlabs/edm training/augment.py:35, :237).
_SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
         0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
         -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)

_MULTIPLIERS = ("xflip", "yflip", "rotate_int", "translate_int", "scale", "rotate_frac", "aniso", "translate_frac",
                "brightness", "contrast", "lumaflip", "hue", "saturation")
# The label columns each enabled transform adds, in EDM's order (training/augment.py:162-310).
_COLUMNS = {"xflip": ("xflip",), "yflip": ("yflip",), "rotate_int": ("rotate_int_x", "rotate_int_y"),
            "translate_int": ("translate_int_x", "translate_int_y"), "scale": ("scale",),
            "rotate_frac": ("rotate_frac_cos", "rotate_frac_sin"), "aniso": ("aniso_cos", "aniso_sin"),
            "translate_frac": ("translate_frac_x", "translate_frac_y"), "brightness": ("brightness",),
            "contrast": ("contrast",), "lumaflip": ("lumaflip",), "hue": ("hue_cos", "hue_sin"),
            "saturation": ("saturation",)}


class AugmentPipe(AttributeRepr):
    """EDM's augmentation pipe: `pipe(images, generator=None) -> (images, augment_labels)`.

    images (B, C, H, W) in [-1, 1]; augment_labels (B, label_dim) float32 in EDM's column order
    (`label_names`). Each transform is applied to an image with probability `multiplier * p`
    (a multiplier of 0 disables it and drops its label columns). The defaults are EDM's CIFAR-10
    setting (train.py `--augment 0.12`: xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
    translate_frac=1, nine labels); EDM's class itself defaults every multiplier to 0. xflip=1e8
    makes x-flips happen to half the images whatever p (labelled dataset flips).

    Transforms, each drawing its parameters as EDM does and in EDM's order: x/y flips, 90-degree
    rotations (square images) and integer translations with reflection (pixel blitting); then
    isotropic scaling (log2 std `scale_std`), rotation (uniform in +-`rotate_frac_max` half-turns),
    anisotropic scaling (log2 std `aniso_std`, in a frame rotated with probability
    `aniso_rotate_prob`) and translation (std `translate_frac_std` of the image size), composed
    into one matrix; then brightness, contrast, luma flip, hue rotation and saturation (RGB or L).

    Resampling follows EDM: reflect padding, 2x upsampling with the sym6 wavelet filter, bilinear
    sampling, filtered 2x downsampling. One difference: images whose geometric (or colour) labels
    are all zero skip that stage and come back bit-equal, where EDM resamples them too (which
    reproduces them only up to float rounding, ~1e-5), and the padding is sized from the
    transformed images alone (which changes nothing beyond rounding). So p = 0 is the identity.

    Randomness: `generator` (drawn on its device), or the global generator of the images'
    device when None, which is what `DiffusionModule.training_step` uses (reseeded every step).
    With the global CPU generator the labels equal EDM's pipe's for the same seed.
    """

    def __init__(
        self, p: float = 0.12, xflip: float = 1e8, yflip: float = 1.0, rotate_int: float = 0.0,
        translate_int: float = 0.0, translate_int_max: float = 0.125, scale: float = 1.0,
        rotate_frac: float = 1.0, aniso: float = 1.0, translate_frac: float = 1.0, scale_std: float = 0.2,
        rotate_frac_max: float = 1.0, aniso_std: float = 0.2, aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125, brightness: float = 0.0, contrast: float = 0.0, lumaflip: float = 0.0,
        hue: float = 0.0, saturation: float = 0.0, brightness_std: float = 0.2, contrast_std: float = 0.5,
        hue_max: float = 1.0, saturation_std: float = 1.0,
    ) -> None:
        args = {k: float(v) for k, v in locals().items() if k not in ("self", "__class__")}
        for name, value in args.items():
            if not (value >= 0 and math.isfinite(value)):
                raise UserValueError(f"AugmentPipe {name}={value}: expected a finite number >= 0")
        for name in ("p", "translate_int_max", "aniso_rotate_prob"):
            if args[name] > 1:
                raise UserValueError(f"AugmentPipe {name}={args[name]}: expected a value in [0, 1]")
        for name, value in args.items():
            setattr(self, name, value)

    @property
    def label_names(self) -> tuple[str, ...]:
        """The augment_labels columns, in order (EDM's layout for the enabled transforms)."""
        return tuple(c for name in _MULTIPLIERS if getattr(self, name) > 0 for c in _COLUMNS[name])

    @property
    def label_dim(self) -> int:
        """Length of the label vector; the network's `augment_dim` must equal it (9 for EDM's CIFAR-10)."""
        return len(self.label_names)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        # in the images' precision, as EDM (whose fp16 is inside the network): no mixed-precision autocast
        with torch.autocast(images.device.type, enabled=False):
            return self._augment(images, generator)

    def _augment(self, images: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        N, C, H, W = images.shape
        device = images.device
        draw_device = generator.device if generator is not None else device

        def draw(fn, *args):  # (shape) float32 or int64, on the images' device
            return fn(*args, generator=generator, device=draw_device).to(device)

        def gate(w: Tensor, multiplier: float) -> Tensor:  # keep w where the transform fires, else 0
            fires = draw(torch.rand, (1, N) if w.ndim == 2 else (N,)) < multiplier * self.p
            return torch.where(fires, w, torch.zeros_like(w))

        labels: list[Tensor] = []
        # -- pixel blitting (EDM training/augment.py:162-191) --
        if self.xflip > 0:
            w = gate(draw(torch.randint, 2, (N,)), self.xflip)  # (N,) in {0, 1}
            images = torch.where(_per_image(w == 1), images.flip(3), images)
            labels.append(w)
        if self.yflip > 0:
            w = gate(draw(torch.randint, 2, (N,)), self.yflip)
            images = torch.where(_per_image(w == 1), images.flip(2), images)
            labels.append(w)
        if self.rotate_int > 0:
            if H != W:
                raise UserValueError(f"AugmentPipe rotate_int needs square images, got {H}x{W}: set rotate_int: 0")
            w = gate(draw(torch.randint, 4, (N,)), self.rotate_int)  # quarter turns
            out = images
            for k in (1, 2, 3):
                out = torch.where(_per_image(w == k), torch.rot90(images, k, dims=(2, 3)), out)
            images = out
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if self.translate_int > 0:
            w = gate(draw(torch.rand, (2, N)) * 2 - 1, self.translate_int)  # (2, N)
            tx = (w[0] * (W * self.translate_int_max)).round().long()  # (N,) pixels
            ty = (w[1] * (H * self.translate_int_max)).round().long()
            images = _shift_reflect(images, tx, ty)
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]

        # -- geometric transforms, one matrix: output pixel -> input pixel (augment.py:197-226) --
        G_inv = torch.eye(3, device=device).expand(N, 3, 3)
        first = len(labels)
        if self.scale > 0:
            w = gate(draw(torch.randn, (N,)), self.scale)
            s = torch.exp2(w * self.scale_std)
            G_inv = G_inv @ _matrix(1 / s, 0, 0, 1 / s)
            labels.append(w)
        if self.rotate_frac > 0:
            w = gate((draw(torch.rand, (N,)) * 2 - 1) * (math.pi * self.rotate_frac_max), self.rotate_frac)
            G_inv = G_inv @ _rotation(w)  # the inverse of a rotation by -w
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = draw(torch.randn, (N,))
            r = (draw(torch.rand, (N,)) * 2 - 1) * math.pi
            w = gate(w, self.aniso)
            r = torch.where(draw(torch.rand, (N,)) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = torch.exp2(w * self.aniso_std)
            G_inv = G_inv @ _rotation(-r) @ _matrix(1 / s, 0, 0, s) @ _rotation(r)
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = gate(draw(torch.randn, (2, N)), self.translate_frac)  # (2, N)
            tx, ty = w[0] * (W * self.translate_frac_std), w[1] * (H * self.translate_frac_std)  # (N,) pixels
            G_inv = G_inv @ _matrix(1, 0, 0, 1, -tx, -ty)
            labels += [w[0], w[1]]
        moved = _any_nonzero(labels[first:], N, device)  # (N,) images with a non-identity transform
        if moved.any():
            index = moved.nonzero()[:, 0]
            images = images.index_copy(0, index, _warp(images[index], G_inv[index].to(images.dtype)))

        # -- colour transforms, one 4x4 matrix on (r, g, b, 1) (augment.py:276-325) --
        M = torch.eye(4, device=device).expand(N, 4, 4)
        luma = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device) / math.sqrt(3)  # (4,) luma axis
        luma_outer = torch.outer(luma, luma)  # (4, 4)
        first = len(labels)
        if self.brightness > 0:
            w = gate(draw(torch.randn, (N,)), self.brightness)
            b = w * self.brightness_std
            M = _color_matrix(torch.ones_like(b), b) @ M
            labels.append(w)
        if self.contrast > 0:
            w = gate(draw(torch.randn, (N,)), self.contrast)
            M = _color_matrix(torch.exp2(w * self.contrast_std), torch.zeros_like(w)) @ M
            labels.append(w)
        if self.lumaflip > 0:
            w = gate(draw(torch.randint, 2, (N,)), self.lumaflip)
            M = (torch.eye(4, device=device) - 2 * luma_outer * w[:, None, None]) @ M  # Householder reflection
            labels.append(w)
        if self.hue > 0:
            w = gate((draw(torch.rand, (N,)) * 2 - 1) * (math.pi * self.hue_max), self.hue)
            M = _rotation_about(luma, w) @ M
            labels += [w.cos() - 1, w.sin()]
        if self.saturation > 0:
            w = gate(draw(torch.randn, (N,)), self.saturation)
            eye = torch.eye(4, device=device)
            M = (luma_outer + (eye - luma_outer) * torch.exp2(w * self.saturation_std)[:, None, None]) @ M
            labels.append(w)
        recoloured = _any_nonzero(labels[first:], N, device)
        if recoloured.any():
            index = recoloured.nonzero()[:, 0]
            images = images.index_copy(0, index, _recolour(images[index], M[index].to(images.dtype)))

        if not labels:
            return images, torch.zeros(N, 0, device=device)
        return images, torch.stack([v.to(torch.float32) for v in labels], dim=1)  # (N, label_dim)


def _per_image(mask: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, 1), to select whole images with torch.where."""
    return mask[:, None, None, None]


def _any_nonzero(columns: list[Tensor], n: int, device: torch.device) -> Tensor:
    """(N,) bool: some label in `columns` is nonzero (a transform other than the identity was drawn)."""
    if not columns:
        return torch.zeros(n, dtype=torch.bool, device=device)
    return (torch.stack(columns, dim=1) != 0).any(dim=1)


def _matrix(a, b, c, d, tx=0.0, ty=0.0) -> Tensor:
    """(N, 3, 3) homogeneous 2-D matrices [[a, b, tx], [c, d, ty], [0, 0, 1]] from (N,) tensors or numbers."""
    entries = [a, b, c, d, tx, ty]
    ref = next(e for e in entries if isinstance(e, Tensor))
    a, b, c, d, tx, ty = (e if isinstance(e, Tensor) else torch.full_like(ref, e) for e in entries)
    zero, one = torch.zeros_like(ref), torch.ones_like(ref)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=1).view(-1, 3, 3)


def _rotation(theta: Tensor) -> Tensor:
    """(N, 3, 3) counter-clockwise rotations by theta (N,) radians."""
    cos, sin = theta.cos(), theta.sin()
    return _matrix(cos, -sin, sin, cos)


def _rotation_about(axis: Tensor, theta: Tensor) -> Tensor:
    """(N, 4, 4) rotations by theta (N,) about the unit 3-vector axis[:3] (Rodrigues), fixing the 4th coordinate."""
    v = axis[:3]  # (3,)
    cross = torch.zeros(3, 3, device=v.device)  # [v]_x, cross @ u = v x u
    cross[0, 1], cross[0, 2], cross[1, 2] = -v[2], v[1], -v[0]
    cross = cross - cross.T
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    R = cos * torch.eye(3, device=v.device) + sin * cross + (1 - cos) * torch.outer(v, v)  # (N, 3, 3)
    out = torch.eye(4, device=v.device).repeat(theta.shape[0], 1, 1)
    out[:, :3, :3] = R
    return out


def _color_matrix(gain: Tensor, offset: Tensor) -> Tensor:
    """(N, 4, 4): rgb -> gain * rgb + offset, for (N,) gain and offset."""
    out = torch.diag_embed(torch.stack([gain, gain, gain, torch.ones_like(gain)], dim=1))
    out[:, :3, 3] = offset[:, None]
    return out


def _reflect(i: Tensor, n: int) -> Tensor:
    """Indices folded into [0, n) by mirror reflection about the edge pixels (period 2n - 2)."""
    return (n - 1) - ((n - 1) - i % (2 * n - 2)).abs()


def _shift_reflect(images: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """out[:, :, y, x] = images[:, :, reflect(y + ty), reflect(x - tx)] per image (EDM augment.py:187-190)."""
    N, C, H, W = images.shape
    src_x = _reflect(torch.arange(W, device=images.device)[None, :] - tx[:, None], W)  # (N, W)
    src_y = _reflect(torch.arange(H, device=images.device)[None, :] + ty[:, None], H)  # (N, H)
    index = (src_y[:, :, None] * W + src_x[:, None, :]).view(N, 1, H * W).expand(N, C, H * W)
    return images.flatten(2).gather(2, index).view(N, C, H, W)


def _warp(images: Tensor, G_inv: Tensor) -> Tensor:
    """Resample images (n, C, H, W) so output pixel p shows input pixel G_inv p (centred pixel coordinates).

    EDM's scheme (augment.py:232-270): reflect-pad by what the corners reach plus the filter's
    support, upsample 2x with the sym6 filter, sample bilinearly, downsample 2x with the same filter.
    """
    n, C, H, W = images.shape
    device, dtype = images.device, images.dtype
    taps = torch.tensor(_SYM6, dtype=dtype, device=device)  # (12,)
    support = len(_SYM6) // 4  # filter support in output pixels (3)
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1.0, 1.0, 1.0, 1.0]], dtype=dtype, device=device)
    reach = (G_inv @ corners)[:, :2, :].permute(1, 0, 2).flatten(1)  # (2, n * 4) input x, y of the output corners
    low = (-reach).amax(dim=1) - torch.tensor([cx, cy], dtype=dtype, device=device) + 2 * support  # left, top
    high = reach.amax(dim=1) - torch.tensor([cx, cy], dtype=dtype, device=device) + 2 * support  # right, bottom
    limit = torch.tensor([W - 1, H - 1], dtype=dtype, device=device)  # reflect padding is at most size - 1
    (px0, py0), (px1, py1) = (low.clamp(min=0).minimum(limit).ceil().long().tolist(),
                              high.clamp(min=0).minimum(limit).ceil().long().tolist())
    images = F.pad(images, [px0, px1, py0, py1], mode="reflect")
    # the padded image's centre is shifted from the original's
    G_inv = _translation((px0 - px1) / 2, (py0 - py1) / 2, G_inv) @ G_inv

    # 2x upsampling: zero-stuffing and filtering = a strided transposed convolution, one axis at a time
    kx, ky = taps.view(1, 1, 1, -1).repeat(C, 1, 1, 1), taps.view(1, 1, -1, 1).repeat(C, 1, 1, 1)
    pad = (len(_SYM6) - 2) // 2  # 5: output length exactly 2x the input
    images = F.conv_transpose2d(images, kx, stride=(1, 2), padding=(0, pad), groups=C)
    images = F.conv_transpose2d(images, ky, stride=(2, 1), padding=(pad, 0), groups=C)
    # the same map in upsampled pixels: coordinates doubled, then EDM's half-pixel conjugation
    G_inv = _scaled(G_inv, 2.0)
    G_inv = _translation(-0.5, -0.5, G_inv) @ G_inv @ _translation(0.5, 0.5, G_inv)

    # bilinear sampling onto the (upsampled) output plus a filter-support border, in affine_grid's [-1, 1] units
    out_h, out_w = (H + 2 * support) * 2, (W + 2 * support) * 2
    to_unit = torch.diag(torch.tensor([2 / images.shape[3], 2 / images.shape[2], 1.0], dtype=dtype, device=device))
    from_unit = torch.diag(torch.tensor([out_w / 2, out_h / 2, 1.0], dtype=dtype, device=device))
    theta = (to_unit @ G_inv @ from_unit)[:, :2, :]  # (n, 2, 3)
    grid = F.affine_grid(theta, [n, C, out_h, out_w], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # filtered 2x downsampling, then crop the border
    images = F.conv2d(images, kx, stride=(1, 2), padding=(0, pad), groups=C)[:, :, :, support:-support]
    images = F.conv2d(images, ky, stride=(2, 1), padding=(pad, 0), groups=C)[:, :, support:-support, :]
    return images  # (n, C, H, W)


def _translation(tx: float, ty: float, like: Tensor) -> Tensor:
    """(3, 3) translation by (tx, ty), in `like`'s dtype and device."""
    return torch.tensor([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], dtype=like.dtype, device=like.device)


def _scaled(G: Tensor, k: float) -> Tensor:
    """The map G expressed in coordinates multiplied by k: S(k) G S(1/k)."""
    S = torch.diag(torch.tensor([k, k, 1.0], dtype=G.dtype, device=G.device))
    return S @ G @ torch.diag(torch.tensor([1 / k, 1 / k, 1.0], dtype=G.dtype, device=G.device))


def _recolour(images: Tensor, M: Tensor) -> Tensor:
    """Apply (n, 4, 4) colour matrices to (n, C, H, W) images: RGB directly, L through the mean of the RGB rows."""
    n, C, H, W = images.shape
    flat = images.reshape(n, C, H * W)
    if C == 3:
        flat = M[:, :3, :3] @ flat + M[:, :3, 3:]
    elif C == 1:
        row = M[:, :3, :].mean(dim=1, keepdim=True)  # (n, 1, 4)
        flat = flat * row[:, :, :3].sum(dim=2, keepdim=True) + row[:, :, 3:]
    else:
        raise UserValueError(f"AugmentPipe colour transforms need 1 or 3 channels, got {C}: disable brightness, "
                             "contrast, lumaflip, hue and saturation")
    return flat.view(n, C, H, W)
