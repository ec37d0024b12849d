"""`diffusion-pl list`: every category holds what the code defines, a user's own classes join it, and recipes are
printed or written out (never over an existing file)."""

from __future__ import annotations

import gc
import importlib
import sys

import pytest
import yaml

from diffusion_pl.cli.catalogue import CATEGORIES, entries
from diffusion_pl.cli.main import main
from diffusion_pl.cli.recipes import recipes_dir
from diffusion_pl.cli.sampler_spec import sampler_classes
from diffusion_pl.networks.presets import PRESETS
from tests.support.paths import REPO

# members each category must show (a new class must join by itself: the checks below compare with the code)
KNOWN = {
    "recipes": {"quickstart", "cifar10_ddpm", "imagenet256_dit_xl2"},
    "overrides": {"fast", "fsdp"},
    "networks": {"UNet", "DiT", *(fn.__name__ for fn in PRESETS)},
    "processes": {"VPLinear", "VPCosine", "DDPMDiscrete", "SubVP", "VE", "EDM", "RectifiedFlow"},
    "predictions": {"EpsPrediction", "X0Prediction", "VPrediction", "VelocityPrediction", "EDMPreconditioning"},
    "samplers": {"DDPM", "DDIM", "HeunODE", "EulerMaruyama", "DPMSolverPP", "EDMStochastic"},
    "proposals": {"UniformTime", "LogNormalNoise", "LogitNormalTime"},
    "weightings": {"OutputMSE", "EpsMSE", "MinSNR", "EDMWeighting", "LikelihoodWeighting"},
    "callbacks": {"SampleGrid", "FIDCallback", "PowerEMA", "PreemptionCheckpoint"},
}


def _listed(capsys, *argv: str) -> list[str]:
    assert main(["list", *argv]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_each_category_lists_its_known_members_one_line_each(category, capsys):
    lines = _listed(capsys, category)
    assert lines[0].startswith(f"{category}: ")
    names = [line.split()[0] for line in lines[1:]]
    assert KNOWN[category] <= set(names), KNOWN[category] - set(names)
    assert len(names) == len(set(names)) == len(entries(category))


def test_every_recipe_file_is_listed_with_its_title(capsys):
    lines = _listed(capsys, "recipes")[1:]
    files = sorted(recipes_dir().glob("*.yaml"))
    assert [line.split()[0] for line in lines] == [f.stem for f in files]
    for line, path in zip(lines, files):
        title = line.split(maxsplit=1)[1]
        assert path.read_text().startswith(f"# {title}: "), (path.name, title)  # the comment's "Title: ..."


@pytest.mark.slow
def test_networks_show_each_preset_with_its_class_path_and_size(capsys):
    lines = {line.split()[0]: line for line in _listed(capsys, "networks")[1:]}
    for preset in PRESETS:
        assert f"{preset.__module__}.{preset.__name__}" in lines[preset.__name__]
    # the size is counted from the network built at the preset's defaults (its docstring states it too)
    assert "35.7M params" in lines["unet_ddpm_cifar10"] and "673.7M params" in lines["dit_xl_2"]


def test_samplers_show_their_sampler_option_names(capsys):
    lines = {line.split()[0]: line for line in _listed(capsys, "samplers")[1:]}
    for name, cls in sampler_classes().items():
        assert f"--sampler {name}" in lines[cls.__name__]


@pytest.mark.slow
def test_the_overview_counts_every_category(capsys):
    lines = _listed(capsys)
    for category in CATEGORIES:
        row = next(line.split() for line in lines if line.split()[:1] == [category])
        assert int(row[1]) == len(entries(category))


PLUGIN = '''
import torch

from diffusion_pl.losses import OutputMSE
from diffusion_pl.networks.base import ScoreNetwork


class UserWeighting(OutputMSE):
    """A user's weighting (plain output MSE under its own name)."""


class UserNet(ScoreNetwork):
    """A user's network: one learnable scale."""

    def __init__(self, img_resolution: int | None = None, in_channels: int | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__(img_resolution, in_channels, num_classes=num_classes)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, noise_label, class_labels=None, augment_labels=None):
        return self.scale * x
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A user's module (outside the package) defining a ScoreNetwork and a Weighting; forgotten afterwards, so that
    the tests parametrized over every weighting never meet it."""
    (tmp_path / "user_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("user_plugin")
    sys.modules.pop("user_plugin", None)
    gc.collect()  # the classes leave their bases' __subclasses__


def test_a_users_own_classes_join_the_listings(plugin, capsys):
    weightings = _listed(capsys, "weightings")
    assert any(line.split()[:2] == ["UserWeighting", "user_plugin.UserWeighting"] for line in weightings), weightings
    networks = _listed(capsys, "networks")
    assert any(line.split()[:2] == ["UserNet", "user_plugin.UserNet"] for line in networks), networks


@pytest.mark.slow
def test_a_users_network_by_class_path_trains_and_its_checkpoint_loads(plugin, tiny_fit_config, tmp_path):
    """model.net is typed ScoreNetwork: a user's subclass named by class_path still parses, trains and reloads."""
    from diffusion_pl.training.module import load_module

    config = tiny_fit_config(max_steps=2, logger=False, default_root_dir=str(tmp_path / "run"))
    config["model"]["net"] = {"class_path": "user_plugin.UserNet"}
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "fit.yaml")]) == 0
    module = load_module(str(next((tmp_path / "run").rglob("*.ckpt"))), trust_config=True)
    assert type(module.net).__name__ == "UserNet" and module.net.img_resolution == 8


def test_a_recipe_is_printed_and_written_out_for_editing(capsys, tmp_path):
    source = (REPO / "configs" / "quickstart.yaml").read_text()
    assert main(["list", "recipes", "quickstart"]) == 0
    assert capsys.readouterr().out == source
    out = tmp_path / "mine.yaml"
    assert main(["list", "recipes", "quickstart", "--write", str(out)]) == 0
    assert out.read_text() == source
    assert main(["list", "recipes", "quickstart", "--write", str(tmp_path)]) == 0  # a folder: the recipe's name
    assert (tmp_path / "quickstart.yaml").read_text() == source


def test_writing_a_recipe_refuses_an_existing_file(capsys, tmp_path):
    out = tmp_path / "mine.yaml"
    out.write_text("my edits\n")
    assert main(["list", "recipes", "cifar10_edm", "--write", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists" in err and str(out) in err
    assert out.read_text() == "my edits\n"
