"""EDM's non-leaking augmentation: the pipe's distribution and labels, the labels' path to the network
(training only), bit-exact resume with augmentation on, EDM's gradient nan_to_num, and bad configs."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from diffusion_pl.training.augment import AugmentPipe
from diffusion_pl.training.callbacks.checkpointing import AtomicCheckpointIO
from diffusion_pl.cli.main import main
from diffusion_pl.data.datamodule import ShardDataModule
from diffusion_pl.utils.errors import TRACEBACK_ENV, UserValueError
from diffusion_pl.training.module import DiffusionModule, load_module
from diffusion_pl.utils.seeding import mix_seed as step_seed
from diffusion_pl.networks.base import ScoreNetwork
from diffusion_pl.networks.dit import DiT, dit_tiny
from diffusion_pl.networks.unet import UNet
from diffusion_pl.processes.variance_preserving import VPLinear
from tests.support.fit import tiny_fit_config

ALL_OFF = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
EVERYTHING = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
                  brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
SHAPES = "builtin:shapes?size=8&count=32"  # RGB 8x8, 5 classes


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))  # the built-in shapes are cached here


def _images(n: int, channels: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1  # (n, C, size, size) in [-1, 1]


def _column(pipe: AugmentPipe, labels: torch.Tensor, name: str) -> torch.Tensor:
    return labels[:, pipe.label_names.index(name)]


# -- the pipe ---------------------------------------------------------------------------------------
def test_defaults_are_edms_cifar10_setting():
    """train.py --augment 0.12: xflip=1e8, yflip, scale, rotate_frac, aniso, translate_frac; nine labels."""
    pipe = AugmentPipe()
    assert (pipe.p, pipe.xflip, pipe.yflip, pipe.scale, pipe.rotate_frac, pipe.aniso, pipe.translate_frac) == (
        0.12, 1e8, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert pipe.label_names == ("xflip", "yflip", "scale", "rotate_frac_cos", "rotate_frac_sin", "aniso_cos",
                                "aniso_sin", "translate_frac_x", "translate_frac_y")
    assert pipe.label_dim == 9
    assert AugmentPipe(**EVERYTHING).label_dim == 19


@pytest.mark.parametrize("config", [{}, EVERYTHING], ids=["edm", "everything"])
def test_p0_is_the_identity(config):
    x = _images(64)
    pipe = AugmentPipe(**{**config, "p": 0.0})
    y, labels = pipe(x, torch.Generator().manual_seed(0))
    assert torch.equal(y, x)
    assert labels.shape == (64, pipe.label_dim) and labels.dtype == torch.float32
    assert not labels.any()


def test_label_statistics_match_the_probabilities():
    """Fractions of images a transform fired on, over 4096 images, within 4 standard errors of the configured value."""
    n = 4096
    pipe = AugmentPipe(p=0.12)
    _, labels = pipe(_images(n, channels=1), torch.Generator().manual_seed(1))
    _, flips = AugmentPipe(p=0.5, **{**ALL_OFF, "xflip": 1})(_images(n, channels=1), torch.Generator().manual_seed(2))
    fired = {
        "xflip 1e8 (every image, half flipped)": (_column(pipe, labels, "xflip") != 0, 0.5),
        "xflip 1 at p=0.5": (flips[:, 0] != 0, 0.5 * 0.5),
        "yflip": (_column(pipe, labels, "yflip") != 0, 0.12 * 0.5),
        "scale": (_column(pipe, labels, "scale") != 0, 0.12),
        "rotate_frac": (_column(pipe, labels, "rotate_frac_sin") != 0, 0.12),
        "aniso": (_column(pipe, labels, "aniso_cos") != 0, 0.12),
        "translate_frac": (_column(pipe, labels, "translate_frac_x") != 0, 0.12),
    }
    for name, (mask, q) in fired.items():
        sigma = math.sqrt(q * (1 - q) / n)
        assert abs(mask.float().mean().item() - q) < 4 * sigma, f"{name}: {mask.float().mean().item()} vs {q}"
    # where it fired, the isotropic scale's label is EDM's N(0, 1) draw (log2 scale / scale_std)
    w = _column(pipe, labels, "scale")
    w = w[w != 0]
    assert abs(w.std().item() - 1) < 4 / math.sqrt(2 * len(w)) and abs(w.mean().item()) < 4 / math.sqrt(len(w))
    # rotate_frac's (cos - 1, sin) lie on the unit circle shifted by -1
    c, s = _column(pipe, labels, "rotate_frac_cos"), _column(pipe, labels, "rotate_frac_sin")
    torch.testing.assert_close((c + 1) ** 2 + s**2, torch.ones(n))


def test_xflip_flips_exactly_the_labelled_images():
    x = _images(64)
    pipe = AugmentPipe(p=1.0, **{**ALL_OFF, "xflip": 1})
    y, labels = pipe(x, torch.Generator().manual_seed(3))
    assert labels.shape == (64, 1)
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < 64 and set(labels[:, 0].tolist()) == {0.0, 1.0}
    assert torch.equal(y[flipped], x[flipped].flip(3))
    assert torch.equal(y[~flipped], x[~flipped])


def test_geometric_labels_describe_the_transform():
    """Output pixel p shows the input at G_inv p, G_inv = scale(1 / s) rotate(theta) translate(-t), with s, theta
    and t read back from the labels (EDM's conventions); checked on a smooth image where G_inv p is inside it."""
    size, c = 32, 15.5

    def f(x, y):  # a smooth image as a function of pixel coordinates centred on the image
        return 0.6 * torch.sin(2 * math.pi * (0.7 * x + 0.4 * y) / 24 + 0.3) + 0.3 * torch.cos(2 * math.pi * y / 30)

    py, px = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing="ij")  # (H, W)
    pipe = AugmentPipe(p=1.0, **{**ALL_OFF, "scale": 1, "rotate_frac": 1, "translate_frac": 1})
    y, labels = pipe(f(px, py).expand(128, 1, size, size).clone(), torch.Generator().manual_seed(4))
    w = dict(zip(pipe.label_names, (v[:, None, None] for v in labels.T)))  # each (N, 1, 1)
    s = torch.exp2(w["scale"] * pipe.scale_std)
    theta = torch.atan2(w["rotate_frac_sin"], w["rotate_frac_cos"] + 1)
    qx = px - w["translate_frac_x"] * size * pipe.translate_frac_std
    qy = py - w["translate_frac_y"] * size * pipe.translate_frac_std
    sx, sy = (theta.cos() * qx - theta.sin() * qy) / s, (theta.sin() * qx + theta.cos() * qy) / s
    inside = (sx.abs() < c - 2) & (sy.abs() < c - 2)
    error = (y[:, 0] - f(sx, sy))[inside].abs()
    # the sym6-filtered bilinear resampling is accurate to ~0.006 here; a quarter-pixel offset gives 0.018
    assert inside.float().mean() > 0.5 and error.mean() < 0.01 and error.max() < 0.05, (error.mean(), error.max())


