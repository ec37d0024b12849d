"""Guidance itself, autoguidance and the guidance interval (Denoiser(..., Guidance(guide=..., interval=...))) on
analytic oracles.

Autoguidance (Karras et al. 2024, eq. 1): D = D_guide + w (D_main - D_guide), mixed on raw outputs F.
Guidance interval (Kynkäänniemi et al. 2024): guidance only where sigma/alpha lies in [lo, hi].
The exactness tests compare samples bitwise (torch.equal): the code paths must coincide, not approximate.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_pl.guidance import Guidance
from diffusion_pl.oracle import GaussianMixture
from diffusion_pl.prediction import Denoiser, EpsPrediction, VPrediction
from diffusion_pl.processes.exploding import EDM
from diffusion_pl.processes.variance_preserving import VPLinear
from diffusion_pl.sampling.posterior import DDIM
from diffusion_pl.sampling.ode import HeunODE
from diffusion_pl.sampling.api import sample
from tests.support.guidance import MIX, NULL

BAD = GaussianMixture(MIX.weights, MIX.means, 1.5 * MIX.stds)  # the "bad version": every std broadened x1.5


def _mode_distance(x: torch.Tensor) -> float:
    """Mean distance of the samples to their nearest component mean."""
    return float(torch.cdist(x.double(), MIX.means).min(1).values.mean())


# -- Guidance itself -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,bad,prefix", [
    *[("weight", v, "guidance weight") for v in (float("nan"), math.inf, "2", True, None)],
    ("guide", "", "guidance guide"),
    *[("interval", v, "guidance interval") for v in ((1.0,), (-1.0, 2.0), (float("nan"), 1.0), "ab", 3.0, (2.0, 1.0))],
    *[("channels", v, "guidance channels") for v in (0, -1, 1.5, True, "3")],
    *[("clip_x0", v, "clip_x0") for v in (0.0, -1.0, True, "1", float("nan"))],
    *[("null_label", v, "guidance null_label") for v in (-1, 1.5, True, "3")],
])
def test_guidance_refuses_each_bad_field_in_one_line(field, bad, prefix):
    with pytest.raises(ValueError) as err:
        Guidance(**{field: bad})
    message = str(err.value)
    assert message.startswith(prefix + " ") and " is invalid: " in message and "expected" in message, message
    assert "\n" not in message
    with pytest.raises(ValueError, match=re.escape(prefix)):  # replace validates again
        Guidance(weight=2.0, null_label=1).replace(**{field: bad})


def test_guidance_values():
    """Normalised once (floats, a tuple interval), compared by value, frozen; the helpers the callers use."""
    g = Guidance(weight=2, interval=[0, 5], channels=1, clip_x0=1, null_label=3)
    assert g == Guidance(weight=2.0, interval=(0.0, 5.0), channels=1, clip_x0=1.0, null_label=3)
    assert isinstance(g.weight, float) and g.interval == (0.0, 5.0) and isinstance(g.clip_x0, float) and g.active
    assert Guidance(interval=(1.0, 1.0)).interval == (1.0, 1.0)  # lo == hi is one level, not empty
    with pytest.raises(AttributeError):
        g.weight = 3.0
    assert g.replace(weight=1.0) == Guidance(interval=(0, 5), channels=1, clip_x0=1, null_label=3) and g.weight == 2.0
    assert Guidance().for_model(7).null_label == 7 and g.for_model(7).null_label == 3
    assert Guidance().for_model(None) == Guidance()
    assert g.check_channels(4) == 1 and Guidance().check_channels(4) == 4
    with pytest.raises(ValueError, match="guidance channels 5 exceeds the 4 channels") as err:
        Guidance(channels=5).check_channels(4)
    assert "\n" not in str(err.value)
    assert Guidance(guide="a/guide.ckpt").guide_path == "a/guide.ckpt" and Guidance(guide=MIX).guide_path is None
    for path in (b"a/guide.ckpt", Path("a/guide.ckpt")):
        assert Guidance(guide=path).guide_path == "a/guide.ckpt"


def test_default_guidance_leaves_sampling_unchanged(conditional_oracle, mixture_noise):
    """`Guidance()` (and w = 1 with any other option) is plain conditional sampling: the same samples bitwise, one
    network call of B per evaluation, no clipping."""
    process, pred, n = EDM(), VPrediction(), 60
    labels = torch.arange(n) % 3

    def draw(**kw):
        main = conditional_oracle(MIX, process, pred)
        out = sample(main, process, pred, HeunODE(steps=4), (n, 2), noise=mixture_noise(n, 4), class_labels=labels,
                     **kw)
        return out.x, main.batch_sizes

    plain, sizes = draw()
    assert sizes == [n] * len(sizes)
    for guidance in (Guidance(), Guidance(weight=1.0, null_label=NULL, interval=(0.0, math.inf), channels=1),
                     Guidance(weight=1.0, guide=conditional_oracle(BAD, process, pred))):
        x, sizes = draw(guidance=guidance)
        assert torch.equal(x, plain) and sizes == [n] * len(sizes), guidance
    x_t, t = mixture_noise(n, 5), torch.full((n,), 0.5)
    model = conditional_oracle(MIX, process, pred)
    assert torch.equal(Denoiser(model, process, pred)(x_t, t, labels).x0,
                       Denoiser(model, process, pred, Guidance())(x_t, t, labels).x0)


def test_yaml_guidance_parses_through_lightning_cli(tmp_path, tiny_fit_config):
    """A callback's `guidance:` mapping in a recipe becomes one Guidance (as configs/imagenet256_dit_xl2.yaml
    writes it); a bad one is refused with Guidance's own message."""
    import yaml

    from diffusion_pl.cli.fit import DiffusionCLI
    from diffusion_pl.evaluation.fid_callback import FIDCallback
    from diffusion_pl.evaluation.sample_grid import SampleGrid

    recipe = """
    - class_path: diffusion_pl.evaluation.sample_grid.SampleGrid
      init_args:
        guidance: {weight: 2.0, interval: [0.1, 5.0], channels: 1}
    - class_path: diffusion_pl.evaluation.fid_callback.FIDCallback
      init_args:
        guidance: {weight: 1.5, channels: 3}
    - class_path: diffusion_pl.evaluation.fid_callback.FIDCallback
      init_args: {num_samples: 4}
    """

    def cli(text):  # LightningCLI rewrites the dicts it parses: a fresh config each time
        return DiffusionCLI(args=tiny_fit_config(default_root_dir=str(tmp_path), callbacks=yaml.safe_load(text)),
                            run=False)

    callbacks = cli(recipe).trainer.callbacks
    grid, fid, plain = [c for c in callbacks if isinstance(c, (SampleGrid, FIDCallback))]
    assert grid.guidance == Guidance(weight=2.0, interval=(0.1, 5.0), channels=1)
    assert fid.guidance == Guidance(weight=1.5, channels=3) and plain.guidance == Guidance()
    with pytest.raises((ValueError, SystemExit)) as err:
        cli(recipe.replace("[0.1, 5.0]", "[5.0, 0.1]"))
    assert "guidance interval 5 0.1 is invalid: sigma_lo > sigma_hi never guides; expected 0.1 5" in str(err.value)


