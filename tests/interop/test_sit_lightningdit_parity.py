"""SiT and LightningDiT against their own code, run beside ours by weight transfer (as tests/interop/test_interop_dit.py
does with diffusers): the same random weights give the same output.

The reference code is not a package: these tests run only where DIFFUSION_PL_SIT_REPO (a checkout of willisma/SiT,
checked at 947f95b) and DIFFUSION_PL_LIGHTNINGDIT_REPO (hustvl/LightningDiT, checked at 2725fed; it imports einops and
fairscale) name checkouts, and are skipped otherwise:

    git clone https://github.com/willisma/SiT /tmp/SiT && git clone https://github.com/hustvl/LightningDiT /tmp/ldit
    pip install einops fairscale
    DIFFUSION_PL_SIT_REPO=/tmp/SiT DIFFUSION_PL_LIGHTNINGDIT_REPO=/tmp/ldit python -m pytest \\
        tests/interop/test_sit_lightningdit_parity.py

Every option's formula is tested without the checkouts in tests/core/test_dit_options.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import sys

import pytest
import torch

from diffusion_pl.interop.dit_reference import convert_dit_reference_state_dict
from diffusion_pl.networks.dit import DiT

SIT_REPO, LDIT_REPO = os.environ.get("DIFFUSION_PL_SIT_REPO"), os.environ.get("DIFFUSION_PL_LIGHTNINGDIT_REPO")
SIZE = dict(hidden_size=64, depth=2, num_heads=4)
CLASSES, LATENT = 10, (4, 8, 8)


def randomize(net: torch.nn.Module, seed: int = 1) -> None:
    """Random weights everywhere (norm scales around 1), so that no zero-initialised layer hides a term; the frozen
    sin-cos position table (a parameter there, a buffer here) stays the table."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + ("norm" in name))


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three latents, times {0, 0.37, 0.999} (the reference codes' t in [0, 1]), labels with the null label."""
    x = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(2))
    return x, torch.tensor([0.0, 0.37, 0.999]), torch.tensor([3, 7, CLASSES])


def transfer(reference: torch.nn.Module, ours: DiT, rename: dict[str, str] | None = None) -> None:
    """Load the reference's weights into ours: DiT's renames, then `rename` on key substrings; the reference's
    position tables (its frozen sin-cos parameter, RoPE buffers) are recomputed here, not weights."""
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("feat_rope.")}
    state = convert_dit_reference_state_dict(state)
    for old, new in (rename or {}).items():
        state = {k.replace(old, new): v for k, v in state.items()}
    ours.load_state_dict(state, strict=True)


@pytest.mark.skipif(not SIT_REPO, reason="DIFFUSION_PL_SIT_REPO (a checkout of willisma/SiT) not set")
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_dit_is_sit(learn_sigma, monkeypatch):
    spec = importlib.util.spec_from_file_location("sit_reference_models", os.path.join(SIT_REPO, "models.py"))
    sit_models = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, sit_models)
    spec.loader.exec_module(sit_models)
    torch.manual_seed(0)
    reference = sit_models.SiT(input_size=LATENT[1], patch_size=2, in_channels=LATENT[0], num_classes=CLASSES,
                               learn_sigma=learn_sigma, **SIZE).eval()
    randomize(reference)
    # SiT with learn_sigma builds 2C output channels and returns the first C (models.py:245-246)
    ours = DiT(LATENT[1], LATENT[0], 2 * LATENT[0] if learn_sigma else LATENT[0], CLASSES, patch_size=2, **SIZE).eval()
    transfer(reference, ours)
    x, t, y = inputs()
    with torch.no_grad():
        expected, got = reference(x, t, y), ours(x, t, y)[:, :LATENT[0]]
    assert expected.shape == got.shape == (3, *LATENT)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def lightningdit_class():
    pytest.importorskip("einops")
    pytest.importorskip("fairscale")
    saved = {k: v for k, v in sys.modules.items() if k == "models" or k.startswith("models.")}
    for k in saved:
        del sys.modules[k]
    compile_ = torch.compile
    torch.compile = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)  # eager: its @torch.compile
    sys.path.insert(0, LDIT_REPO)
    try:
        yield importlib.import_module("models.lightningdit").LightningDiT
    finally:
        sys.path.remove(LDIT_REPO)
        torch.compile = compile_
        for k in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.mark.skipif(not LDIT_REPO, reason="DIFFUSION_PL_LIGHTNINGDIT_REPO (a checkout of hustvl/LightningDiT) not set")
def test_dit_options_are_lightningdit(lightningdit_class):
    """Every one of the 64 combinations of patch {1, 2} x the five block options."""
    mismatched = []
    for patch, rmsnorm, swiglu, rope, qk_norm, no_shift in itertools.product([1, 2], *[[False, True]] * 5):
        torch.manual_seed(0)
        reference = lightningdit_class(input_size=LATENT[1], patch_size=patch, in_channels=LATENT[0],
                                       num_classes=CLASSES, use_rmsnorm=rmsnorm, use_swiglu=swiglu, use_rope=rope,
                                       use_qknorm=qk_norm, wo_shift=no_shift, **SIZE).eval()
        randomize(reference)
        ours = DiT(LATENT[1], LATENT[0], LATENT[0], CLASSES, patch_size=patch,
                   norm="rmsnorm" if rmsnorm else "layernorm", mlp="swiglu" if swiglu else "gelu", rope=rope,
                   qk_norm=qk_norm, adaln_shift=not no_shift, **SIZE).eval()
        transfer(reference, ours, {".mlp.w12.": ".mlp.fc1.", ".mlp.w3.": ".mlp.fc2."})
        x, t, y = inputs()
        with torch.no_grad():
            expected, got = reference(x, t, y), ours(x, t, y)
        assert expected.shape == got.shape == (3, *LATENT)
        difference = (got - expected).abs().max().item()
        if not difference <= 1e-5:
            mismatched.append((f"patch={patch} rmsnorm={rmsnorm} swiglu={swiglu} rope={rope} qk_norm={qk_norm} "
                               f"no_shift={no_shift}", difference))
    assert not mismatched, mismatched
