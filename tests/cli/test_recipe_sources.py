"""Every CIFAR-10 / ImageNet recipe is its table in configs/sources/*.yaml, docs/recipes.md shows those tables, and each
recipe's network is its reference preset weight for weight."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from diffusion_pl.networks.presets import PRESETS
from tests.support.paths import REPO

_spec = importlib.util.spec_from_file_location("recipe_tables", REPO / "configs" / "sources" / "tables.py")
recipe_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe_tables)

SOURCES = recipe_tables.load_sources()
RECIPES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml") if p.stem.startswith(("cifar10_", "imagenet")))


def test_every_reproduction_recipe_has_a_table_and_every_table_a_recipe():
    assert sorted(SOURCES) == RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_matches_its_table(name):
    problems = recipe_tables.check(name, SOURCES[name], recipe_tables.load_recipe(name))
    assert not problems, "\n".join(problems)


def test_a_drifted_recipe_is_caught():
    config = copy.deepcopy(recipe_tables.load_recipe("cifar10_edm"))
    config["model"]["optimizer"]["init_args"]["lr"] = 2e-3  # official value, no deviation stated
    config["model"]["optimizer"]["init_args"]["eps"] = 1e-8  # a stated deviation, no longer applied
    del config["model"]["augment"]
    problems = recipe_tables.check("cifar10_edm", SOURCES["cifar10_edm"], config)
    assert any("learning rate" in p and "0.002" in p for p in problems)
    assert any("Adam eps" in p for p in problems)
    assert any("augmentation probability" in p and "has no" in p for p in problems)
    # a deviation without a reason is refused too
    table = copy.deepcopy(SOURCES["cifar10_edm"])
    next(r for r in table["rows"] if r["name"] == "Adam eps").pop("why")
    assert any("needs a 'why'" in p for p in recipe_tables.check("cifar10_edm", table, recipe_tables.load_recipe("cifar10_edm")))


def test_readme_shows_the_tables():
    section = recipe_tables.readme_section((REPO / "docs" / "recipes.md").read_text())
    assert section is not None, "docs/recipes.md has no recipe-tables section"
    assert section == recipe_tables.render(), \
        "docs/recipes.md recipe tables are stale: python configs/sources/tables.py --write docs/recipes.md"


def _built(class_path: str, kwargs: dict) -> torch.nn.Module:
    module_name, name = class_path.rsplit(".", 1)
    fn = getattr(importlib.import_module(module_name), name)
    torch.manual_seed(0)
    return fn(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RECIPES if "network" in SOURCES.get(n, {})])
def test_recipe_network_is_its_preset_weight_for_weight(name):
    """Same seed, same weights, same outputs: options that hold no weights (padding, embedding, init) count too."""
    net = recipe_tables.load_recipe(name)["model"]["net"]
    args = dict(net["init_args"])
    recipe_net = _built(net["class_path"], args)
    shared = {k: args[k] for k in ("img_resolution", "in_channels", "out_channels", "num_classes", "augment_dim")
              if k in args}
    preset_fn = next(p for p in PRESETS if p.__name__ == SOURCES[name]["network"])
    preset = _built(f"{preset_fn.__module__}.{preset_fn.__name__}", shared)
    ours, theirs = recipe_net.state_dict(), preset.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), f"{key} initialised differently"
    # the zero-initialised output layers would make any two networks agree: give both the same random weights
    for model in (recipe_net, preset):
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    x = torch.randn(2, args.get("in_channels") or 3, args["img_resolution"], args["img_resolution"])
    label = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        out = recipe_net.eval()(x, label)
        assert out.abs().max() > 0
        assert torch.equal(out, preset.eval()(x, label))