# -- autoguidance and the interval -----------------------------------------------------------------------------------


@pytest.mark.parametrize("process", [EDM(), VPLinear()], ids=["EDM", "VPLinear"])
def test_guide_equal_to_main_model_changes_nothing(process, mixture_noise):
    pred, noise = EpsPrediction(), mixture_noise(300)
    model = MIX.model(process, pred)
    plain_out = sample(model, process, pred, HeunODE(steps=8), (300, 2), noise=noise)
    plain = plain_out.x
    for w in (0.0, 2.0, 7.5):
        guided = sample(model, process, pred, HeunODE(steps=8), (300, 2), noise=noise,
                        guidance=Guidance(weight=w, guide=model))
        assert torch.equal(guided.x, plain)  # D + w (D - D) = D bitwise
        assert guided.nfe == plain_out.nfe  # a guided evaluation counts once


def test_autoguidance_calls_main_and_guide_with_the_same_labels(conditional_oracle, mixture_noise):
    process, pred, n = VPLinear(), EpsPrediction(), 50
    main, guide = conditional_oracle(MIX, process, pred), conditional_oracle(BAD, process, pred)
    seen = []
    guide_fn = lambda x, t, y: (seen.append(y.clone()), guide(x, t, y))[1]  # noqa: E731
    labels = torch.arange(n) % 3
    sample(main, process, pred, DDIM(steps=4), (n, 2), noise=mixture_noise(n), class_labels=labels,
           guidance=Guidance(weight=2.0, guide=guide_fn))
    assert main.batch_sizes == [n] * 4 and guide.batch_sizes == [n] * 4  # two calls of B, no null batch
    assert all(torch.equal(y, labels) for y in seen)


