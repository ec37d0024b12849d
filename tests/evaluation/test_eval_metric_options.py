"""`evaluate` / `diffusion-pl evaluate` with precision / recall, FD_DINOv2 and the class-label sampling."""

from __future__ import annotations

import collections

import pytest
import torch

from diffusion_pl.cli.evaluate import options_from_args, parser
from diffusion_pl.evaluation.evaluate import EvalOptions, evaluate
from diffusion_pl.evaluation.generation import class_labels_for, generate, metric_prefix
from diffusion_pl.sampling.posterior import DDIM
from diffusion_pl.utils.errors import UserError
from tests.support.evaluation import DATA, StandInFeatures, make_module


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))


def _options(**kwargs) -> EvalOptions:
    return EvalOptions(**{"data": DATA, "samplers": [DDIM(steps=2)], "num_samples": 10, "batch_size": 4,
                          "feature_extractor": StandInFeatures(), "progress": False, **kwargs})


def test_balanced_labels_give_every_class_its_share():
    labels = class_labels_for(range(23), 5).tolist()
    assert collections.Counter(labels) == {0: 5, 1: 5, 2: 5, 3: 4, 4: 4}
    # sample i's label does not depend on how the indices are batched or split over ranks
    assert class_labels_for(range(10, 23), 5).tolist() == labels[10:]


def test_random_labels_are_uniform_per_sample_and_reproducible():
    labels = class_labels_for(range(4000), 10, label_sampling="random", seed=7)
    assert torch.equal(labels[1000:1500], class_labels_for(range(1000, 1500), 10, label_sampling="random", seed=7))
    assert not torch.equal(labels, class_labels_for(range(4000), 10, label_sampling="random", seed=8))
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() > 330 and counts.max() < 470  # 400 expected per class; +-3.5 standard deviations
    assert not torch.equal(labels, class_labels_for(range(4000), 10))
    assert class_labels_for(range(3), None, label_sampling="random") is None
    with pytest.raises(ValueError, match="expected one of"):
        class_labels_for(range(3), 10, label_sampling="stratified")


def test_evaluate_reports_precision_recall_and_fd_dinov2():
    """FD_DINOv2 is the Frechet distance in the second extractor's features: the FID a run with that extractor gets."""
    module, dinov2 = make_module(), StandInFeatures(seed=1)
    report = evaluate(_options(pr=True, pr_reference=20, fd_dinov2=True, dinov2_weights=dinov2), ckpt=module)
    row = report.results[0]
    assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    assert row["fd_dinov2"] == pytest.approx(evaluate(_options(feature_extractor=dinov2), ckpt=module).results[0]["fid"])
    assert row["fd_dinov2"] != pytest.approx(row["fid"])
    assert set(report.values()) == {f"{m}/ddim_2" for m in ("fid10", "fd_dinov2_10", "precision10", "recall10")}
    protocol = report.protocol
    assert protocol["precision_recall"]["k"] == 3 and protocol["precision_recall"]["reference_features"] == 20
    assert protocol["fd_dinov2"]["extractor"] == "tests.support.evaluation.StandInFeatures"
    assert "fd_dinov2_10" in report.table() and "precision" in report.table()
    assert metric_prefix("fd_dinov2", 50_000) == "fd_dinov2" and metric_prefix("fd_dinov2", 10_000) == "fd_dinov2_10k"


def test_conditional_report_records_the_label_sampling():
    module = make_module(num_classes=3)
    balanced = evaluate(_options(), ckpt=module)
    random = evaluate(_options(label_sampling="random"), ckpt=module)
    assert balanced.source["label_sampling"] == "balanced" and random.source["label_sampling"] == "random"
    assert balanced.source["class_labels"].startswith("i % num_classes (balanced)")
    # the samples are drawn with those labels
    drawn = [labels for _, _, labels, _ in generate(module, DDIM(steps=2), range(10), module.net.image_shape, seed=3,
                                                    label_sampling="random", batch_size=4)]
    assert torch.equal(torch.cat(drawn), class_labels_for(range(10), 3, label_sampling="random", seed=3))
    assert evaluate(_options(), ckpt=make_module()).source["label_sampling"] is None  # unconditional


@pytest.mark.parametrize("kwargs,message", [
    ({"ref_stats": "ref.npz", "data": None, "pr": True}, "pr with ref_stats: expected data"),
    ({"ref_stats": "ref.npz", "data": None, "fd_dinov2": True}, "fd_dinov2 with ref_stats: expected data"),
    ({"label_sampling": "uniform"}, "label_sampling 'uniform' is unknown: expected one of balanced, random"),
    ({"pr_reference": 0}, "pr_reference 0 is invalid: expected a positive integer"),
])
def test_options_refuse_bad_metric_settings_in_one_line(kwargs, message):
    with pytest.raises(UserError) as err:
        _options(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_command_flags_reach_the_options():
    args = parser().parse_args(["--samples", "s.npz", "--data", DATA, "--pr", "--pr_reference", "500", "--fd_dinov2",
                                "--dinov2_weights", "w.pth", "--label_sampling", "random"])
    options = options_from_args(args)
    assert (options.pr, options.pr_reference, options.fd_dinov2, options.dinov2_weights, options.label_sampling) == (
        True, 500, True, "w.pth", "random")
    with pytest.raises(UserError, match="--pr with --ref_stats"):
        options_from_args(parser().parse_args(["--samples", "s.npz", "--ref_stats", "r.npz", "--pr"]))


def test_fid_callback_logs_precision_recall_and_fd_dinov2(tmp_path, frozen_fit, recording):
    from diffusion_pl.evaluation.fid_callback import FIDCallback

    fid = recording(FIDCallback)(every_n_steps=1, num_samples=8, sampler=DDIM(steps=1), data=DATA,
                                 feature_extractor=StandInFeatures(), pr=True, pr_reference=20, fd_dinov2=True,
                                 dinov2_weights=StandInFeatures(seed=1), label_sampling="random", batch_size=4)
    frozen_fit(tmp_path / "run", [fid], max_steps=1)
    assert set(fid.last) == {f"{m}8/ddim_1" for m in ("fid", "fd_dinov2_", "precision", "recall")}
    assert 0 <= fid.last["precision8/ddim_1"] <= 1 and fid.last["fd_dinov2_8/ddim_1"] > 0
    with pytest.raises(UserError, match="pr=True with ref_stats: expected data:"):
        FIDCallback(ref_stats="ref.npz", pr=True)
    with pytest.raises(UserError, match="label_sampling 'uniform'"):
        FIDCallback(label_sampling="uniform")
