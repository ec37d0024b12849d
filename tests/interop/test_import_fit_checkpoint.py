"""`diffusion-pl import RUN.ckpt`: a fit checkpoint's EMA network as the start of a fine-tune with another loss
(ECT tunes EDM's EMA network with the consistency loss: locuslab/ect training/ct_training_loop.py:192-193)."""

from __future__ import annotations

import pytest
import torch
import yaml

from diffusion_pl.cli.main import main
from tests.support.fit import tiny_fit_config

SHAPES = {"shards": "builtin:shapes?size=8&count=64", "batch_size": 4, "num_workers": 0}


@pytest.fixture
def edm_run(tmp_path):
    """A 3-step EDM fit on the shapes; its newest checkpoint (EMA != net)."""
    config = tiny_fit_config(max_steps=3, logger=False, default_root_dir=str(tmp_path / "edm"))
    config["model"]["process"] = {"class_path": "diffusion_pl.processes.exploding.EDM"}
    config["model"]["prediction"] = {"class_path": "diffusion_pl.prediction.EDMPreconditioning"}
    (tmp_path / "edm.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "edm.yaml")]) == 0
    return max((tmp_path / "edm" / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)


def test_a_fit_checkpoint_imports_as_its_ema_network_and_tunes_with_the_consistency_loss(tmp_path, edm_run):
    out = tmp_path / "edm_import.ckpt"
    assert main(["import", str(edm_run), "--out", str(out)]) == 0
    source, imported = torch.load(edm_run, weights_only=True), torch.load(out, weights_only=True)
    ema = {k[4:]: v for k, v in source["state_dict"].items() if k.startswith("ema.")}
    assert any(not torch.equal(v, source["state_dict"]["net." + k]) for k, v in ema.items())  # a real EMA
    for key, value in ema.items():
        assert torch.equal(imported["state_dict"]["net." + key], value)
        assert torch.equal(imported["state_dict"]["ema." + key], value)
    for key in ("net", "process", "prediction"):
        assert imported["hyper_parameters"][key] == source["hyper_parameters"][key]
    assert "loss" not in imported["hyper_parameters"] and imported["global_step"] == 0
    # the tune: the recipe's loss, optimizer and EMA; the import's network, from step 0
    config = tiny_fit_config(max_steps=2, logger=False, default_root_dir=str(tmp_path / "ect"))
    del config["model"]["net"], config["model"]["process"]
    config["model"]["loss"] = {"class_path": "diffusion_pl.consistency.ConsistencyLoss",
                               "init_args": {"schedule": {"class_path": "diffusion_pl.consistency.ECTSchedule",
                                                          "init_args": {"images_per_stage": 4}}}}
    config["model"]["optimizer"] = {"class_path": "torch.optim.RAdam", "init_args": {"lr": 1e-4}}
    config["data"]["init_args"] = SHAPES
    (tmp_path / "ect.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "ect.yaml"), "--ckpt_path", str(out)]) == 0
    tuned = torch.load(max((tmp_path / "ect" / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime),
                       weights_only=True)
    assert tuned["global_step"] == 2
    assert tuned["hyper_parameters"]["loss"]["class_path"].endswith("ConsistencyLoss")
    assert tuned["hyper_parameters"]["net"] == source["hyper_parameters"]["net"]


def test_a_checkpoint_without_a_config_is_a_one_line_error(tmp_path, capsys):
    torch.save({"global_step": 0, "state_dict": {}}, tmp_path / "bare.ckpt")
    assert main(["import", str(tmp_path / "bare.ckpt"), "--out", str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no saved model.net and model.process" in err[0], err
