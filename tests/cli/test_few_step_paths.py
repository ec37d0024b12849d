"""The few-step objectives through every way to train and to sample.

Training: MeanFlowLoss, ConsistencyLoss (ECT) and SCMLoss each from a YAML recipe, from `fit` flags
(`--model.loss ...`) and from Python (`DiffusionModule(..., loss=...)`). Sampling: their samplers (MeanFlow,
Consistency) and the multistep ones (DPMSolverPP of order 3, DPMSolverPPSDE, UniPC) in SampleGrid and FIDCallback
during the fit, and in `diffusion-pl sample` and `diffusion-pl evaluate` after it. A checkpoint records its loss; a
consistency model's (its x0 output is a consistency function, not a denoiser) is refused by a diffusion sampler in
one line on every path, while a MeanFlow model, a velocity model at r = t, takes every sampler.
"""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_pl.cli.main import main
from diffusion_pl.consistency import ConsistencyLoss, ECTSchedule
from diffusion_pl.evaluation.sample_grid import SampleGrid
from diffusion_pl.meanflow import MeanFlowLoss, MeanFlowTimes
from diffusion_pl.networks.unet import UNet
from diffusion_pl.prediction import EDMPreconditioning, VelocityPrediction, VPrediction
from diffusion_pl.processes.exploding import EDM
from diffusion_pl.processes.interpolants import RectifiedFlow, Trigonometric
from diffusion_pl.sampling.dpm_solver import DPMSolverPP
from diffusion_pl.scm import SCMLoss
from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.data.datamodule import ShardDataModule
from tests.support.evaluation import STAND_IN

SHAPES = "builtin:shapes?size=8&count=32"


def spec(name: str, **init_args) -> dict:
    """A sampler as a recipe and `--sampler` write it."""
    paths = {"MeanFlow": "meanflow", "Consistency": "consistency", "DPMSolverPP": "dpm_solver",
             "DPMSolverPPSDE": "dpm_solver", "UniPC": "unipc"}
    return {"class_path": f"diffusion_pl.sampling.{paths[name]}.{name}", "init_args": init_args}


CONSISTENCY = [spec("Consistency", steps=1), spec("Consistency", steps=2)]
MULTISTEP = [spec("DPMSolverPP", steps=3, order=3), spec("DPMSolverPPSDE", steps=2), spec("UniPC", steps=2)]
DIFFUSION_SAMPLER = MULTISTEP[0]  # what a consistency model refuses

# objective -> the model section's process / prediction / loss (and net options), and the samplers it takes
OBJECTIVES = {
    "meanflow": {
        "model": {"process": {"class_path": "diffusion_pl.processes.interpolants.RectifiedFlow"},
                  "prediction": {"class_path": "diffusion_pl.prediction.VelocityPrediction"},
                  "loss": {"class_path": "diffusion_pl.meanflow.MeanFlowLoss",
                           "init_args": {"times": {"class_path": "diffusion_pl.meanflow.MeanFlowTimes",
                                                   "init_args": {"ratio": 0.5}}}}},
        "net": {"interval_embedding": True},
        "samplers": [spec("MeanFlow", steps=1), spec("MeanFlow", steps=2), *MULTISTEP],
        "flag": ("norm_p", 0.5),
    },
    "ect": {
        "model": {"process": {"class_path": "diffusion_pl.processes.exploding.EDM"},
                  "prediction": {"class_path": "diffusion_pl.prediction.EDMPreconditioning"},
                  "loss": {"class_path": "diffusion_pl.consistency.ConsistencyLoss",
                           "init_args": {"schedule": {"class_path": "diffusion_pl.consistency.ECTSchedule",
                                                      "init_args": {"images_per_stage": 4}}}}},
        "net": {},
        "samplers": CONSISTENCY,
        "flag": ("distance", "l2"),
    },
    "scm": {
        "model": {"process": {"class_path": "diffusion_pl.processes.interpolants.Trigonometric"},
                  "prediction": {"class_path": "diffusion_pl.prediction.VPrediction"},
                  "loss": {"class_path": "diffusion_pl.scm.SCMLoss", "init_args": {"warmup_steps": 2}}},
        "net": {},
        "samplers": CONSISTENCY,
        "flag": ("warmup_steps", 7),
    },
}


