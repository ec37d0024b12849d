"""Foundation: the package imports, the CLI answers, every recipe parses, CI runs the README's test command."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest
import yaml

import diffusion_pl
from diffusion_pl.cli.main import LIGHTNING_COMMANDS, PROJECT_COMMANDS, main
from tests.support.paths import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_package_imports_and_has_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", diffusion_pl.__version__)
    for name in ("training.module", "sampling", "losses", "likelihood", "networks", "data", "evaluation.metrics",
                 "cli.main", "utils", "codecs", "interop"):
        importlib.import_module(f"diffusion_pl.{name}")


def test_public_api_names_resolve_to_their_defining_modules():
    for name in diffusion_pl.__all__:
        value = getattr(diffusion_pl, name)
        if name != "__version__":
            assert value.__module__.startswith("diffusion_pl."), name
    with pytest.raises(AttributeError):
        diffusion_pl.NoSuchThing


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*LIGHTNING_COMMANDS, *PROJECT_COMMANDS]:
        assert re.search(rf"^\s+{name}\s", out, re.M), f"{name} missing from --help"


def test_version_is_printed(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"diffusion-pl {diffusion_pl.__version__}"


def test_console_script_help_runs():
    proc = subprocess.run([sys.executable, "-m", "diffusion_pl", "--help"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"fit" in proc.stdout and b"prepare" in proc.stdout


@pytest.mark.parametrize("command", ["test", "predict"])
def test_lightning_test_and_predict_point_to_sample_and_evaluate(command, capsys):
    assert main([command, "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "diffusion-pl sample" in err and "diffusion-pl evaluate" in err and len(err.strip().splitlines()) == 1


def test_unknown_command_is_a_one_line_error(capsys):
    assert main(["fitt"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'fitt'" in err and len(err.strip().splitlines()) == 1


def test_fit_help_runs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    assert "--ckpt_path" in capsys.readouterr().out


def test_configs_folder_is_not_empty():
    assert CONFIGS, "configs/ holds the recipes"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses_and_resolves(config, capsys):
    """Every recipe is valid YAML and a valid LightningCLI config (class paths resolve, types check)."""
    yaml.safe_load(config.read_text())
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["net"]["class_path"].startswith("diffusion_pl.networks.")
    assert "class_path" in printed["model"]["process"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_cites_its_source(config):
    head = config.read_text().split("\n", 3)[:3]
    assert any(line.startswith("#") for line in head), f"{config.name} must start with a comment citing its source"


def test_ci_runs_the_readme_test_command():
    test_line = _readme_block("Tests", "bash").strip()
    assert len(test_line.splitlines()) == 1 and "pytest" in test_line, test_line
    pytest_cmd = test_line.split("&&")[-1].strip()
    assert pytest_cmd in (REPO / ".ci" / "run").read_text(), f"{pytest_cmd!r} missing from .ci/run"


def test_gitignore_keeps_outputs_out():
    ignored = (REPO / ".gitignore").read_text()
    for pattern in ("runs/", "*.ckpt", "__pycache__/", "venv/"):
        assert pattern in ignored


def _readme_block(heading: str, language: str = "python") -> str:
    """The first fenced code block under a README heading."""
    section = (REPO / "README.md").read_text().split(f"\n## {heading}\n", 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_readme_is_the_front_door_and_the_site_home_follows_it():
    readme = (REPO / "README.md").read_text()
    assert 60 <= len(readme.splitlines()) <= 250  # the front door; everything else is on the site (docs/)
    home = (REPO / "docs" / "index.md").read_text().split("\n", 1)[1]  # below its one-line comment
    assert home == readme.replace("](docs/", "](").replace("see docs/guide/", "see guide/")
    linked = {p for p in re.findall(r"\]\(docs/([^)#]+)\)", readme)}
    assert linked and all((REPO / "docs" / p).is_file() for p in linked), linked


def test_readme_python_api_example_runs(run, tmp_path, monkeypatch):
    """The README's Python block, as written, on a checkpoint of a 2-step fit: a 4x4 grid of 16 samples."""
    code = _readme_block("Python API")
    assert '"runs/mine/checkpoints/last.ckpt"' in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("runs/mine/checkpoints/last.ckpt", run["ckpt"]), "README.md", "exec"), {})
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:
        side = int(run_image_size(run)) * 4 + 2 * 5  # nrow=4, torchvision's default padding 2
        assert grid.size == (side, side)


def run_image_size(run) -> int:
    from diffusion_pl.training.module import load_module

    return load_module(run["ckpt"]).net.img_resolution


def test_ci_tests_every_declared_floor():
    """.ci/floors.txt pins each dependency at the floor pyproject.toml declares (and names every dependency but torch
    and torchvision, whose floors are the versions CI installs), so the floors CI installs are the declared ones."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    declared = {}
    for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(line)
        floors = [spec.version for spec in req.specifier if spec.operator == ">="]
        assert len(floors) == 1, f"{line}: expected one floor (>=)"
        declared[req.name.lower().replace("_", "-")] = floors[0]
    pinned = {}
    for line in (REPO / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name.strip().lower()] = version.strip()
    assert set(pinned) == set(declared) - {"torch", "torchvision"}
    for name, version in pinned.items():
        floor = Version(declared[name])
        assert Version(version).release[:len(floor.release)] == floor.release, \
            f"{name}: .ci/floors.txt installs {version}, pyproject.toml declares >= {floor}"
