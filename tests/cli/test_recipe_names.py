"""Recipes by name: `fit --config quickstart` from any folder, the recipes inside the wheel, `fit --help` listing
the project's networks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml

from diffusion_pl.cli.main import main
from diffusion_pl.networks.presets import PRESETS
from tests.support.paths import REPO

RECIPES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def _printed_config(capsys, *argv: str) -> dict:
    with pytest.raises(SystemExit) as exc:
        main(["fit", *argv, "--print_config"])
    assert exc.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.slow
def test_a_recipe_by_name_from_a_folder_that_is_not_the_clone(tmp_path, monkeypatch, capsys):
    by_path = _printed_config(capsys, "--config", str(REPO / "configs" / "quickstart.yaml"))
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "configs").exists()
    by_name = _printed_config(capsys, "--config", "quickstart")
    assert by_name == by_path
    assert by_name["trainer"]["default_root_dir"] == "runs/quickstart"  # the run folder stays relative to the cwd
    # later options still override the recipe's, as with a file
    assert _printed_config(capsys, "-c", "quickstart", "--trainer.max_steps=3")["trainer"]["max_steps"] == 3


def test_a_file_of_the_recipes_name_comes_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    recipe["trainer"]["max_steps"] = 11
    (tmp_path / "quickstart").write_text(yaml.safe_dump(recipe))
    assert _printed_config(capsys, "--config", "quickstart")["trainer"]["max_steps"] == 11


def test_fit_help_lists_the_projects_networks_not_every_torch_module(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    net_help = out.split("\n  --model.net NET", 1)[1].split("--model.process", 1)[0]  # its help, not the usage
    assert "diffusion_pl.UNet" in net_help and "diffusion_pl.DiT" in net_help
    assert all(fn.__name__ in net_help for fn in PRESETS)
    assert "torch.nn.Linear" not in out  # --model.net used to list all of torch.nn (about 700 lines)
    assert "diffusion-pl list recipes" in out.split("\n  -c CONFIG, --config CONFIG", 1)[1].split("--print_config", 1)[0]


@pytest.mark.slow
def test_the_wheel_ships_the_recipes_and_the_installed_package_finds_them(tmp_path):
    """A real `pip wheel` of a copy of the project, installed into a folder and run from another folder."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("diffusion_pl", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", str(source), "-w", str(tmp_path / "wheel"), "--no-deps", "--no-build-isolation",
                    "-q"], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "wheel").glob("diffusion_pl-*.whl"))
    files = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(f.split("/")[-1][: -len(".yaml")] for f in files
                     if f.startswith("diffusion_pl/recipes/") and f.count("/") == 2)
    assert shipped == RECIPES
    overrides = sorted(f.split("/")[-1][: -len(".yaml")] for f in files if f.startswith("diffusion_pl/recipes/overrides/"))
    assert overrides == sorted(p.stem for p in (REPO / "configs" / "overrides").glob("*.yaml"))
    assert not [f for f in files if "recipes/sources" in f or f.startswith("configs/")]  # configs/sources stays out
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp_path / "site"), str(wheel), "-q"],
                   check=True, capture_output=True, timeout=600)
    (tmp_path / "elsewhere").mkdir()
    probe = ("import diffusion_pl; from diffusion_pl.cli.recipes import recipes_dir, recipe_names; "
             "print(diffusion_pl.__file__); print(recipes_dir()); print(','.join(recipe_names()))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                          env={"PATH": "", "PYTHONPATH": str(tmp_path / "site")}, timeout=600)
    assert done.returncode == 0, done.stderr
    package, folder, names = done.stdout.split()
    assert package.startswith(str(tmp_path / "site")) and folder == str(tmp_path / "site" / "diffusion_pl" / "recipes")
    assert names.split(",") == RECIPES
