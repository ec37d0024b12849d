"""Contract tests for the score networks, parametrized over every preset in networks.PRESETS.

Published-size presets are built on the meta device (no memory, no compute); behaviour is
checked on small versions of each preset (same options, fewer channels and blocks).
"""

from __future__ import annotations

import functools
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.networks.presets import PRESETS
from diffusion_pl.networks.dit import DiT, dit_tiny, dit_xl_2
from diffusion_pl.networks.unet import UNet
from diffusion_pl.networks.unet_presets import unet_tiny
from diffusion_pl.networks.embeddings import PositionalEmbedding

# Shrinks a preset to 0.2-2M parameters at 16x16 while keeping its family's options.
SMALL = {
    UNet: dict(img_resolution=16, model_channels=32, num_res_blocks=1, attn_resolutions=(8,)),
    DiT: dict(img_resolution=16, hidden_size=64, depth=2, num_heads=4),
}
IDS = [preset.__name__ for preset in PRESETS]


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@functools.cache
def family(preset) -> type:
    with torch.device("meta"):
        return type(preset())


def small(preset, **kwargs) -> torch.nn.Module:
    with torch.random.fork_rng():  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(0)
        return preset(**{**SMALL[family(preset)], **kwargs}).eval()


def null_label(net: torch.nn.Module) -> int | None:
    """The network's null class label: num_classes, or None for a table without one (ADM's)."""
    return getattr(net, "null_label", net.num_classes)


