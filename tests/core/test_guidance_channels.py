"""`Guidance(channels=K)`: guidance mixes only the first K channels of the mean output, the rest (and a learned
variance) stay the conditional / main output (DiT's forward_with_cfg, models.py:258-266, with K = 3 of 4 latent
channels); None mixes every channel, unchanged. Denoiser, `sample`, `generate`, the callbacks and the commands."""

from __future__ import annotations

import json
import re

import pytest
import torch

from diffusion_pl.cli.main import main
from diffusion_pl.evaluation.generation import generate
from diffusion_pl.guidance import Guidance
from diffusion_pl.prediction import Denoiser, EpsPrediction
from diffusion_pl.processes.exploding import EDM
from diffusion_pl.processes.variance_preserving import VPLinear
from diffusion_pl.sampling.posterior import DDIM
from diffusion_pl.sampling.ode import HeunODE
from diffusion_pl.sampling.api import sample
from tests.support.evaluation import DATA
from tests.support.guidance import MIX, NULL

W = 1.5


class FakeNet:
    """A class-conditional stand-in: every output element depends on its sample's x_t, t and label only (so a
    batched call and a separate one agree bitwise), with `channels` mean channels and optionally as many variance."""

    def __init__(self, channels: int = 4, learned_variance: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.scale = torch.randn(NULL + 1, channels * (2 if learned_variance else 1), generator=g)

    def __call__(self, x_t, t, labels):
        x = torch.cat([x_t, -x_t], 1) if self.scale.shape[1] > x_t.shape[1] else x_t
        return torch.tanh(x * self.scale[labels][:, :, None, None] + t[:, None, None, None])


def _inputs(n: int = 6, channels: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, channels, 3, 3, generator=g), torch.rand(n, generator=g), torch.arange(n) % NULL


@pytest.mark.parametrize("learned_variance", [False, True], ids=["eps", "learned-variance"])
@pytest.mark.parametrize("k", [1, 3])
def test_only_the_first_k_channels_are_guided(k, learned_variance):
    net, (x_t, t, labels) = FakeNet(learned_variance=learned_variance), _inputs()
    process, pred = VPLinear(), EpsPrediction()
    den = lambda **kw: Denoiser(net, process, pred, Guidance(weight=W, null_label=NULL, **kw))  # noqa: E731
    cond, uncond = net(x_t, t, labels), net(x_t, t, torch.full_like(labels, NULL))
    all_guided, k_guided = den().output(x_t, t, labels), den(channels=k).output(x_t, t, labels)
    assert torch.equal(k_guided[:, k:], cond[:, k:])  # the unguided conditional output, exactly
    assert torch.equal(k_guided[:, :k], all_guided[:, :k])  # the guided mix
    assert torch.equal(all_guided[:, :4], uncond[:, :4] + W * (cond[:, :4] - uncond[:, :4]))  # None: every channel
    assert torch.equal(den(channels=4).output(x_t, t, labels), all_guided)  # K = C is None
    assert not torch.equal(k_guided[:, k:4], all_guided[:, k:4])
    # the same split for autoguidance and inside a guidance interval (outside it: all conditional)
    guide = lambda x, s, y: net(x, s, torch.full_like(y, NULL))  # noqa: E731
    auto = Denoiser(net, process, pred, Guidance(weight=W, guide=guide, channels=k)).output(x_t, t, labels)
    assert torch.equal(auto, k_guided)
    level = process.noise_level(t.double())
    lo = float(level.median())
    interval = den(channels=k, interval=(lo, float("inf"))).output(x_t, t, labels)
    inside = level >= lo
    assert inside.any() and (~inside).any()
    assert torch.equal(interval[inside], k_guided[inside]) and torch.equal(interval[~inside], cond[~inside])


def test_sampling_the_mixture_oracle(conditional_oracle, mixture_noise):
    """2-D mixture data (n, D=2): K = D samples as None bitwise; K = 1 guides only the first coordinate."""
    process, pred, n = EDM(), EpsPrediction(), 200
    oracle, labels, noise = conditional_oracle(MIX, process, pred), torch.arange(n) % 3, mixture_noise(n)
    draw = lambda **kw: sample(oracle, process, pred, HeunODE(steps=6), (n, 2), noise=noise,  # noqa: E731
                               class_labels=labels, guidance=Guidance(null_label=NULL, **kw)).x
    unguided, guided = draw(), draw(weight=3.0)
    assert torch.equal(draw(weight=3.0, channels=2), guided)
    first = draw(weight=3.0, channels=1)
    assert not torch.equal(first, guided) and not torch.equal(first, unguided)
    assert torch.equal(draw(weight=1.0, channels=1), unguided)  # w = 1: nothing to mix
    with pytest.raises(ValueError, match="guidance channels 3 exceeds the 2 channels") as err:
        draw(weight=3.0, channels=3)
    assert "\n" not in str(err.value)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="guidance channels .* is invalid: expected a positive number K") as err:
            draw(weight=3.0, channels=bad)
        assert "\n" not in str(err.value)