def test_generators_and_autocast():
    x, pipe = _images(32), AugmentPipe(p=0.5, **EVERYTHING)
    a = pipe(x, torch.Generator().manual_seed(7))
    b = pipe(x, torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    c = pipe(x)  # the global generator, as training_step uses it
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training_step under bf16-mixed: the pipe stays in float32
        d = pipe(x, torch.Generator().manual_seed(7))
    for other in (b, c, d):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])


# -- networks -----------------------------------------------------------------------------------------
def test_dit_takes_augment_labels():
    torch.manual_seed(0)
    net = dit_tiny(img_resolution=8, augment_dim=9)
    assert net.augment_dim == 9 and net.augment_embedder.bias is None
    assert DiT(img_resolution=8, hidden_size=32, depth=1, num_heads=2).augment_dim == 0
    with torch.no_grad():  # adaLN-Zero starts blind to the conditioning
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, noise = torch.randn(4, 3, 8, 8), torch.full((4,), 500.0)
    labels = torch.randn(4, 9)
    assert torch.equal(net(x, noise), net(x, noise, augment_labels=torch.zeros(4, 9)))  # None means zeros
    assert not torch.allclose(net(x, noise, augment_labels=labels), net(x, noise))
    with pytest.raises(ValueError, match="augment_dim"):
        DiT(img_resolution=8, augment_dim=-1)


