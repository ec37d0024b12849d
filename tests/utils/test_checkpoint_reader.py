"""The one checkpoint reader (diffusion_pl/utils/checkpoint.py) on every path that opens a checkpoint: fit
--ckpt_path (fine-tuning), resuming (--ckpt_path last), sample, evaluate, export, reconstruct-ema, load_module.

(a) a forged checkpoint whose saved config names a class outside the trusted packages is refused in one line
    naming it, before its module is imported (importing `evil_pkg` writes a marker file);
(b) a file that is not a checkpoint (junk bytes, text, a tensor, a missing file) gives the same line everywhere;
(c) configs saved before the re-layout (commit 47eced5) name old class paths: such a checkpoint loads, samples,
    exports, fine-tunes and resumes as the same checkpoint with today's paths; so do old PowerEMA snapshots.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusion_pl.cli.main import main
from diffusion_pl.processes.variance_preserving import VPLinear
from diffusion_pl.training.module import load_module
from diffusion_pl.training.phema import SNAPSHOT_FORMAT
from diffusion_pl.utils.checkpoint import ALIASES, EXPECTED, read_checkpoint, read_snapshot, upgrade_path
from diffusion_pl.utils.errors import MissingFileError, UserError, UserValueError
from tests.support.paths import REPO

SHAPES = "builtin:shapes?size=8&count=64"
EVIL = "evil_pkg.Net"
POWER_EMA = {"class_path": "diffusion_pl.training.callbacks.power_ema.PowerEMA",
             "init_args": {"snapshot_every_n_steps": 1}}
# today's class paths in the tiny recipe's saved config -> what a checkpoint written before the re-layout says
OLD = {"diffusion_pl.networks.unet.UNet": "diffusion_pl.networks.UNet",
       "diffusion_pl.processes.variance_preserving.VPLinear": "diffusion_pl.processes.VPLinear",
       "diffusion_pl.training.module._default_optimizer": "diffusion_pl.module._default_optimizer"}


@pytest.fixture(autouse=True)
def environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(REPO))  # tests.support.evaluation's stand-in feature extractor


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_fit_config):
    """A 2-step fit of the tiny recipe with PowerEMA snapshots at every step: its folder and checkpoint, and the
    recipe without the callback (for fitting on)."""
    root = tmp_path_factory.mktemp("trained")
    config = tiny_fit_config(max_steps=2, logger=False)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    config["trainer"]["callbacks"] = [POWER_EMA]
    (root / "fit.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFUSION_PL_CACHE", str(root / "cache"))
        assert main(["fit", "--config", str(root / "fit.yaml"), f"--trainer.default_root_dir={root / 'run'}"]) == 0
    return {"run": root / "run", "ckpt": next((root / "run" / "checkpoints").glob("*.ckpt")), "recipe": recipe}


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """tmp_path/evil_pkg on the path: importing it writes the marker file returned (its Net is a UNet)."""
    marker = tmp_path / "evil_pkg_was_imported"
    (tmp_path / "evil_pkg").mkdir()
    (tmp_path / "evil_pkg" / "__init__.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "from diffusion_pl.networks.unet import UNet\n\n\nclass Net(UNet):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    yield marker
    sys.modules.pop("evil_pkg", None)


def rewrite(ckpt: Path, out: Path, edit, callbacks: bool = True) -> Path:
    """A copy of the checkpoint `ckpt` whose hyper_parameters `edit` has changed in place; without the callback
    states unless `callbacks` (fitting on from them in another run folder makes Lightning warn that ModelCheckpoint's
    folder changed and PowerEMA is missing; a fine-tuned import has none)."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    edit(checkpoint["hyper_parameters"])
    if not callbacks:
        del checkpoint["callbacks"]
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out


def forge(ckpt: Path, out: Path, callbacks: bool = True) -> Path:
    def evil_net(hparams):
        hparams["net"]["class_path"] = EVIL
    return rewrite(ckpt, out, evil_net, callbacks)


def no_model_section(trained, tmp_path) -> str:
    """The tiny recipe without net and process (a fine-tuning recipe: the checkpoint's network is used)."""
    config = yaml.safe_load(trained["recipe"].read_text())
    del config["model"]["net"], config["model"]["process"]
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def data_options(root: Path) -> list[str]:
    """A command line that names data and a run folder but no model (resuming takes the checkpoint's)."""
    return ["--data", "diffusion_pl.data.datamodule.ShardDataModule", "--data.shards", SHAPES, "--data.batch_size", "4",
            "--data.num_workers", "0", "--trainer.default_root_dir", str(root), "--trainer.accelerator", "cpu",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]


