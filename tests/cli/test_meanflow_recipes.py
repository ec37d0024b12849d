"""The MeanFlow recipes embed t itself, as py-meanflow: at the process's 1000 t the target's (t - r) du/dt term
carries derivatives about 1000 times larger, and the CPU recipe's loss rose from 5.75 to 12-17 and never learned."""

from __future__ import annotations

import importlib

import pytest
import torch
import yaml

from diffusion_pl.cli.main import main
from tests.support.paths import REPO

MEANFLOW = sorted(p.stem for p in (REPO / "configs").glob("*.yaml")
                  if "diffusion_pl.meanflow.MeanFlowLoss" in p.read_text())


def _build(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))


def test_there_are_meanflow_recipes():
    assert {"cpu_meanflow_shapes", "cifar10_meanflow"} <= set(MEANFLOW)


@pytest.mark.parametrize("recipe", MEANFLOW)
def test_the_network_sees_time_in_the_unit_interval(recipe, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", recipe, "--print_config"])
    assert exc.value.code == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    process = _build(model["process"])
    scale = model["net"]["init_args"].get("noise_label_scale", 1.0)
    embedded = scale * process.noise_label(torch.tensor([1.0]))  # what the time embedding sees at t = 1
    assert float(embedded) == pytest.approx(1.0)
