"""What `diffusion-pl fit` sets up for logging: log_every_n_steps, the TrainingMonitor, TensorBoard without
hp_metric, and one line for a configured logger whose package is missing."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from diffusion_pl.cli.fit import DiffusionCLI, default_log_every_n_steps, missing_package
from diffusion_pl.cli.main import main
from diffusion_pl.training.callbacks.monitor import TrainingMonitor


def _cli(tiny_fit_config, tmp_path, **trainer):
    config = tiny_fit_config(default_root_dir=str(tmp_path / "run"), **trainer)
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return DiffusionCLI(args=["--config", str(path)], run=False)


def test_default_log_every_n_steps():
    assert [default_log_every_n_steps(n) for n in (None, -1, 2, 30, 99, 100, 700)] == [10, 10, 1, 3, 9, 10, 10]


def test_cli_trainer_logs_short_runs_and_monitors_by_default(tiny_fit_config, tmp_path):
    cli = _cli(tiny_fit_config, tmp_path, max_steps=30)
    assert cli.trainer.log_every_n_steps == 3
    assert sum(isinstance(cb, TrainingMonitor) for cb in cli.trainer.callbacks) == 1


def test_recipe_log_every_n_steps_and_monitor_are_kept(tiny_fit_config, tmp_path):
    monitor = {"class_path": "diffusion_pl.training.callbacks.monitor.TrainingMonitor", "init_args": {"window": 5}}
    cli = _cli(tiny_fit_config, tmp_path, max_steps=30, log_every_n_steps=7, callbacks=[monitor])
    monitors = [cb for cb in cli.trainer.callbacks if isinstance(cb, TrainingMonitor)]
    assert cli.trainer.log_every_n_steps == 7 and [m.window for m in monitors] == [5]


def test_default_tensorboard_logs_no_hp_metric(tiny_fit_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_fit_config(default_root_dir=str(tmp_path / "run"), max_steps=1)
    config["trainer"].pop("logger", None)
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    (events,) = (tmp_path / "run").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events)).Reload()
    tags = accumulator.Tags()["scalars"]
    assert "train/loss" in tags and "hp_metric" not in tags


def test_missing_logger_package_is_one_line(tiny_fit_config, tmp_path, capsys):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    config = tiny_fit_config(default_root_dir=str(tmp_path / "run"), max_steps=1)
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.WandbLogger"}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("diffusion-pl fit: error: lightning.pytorch.loggers.WandbLogger needs the package wandb")
    assert "pip install 'wandb" in err


def test_missing_package_reads_plain_import_errors():
    try:
        try:
            raise ModuleNotFoundError("No module named 'comet_ml'", name="comet_ml")
        except ModuleNotFoundError as err:
            raise ValueError("Problem with given class_path 'x.CometLogger':") from err
    except ValueError as err:
        assert missing_package(err) == ("x.CometLogger needs the package comet_ml, which is not installed: expected "
                                        "`pip install 'comet_ml'`")
    assert missing_package(ValueError("bad value")) is None