def perturb(net: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised layers stop hiding the conditioning."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return net


def inputs(batch: int = 2, res: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=generator)
    return x, torch.rand(batch, generator=generator) * 1000


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_output_shape_published_size_on_meta(preset):
    # One forward of the published size on the meta device: shapes only, no memory or compute.
    with torch.device("meta"):
        x = torch.empty(2, 3, 32, 32)
        net = preset(num_classes=10)
        assert net.num_classes == 10
        labels = None if null_label(net) is not None else torch.zeros(2, dtype=torch.long)
        assert net(x, torch.empty(2), labels).shape == x.shape


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_zero_output_at_init_and_shape(preset):
    # Every family zero-initialises its output layer (DDPM init_scale=0, ADM zero_module, DiT adaLN-Zero).
    x, t = inputs()
    net = small(preset)
    out = net(x, t)
    assert out.shape == x.shape
    if getattr(net, "init", None) == "edm":
        # EDM's init_zero is xavier x 1e-5, not 0 (NVlabs/edm training/networks.py:260).
        assert 0 < out.abs().max() < 1e-4
    else:
        assert torch.count_nonzero(out) == 0
    # out_channels overrides the output width (e.g. a learned variance doubles it).
    net = small(preset, out_channels=6, num_classes=10)
    assert net(x, t, torch.tensor([0, null_label(net) or 9])).shape == (2, 6, 16, 16)


# Published counts and where they come from (exact; the published figure is checked to +-2%):
# - DDPM: "35.7 million" (Ho et al. 2020, App. B); 35,746,307 is the count of the released
#   CIFAR-10 model (also diffusers' UNet2DModel at that config, see bench/bench_networks.py).
# - DDPM++: 55.7M (Karras et al. 2022); 55,732,739 = NVlabs/edm SongUNet with train.py
#   --arch=ddpmpp (model_channels=128, channel_mult=[2,2,2], resample_filter=[1,1]), augment_dim=0.
# - ADM at iDDPM's CIFAR-10 size: 57,091,203 = openai/guided-diffusion UNetModel(128, (1,2,2,2),
#   3 blocks, attention 16/8, 64 ch/head, scale-shift norm, resblock up/down, out_channels=3).
# - DiT: facebookresearch/DiT models.py at input_size=32, in_channels=3, learn_sigma=False,
#   num_classes=10, parameters other than the frozen pos_embed (a buffer here). Unconditional
#   removes the 11-row label table (11 * hidden). DiT-XL/2 at the paper's ImageNet latent
#   setting (4 -> 8 channels, 1000 classes) is 674,834,720 + 294,912 pos_embed = 675,129,632
#   ("675M" in Peebles & Xie 2023).
# - LightningDiT: hustvl/LightningDiT models/lightningdit.py (LightningDiT_XL_1 / _B_1 with use_swiglu, use_rope,
#   use_rmsnorm as configs/lightningdit_xl_vavae_f16d32.yaml) at its setting input_size=16, in_channels=32,
#   num_classes=1000, learn_sigma=False, counted from that code without the frozen pos_embed.
PUBLISHED = [
    ("unet_ddpm_cifar10", {}, 35_746_307, 35.7e6),
    ("unet_ddpmpp_cifar10", {}, 55_732_739, 55.7e6),
    ("unet_adm_cifar10", {}, 57_091_203, None),
    ("dit_s_2", dict(num_classes=10), 32_475_660, None),
    ("dit_s_2", {}, 32_475_660 - 11 * 384, None),
    ("dit_b_2", dict(num_classes=10), 129_537_036, None),
    ("dit_b_2", {}, 129_537_036 - 11 * 768, None),
    ("dit_xl_2", dict(in_channels=4, out_channels=8, num_classes=1000), 674_834_720, None),
    ("lightningdit_xl_1", dict(img_resolution=16, in_channels=32, num_classes=1000), 674_961_824, None),
    ("lightningdit_b_1", dict(img_resolution=16, in_channels=32, num_classes=1000), 130_359_584, None),
]


@pytest.mark.parametrize("name, kwargs, exact, published", PUBLISHED, ids=[f"{n}-{k}" for n, k, *_ in PUBLISHED])
def test_parameter_count(name, kwargs, exact, published):
    preset = {p.__name__: p for p in PRESETS}[name]
    with torch.device("meta"):
        n = count(preset(**kwargs))
    assert n == exact
    if published is not None:
        assert abs(n - published) / published < 0.02


def test_dit_xl_2_matches_paper_size():
    with torch.device("meta"):
        net = dit_xl_2(in_channels=4, out_channels=8, num_classes=1000)
    # The paper's count includes the fixed position table, a frozen parameter in its code.
    assert abs(count(net) + net.pos_embed.numel() - 675e6) / 675e6 < 0.02


def test_tiny_presets_are_small():
    assert count(unet_tiny()) <= 1.2e6
    assert count(dit_tiny()) <= 1.2e6


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_output_depends_on_noise_label_and_class(preset):
    net = perturb(small(preset, num_classes=10))
    x, _ = inputs()
    labels = torch.tensor([3, 7])

    def run(noise_label, class_labels=labels):
        with torch.no_grad():
            return net(x, noise_label, class_labels)

    # Both noise-label conventions: 1000 t (0..1000) and EDM's c_noise = log(sigma) / 4.
    for a, b in [([10.0, 500.0], [20.0, 510.0]), ([-1.2, 0.3], [-1.0, 0.5])]:
        a, b = torch.tensor(a), torch.tensor(b)
        assert (run(a) - run(b)).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    t = torch.tensor([10.0, 500.0])
    assert (run(t) - run(t, torch.tensor([4, 8]))).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    # class_labels=None means the null label, index num_classes; without one, labels are required.
    if null_label(net) is not None:
        assert torch.equal(run(t, None), run(t, torch.full((2,), 10)))
    else:
        with pytest.raises(UserValueError, match="no null label"):
            run(t, None)
    # A 0-d noise label is one noise level for the whole batch.
    assert torch.equal(run(torch.tensor(7.0)), run(torch.tensor([7.0, 7.0])))


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_gradients_reach_every_parameter(preset):
    net = perturb(small(preset, num_classes=10)).train()
    x, t = inputs()
    net(x, t, torch.tensor([3, null_label(net) or 9])).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_deterministic_forward_on_cpu(preset):
    a, b = perturb(small(preset)), perturb(small(preset))
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(a(x, t), a(x, t))
        assert torch.equal(a(x, t), b(x, t))  # same seed -> same weights -> same output


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_channels_last(preset):
    net = perturb(small(preset))
    x, t = inputs()
    with torch.no_grad():
        reference = net(x, t)
        out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", PRESETS, ids=IDS)
def test_bf16_autocast(preset):
    net = perturb(small(preset, num_classes=10))
    x, t = inputs()
    labels = None if null_label(net) is not None else torch.tensor([3, 7])
    with torch.no_grad():
        reference = net(x, t, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, t, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # bf16 keeps ~3 significant digits: compare to float32 loosely, relative to the output scale.
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_attention_is_fused(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    x, t = inputs()
    with torch.no_grad():
        small(unet_tiny)(x, t)
        n_unet = len(calls)
        small(dit_tiny)(x, t)
    assert n_unet == 4  # 8x8: one encoder and two decoder blocks; one in the middle
    assert len(calls) - n_unet == SMALL[DiT]["depth"]


def test_positional_embedding_resolves_both_noise_label_ranges():
    embed = PositionalEmbedding(128, endpoint=True)
    # Steps of 1 in 1000 t and of 0.0027 in c_noise both move the embedding noticeably.
    for grid in (torch.arange(0, 1000, 1.0), torch.linspace(-1.6, 1.1, 1000)):
        e = embed(grid)
        assert (e[1:] - e[:-1]).norm(dim=1).min() > 1e-3


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: unet_tiny(img_resolution=30), "img_resolution"),
        (lambda: unet_tiny(img_resolution=32, attn_resolutions=(12,)), "attn_resolutions"),
        (lambda: unet_tiny(attn_head_channels=48), "attn_head_channels"),
        (lambda: unet_tiny(attn_heads=3), "attn_heads"),
        (lambda: unet_tiny(channel_mult=()), "channel_mult"),
        (lambda: unet_tiny(embedding="gaussian"), "embedding"),
        (lambda: unet_tiny(num_classes=0), "num_classes"),
        (lambda: unet_tiny(model_channels=33), "model_channels"),
        (lambda: unet_tiny(norm_groups=0), "norm_groups must be None or a positive integer"),
        (lambda: unet_tiny(norm_groups=12), "norm_groups=12 does not divide a GroupNorm of 32 channels"),
        (lambda: dit_tiny(img_resolution=31), "img_resolution"),
        (lambda: dit_tiny(num_heads=3), "hidden_size"),
        (lambda: dit_tiny(patch_size=3), "img_resolution"),
    ],
)
def test_bad_constructor_input_raises_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def groups_by_width(net: torch.nn.Module) -> set[tuple[int, int]]:
    return {(m.num_channels, m.num_groups) for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}


