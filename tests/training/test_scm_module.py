"""SCMLoss as `model.loss` of a `diffusion-pl fit` recipe: the step reaches its warm-up, its adaptive weight trains
with the network and is saved, validation runs it, and the checkpoint loads back with the loss it names."""

from __future__ import annotations

import torch
import yaml

from diffusion_pl.cli.main import main
from diffusion_pl.training.module import load_module
from tests.support.fit import tiny_fit_config


def test_fit_trains_the_adaptive_weight_and_reloads(tmp_path):
    config = tiny_fit_config(max_steps=3, logger=False, limit_val_batches=1, val_check_interval=3,
                             default_root_dir=str(tmp_path))
    config["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}]
    config["model"].update(
        process={"class_path": "diffusion_pl.processes.interpolants.Trigonometric"},
        prediction={"class_path": "diffusion_pl.prediction.VPrediction"},
        loss={"class_path": "diffusion_pl.scm.SCMLoss", "init_args": {"warmup_steps": 2}},
        optimizer={"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-2}})
    path = tmp_path / "scm.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    weight = ckpt["state_dict"]["loss_fn.weight.linear.weight"]
    assert weight.abs().sum() > 0, "the adaptive weight starts at zero and did not train"
    module = load_module(str(tmp_path / "ckpt" / "last.ckpt"))
    assert type(module.loss_fn).__name__ == "SCMLoss" and module.loss_fn.warmup_steps == 2
    torch.testing.assert_close(module.loss_fn.weight.linear.weight, weight)
