"""`diffusion-pl export` and `diffusion_pl.interop.safetensors.load_exported`: a real `fit` checkpoint out as safetensors and back.

Bad command lines of `export` (missing checkpoint, a non-checkpoint file, --out a file) are probes in
tests/cli/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusion_pl.cli.main import main
from diffusion_pl.guidance import Guidance
from diffusion_pl.utils.errors import MissingFileError, UserValueError
from diffusion_pl.utils.fileio import sha256_file
from diffusion_pl.interop.safetensors import load_exported, read_export_config
from diffusion_pl.training.module import load_module
from diffusion_pl.sampling.posterior import DDIM
from diffusion_pl.sampling.api import sample

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_fit_config) -> str:
    """A 3-step class-conditional fit with a non-default parameterization; EMA (decay 0.5) differs from the net."""
    root = tmp_path_factory.mktemp("export_fit")
    config = tiny_fit_config(max_steps=3, logger=False, default_root_dir=str(root / "run"))
    config["model"]["net"]["init_args"]["num_classes"] = NUM_CLASSES
    config["model"]["prediction"] = {"class_path": "diffusion_pl.prediction.EDMPreconditioning",
                                     "init_args": {"sigma_data": 0.5}}
    (root / "fit.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(root / "fit.yaml")]) == 0
    return str(next((root / "run").rglob("*.ckpt")))


def export(ckpt: str, out: Path, *args: str) -> int:
    return main(["export", "--ckpt_path", ckpt, "--out", str(out), *args])


def draw(model, process, prediction, null_label) -> torch.Tensor:
    """4 guided, stochastic (DDIM eta=1) samples with per-sample seeds: the same numbers for the same model."""
    out = sample(model, process, prediction, DDIM(steps=3, eta=1.0), (4, 3, 8, 8), seeds=[10, 11, 12, 13],
                 class_labels=torch.tensor([0, 1, 2, 4]), guidance=Guidance(weight=2.0, null_label=null_label))
    return out.x


def draw_module(module, ema: bool = True) -> torch.Tensor:
    return draw(module.model(ema=ema), module.process, module.prediction, module.null_label)


def draw_exported(exported) -> torch.Tensor:
    return draw(exported.model(), exported.process, exported.prediction, exported.null_label)


def test_export_samples_exactly_like_the_checkpoint(ckpt, tmp_path):
    out = tmp_path / "exported"
    assert export(ckpt, out) == 0
    module = load_module(ckpt).eval()
    exported = load_exported(out)
    assert not exported.net.training and exported.null_label == NUM_CLASSES == module.null_label
    assert exported.image_shape == (3, 8, 8)
    assert torch.equal(draw_exported(exported), draw_module(module))
    # the file alone, without pickle or the training code: the EMA state_dict and the metadata JSON
    tensors = load_file(out / "model.safetensors")
    ema = module.ema.state_dict()
    assert tensors.keys() == ema.keys() and all(torch.equal(tensors[k], ema[k]) for k in ema)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")["hyper_parameters"]
    for key in ("net", "process", "prediction"):
        assert json.loads(metadata[key]) == saved[key]  # as the checkpoint's config holds them
    assert metadata["weights"] == "ema" and metadata["format"] == "pt"
    assert metadata["source_checkpoint_sha256"] == sha256_file(ckpt)
    assert metadata["diffusion_pl_version"] == __import__("diffusion_pl").__version__
    config = json.loads((out / "config.json").read_text())
    assert config == exported.config == read_export_config(out)
    assert config["global_step"] == 3 and config["export_format"] == 1


def test_no_ema_exports_the_raw_weights(ckpt, tmp_path):
    assert export(ckpt, tmp_path / "raw", "--no_ema") == 0
    module = load_module(ckpt).eval()
    tensors = load_file(tmp_path / "raw" / "model.safetensors")
    raw, ema = module.net.state_dict(), module.ema.state_dict()
    assert all(torch.equal(tensors[k], raw[k]) for k in raw)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # EMA decay 0.5 over 3 steps: they differ
    exported = load_exported(tmp_path / "raw" / "model.safetensors")
    assert exported.config["weights"] == "raw"
    x = draw_exported(exported)
    assert torch.equal(x, draw_module(module, ema=False)) and not torch.equal(x, draw_module(module, ema=True))


def test_unset_prediction_exports_the_module_default(ckpt, tmp_path):
    checkpoint = torch.load(ckpt, weights_only=True, map_location="cpu")
    checkpoint["hyper_parameters"]["prediction"] = None  # a recipe that leaves model.prediction unset
    unset = tmp_path / "unset.ckpt"
    torch.save(checkpoint, unset)
    assert export(str(unset), tmp_path / "out") == 0
    exported = load_exported(tmp_path / "out")
    assert exported.config["prediction"] == {"class_path": "diffusion_pl.prediction.EpsPrediction", "init_args": {}}
    assert torch.equal(draw_exported(exported), draw_module(load_module(str(unset)).eval()))


def test_loading_unpickles_nothing(ckpt, tmp_path, monkeypatch):
    assert export(ckpt, tmp_path / "e") == 0
    expected = draw_module(load_module(ckpt).eval())

    def refuse(*args, **kwargs):
        raise AssertionError("load_exported unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert torch.equal(draw_exported(load_exported(tmp_path / "e")), expected)


@pytest.mark.parametrize("change", ["drop a tensor", "add a tensor", "wider net in the metadata"])
def test_weights_that_do_not_match_the_metadata_are_refused(ckpt, tmp_path, change):
    assert export(ckpt, tmp_path / "e") == 0
    file = tmp_path / "e" / "model.safetensors"
    tensors = load_file(file)
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    if change == "drop a tensor":
        del tensors["conv_in.weight"]
        words = ("missing keys", "conv_in.weight")
    elif change == "add a tensor":
        tensors["extra.weight"] = torch.zeros(2)
        words = ("unexpected keys", "extra.weight")
    else:
        net = json.loads(metadata["net"])
        net["init_args"]["model_channels"] = 16
        metadata["net"] = json.dumps(net)
        words = ("shape mismatches", "map_emb.0.weight (32, 8) vs (64, 16)")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata=metadata)
    with pytest.raises(UserValueError, match="weights do not fit") as err:
        load_exported(bad)
    assert all(word in str(err.value) for word in words) and "\n" not in str(err.value), str(err.value)


def test_untrusted_class_path_and_foreign_files_are_refused(ckpt, tmp_path):
    assert export(ckpt, tmp_path / "e") == 0
    file = tmp_path / "e" / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    metadata["process"] = json.dumps({"class_path": "collections.OrderedDict", "init_args": {}})
    save_file(load_file(file), tmp_path / "untrusted.safetensors", metadata=metadata)
    with pytest.raises(UserValueError, match="outside diffusion_pl.*collections.OrderedDict"):
        load_exported(tmp_path / "untrusted.safetensors")
    with pytest.raises(UserValueError, match="not a safetensors file"):
        load_exported(ckpt)
    save_file({"w": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(UserValueError, match="no export_format, net"):
        load_exported(tmp_path / "plain.safetensors")
    with pytest.raises(MissingFileError, match="does not exist"):
        load_exported(tmp_path / "nowhere")


def test_rerun_rewrites_another_export_needs_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "e"
    assert export(ckpt, out) == 0
    assert export(ckpt, out) == 0  # the same export again
    assert export(ckpt, out, "--no_ema") == 2
    assert "already holds model.safetensors of another export" in capsys.readouterr().err
    assert read_export_config(out)["weights"] == "ema"
    assert export(ckpt, out, "--no_ema", "--overwrite") == 0
    assert read_export_config(out)["weights"] == "raw" == json.loads((out / "config.json").read_text())["weights"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temporaries left
    mode = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert mode["model.safetensors"] == mode["config.json"]  # the umask's mode, not safetensors' own 0600