@pytest.mark.parametrize("autoguide", [False, True], ids=["cfg", "autoguidance"])
def test_interval_outside_every_level_is_unguided_and_full_is_plain_guidance(autoguide, conditional_oracle,
                                                                             mixture_noise):
    process, pred, n = EDM(), VPrediction(), 200
    labels = torch.arange(n) % 3

    def draw(w, interval):
        main = conditional_oracle(MIX, process, pred)
        guide = conditional_oracle(BAD, process, pred) if autoguide else None
        out = sample(main, process, pred, HeunODE(steps=6), (n, 2), noise=mixture_noise(n, 1), class_labels=labels,
                     guidance=Guidance(weight=w, null_label=NULL, guide=guide, interval=interval))
        return out.x, main.batch_sizes

    unguided, _ = draw(1.0, None)
    guided, _ = draw(3.0, None)
    assert not torch.allclose(unguided, guided, atol=1e-3)
    for outside in ((1e4, 1e5), (0.0, 1e-6)):  # above sigma_max = 80; below sigma_min
        x, sizes = draw(3.0, outside)
        assert torch.equal(x, unguided)
        assert sizes == [n] * len(sizes)  # outside the interval: no null-label or guide call
    with pytest.raises(ValueError, match=r"guidance interval 2 1 is invalid: sigma_lo > sigma_hi never guides; "
                                         r"expected 1 2") as err:  # an empty interval (lo > hi) is refused
        draw(3.0, (2.0, 1.0))
    assert "\n" not in str(err.value)
    assert torch.equal(draw(3.0, (0.0, math.inf))[0], guided)
    assert torch.equal(draw(3.0, (0.002, 80.0))[0], guided)  # EDM's whole range, ends included
    partial = draw(3.0, (0.3, 5.0))[0]
    assert not torch.allclose(partial, guided, atol=1e-3) and not torch.allclose(partial, unguided, atol=1e-3)


def test_interval_is_per_sample_in_noise_level(conditional_oracle, mixture_noise):
    """A batch at mixed times: samples whose sigma/alpha lies in the interval are guided, the others not."""
    process, pred = VPLinear(), EpsPrediction()
    t = torch.tensor([0.05, 0.3, 0.6, 0.9])
    levels = process.noise_level(t.double())
    lo, hi = float(levels[1]) * 0.99, float(levels[2]) * 1.01  # samples 1 and 2 inside
    x_t, labels = mixture_noise(4, 2), torch.tensor([0, 1, 2, 0])
    main, guide = MIX.model(process, pred), BAD.model(process, pred)

    def eps(**kw):
        return Denoiser(conditional_oracle(MIX, process, pred), process, pred, Guidance(null_label=NULL, **kw))(
            x_t, t, labels).eps

    for kw in ({}, {"guide": conditional_oracle(BAD, process, pred)}):
        plain, guided = eps(**kw), eps(weight=2.0, **kw)
        mixed = eps(weight=2.0, interval=(lo, hi), **kw)
        inside = torch.tensor([False, True, True, False])
        assert torch.equal(mixed[inside], guided[inside]) and torch.equal(mixed[~inside], plain[~inside])
        assert not torch.allclose(guided, plain, atol=1e-4)
    del main, guide