def test_unet_norm_groups_option():
    """None keeps the default rule (32 groups, >= 4 channels each); a count is used in every GroupNorm, as
    diffusers' UNet2DModel norm_num_groups, with the same parameters but other outputs."""
    default, eight = small(unet_tiny), small(unet_tiny, norm_groups=8)
    assert groups_by_width(default) == {(32, 8), (64, 16), (96, 24), (128, 32)}
    assert {g for _, g in groups_by_width(eight)} == {8}
    eight.load_state_dict(perturb(default).state_dict())  # norm_groups changes no parameter shape
    x, t = inputs()
    with torch.no_grad():
        assert (default(x, t) - eight(x, t)).abs().max() > 1e-3


def test_fourier_embedding_option():
    net = perturb(unet_tiny(img_resolution=16, embedding="fourier"))
    x, _ = inputs()
    with torch.no_grad():
        # NCSN++ feeds log(sigma) to random Fourier features (Song et al. 2021).
        assert not torch.allclose(net(x, torch.tensor([-1.0, 0.0])), net(x, torch.tensor([-0.9, 0.1])))


MICRO = [
    lambda: unet_tiny(img_resolution=8, model_channels=16, channel_mult=(1, 2), attn_resolutions=(4,)),
    lambda: dit_tiny(img_resolution=8, depth=1),
]


@pytest.mark.parametrize("build", MICRO, ids=["unet", "dit"])
def test_torch_compile_fullgraph(build):
    # Dynamo capture of forward and backward with no graph break (fullgraph=True); the
    # "eager" backend skips code generation, which takes minutes on 2 CPU cores.
    net = perturb(build())
    x, t = inputs(res=8)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    out = compiled(x, t)
    out.square().mean().backward()
    torch.testing.assert_close(out, net(x, t))


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="TorchInductor's CPU backend needs a C++ compiler (g++ or c++) on PATH; none found",
)
@pytest.mark.skipif(
    os.environ.get("DIFFUSION_PL_TEST_INDUCTOR") != "1",
    reason="Inductor code generation takes 0.5-4 min on 2 CPU cores with a cold cache; "
    "set DIFFUSION_PL_TEST_INDUCTOR=1 to run",
)
def test_torch_compile_inductor():
    net = perturb(MICRO[1]())
    x, t = inputs(res=8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net, fullgraph=True)(x, t), net(x, t), rtol=1e-4, atol=1e-4)


def test_networks_run_in_float64():
    """net.double() runs end to end: the float32 sinusoid is cast to the embedding MLP's dtype."""
    from diffusion_pl.networks.dit import dit_tiny
    from diffusion_pl.networks.unet_presets import unet_tiny

    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for net in (dit_tiny(img_resolution=16, num_classes=3).double(), unet_tiny(img_resolution=16).double()):
        out = net(x, torch.rand(2, dtype=torch.float64), torch.tensor([0, 2]) if hasattr(net, "y_embedder") else None)
        assert out.dtype == torch.float64 and out.shape == x.shape


def test_unet_augment_labels():
    """augment_dim adds a bias-free map of EDM's augmentation labels to the noise embedding."""
    from diffusion_pl.networks.unet_presets import unet_ddpmpp_cifar10

    plain = small(unet_ddpmpp_cifar10)
    net = perturb(small(unet_ddpmpp_cifar10, augment_dim=9))
    assert net.augment_dim == 9 and plain.augment_dim == 0
    # EDM's SongUNet.map_augment: Linear(augment_dim, model_channels, bias=False).
    assert count(net) - count(plain) == 9 * SMALL[UNet]["model_channels"]
    x, t = inputs()
    labels = torch.randn(2, 9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # None means all-zero augmentation labels (no augmentation).
        assert torch.equal(net(x, t, None, None), net(x, t, None, torch.zeros(2, 9)))
        assert (net(x, t, None, labels) - net(x, t)).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    net.train()
    net(x, t, None, labels).square().mean().backward()
    assert net.map_augment.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="augment_dim"):
        unet_tiny(img_resolution=16, augment_dim=-1)


