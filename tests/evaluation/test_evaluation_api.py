"""Evaluation and post-hoc EMA from Python: `evaluate`, `evaluate_checkpoints` and `reconstruct` give what
`diffusion-pl evaluate` and `diffusion-pl reconstruct-ema` write for the same inputs, and refuse bad
arguments in one line naming the Python argument."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusion_pl.cli.main import main
from diffusion_pl.evaluation.evaluate import EvalOptions, evaluate, evaluate_checkpoints
from diffusion_pl.evaluation.reconstruct import reconstruct
from diffusion_pl.evaluation.report import EvalReport
from diffusion_pl.guidance import Guidance
from diffusion_pl.sampling.posterior import DDIM
from diffusion_pl.training.module import load_module
from diffusion_pl.utils.errors import UserError
from tests.support.commands import DDIM_ETA1, ddim_spec
from tests.support.evaluation import DATA, STAND_IN, StandInFeatures


def _without_seconds(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "seconds"}


def _options(**kwargs) -> EvalOptions:
    """The options of the command line `--data DATA --num_samples 6 --sampler ddim DDIM_ETA1 --steps 2
    --batch_size 4 --isc --feature_extractor STAND_IN` as Python objects."""
    return EvalOptions(**{"data": DATA, "samplers": [DDIM(steps=2), DDIM(steps=2, eta=1.0)],
                          "sampler_specs": [ddim_spec(eta=0.0), ddim_spec(eta=1.0)], "num_samples": 6,
                          "batch_size": 4, "isc": True, "feature_extractor": StandInFeatures(), **kwargs})


def test_evaluate_from_python_equals_the_command(run, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    written = tmp_path / "cli.json"
    assert main(["evaluate", "--ckpt_path", run["ckpt"], "--data", DATA, "--num_samples", "6", "--sampler", "ddim",
                 DDIM_ETA1, "--steps", "2", "--batch_size", "4", "--isc", "--feature_extractor", STAND_IN,
                 "--report", str(written)]) == 0
    expected = json.loads(written.read_text())
    published = []
    report = evaluate(_options(), ckpt=run["ckpt"], on_report=published.append)
    assert published == [report] and isinstance(report, EvalReport)
    assert _without_seconds(report.to_dict()) == _without_seconds(expected)
    assert json.loads(report.to_json()) == report.to_dict()
    assert EvalReport.from_dict(expected) == EvalReport(report.protocol, report.source, report.results,
                                                        expected["seconds"])
    assert set(report.values()) == {"fid6/ddim_2", "is6/ddim_2", "fid6/ddim_2#2", "is6/ddim_2#2"}
    assert report.values()["fid6/ddim_2"] == expected["results"][0]["fid"]
    # a loaded module scores the same; the report has no file to name, and without specs records repr(sampler)
    module = load_module(run["ckpt"])
    from_module = evaluate(_options(sampler_specs=None), ckpt=module)
    assert [r["fid"] for r in from_module.results] == [r["fid"] for r in expected["results"]]
    assert from_module.source["checkpoint"] is None and from_module.source["checkpoint_sha256"] is None
    assert from_module.results[1]["sampler"] == repr(DDIM(steps=2, eta=1.0))


def test_evaluate_checkpoints_share_one_launch_extractor_and_reference(run, tmp_path, monkeypatch):
    """Two checkpoints, one launch and one reference: the reference images are read once, and the extractor sees
    them once, then each checkpoint's samples."""
    from diffusion_pl.evaluation import evaluate as evaluate_module

    calls = {"make_fabric": 0, "reference_images": 0}
    for name in calls:
        def counting(*args, _name=name, _real=getattr(evaluate_module, name), **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(evaluate_module, name, counting)
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    extractor = StandInFeatures()
    options = _options(samplers=[DDIM(steps=2)], sampler_specs=None, isc=False, feature_extractor=extractor)
    one, two = evaluate_checkpoints(options, [run["ckpt"], load_module(run["ckpt"])])
    assert calls == {"make_fabric": 1, "reference_images": 1}
    assert extractor.images_seen == int(DATA.rsplit("=", 1)[1]) + 2 * 6
    assert one.results == two.results and one.protocol == two.protocol and math.isfinite(one.results[0]["fid"])
    assert one.results[0]["fid"] == evaluate(options, ckpt=run["ckpt"]).results[0]["fid"]


@pytest.mark.parametrize("kwargs,message", [
    ({"num_samples": 0}, "num_samples 0 is invalid: expected a positive integer"),
    ({"data": None}, "give one reference: expected data SHARDS or ref_stats NPZ"),
    ({"ref_stats": "ref.npz", "data": None, "kid": True}, "kid with ref_stats: expected data"),
    ({"samplers": ["ddim"]}, "samplers holds a str: expected diffusion_pl.sampling Sampler instances"),
    ({"sampler_specs": [{}]}, "sampler_specs holds 1 specs for 2 samplers"),
    ({"guidance": 1.5}, "guidance is a float: expected a diffusion_pl.guidance.Guidance"),
])
def test_eval_options_refuse_bad_values_in_one_line(kwargs, message):
    with pytest.raises(UserError) as err:
        _options(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"interval": (-1.0, 2.0)}, "guidance interval -1 2 is invalid"),
    ({"interval": (2.0, 1.0)}, "guidance interval 2 1 is invalid: sigma_lo > sigma_hi never guides; expected 1 2"),
    ({"clip_x0": 0.0}, "clip_x0 0.0 is invalid"),
])
def test_eval_options_guidance_refuses_bad_values_in_one_line(kwargs, message):
    """The guidance options are validated by Guidance itself, before EvalOptions sees them."""
    with pytest.raises(ValueError) as err:
        _options(guidance=Guidance(**kwargs))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_evaluate_refuses_a_bad_source_before_any_work(tmp_path):
    for call, message in [(lambda: evaluate(_options()), "give one source: expected ckpt or samples"),
                          (lambda: evaluate(_options(), samples=tmp_path / "none.npz"), "samples "),
                          (lambda: evaluate(_options(bpd=True), samples=tmp_path), "bpd needs ckpt"),
                          (lambda: evaluate(_options(guidance=Guidance(channels=1)), samples=tmp_path),
                           "guidance.guide / guidance.interval / guidance.channels need ckpt"),
                          (lambda: evaluate_checkpoints(_options(), [3]), "ckpt 3 is a int")]:
        with pytest.raises(UserError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value)