def test_autoguidance_with_a_bad_guide_sharpens_the_modes(mixture_noise):
    """w = 2 with the x1.5-broadened oracle as guide pulls samples towards the component means.

    Measured (N = 1000, HeunODE(steps=20), noise seed 0): mean distance to the nearest mean at w = 1
    0.271 (EDM) / 0.265 (VPLinear), against 0.254 for 1000 exact mixture samples; at w = 2 0.184 / 0.179,
    ratios 0.678 / 0.674 (w = 3: 0.127 / 0.122).
    The product p^2 / p_bad would shrink each component's std by 0.80; the ODE sharpens more.
    Asserted: ratio < 0.75, and w = 1 within 10% of the exact mixture's value.
    """
    n = 1000
    exact = _mode_distance(MIX.sample(n, torch.Generator().manual_seed(5)))
    for process in (EDM(), VPLinear()):
        pred = EpsPrediction()
        model, guide = MIX.model(process, pred), BAD.model(process, pred)
        d = {w: _mode_distance(sample(model, process, pred, HeunODE(steps=20), (n, 2), noise=mixture_noise(n),
                                      guidance=Guidance(weight=w, guide=guide)).x) for w in (1.0, 2.0)}
        assert abs(d[1.0] / exact - 1) < 0.10
        assert d[2.0] / d[1.0] < 0.75


def test_learned_variance_mixes_only_the_mean_channels(mixture_noise):
    x_t, t = mixture_noise(4, 3)[:, :, None, None], torch.full((4,), 0.5)  # (B, C=2, 1, 1)
    main_out = torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(4))  # mean | variance channels
    guide_out = torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(5))
    process, pred = VPLinear(), EpsPrediction()
    den = Denoiser(lambda x, s, y: main_out, process, pred, Guidance(weight=3.0, guide=lambda x, s, y: guide_out))
    out = den.output(x_t, t, None)
    assert torch.equal(out[:, 2:], main_out[:, 2:])
    assert torch.allclose(out[:, :2], guide_out[:, :2] + 3.0 * (main_out[:, :2] - guide_out[:, :2]))
    den(x_t, t)  # split_variance still accepts the guided output


def test_errors_are_one_line(mixture_noise):
    process, pred = VPLinear(), EpsPrediction()
    model = MIX.model(process, pred)
    with pytest.raises(ValueError, match="null_label") as e:
        Denoiser(model, process, pred, Guidance(weight=2.0))
    assert "\n" not in str(e.value)
    for bad in ((1.0,), (-1.0, 2.0), (float("nan"), 1.0), "ab", (2.0, 1.0)):
        with pytest.raises(ValueError, match="guidance interval") as e:
            Denoiser(model, process, pred, Guidance(weight=2.0, guide=model, interval=bad))
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="guidance must be a diffusion_pl.guidance.Guidance, got float") as e:
        Denoiser(model, process, pred, 2.0)  # the old bare weight
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="guidance guide guide.ckpt is a checkpoint path: expected the loaded") as e:
        Denoiser(model, process, pred, Guidance(weight=2.0, guide="guide.ckpt"))
    assert "\n" not in str(e.value)
    wrong = lambda x, t, y: torch.zeros(len(x), 3)  # noqa: E731
    with pytest.raises(ValueError, match=r"output has shape \(5, 3\)") as e:
        Denoiser(model, process, pred, Guidance(weight=2.0, guide=wrong))(mixture_noise(5), torch.full((5,), 0.5))
    assert "\n" not in str(e.value)


# -- generate() and the CLI's guide loading ----------------------------------------------------------------------


def test_generate_with_the_module_as_its_own_guide_is_unguided(guidance_module):
    from diffusion_pl.evaluation.generation import generate

    module, other = guidance_module(), guidance_module(seed=1)
    draw = lambda **kw: torch.cat([im for _, im, _, _ in generate(module, DDIM(steps=3), range(4), (3, 8, 8),  # noqa: E731
                                                                  batch_size=4, **kw)])
    plain = draw()
    assert torch.equal(draw(guidance=Guidance(weight=3.0, guide=module)), plain)
    assert not torch.equal(draw(guidance=Guidance(weight=3.0, guide=other)), plain)
    assert torch.equal(draw(guidance=Guidance(weight=3.0, guide=other, interval=(1e5, 1e6))), plain)
    with pytest.raises(ValueError, match="guidance guide .* is a checkpoint path: expected the loaded module") as e:
        draw(guidance=Guidance(weight=3.0, guide="guide.ckpt"))  # generate takes a loaded guide (load_guide)
    assert "\n" not in str(e.value)