@pytest.mark.parametrize("name, scheme", [("unet_ddpm_cifar10", "ddpm"), ("unet_ddpmpp_cifar10", "edm"),
                                          ("unet_adm_cifar10", "adm")])
def test_unet_init_scales(name, scheme):
    """Each preset starts with its reference's init (unet_blocks.init_unet): uniform bounds per layer."""
    from diffusion_pl.networks.unet_blocks import SpatialAttention

    net = small({p.__name__: p for p in PRESETS}[name], num_classes=10, augment_dim=9)
    assert net.init == scheme

    def bound_of(t, fan_in, fan_out):
        return {"adm": 1 / math.sqrt(fan_in)}.get(scheme, math.sqrt(6 / (fan_in + fan_out)))

    def check(t, bound, tight=True):
        peak = float(t.detach().abs().max())
        assert peak <= bound * (1 + 1e-6)
        if tight and t.numel() >= 500:  # the largest of >= 500 uniform draws is within 1% of the bound
            assert peak >= 0.95 * bound

    qkv = {id(m.attn.qkv) for m in net.modules() if isinstance(m, SpatialAttention)}
    for module in net.modules():
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        w = module.weight
        fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
        if getattr(module, "zero_init", False):
            # DDPM's init_scale=0 and ADM's zero_module: 0; EDM's init_zero: xavier x 1e-5 (networks.py:260).
            if scheme == "edm":
                check(w, 1e-5 * bound_of(w, fan_in, fan_out))
            else:
                assert torch.count_nonzero(w) == 0
        elif id(module) in qkv and scheme == "ddpm":  # three C x C layers q, k, v (diffusion_tf unet.py:70-72)
            for part in w.chunk(3):
                check(part, math.sqrt(6 / (2 * part.shape[1])))
        elif id(module) in qkv and scheme == "edm":  # init_attn: xavier x sqrt(0.2) (networks.py:261)
            check(w, math.sqrt(0.2) * bound_of(w, fan_in, fan_out))
        elif module is net.map_augment and scheme == "adm":  # EDM's DhariwalUNet: init_zero
            assert torch.count_nonzero(w) == 0
        else:
            check(w, bound_of(w, fan_in, fan_out))
        if module.bias is not None:
            if scheme == "adm" and not getattr(module, "zero_init", False):
                check(module.bias, 1 / math.sqrt(fan_in), tight=False)  # PyTorch's default bias init
                assert torch.count_nonzero(module.bias) > 0
            else:
                assert torch.count_nonzero(module.bias) == 0
    table = net.map_label.table.weight  # (classes [+ null], width)
    if scheme == "edm":  # EDM's map_label: xavier (fan_in 10) on one_hot * sqrt(10), zero bias = null row
        check(table[:10].detach(), math.sqrt(10) * math.sqrt(6 / (10 + table.shape[1])))
        assert torch.count_nonzero(table[10]) == 0
    else:  # nn.Embedding's N(0, 1); ADM's table has no null row
        assert table.shape[0] == (10 if scheme == "adm" else 11)
        assert 0.8 < float(table.detach().std()) < 1.2


def test_adm_preset_embeddings():
    """ADM: [cos, sin] sinusoid without endpoint, GroupNorm eps 1e-5, class table after the MLP, no null row."""
    from diffusion_pl.training.module import DiffusionModule
    from diffusion_pl.networks.unet_presets import unet_adm_cifar10
    from diffusion_pl.processes.variance_preserving import VPLinear

    net = perturb(small(unet_adm_cifar10, num_classes=10))
    assert net.null_label is None and DiffusionModule(net, VPLinear()).null_label is None
    assert DiffusionModule(small(unet_tiny, num_classes=10), VPLinear()).null_label == 10
    assert {m.eps for m in net.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-5}
    t = torch.tensor([3.0, 700.0])
    half = SMALL[UNet]["model_channels"] // 2
    angle = t[:, None] * 10000.0 ** (-torch.arange(half) / half)  # guided_diffusion/nn.py:113-118
    torch.testing.assert_close(net.noise_order(net.map_noise(t)), torch.cat([angle.cos(), angle.sin()], dim=1))
    seen = []
    net.mid[0].affine.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x, _ = inputs()
    labels = torch.tensor([3, 9])
    with torch.no_grad():
        net(x, t, labels)
        expected = net.map_emb(net.noise_order(net.map_noise(t))) + net.map_label.table.weight[labels]
    torch.testing.assert_close(seen[0], expected)  # emb = MLP(sinusoid) + table[y] (unet.py:648-652)