def test_generate_and_the_sampling_callbacks_pass_it_on(tmp_path, monkeypatch, guidance_module, stand_in_features,
                                                        frozen_fit, recording):
    from diffusion_pl.evaluation.fid_callback import FIDCallback
    from diffusion_pl.evaluation.sample_grid import SampleGrid

    import diffusion_pl.evaluation.fid_callback as fid_module
    import diffusion_pl.evaluation.sample_grid as grid_module
    import diffusion_pl.evaluation.generation as generation

    calls = []
    real_sample = generation.sample
    monkeypatch.setattr(generation, "sample", lambda *a, **kw: (calls.append(kw), real_sample(*a, **kw))[1])
    module = guidance_module()
    for k in (None, 2):
        list(generate(module, DDIM(steps=1), range(2), (3, 8, 8), guidance=Guidance(weight=4.0, channels=k)))
        assert calls[-1]["guidance"].channels == k and calls[-1]["guidance"].weight == 4.0
    with pytest.raises(ValueError, match="guidance channels 4 exceeds the 3 channels"):  # before sampling
        next(generate(module, DDIM(steps=1), range(2), (3, 8, 8), guidance=Guidance(weight=4.0, channels=4)))

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["guidance"].channels)
        return generate(*args, **kwargs)

    monkeypatch.setattr(fid_module, "generate", spy)
    monkeypatch.setattr(grid_module, "generate", spy)
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    fid = recording(FIDCallback)(every_n_steps=1, num_samples=4, sampler=DDIM(steps=1),
                                 guidance=Guidance(weight=2.0, channels=2), feature_extractor=stand_in_features())
    grid = SampleGrid(every_n_steps=1, num_samples=4, sampler=DDIM(steps=1), guidance=Guidance(weight=2.0, channels=1),
                      at_train_end=False)
    frozen_fit(tmp_path, [fid, grid], max_steps=1)
    assert sorted(seen) == [1, 2]
    with pytest.raises(ValueError, match="guidance channels 0 is invalid") as err:
        Guidance(channels=0)
    assert "\n" not in str(err.value)
    for cls in (FIDCallback, SampleGrid):  # the options unpacked (a dict from Python): refused in one line
        with pytest.raises(ValueError, match=f"{cls.__name__}: guidance .* is a dict: expected a "
                                             r"diffusion_pl.guidance.Guidance") as err:
            cls(guidance={"weight": 2.0, "channels": 1})
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_sample_and_evaluate_cli(run, tmp_path, capsys, monkeypatch):
    import diffusion_pl.evaluation.generation as generation

    calls = []
    real_sample = generation.sample
    monkeypatch.setattr(generation, "sample", lambda *a, **kw: (calls.append(kw), real_sample(*a, **kw))[1])
    monkeypatch.setenv("DIFFUSION_PL_CACHE", run["env"]["DIFFUSION_PL_CACHE"])
    common = ["--sampler", "ddim", "--steps", "2", "--num_samples", "2", "--guidance", "2.0"]
    out = tmp_path / "k1"
    assert main(["sample", "--ckpt_path", run["ckpt"], *common, "--guidance_channels", "1", "--out", str(out)]) == 0
    assert json.loads((out / "sample_config.json").read_text())["guidance_channels"] == 1
    assert calls and all(kw["guidance"].channels == 1 for kw in calls)
    calls.clear()
    report = tmp_path / "report.json"
    assert main(["evaluate", "--ckpt_path", run["ckpt"], *common, "--guidance_channels", "2", "--data", DATA,
                 "--feature_extractor", "tests.support.evaluation.StandInFeatures", "--report", str(report)]) == 0
    assert calls and all(kw["guidance"].channels == 2 for kw in calls)
    assert json.loads(report.read_text())["guidance_channels"] == 2
    assert main(["sample", "--ckpt_path", run["ckpt"], *common, "--out", str(tmp_path / "all")]) == 0
    assert "guidance_channels" not in json.loads((tmp_path / "all" / "sample_config.json").read_text())
    capsys.readouterr()
    for args, match in [(["sample", "--ckpt_path", run["ckpt"], *common, "--guidance_channels", "4", "--out",
                          str(tmp_path / "x")], "--guidance_channels 4 exceeds the 3 channels"),
                        (["sample", "--ckpt_path", run["ckpt"], *common, "--guidance_channels", "0", "--out",
                          str(tmp_path / "y")], "--guidance_channels 0 is invalid"),
                        (["evaluate", "--samples", str(out), "--data", "builtin:shapes", "--guidance_channels", "1"],
                         "--guidance_channels need --ckpt_path")]:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(match, err), err
