"""Recipes end to end: the quickstart writes a sample grid; every CIFAR-10 recipe trains on real shards."""

from __future__ import annotations

from pathlib import Path

import importlib

import pytest
import torch
import yaml

from diffusion_pl.cli.main import main
from tests.support.paths import REPO

CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR_RECIPES = sorted((REPO / "configs").glob("cifar10_*.yaml"))


def _localise(config: dict, root: Path, max_steps: int) -> dict:
    """Run a recipe here: CPU, float32, a few steps, checkpoints under `root`, no FID (no Inception weights)."""
    trainer = config["trainer"]
    trainer.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true", max_steps=max_steps,
                   default_root_dir=str(root), logger=False, enable_progress_bar=False)
    trainer["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True}},
    ]
    return config


def _run(config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0


def test_quickstart_recipe_writes_a_sample_grid(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    grid = next(cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("SampleGrid"))
    _localise(config, tmp_path, max_steps=3)
    grid["init_args"].update(every_n_steps=3, num_samples=8)
    grid["init_args"]["sampler"]["init_args"]["steps"] = 2
    config["trainer"]["callbacks"].append(grid)
    config["data"]["init_args"]["batch_size"] = 8
    _run(config, tmp_path / "quickstart.yaml")
    pngs = list(tmp_path.rglob("*.png"))
    assert pngs, f"no sample grid under {tmp_path}"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 3


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory) -> Path:
    if not CIFAR_TAR.exists():
        pytest.skip(f"real CIFAR-10 images not found at {CIFAR_TAR}")
    out = tmp_path_factory.mktemp("cifar") / "train"
    assert importlib.import_module("diffusion_pl.cli.prepare").main(["folder", str(CIFAR_TAR), "--split", "train", "--max_samples", "300",
                         "--shard_size", "100", "--out", str(out)]) == 0
    return out


def _shrink(net: dict) -> None:
    """A small network of the recipe's family, so that every recipe trains a step in seconds."""
    args = net["init_args"]
    if net["class_path"].endswith("DiT"):
        args.update(hidden_size=64, depth=2, num_heads=2)
    else:
        args.update(model_channels=16, num_res_blocks=1)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", CIFAR_RECIPES, ids=[r.stem for r in CIFAR_RECIPES])
def test_cifar_recipe_trains_on_prepared_shards(recipe, cifar_shards, tmp_path):
    config = _localise(yaml.safe_load(recipe.read_text()), tmp_path, max_steps=2)
    _shrink(config["model"]["net"])
    config["data"]["init_args"].update(shards=str(cifar_shards), batch_size=4, num_workers=0)
    _run(config, tmp_path / recipe.name)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_full_size_ddpm_recipe_takes_a_step(cifar_shards, tmp_path):
    """The published 35.7M DDPM U-Net, unchanged, on 300 real CIFAR-10 images."""
    config = _localise(yaml.safe_load((REPO / "configs" / "cifar10_ddpm.yaml").read_text()), tmp_path, max_steps=1)
    config["data"]["init_args"].update(shards=str(cifar_shards), batch_size=2, num_workers=0)
    _run(config, tmp_path / "ddpm.yaml")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("net.")) == 35_746_307


@pytest.mark.slow
def test_meanflow_recipe_trains_and_samples_in_one_step(tmp_path):
    """The CPU MeanFlow recipe takes steps; its checkpoint samples with `--sampler meanflow` (1 and 2 steps) and,
    read as a velocity model, with an ODE sampler; a diffusion checkpoint is refused by the MeanFlow sampler."""
    config = yaml.safe_load((REPO / "configs" / "cpu_meanflow_shapes.yaml").read_text())
    grid = next(cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("SampleGrid"))
    _localise(config, tmp_path, max_steps=3)
    grid["init_args"].update(every_n_steps=3, num_samples=8)
    config["trainer"]["callbacks"].append(grid)
    config["data"]["init_args"]["batch_size"] = 8
    _run(config, tmp_path / "meanflow.yaml")
    assert list(tmp_path.rglob("samples/*.png")), f"no sample grid under {tmp_path}"
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    for sampler in (["meanflow"], ["meanflow", "--steps", "2"], ["heunode", "--steps", "2"]):
        out = tmp_path / f"samples_{'_'.join(sampler)}"
        assert main(["sample", "--ckpt", str(ckpt), "--sampler", *sampler, "--num-samples", "4", "--out", str(out)]) == 0
        assert list(out.rglob("*.npz")) or list(out.rglob("*.png")), sampler
