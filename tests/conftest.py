"""Test-session settings and the fixtures shared by more than one folder.

The setup itself lives in tests/support (imported as `tests.support.x`); the fixtures here hand it to test bodies.
Factory fixtures return the function or class itself (call it as before: `tiny_fit_config(max_steps=2)`), so they
are session-scoped and module-scoped fixtures can use them. Fixtures one folder needs are in its conftest.py. Each
fixture imports what it hands out, so that a run of a few light test files does not import Lightning for them.
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (multi-process DDP/FSDP, multi-node, training runs); "
                          "CI runs them, a plain `pytest` leaves them out")


def pytest_report_header(config):
    if not _runs_slow(config):
        return "tests marked slow are left out: add --slow to run them (CI does)"
    return None


def _runs_slow(config) -> bool:
    # an explicit -m (`-m slow`, `-m "not slow"`) chooses for itself
    return bool(config.getoption("--slow") or config.getoption("markexpr"))


def pytest_collection_modifyitems(config, items):
    """A plain run leaves out the slow tests (the quick run a contributor makes, under 5 minutes on 2 cores)."""
    if _runs_slow(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread in the test process.

    The tests use tiny tensors and networks, where a second thread only adds synchronisation, and
    subprocess tests (DDP ranks) would otherwise oversubscribe the 2-core CI machine: on a loaded
    2-core machine a tiny U-Net forward took 1,067 ms with 2 threads and 74 ms with 1.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- factories -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_fit_config():
    """`tiny_fit_config(**trainer) -> dict`: the tiny `diffusion-pl fit` recipe (tests/support/fit.py)."""
    from tests.support.fit import tiny_fit_config

    return tiny_fit_config


@pytest.fixture(scope="session")
def tiny_autoencoder():
    """`tiny_autoencoder(**kwargs) -> Autoencoder`: the tiny seeded AutoencoderKL (tests/support/latent.py)."""
    from tests.support.latent import tiny_autoencoder

    return tiny_autoencoder


@pytest.fixture(scope="session")
def stand_in_features():
    """The class StandInFeatures (`stand_in_features()` builds one): a fixed projection in place of InceptionV3."""
    from tests.support.evaluation import StandInFeatures

    return StandInFeatures


@pytest.fixture(scope="session")
def frozen_fit():
    """`frozen_fit(root, callbacks, devices=1, logger=False, num_classes=5, max_steps=2) -> Trainer`: a short CPU
    fit of a frozen tiny conditional model on the built-in shapes (tests/support/evaluation.py `fit`)."""
    from tests.support.evaluation import fit

    return fit


@pytest.fixture(scope="session")
def eval_module():
    """`eval_module(num_classes=None, frozen=False) -> DiffusionModule`: the tiny 8x8 module of the evaluation
    tests (tests/support/evaluation.py `make_module`)."""
    from tests.support.evaluation import make_module

    return make_module


@pytest.fixture(scope="session")
def recording():
    """`recording(FIDCallback or SampleGrid) -> subclass` keeping `.last` (FID values) and `.written` (grids)."""
    from tests.support.evaluation import recording

    return recording


@pytest.fixture(scope="session")
def one_line_error():
    """`one_line_error(capsys, argv, *words) -> str`: a command fails with exit 2 and one error line naming words."""
    from tests.support.commands import one_line_error

    return one_line_error


@pytest.fixture(scope="session")
def dit_reference():
    """`dit_reference(out_channels=8, num_layers=2, **config)`: a randomised small DiTTransformer2DModel (needs
    diffusers; tests/support/interop.py)."""
    from tests.support.interop import dit_reference

    return dit_reference


@pytest.fixture(scope="session")
def save_unet():
    """`save_unet(folder, config, seed=0, scheduler=None, layout="pipeline", weights="safetensors")`: a randomised
    diffusers UNet2DModel saved as a pipeline or flat folder; returns the model (needs diffusers)."""
    from tests.support.interop import save_unet

    return save_unet


# -- runs ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step `diffusion-pl fit` (callbacks from YAML by class_path); yields its folder and checkpoint."""
    from diffusion_pl.cli.main import main
    from diffusion_pl.evaluation.metrics.inception import WEIGHTS_ENV
    from tests.support.commands import FIT_CONFIG

    root = tmp_path_factory.mktemp("fit")
    env = {"DIFFUSION_PL_CACHE": str(root / "cache"), "TORCH_HOME": str(root / "torch")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv(WEIGHTS_ENV, raising=False)
        config = root / "fit.yaml"
        config.write_text(FIT_CONFIG.replace("ROOT", str(root)))
        assert main(["fit", "--config", str(config), f"--trainer.default_root_dir={root}"]) == 0
        yield {"root": root, "ckpt": str(next(root.rglob("*.ckpt"))), "env": env}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_fit_config):
    """`diffusion-pl fit` of the tiny recipe for 6 steps with PowerEMA (snapshots every 2 steps)."""
    import yaml

    from diffusion_pl.cli.main import main

    root = tmp_path_factory.mktemp("phema_run")
    power = {"class_path": "diffusion_pl.training.callbacks.power_ema.PowerEMA",
             "init_args": {"sigma_rels": [0.05, 0.10], "snapshot_every_n_steps": 2}}
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_fit_config(max_steps=6, logger=False, callbacks=[power])))
    run = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFUSION_PL_CACHE", str(root / "cache"))
        assert main(["fit", "--config", str(config), f"--trainer.default_root_dir={run}"]) == 0
    return run