def label(sampler: dict) -> str:
    """The sampler's name in grid files, metrics and evaluate reports (`sampler_label`)."""
    return f"{sampler['class_path'].rsplit('.', 1)[-1].lower()}_{sampler['init_args']['steps']}"


def recipe(tiny_fit_config, root, objective: str, callbacks: list | None = None, with_loss: bool = True) -> dict:
    setup = OBJECTIVES[objective]
    config = tiny_fit_config(max_steps=2, default_root_dir=str(root), logger=False)
    config["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True}},
                                      *(callbacks or [])]
    config["model"].update({k: v for k, v in setup["model"].items() if with_loss or k != "loss"})
    config["model"]["net"]["init_args"].update(setup["net"])
    config["data"]["init_args"]["shards"] = SHAPES
    return config


def write(config: dict, path) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_a_recipe_trains_and_every_sampling_path_takes_its_samplers(objective, tiny_fit_config, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    samplers = OBJECTIVES[objective]["samplers"]
    callbacks = [
        {"class_path": "diffusion_pl.evaluation.sample_grid.SampleGrid",
         "init_args": {"every_n_steps": 2, "num_samples": 4, "sampler": samplers, "at_train_end": False}},
        {"class_path": "diffusion_pl.evaluation.fid_callback.FIDCallback",
         "init_args": {"every_n_steps": 2, "num_samples": 4, "batch_size": 4, "sampler": samplers,
                       "feature_extractor": {"class_path": STAND_IN}}},
    ]
    config = recipe(tiny_fit_config, tmp_path, objective, callbacks)
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(tmp_path), "name": "csv"}}
    assert main(["fit", "--config", write(config, tmp_path / "recipe.yaml")]) == 0
    labels = [label(s) for s in samplers]
    assert sorted(p.name for p in tmp_path.rglob("samples/*.png")) == sorted(f"{n}_step2.png" for n in labels)
    with open(next(tmp_path.rglob("csv/*/metrics.csv"))) as f:
        logged = {k: float(v) for row in csv.DictReader(f) for k, v in row.items() if k.startswith("fid4/") and v}
    assert sorted(logged) == sorted(f"fid4/{n}" for n in labels) and all(map(math.isfinite, logged.values()))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")["hyper_parameters"]["loss"]
    assert saved["class_path"].endswith(OBJECTIVES[objective]["model"]["loss"]["class_path"].rsplit(".", 1)[-1])

    for sampler in samplers:
        out = tmp_path / f"sample_{label(sampler)}"
        assert main(["sample", "--ckpt_path", str(ckpt), "--sampler", json.dumps(sampler), "--num_samples", "2",
                     "--npz", "--out", str(out)]) == 0
        assert json.loads((out / "sample_config.json").read_text())["sampler"]["init_args"]["steps"] == \
            sampler["init_args"]["steps"]
        assert list(out.glob("samples_2x8x8x3.npz"))
    report = tmp_path / "report.json"
    assert main(["evaluate", "--ckpt_path", str(ckpt), "--data", SHAPES, "--num_samples", "4", "--batch_size", "4",
                 "--feature_extractor", STAND_IN, "--report", str(report),
                 "--sampler", *map(json.dumps, samplers)]) == 0
    results = json.loads(report.read_text())["results"]
    assert [r["name"] for r in results] == labels and all(math.isfinite(r["fid"]) for r in results)
    assert [r["nfe"] for r in results if r["name"].startswith(("meanflow", "consistency"))] == \
        [s["init_args"]["steps"] for s in samplers if s["class_path"].endswith(("MeanFlow", "Consistency"))]


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_fit_flags_choose_the_loss(objective, tiny_fit_config, tmp_path):
    """`--model.loss CLASS --model.loss.init_args.NAME VALUE` over a recipe whose model section names no loss."""
    config = recipe(tiny_fit_config, tmp_path, objective, with_loss=False)
    config["trainer"]["max_steps"] = 1
    loss = OBJECTIVES[objective]["model"]["loss"]
    name, value = OBJECTIVES[objective]["flag"]
    assert main(["fit", "--config", write(config, tmp_path / "recipe.yaml"), "--model.loss", loss["class_path"],
                 f"--model.loss.init_args.{name}", str(value)]) == 0
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert saved["global_step"] == 1
    assert saved["hyper_parameters"]["loss"]["class_path"].endswith(loss["class_path"].rsplit(".", 1)[-1])
    assert saved["hyper_parameters"]["loss"]["init_args"][name] == value