class SpyNet(ScoreNetwork):
    """Output weight * x on SHAPES' 8x8 RGB images; records the augment_labels of every call (None when not given)."""

    def __init__(self, augment_dim: int = 9) -> None:
        super().__init__(img_resolution=8, in_channels=3, augment_dim=augment_dim)
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor | None] = []

    def forward(self, x, noise_label, class_labels=None, augment_labels=None):
        self.seen.append(None if augment_labels is None else augment_labels.detach().clone())
        return self.weight * x


def _trainer(root, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, plugins=[AtomicCheckpointIO()], **kwargs)


def test_labels_reach_the_network_in_training_only(tmp_path):
    pipe = AugmentPipe(p=1.0)
    module = DiffusionModule(SpyNet(), VPLinear(), augment=pipe, seed=3)
    dm = ShardDataModule(shards=SHAPES, val_shards=SHAPES, batch_size=8, num_workers=0)
    trainer = _trainer(tmp_path, 2, limit_val_batches=1, val_check_interval=1, enable_checkpointing=False)
    trainer.fit(module, dm)
    seen = module.net.seen
    assert len(seen) == 2 and all(s is not None and s.shape == (8, 9) for s in seen)
    for step, labels in enumerate(seen):  # drawn first from the step's reseeded generator, whatever the images
        torch.manual_seed(step_seed(3, 0, step, 0))
        assert torch.equal(labels, pipe(torch.zeros(8, 3, 8, 8))[1])
    assert module.ema.seen and all(s is None for s in module.ema.seen)  # validation: no labels
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 0.5)
    for ema, net in ((True, module.ema), (False, module.net)):  # sampling / evaluation models: no labels
        module.model(ema=ema)(x, t, None)
        assert net.seen[-1] is None


def _tiny_unet(augment_dim: int = 9) -> UNet:
    return UNet(img_resolution=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                dropout=0.1, augment_dim=augment_dim)


def _fit(root, max_steps: int, ckpt_path: str | None = None) -> DiffusionModule:
    L.seed_everything(0, verbose=False)
    module = DiffusionModule(_tiny_unet(), VPLinear(), ema_decay=0.9, augment=AugmentPipe(p=0.5))
    ckpt = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=3, save_top_k=-1)
    trainer = _trainer(root, max_steps, limit_val_batches=0, callbacks=[ckpt])
    trainer.fit(module, ShardDataModule(shards=SHAPES, batch_size=8, num_workers=0, seed=0), ckpt_path=ckpt_path)
    return module


def test_resume_with_augmentation_is_bit_exact(tmp_path):
    """6 steps straight == 3 steps + resume from the step-3 checkpoint + 3 steps, augmentation on."""
    straight = _fit(tmp_path / "a", 6)
    _fit(tmp_path / "b", 3)
    resumed = _fit(tmp_path / "b", 6, ckpt_path=str(tmp_path / "b" / "checkpoints" / "epoch=0-step=3.ckpt"))
    for a, b in ((straight.net, resumed.net), (straight.ema, resumed.ema)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=f"{key} differs")


# -- EDM's gradient sanitising ---------------------------------------------------------------------------
class _FixedGrad(torch.autograd.Function):
    """sum(w) forward; backward gives w the gradient (nan, inf, -inf, 2) whatever comes in."""

    @staticmethod
    def forward(ctx, w):
        return w.sum()

    @staticmethod
    def backward(ctx, grad):
        return torch.tensor([math.nan, math.inf, -math.inf, 2.0])