def test_reconstruct_from_python_equals_the_command(tiny_run, tmp_path, capsys):
    assert main(["reconstruct-ema", "--run", str(tiny_run), "--sigma_rel", "0.07", "0.05", "--step", "4",
                 "--out", str(tmp_path / "cli")]) == 0
    assert "ema.* is the reconstruction at step 4" in capsys.readouterr().err  # the newest checkpoint is step 6
    report = reconstruct(tiny_run, [0.07, 0.05, 0.07], tmp_path / "py", step=4)
    assert report.sigma_rels == [0.05, 0.07] and report.step == 4 and report.base_step == 6
    assert [p.name for p in report.paths] == ["phema-000000004-0.05.ckpt", "phema-000000004-0.07.ckpt"]
    assert [p.name for p in report.snapshots] == [f"phema-{s:09d}-{r}.pt" for s in (2, 4) for r in (0.05, 0.1)]
    for path, sigma_rel, gamma, error in zip(report.paths, report.sigma_rels, report.gammas, report.profile_errors):
        ours = torch.load(path, weights_only=True)
        theirs = torch.load(tmp_path / "cli" / path.name, weights_only=True)
        assert ours["phema"] == theirs["phema"]
        assert ours["phema"]["sigma_rel"] == sigma_rel and ours["phema"]["gamma"] == gamma
        assert ours["phema"]["profile_error"] == error and ours["phema"]["base_checkpoint"] == str(report.base_checkpoint)
        assert ours["state_dict"].keys() == theirs["state_dict"].keys()
        assert all(torch.equal(value, theirs["state_dict"][key]) for key, value in ours["state_dict"].items())
    # 0.05 is a tracked profile (exact), 0.07 lies between the tracked ones; 0.25 lies far outside them
    assert report.profile_errors[0] < 1e-6 and report.poor_fits == [False, False]
    far = reconstruct(tiny_run, [0.25], tmp_path / "far", step=4)
    assert far.poor_fits == [True]
    assert json.loads(json.dumps(report.to_dict()))["paths"] == [str(p) for p in report.paths]


@pytest.mark.parametrize("kwargs,message", [
    ({"sigma_rels": [0.3]}, "sigma_rels 0.3 is out of range"),
    ({"step": 3}, "step 3 has no snapshots"),
    ({"batch": 0}, "batch 0 is invalid"),
    ({"out": "{run}/checkpoints"}, "out {run}/checkpoints writes into"),
])
def test_reconstruct_refuses_bad_arguments_in_one_line(tiny_run, tmp_path, kwargs, message):
    arguments = {"sigma_rels": [0.07], "out": str(tmp_path / "out"), **kwargs}
    arguments["out"] = arguments["out"].format(run=tiny_run)
    with pytest.raises(UserError) as err:
        reconstruct(tiny_run, **arguments)
    assert message.format(run=tiny_run) in str(err.value) and "\n" not in str(err.value)
