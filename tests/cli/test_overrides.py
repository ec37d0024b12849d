"""Overrides: partial configs given after a recipe (configs/overrides/), by name. `fast` turns a GPU recipe into its
fast variant and changes exactly bf16 autocast, the fused optimizer and compile, nothing else of the recipe."""

from __future__ import annotations

import pytest
import yaml

from diffusion_pl.cli.main import main
from diffusion_pl.cli.recipes import override_names, recipe_names
from tests.support.paths import REPO

# the recipes that train on a GPU (accelerator auto) with Adam or AdamW: the ones `fast` is for
GPU_ADAM = sorted(p.stem for p in (REPO / "configs").glob("*.yaml")
                  if "accelerator: auto" in (text := p.read_text()) and ("torch.optim.Adam\n" in text
                                                                           or "torch.optim.AdamW" in text))


def _printed(capsys, *configs: str) -> dict:
    argv = ["fit"]
    for config in configs:
        argv += ["--config", config]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--print_config"])
    assert exc.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def _differences(a, b, path=()) -> dict:
    """{key path: (a's value, b's value)} wherever two printed configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = {}
        for key in a.keys() | b.keys():
            found.update(_differences(a.get(key), b.get(key), (*path, key)))
        return found
    return {} if a == b else {path: (a, b)}


def test_overrides_are_listed_apart_and_no_name_is_both():
    assert {"fast", "fsdp"} <= set(override_names())
    assert not set(override_names()) & set(recipe_names())


def test_the_gpu_recipes_it_is_for():
    assert len(GPU_ADAM) >= 11 and "cifar10_edm" in GPU_ADAM and "imagenet256_dit_xl2" in GPU_ADAM


@pytest.mark.parametrize("recipe", GPU_ADAM)
def test_fast_changes_precision_fused_and_compile_only(recipe, capsys):
    faithful = _printed(capsys, recipe)
    fast = _printed(capsys, recipe, "fast")
    changed = _differences(faithful, fast)
    assert changed.pop(("trainer", "precision"))[1] == "bf16-mixed"
    assert changed.pop(("model", "compile")) == (False, True)
    assert changed.pop(("model", "optimizer", "init_args", "fused")) == (None, True)
    assert changed == {}  # the recipe's lr, betas, eps, callbacks, data, ... are untouched


def test_fast_on_a_recipe_whose_optimizer_has_no_fused_kernel_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "cifar10_ect", "--config", "fast", "--print_config"])
    assert exc.value.code != 0
    assert "Option 'fused' is not accepted" in capsys.readouterr().err  # ECT trains with RAdam


def test_fast_and_fsdp_together(capsys):
    printed = _printed(capsys, "imagenet256_dit_xl2", "fsdp", "fast")
    assert printed["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert printed["trainer"]["precision"] == "bf16-mixed" and printed["model"]["optimizer"]["init_args"]["fused"]


def test_list_overrides(capsys):
    assert main(["list", "overrides"]) == 0
    out = capsys.readouterr().out
    assert "fast" in out and "fsdp" in out and "--config RECIPE --config NAME" in out
    assert main(["list", "overrides", "fast"]) == 0
    assert capsys.readouterr().out == (REPO / "configs" / "overrides" / "fast.yaml").read_text()