# path -> the command line that opens the checkpoint `ckpt` (tmp_path: a folder for outputs)
PATHS = {
    "fit": lambda t, ckpt, tmp: ["fit", "--config", str(t["recipe"]), "--ckpt_path", str(ckpt),
                                 f"--trainer.default_root_dir={tmp / 'ft'}"],
    "fit, no model section": lambda t, ckpt, tmp: ["fit", "--config", no_model_section(t, tmp), "--ckpt_path",
                                                   str(ckpt), f"--trainer.default_root_dir={tmp / 'ft'}"],
    "sample": lambda t, ckpt, tmp: ["sample", "--ckpt_path", str(ckpt), "--num_samples", "1", "--out", str(tmp / "s")],
    "evaluate": lambda t, ckpt, tmp: ["evaluate", "--ckpt_path", str(ckpt), "--data", SHAPES, "--num_samples", "2",
                                      "--feature_extractor", "tests.support.evaluation.StandInFeatures"],
    "export": lambda t, ckpt, tmp: ["export", "--ckpt_path", str(ckpt), "--out", str(tmp / "e")],
    "reconstruct-ema": lambda t, ckpt, tmp: ["reconstruct-ema", "--run", str(t["run"]), "--ckpt_path", str(ckpt),
                                             "--sigma_rel", "0.07", "--out", str(tmp / "ema.ckpt")],
    "load_module": None,  # diffusion_pl.training.module.load_module(ckpt)
}


def refusal(path: str, trained, ckpt: Path, tmp_path: Path, capsys) -> str:
    """The one-line error of opening `ckpt` on `path`, without its `diffusion-pl <command>: error: ` prefix."""
    if PATHS[path] is None:
        with pytest.raises(UserError) as err:
            load_module(str(ckpt))
        message = str(err.value)
    else:
        argv = PATHS[path](trained, ckpt, tmp_path)
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        prefix = f"diffusion-pl {argv[0]}: error: "
        assert len(lines) == 1 and lines[0].startswith(prefix), err[-3000:]
        message = lines[0][len(prefix):]
    assert "\n" not in message
    return message


# -- (a) a forged checkpoint's classes are refused before they are imported -------------------------------------

@pytest.mark.parametrize("path", [*PATHS, "resume"])
def test_a_forged_config_is_refused_before_its_module_is_imported(path, trained, evil, tmp_path, capsys):
    if path == "resume":  # the run folder's newest checkpoint, with no model section: its config is the network
        forged = forge(trained["ckpt"], tmp_path / "run" / "checkpoints" / "last.ckpt")
        capsys.readouterr()
        assert main(["fit", "--ckpt_path", "last", *data_options(tmp_path / "run")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("diffusion-pl fit: error: "), lines
        message = lines[0]
    else:
        forged = forge(trained["ckpt"], tmp_path / "forged.ckpt")
        message = refusal(path, trained, forged, tmp_path, capsys)
    assert f"checkpoint {forged} names {EVIL}, outside the trusted packages" in message, message
    trust = "--trust_config" if path in ("fit", "fit, no model section", "resume") else "--trust_config"
    assert trust in message, message
    assert not evil.exists() and "evil_pkg" not in sys.modules
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists() and not (tmp_path / "ema.ckpt").exists()


def test_trusting_a_forged_config_imports_it(trained, evil, tmp_path):
    """The positive control of the test above: the marker is written once the module is imported, here by a
    fine-tune with --trust_config; load_module(trust_config=True) then builds the class."""
    forged = forge(trained["ckpt"], tmp_path / "forged.ckpt", callbacks=False)
    assert main(["fit", "--config", no_model_section(trained, tmp_path), "--ckpt_path", str(forged), "--trust_config",
                 "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path / 'ft'}"]) == 0
    assert evil.read_text() == "imported"
    tuned = read_checkpoint(next((tmp_path / "ft" / "checkpoints").glob("*step=3.ckpt")), trust_config=True)
    assert tuned.config["net"]["class_path"] == EVIL
    module = load_module(str(forged), trust_config=True)
    assert type(module.net).__module__ == "evil_pkg"


def test_a_recipe_may_name_its_own_classes(trained, evil, tmp_path, capsys):
    """Classes the recipe names itself are the user's choice: a checkpoint naming them is not refused."""
    forged = forge(trained["ckpt"], tmp_path / "forged.ckpt", callbacks=False)
    config = yaml.safe_load(trained["recipe"].read_text())
    config["model"]["net"]["class_path"] = EVIL
    recipe = tmp_path / "own.yaml"
    recipe.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(recipe), "--ckpt_path", str(forged), "--trainer.max_steps=3",
                 f"--trainer.default_root_dir={tmp_path / 'own'}"]) == 0
    tuned = read_checkpoint(next((tmp_path / "own" / "checkpoints").glob("*step=3.ckpt")), trust_config=True)
    assert tuned.config["net"]["class_path"] == EVIL and evil.exists()