def test_load_guide_refuses_a_mismatched_checkpoint_in_one_line(tmp_path, monkeypatch, guidance_module):
    """evaluation.loading.load_guide, as the commands call it (errors naming their flags through cli.common.flag)."""
    import argparse

    from diffusion_pl.cli.common import add_model_options, flag, guidance_from_args
    from diffusion_pl.evaluation import loading
    from diffusion_pl.utils.errors import UserError

    p = argparse.ArgumentParser()
    add_model_options(p)
    path = tmp_path / "guide.ckpt"
    path.write_bytes(b"")
    main = guidance_module()
    cpu = torch.device("cpu")
    guidance = guidance_from_args(p.parse_args(["--guide_ckpt", str(path), "--guidance_interval", "0.1", "inf",
                                                "--guidance", "2"]))
    assert guidance == Guidance(weight=2.0, guide=str(path), interval=(0.1, math.inf))
    for guide, what in ((guidance_module(seed=1), None), (guidance_module(EDM()), "process"),
                        (guidance_module(resolution=16), "image shape")):
        monkeypatch.setattr(loading, "load_checkpoint", lambda *a, g=guide, **k: g)
        if what is None:
            loaded = loading.load_guide(main, guidance, cpu, names=flag)
            assert loaded.guide is guide and loaded == guidance.replace(guide=guide)
            continue
        with pytest.raises(UserError, match=f"--guide_ckpt .* has {what} .*expected the same") as e:
            loading.load_guide(main, guidance, cpu, names=flag)
        assert "\n" not in str(e.value)
    for argv, message in ((["--guidance_interval", "-1", "2"], "--guidance_interval -1 2 is invalid"),
                          (["--guidance_interval", "2", "1"], "--guidance_interval 2 1 is invalid: sigma_lo > sigma_hi "
                                                              "never guides; expected 1 2"),
                          (["--guidance_channels", "0"], "--guidance_channels 0 is invalid"),
                          (["--clip_x0", "0"], "--clip_x0 0.0 is invalid"),
                          (["--guidance", "nan"], "--guidance nan is invalid")):
        with pytest.raises(UserError) as e:
            guidance_from_args(p.parse_args(argv))
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(UserError, match="--guidance_channels 4 exceeds the 3 channels") as e:
        loading.load_guide(main, Guidance(channels=4), cpu, names=flag)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        loading.load_guide(main, Guidance(guide=str(tmp_path / "missing.ckpt")), cpu, names=flag)
    assert loading.load_guide(main, Guidance(weight=2.0), cpu, names=flag) == Guidance(weight=2.0)
    # from Python (the default names) the errors name the Guidance fields
    for bad, message in ((Guidance(channels=4), "guidance.channels 4 exceeds the 3 channels"),
                         (Guidance(guide=str(tmp_path / "missing.ckpt")), "guidance.guide .* does not exist")):
        with pytest.raises(UserError, match=message) as e:
            loading.load_guide(main, bad, cpu)
        assert "\n" not in str(e.value)
    assert set(loading.guidance_config(guidance)) == {"guide_checkpoint_sha256", "guidance_interval"}
    assert loading.guidance_config(Guidance(weight=2.0)) == {}


@pytest.mark.slow
def test_sample_cli_with_a_guide_checkpoint(run, tmp_path, capsys):
    """`diffusion-pl sample --guide_ckpt`: the checkpoint as its own guide reproduces the unguided images
    and is recorded; a guide of another process (EDM) is refused in one line."""
    from diffusion_pl.cli.main import main

    ckpt = run["ckpt"]

    def draw(name, *args):
        out = tmp_path / name
        rc = main(["sample", "--ckpt_path", ckpt, "--sampler", "ddim", "--steps", "2", "--num_samples", "3", "--npz",
                   "--out", str(out), *args])
        return rc, out

    _, plain = draw("plain")
    _, guided = draw("guided", "--guide_ckpt", ckpt, "--guidance", "3", "--guidance_interval", "0", "inf")
    npz = lambda out: np.load(next(out.glob("*.npz")))["arr_0"]  # noqa: E731
    assert np.array_equal(npz(plain), npz(guided))
    recorded = json.loads((guided / "sample_config.json").read_text())
    assert len(recorded["guide_checkpoint_sha256"]) == 64 and recorded["guidance_interval"] == [0.0, math.inf]
    forged = torch.load(ckpt, map_location="cpu", weights_only=True)
    forged["hyper_parameters"]["process"] = {"class_path": "diffusion_pl.processes.exploding.EDM", "init_args": {}}
    torch.save(forged, tmp_path / "other.ckpt")
    capsys.readouterr()
    rc, out = draw("refused", "--guide_ckpt", str(tmp_path / "other.ckpt"), "--guidance", "3")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "diffusion_pl.processes.exploding.EDM" in err[0] and "expected the same" in err[0]
    assert not out.exists()
    # the same process class with another parameter (VPLinear's repr omits its betas): refused too
    forged["hyper_parameters"]["process"] = {"class_path": "diffusion_pl.processes.variance_preserving.VPLinear",
                                             "init_args": {"beta_min": 0.1, "beta_max": 10.0}}
    torch.save(forged, tmp_path / "betas.ckpt")
    capsys.readouterr()
    rc, out = draw("refused_betas", "--guide_ckpt", str(tmp_path / "betas.ckpt"), "--guidance", "3")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "beta_max" in err[0], err