class _BadGradNet(ScoreNetwork):
    def __init__(self) -> None:
        super().__init__(img_resolution=8, in_channels=3)  # SHAPES' images
        self.weight = nn.Parameter(torch.zeros(4))

    def forward(self, x, noise_label, class_labels=None):
        return x * _FixedGrad.apply(self.weight)


@pytest.mark.parametrize("nan_to_num", [True, False])
def test_grad_nan_to_num(tmp_path, nan_to_num):
    """One SGD step at lr 1: w = -nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5) (EDM training_loop.py:139)."""
    module = DiffusionModule(_BadGradNet(), VPLinear(), optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
                             grad_nan_to_num=nan_to_num)
    _trainer(tmp_path, 1, limit_val_batches=0, enable_checkpointing=False).fit(
        module, ShardDataModule(shards=SHAPES, batch_size=4, num_workers=0))
    weight = module.net.weight.detach()
    if nan_to_num:
        assert torch.equal(weight, torch.tensor([0.0, -1e5, 1e5, -2.0]))
    else:
        assert weight[0].isnan() and weight[1] == -math.inf and weight[3] == -2.0


# -- configuration ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    (dict(p=1.5), "p=1.5"), (dict(scale=-1), "scale=-1.0"), (dict(scale_std=math.nan), "scale_std=nan"),
    (dict(aniso_rotate_prob=2), "aniso_rotate_prob=2.0"), (dict(rotate_frac=math.inf), "rotate_frac=inf"),
])
def test_bad_pipe_settings_are_one_line_errors(kwargs, words):
    with pytest.raises(UserValueError, match=words) as err:
        AugmentPipe(**kwargs)
    assert "\n" not in str(err.value)


def test_pipe_refuses_images_it_cannot_transform():
    with pytest.raises(UserValueError, match="square"):
        AugmentPipe(p=1.0, **{**ALL_OFF, "rotate_int": 1})(torch.zeros(2, 3, 8, 6))
    with pytest.raises(UserValueError, match="1 or 3 channels, got 2"):
        AugmentPipe(p=1.0, **{**ALL_OFF, "hue": 1})(torch.zeros(2, 2, 8, 8))


def test_module_refuses_a_network_without_matching_augment_dim():
    for net, dim in ((SpyNet(augment_dim=0), 0), (dit_tiny(img_resolution=8, augment_dim=3), 3)):
        with pytest.raises(UserValueError, match=f"gives 9 augmentation labels .* augment_dim={dim}") as err:
            DiffusionModule(net, VPLinear(), augment=AugmentPipe())
        assert "\n" not in str(err.value)
    with pytest.raises(UserValueError, match="expected a diffusion_pl.training.augment.AugmentPipe"):
        DiffusionModule(SpyNet(), VPLinear(), augment=object())
    DiffusionModule(SpyNet(augment_dim=0), VPLinear(), augment=AugmentPipe(p=0.5, **ALL_OFF))  # 0 labels, 0 dims


# -- the recipe path --------------------------------------------------------------------------------------
def _cli_config(tmp_path, augment_dim: int | None):
    config = tiny_fit_config(max_steps=2, logger=False, default_root_dir=str(tmp_path / "run"))
    config["model"]["augment"] = {"class_path": "diffusion_pl.training.augment.AugmentPipe", "init_args": {"p": 0.12}}
    if augment_dim is not None:
        config["model"]["net"]["init_args"]["augment_dim"] = augment_dim
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_yaml_recipe_trains_with_augmentation(tmp_path):
    """The README's YAML: fit, then the checkpoint rebuilds the pipe, and its model takes no labels."""
    assert main(["fit", "--config", _cli_config(tmp_path, 9)]) == 0
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    module = load_module(str(ckpt))
    assert isinstance(module.augment, AugmentPipe) and module.augment.p == 0.12 and module.net.augment_dim == 9
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 0.5)
    assert module.model()(x, t, None).shape == x.shape


def test_yaml_recipe_without_augment_dim_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    assert main(["fit", "--config", _cli_config(tmp_path, None)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("diffusion-pl fit: error: ") and "augment_dim=0" in last and "9" in last, last
