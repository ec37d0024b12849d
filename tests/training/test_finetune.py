"""Fine-tuning an imported model: `diffusion-pl fit --ckpt_path IMPORTED.ckpt` with a recipe that names no network.

The imported checkpoint's saved config (net / process / prediction) is the network: a recipe (or a command line)
without a model section trains it, a recipe that names another network is overruled with one stderr line, and a
checkpoint without a saved config is a one-line error. Training starts at step 0 (an import has no loops) from
the imported weights, EMA included. The tiny UNet2DModel is tests/interop/test_import.py's (TINY in
tests/support/interop.py), built without a download.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from diffusion_pl.cli.main import main
from diffusion_pl.utils.classes import canonical_class_path
from diffusion_pl.interop.importer import import_pretrained
from tests.support.fit import tiny_fit_config
from tests.support.interop import TINY

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

WINS = "diffusion-pl: model.net, model.process, model.prediction come from the checkpoint"
SHAPES = "builtin:shapes?size=8&count=64"


@pytest.fixture
def imported(tmp_path, save_unet):
    """A tiny diffusers DDPM (UNet2DModel + DDPMScheduler) imported as tmp_path/tiny.ckpt."""
    save_unet(tmp_path / "tiny", TINY, scheduler=diffusers.DDPMScheduler())
    import_pretrained(str(tmp_path / "tiny"), tmp_path / "tiny.ckpt")
    return tmp_path / "tiny.ckpt"


def recipe(tmp_path, root, with_net: bool) -> str:
    """tiny_fit_config with lr 0 (the weights must stay the imported ones), with or without its own network."""
    config = tiny_fit_config(max_steps=2, logger=False, default_root_dir=str(root))
    config["model"]["optimizer"] = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.0}}
    if not with_net:
        del config["model"]["net"], config["model"]["process"]
    path = tmp_path / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def newest(root):
    return torch.load(max(root.glob("checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime), weights_only=True)


def same(a: dict, b: dict) -> bool:
    """The same component: the same class (named by any of its import paths: LightningCLI's printed and saved
    configs name it by the package root, `diffusion_pl.UNet`, where a recipe may name its module) and arguments."""
    return ({**a, "class_path": canonical_class_path(a["class_path"])}
            == {**b, "class_path": canonical_class_path(b["class_path"])})


def test_fine_tune_an_import_with_no_model_section(tmp_path, imported, capsys):
    root = tmp_path / "ft"
    config = recipe(tmp_path, root, with_net=False)
    saved = torch.load(imported, weights_only=True)
    with pytest.raises(SystemExit):  # --print_config shows the network the run will train
        main(["fit", "--config", config, "--ckpt_path", str(imported), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert same(printed["model"]["net"], saved["hyper_parameters"]["net"])
    assert main(["fit", "--config", config, "--ckpt_path", str(imported)]) == 0
    assert WINS not in capsys.readouterr().err  # the recipe named nothing: nothing to overrule
    tuned = newest(root)
    assert tuned["global_step"] == 2  # from 0: the import has no loops
    assert same(tuned["hyper_parameters"]["net"], saved["hyper_parameters"]["net"])
    assert tuned["hyper_parameters"]["optimizer"]["init_args"]["lr"] == 0.0 and tuned["optimizer_states"][0]["state"]
    weights = saved["state_dict"]
    assert {k for k in weights if k.startswith("ema.")} and tuned["state_dict"].keys() == weights.keys()
    assert all(torch.equal(tuned["state_dict"][k], v) for k, v in weights.items())  # net.* and ema.*, bit for bit
    run_config = yaml.safe_load((root / "config.yaml").read_text())
    assert same(run_config["model"]["net"], saved["hyper_parameters"]["net"])
    assert same(run_config["model"]["process"], saved["hyper_parameters"]["process"])
    assert run_config["ckpt_path"] == str(imported)
    # resuming it with no recipe at all: --ckpt_path last takes the network from the run's newest checkpoint
    assert main(["fit", "--ckpt_path", "last", "--data", "diffusion_pl.data.datamodule.ShardDataModule", "--data.shards", SHAPES,
                 "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.default_root_dir", str(root),
                 "--trainer.max_steps", "3", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]) == 0
    assert "resuming from" in capsys.readouterr().err
    resumed = newest(root)
    assert resumed["global_step"] == 3 and same(resumed["hyper_parameters"]["net"], saved["hyper_parameters"]["net"])


def test_a_recipe_naming_another_network_is_overruled(tmp_path, imported, capsys):
    # an EMA other than the network (as a trained checkpoint's): the fine-tune's EMA must start from it
    checkpoint = torch.load(imported, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("ema.") and value.is_floating_point():
            value.add_(torch.randn(value.shape, generator=generator) * 0.01)
    torch.save(checkpoint, imported)
    root = tmp_path / "other"
    assert main(["fit", "--config", recipe(tmp_path, root, with_net=True), "--ckpt_path", str(imported)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if WINS in line]
    assert len(lines) == 1 and "the recipe's model.net, model.process are not used" in lines[0], lines
    tuned, hparams = newest(root), checkpoint["hyper_parameters"]
    assert tuned["hyper_parameters"]["net"] == hparams["net"]  # not the recipe's 8-channel UNet on VPLinear
    assert tuned["hyper_parameters"]["process"] == hparams["process"]
    run_config = yaml.safe_load((root / "config.yaml").read_text())
    assert run_config["model"]["net"] == hparams["net"] and run_config["model"]["process"] == hparams["process"]
    state, weights = tuned["state_dict"], checkpoint["state_dict"]
    assert all(torch.equal(state[k], v) for k, v in weights.items() if k.startswith("net."))  # lr 0
    moved = 0
    for key, ema in weights.items():  # ema_decay 0.5, two steps: net + (ema - net) / 4, from the imported EMA
        if key.startswith("ema.") and ema.is_floating_point() and not torch.equal(ema, weights["net." + key[4:]]):
            net = weights["net." + key[4:]]
            torch.testing.assert_close(state[key], net + (ema - net) / 4)
            moved += 1
    assert moved > 10


def test_checkpoints_without_a_saved_config_are_one_line_errors(tmp_path, capsys, one_line_error):
    root = tmp_path / "bare"
    config = recipe(tmp_path, root, with_net=False)
    torch.save({"global_step": 0, "state_dict": {}}, tmp_path / "weights_only.ckpt")  # no hyper_parameters
    one_line_error(capsys, ["fit", "--config", config, "--ckpt_path", str(tmp_path / "weights_only.ckpt")],
                   "weights_only.ckpt holds no saved model.net and model.process", "expected a recipe (--config)")
    one_line_error(capsys, ["fit", "--config", config, "--ckpt_path", str(tmp_path / "gone.ckpt")],
                   "gone.ckpt does not exist")
    one_line_error(capsys, ["fit", "--config", config, "--ckpt_path", "last"], "--ckpt_path last finds no checkpoint",
                   str(root), "model.net and model.process")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    one_line_error(capsys, ["fit", "--config", config, "--ckpt_path", str(tmp_path / "junk.ckpt")], "not a checkpoint")


def test_rerunning_a_fine_tune_into_its_run_folder_is_refused(tmp_path, imported, capsys):
    """The same `fit --ckpt_path IMPORTED.ckpt` again (a requeued job) would go back to the import: refused in one
    line pointing to `--ckpt_path last`, which continues the run; --overwrite starts over."""
    root = tmp_path / "again"
    config = recipe(tmp_path, root, with_net=False)
    assert main(["fit", "--config", config, "--ckpt_path", str(imported)]) == 0
    capsys.readouterr()
    assert main(["fit", "--config", config, "--ckpt_path", str(imported)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--ckpt_path {imported} is from outside it" in err[0] and "--ckpt_path last" in err[0]
    assert main(["fit", "--config", config, "--ckpt_path", "last", "--trainer.max_steps", "3"]) == 0
    assert newest(root)["global_step"] == 3
    # a checkpoint of this run, by its path, is a resume, not a new start
    inside = max(root.glob("checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert main(["fit", "--config", config, "--ckpt_path", str(inside), "--trainer.max_steps", "4"]) == 0
    assert main(["fit", "--config", config, "--ckpt_path", str(imported), "--overwrite"]) == 0
    assert newest(root)["global_step"] == 2


def test_an_imported_ddpm_tunes_into_a_consistency_model(tmp_path, imported, capsys):
    """ECT from a published diffusion model: the imported DDPM's network, process (DDPMDiscrete) and eps prediction,
    the recipe's ConsistencyLoss; the tuned checkpoint records the loss, samples with `--sampler consistency` and
    refuses a diffusion sampler in one line."""
    root = tmp_path / "ect"
    config = yaml.safe_load(open(recipe(tmp_path, root, with_net=False)))
    config["model"]["loss"] = {"class_path": "diffusion_pl.consistency.ConsistencyLoss",
                               "init_args": {"schedule": {"class_path": "diffusion_pl.consistency.ECTSchedule",
                                                          "init_args": {"images_per_stage": 4}}}}
    config["model"]["optimizer"] = {"class_path": "torch.optim.RAdam", "init_args": {"lr": 1e-4}}
    (tmp_path / "ect.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "ect.yaml"), "--ckpt_path", str(imported)]) == 0
    tuned, saved = newest(root), torch.load(imported, weights_only=True)["hyper_parameters"]
    assert tuned["global_step"] == 2 and tuned["hyper_parameters"]["loss"]["class_path"].endswith("ConsistencyLoss")
    assert same(tuned["hyper_parameters"]["process"], saved["process"])
    assert tuned["hyper_parameters"]["process"]["class_path"].endswith("DDPMDiscrete")
    ckpt = str(max(root.glob("checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime))
    assert main(["sample", "--ckpt_path", ckpt, "--sampler", "consistency", "--num_samples", "2",
                 "--out", str(tmp_path / "one_step")]) == 0
    capsys.readouterr()
    assert main(["sample", "--ckpt_path", ckpt, "--sampler", "ddim", "--steps", "2", "--num_samples", "2",
                 "--out", str(tmp_path / "ddim")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained with ConsistencyLoss" in err[0], err