def test_sample_grid_and_fid_callbacks_guide_with_a_checkpoint(tmp_path, monkeypatch, stand_in_features, frozen_fit,
                                                               eval_module, recording):
    """SampleGrid / FIDCallback `guidance=Guidance(guide=<checkpoint path>)`: the guide reaches the sampler (the
    grid and the FID change), and a guidance interval outside every noise level gives the unguided grid and values
    exactly; a guide of other classes is refused when fit starts, in one line."""
    from PIL import Image

    import diffusion_pl.training.module as module_lib
    from diffusion_pl.evaluation.fid_callback import FIDCallback
    from diffusion_pl.evaluation.sample_grid import SampleGrid
    from diffusion_pl.utils.errors import UserValueError

    guide = eval_module(num_classes=5)
    with torch.no_grad():  # a guide that differs from the (frozen) trained model
        for p in guide.ema.parameters():
            p.add_(0.2 * torch.randn_like(p))
    path = tmp_path / "guide.ckpt"  # a file, as the checkpoint path is checked before loading (load_module stubbed)
    path.write_bytes(b"")
    loaded = []
    monkeypatch.setattr(module_lib, "load_module", lambda path, **kw: loaded.append(path) or guide)
    grids, fids = {}, {}
    for name, guidance in {"plain": None, "guided": Guidance(weight=3.0, guide=str(path)),
                           "outside": Guidance(weight=3.0, guide=str(path), interval=(1e5, 1e6))}.items():
        grid = recording(SampleGrid)(every_n_steps=2, num_samples=10, sampler=DDIM(steps=2), guidance=guidance)
        fid = recording(FIDCallback)(every_n_steps=2, num_samples=12, sampler=DDIM(steps=2), batch_size=6,
                                     feature_extractor=stand_in_features(), guidance=guidance)
        frozen_fit(tmp_path / name, [grid, fid])
        with Image.open(grid.written[-1]) as im:
            grids[name] = np.array(im)
        fids[name] = fid.last
        assert grid.guidance == (guidance or Guidance())  # the callback keeps the path, not the loaded guide
    assert loaded == [str(path)] * 4  # once per callback that has a guide
    assert np.array_equal(grids["plain"], grids["outside"]) and fids["plain"] == fids["outside"]
    assert not np.array_equal(grids["plain"], grids["guided"]) and fids["plain"] != fids["guided"]
    other = eval_module(num_classes=None)
    monkeypatch.setattr(module_lib, "load_module", lambda path, **kw: other)
    with pytest.raises(UserValueError, match=rf"SampleGrid: guidance.guide {re.escape(str(path))} has num_classes "
                                             r"None but the trained module has 5: expected the same") as e:
        frozen_fit(tmp_path / "refused",
                   [SampleGrid(every_n_steps=2, num_samples=4, guidance=Guidance(guide=str(path)))])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"guidance interval 1 -2 is invalid"):
        FIDCallback(guidance=Guidance(interval=(1, -2)))
    with pytest.raises(ValueError, match=r"FIDCallback: guidance 3.0 is a float: expected a "
                                         r"diffusion_pl.guidance.Guidance") as e:
        FIDCallback(guidance=3.0)
    assert "\n" not in str(e.value)