# -- (b) not a checkpoint: the same line on every path ------------------------------------------------------------

NOT_CHECKPOINTS = {
    "junk bytes": (lambda p: p.write_bytes(b"PK\x03\x04 truncated" + bytes(200)), "is not a checkpoint (torch.load "
                                                                                   "failed: "),
    "text": (lambda p: p.write_text("model: UNet\n"), "is not a checkpoint (torch.load failed: "),
    "a tensor": (lambda p: torch.save(torch.zeros(3), p), "is not a checkpoint (it holds a Tensor)"),
    "no global_step": (lambda p: torch.save({"state_dict": {}}, p), "is not a checkpoint (no global_step)"),
    "missing": (lambda p: None, "does not exist"),
}


@pytest.mark.parametrize("kind", NOT_CHECKPOINTS)
def test_a_file_that_is_not_a_checkpoint_gets_the_same_line_everywhere(kind, trained, tmp_path, capsys):
    make, words = NOT_CHECKPOINTS[kind]
    bad = tmp_path / "bad.ckpt"
    make(bad)
    messages = {path: refusal(path, trained, bad, tmp_path, capsys) for path in PATHS}
    first = next(iter(messages.values()))
    assert all(message == first for message in messages.values()), messages
    assert str(bad) in first and words in first and first.endswith(f"expected {EXPECTED}"), first
    if kind == "missing":
        assert first == f"checkpoint {bad} does not exist: expected {EXPECTED}"
        with pytest.raises(MissingFileError):
            read_checkpoint(bad)