PYTHON = {  # objective -> (process, prediction, loss, net options), as DiffusionModule takes them
    "meanflow": lambda: (RectifiedFlow(), VelocityPrediction(), MeanFlowLoss(MeanFlowTimes(ratio=0.5)),
                         {"interval_embedding": True}),
    "ect": lambda: (EDM(), EDMPreconditioning(), ConsistencyLoss(schedule=ECTSchedule(images_per_stage=4)), {}),
    "scm": lambda: (Trigonometric(), VPrediction(), SCMLoss(warmup_steps=2), {}),
}


def python_fit(objective: str, root, callbacks=()) -> str:
    """DiffusionModule(..., loss=...) fitted 1 step by a plain Trainer; its checkpoint."""
    process, prediction, loss, net_options = PYTHON[objective]()
    torch.manual_seed(0)
    net = UNet(img_resolution=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
               dropout=0.0, num_classes=5, **net_options)
    module = DiffusionModule(net, process, prediction, loss, ema_decay=0.5)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True), *callbacks])
    trainer.fit(module, ShardDataModule(shards=SHAPES, batch_size=4, num_workers=0))
    return str(root / "checkpoints" / "last.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("objective", PYTHON)
def test_python_module_trains_records_its_loss_and_samples(objective, tmp_path):
    ckpt = python_fit(objective, tmp_path)
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert saved["global_step"] == 1
    assert saved["hyper_parameters"]["loss"]["class_path"].endswith(type(PYTHON[objective]()[2]).__name__)
    sampler = OBJECTIVES[objective]["samplers"][0]
    assert main(["sample", "--ckpt_path", ckpt, "--sampler", json.dumps(sampler), "--num_samples", "2", "--npz",
                 "--out", str(tmp_path / "out")]) == 0


CONSISTENCY_MODELS = ["ect", "scm"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", CONSISTENCY_MODELS)
def test_a_consistency_model_refuses_diffusion_samplers_in_one_line(objective, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    loss = type(PYTHON[objective]()[2]).__name__
    ckpt = python_fit(objective, tmp_path)
    capsys.readouterr()
    sampler = json.dumps(DIFFUSION_SAMPLER)
    assert main(["sample", "--ckpt_path", ckpt, "--sampler", sampler, "--num_samples", "2",
                 "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert f"was trained with {loss}" in line and "not the denoiser that DPMSolverPP needs" in line, line
    assert "(Consistency; e.g. --sampler consistency)" in line and not (tmp_path / "out").exists()
    assert main(["evaluate", "--ckpt_path", ckpt, "--data", SHAPES, "--num_samples", "4", "--feature_extractor",
                 STAND_IN, "--sampler", json.dumps(CONSISTENCY[0]), sampler]) == 2
    assert f"was trained with {loss}" in one_error_line(capsys)
    # in a fit, before the first step: the sample grid's sampler
    grid = SampleGrid(every_n_steps=1, num_samples=2, sampler=DPMSolverPP(steps=3, order=3))
    with pytest.raises(ValueError, match=f"SampleGrid: the module was trained with {loss}"):
        python_fit(objective, tmp_path / "grid", callbacks=[grid])
    assert not (tmp_path / "grid" / "checkpoints").exists()