def test_a_file_that_is_not_a_snapshot_is_one_line(trained, tmp_path, capsys):
    snapshots = tmp_path / "phema"
    shutil.copytree(trained["run"] / "phema", snapshots)
    junk = sorted(snapshots.glob("*.pt"))[0]
    junk.write_bytes(b"not a snapshot")
    assert main(["reconstruct-ema", "--run", str(trained["run"]), "--snapshots", str(snapshots), "--sigma_rel", "0.07",
                 "--out", str(tmp_path / "ema.ckpt")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{junk} is not a snapshot (torch.load failed: " in lines[0], lines
    torch.save({"format": "someone.else/1"}, junk)
    with pytest.raises(UserValueError, match=r"is not a snapshot \(format 'someone.else/1'\): expected a snapshot"):
        read_snapshot(junk, SNAPSHOT_FORMAT)


# -- (c) old class paths ------------------------------------------------------------------------------------------

def resolves(path: str) -> bool:
    """Whether a dotted path names a module, or an attribute of one, today."""
    try:
        importlib.import_module(path)
        return True
    except ImportError:
        pass
    module, _, name = path.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def test_every_alias_maps_a_path_that_is_gone_to_one_that_resolves():
    for old, new in ALIASES.items():
        assert not resolves(old), f"{old} resolves today: the alias would rewrite a current path"
        assert resolves(new), f"{old} -> {new}, which does not resolve"
    assert upgrade_path("diffusion_pl.processes.VPLinear") == "diffusion_pl.processes.variance_preserving.VPLinear"
    assert upgrade_path("diffusion_pl.callbacks.phema.PowerEMA") == "diffusion_pl.training.callbacks.power_ema.PowerEMA"
    for current in ("diffusion_pl.cli.main.main", "diffusion_pl.networks.unet.UNet", "torch.optim.Adam"):
        assert upgrade_path(current) == current


def to_old_paths(hparams: dict) -> None:
    for key in ("net", "process"):
        hparams[key]["class_path"] = OLD[hparams[key]["class_path"]]
    hparams["optimizer"] = OLD[hparams["optimizer"]]


def npz(folder: Path) -> np.ndarray:
    return np.load(next(folder.glob("*.npz")))["arr_0"]


@pytest.mark.slow
def test_an_old_checkpoint_loads_samples_and_exports_as_today(trained, tmp_path, capsys):
    new = trained["ckpt"]
    old = rewrite(new, tmp_path / "old.ckpt", to_old_paths)
    saved = torch.load(old, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert saved["net"]["class_path"] == "diffusion_pl.networks.UNet"  # the file holds the old paths
    assert read_checkpoint(old).config == read_checkpoint(new).config
    a, b = load_module(str(old)), load_module(str(new))
    assert a.saved_config == b.saved_config and a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    for name, ckpt in (("old", old), ("new", new)):
        assert main(["sample", "--ckpt_path", str(ckpt), "--num_samples", "3", "--sampler", "ddim", "--steps", "2", "--npz",
                     "--out", str(tmp_path / f"s_{name}")]) == 0
        assert main(["evaluate", "--ckpt_path", str(ckpt), "--data", SHAPES, "--num_samples", "4", "--sampler", "ddim",
                     "--steps", "2", "--feature_extractor", "tests.support.evaluation.StandInFeatures",
                     "--report", str(tmp_path / f"r_{name}.json")]) == 0
        assert main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / f"e_{name}")]) == 0
    np.testing.assert_array_equal(npz(tmp_path / "s_old"), npz(tmp_path / "s_new"))
    fid = [json.loads((tmp_path / f"r_{name}.json").read_text())["results"][0]["fid"] for name in ("old", "new")]
    assert fid[0] == fid[1]
    exported = [json.loads((tmp_path / f"e_{name}" / "config.json").read_text()) for name in ("old", "new")]
    assert exported[0]["net"] == exported[1]["net"] and exported[0]["process"] == exported[1]["process"]


@pytest.mark.slow
def test_an_old_checkpoint_fine_tunes_and_resumes(trained, tmp_path, capsys):
    old = rewrite(trained["ckpt"], tmp_path / "old.ckpt", to_old_paths, callbacks=False)
    # fine-tuning: a recipe without a network takes the old checkpoint's, read with today's paths
    assert main(["fit", "--config", no_model_section(trained, tmp_path), "--ckpt_path", str(old),
                 "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path / 'ft'}"]) == 0
    tuned = read_checkpoint(next((tmp_path / "ft" / "checkpoints").glob("*step=3.ckpt")))
    assert tuned.config["net"] == read_checkpoint(trained["ckpt"]).config["net"]
    # resuming a run folder whose newest checkpoint is old, with no recipe
    root = tmp_path / "resume"
    (root / "checkpoints").mkdir(parents=True)
    shutil.copy(old, root / "checkpoints" / "last.ckpt")
    assert main(["fit", "--ckpt_path", "last", "--trainer.max_steps", "3", *data_options(root)]) == 0
    assert "resuming from" in capsys.readouterr().err
    resumed = read_checkpoint(next((root / "checkpoints").glob("*step=3.ckpt")))
    assert resumed.global_step == 3
    # (the resumed run's parser writes the class by its shortest import path, `diffusion_pl.VPLinear`, as before)
    module, _, name = resumed.config["process"]["class_path"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is VPLinear


def test_old_snapshots_and_checkpoints_reconstruct_as_today(trained, tmp_path):
    old = rewrite(trained["ckpt"], tmp_path / "old.ckpt", to_old_paths)
    snapshots = tmp_path / "phema"
    snapshots.mkdir()
    for path in (trained["run"] / "phema").glob("*.pt"):
        data = torch.load(path, map_location="cpu", weights_only=True)
        assert data["format"] == SNAPSHOT_FORMAT
        torch.save({**data, "format": "diffusion_pl.phema/1"}, snapshots / path.name)  # before the re-layout
    assert main(["reconstruct-ema", "--run", str(trained["run"]), "--ckpt_path", str(old), "--snapshots", str(snapshots),
                 "--sigma_rel", "0.07", "--out", str(tmp_path / "old_ema.ckpt")]) == 0
    assert main(["reconstruct-ema", "--run", str(trained["run"]), "--ckpt_path", str(trained["ckpt"]), "--sigma_rel",
                 "0.07", "--out", str(tmp_path / "new_ema.ckpt")]) == 0
    a, b = (read_checkpoint(tmp_path / f"{name}_ema.ckpt") for name in ("old", "new"))
    assert a.config == b.config  # the copy is written with today's class paths
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(v, b.state_dict[k]) for k, v in a.state_dict.items())
