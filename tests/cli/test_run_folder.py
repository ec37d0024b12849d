"""`diffusion-pl fit` run folders, through the command line: resume loads what it announces, the final
step is saved, one run per folder, one option moves the whole run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_pl.cli.main import main
from diffusion_pl.cli.run_folder import LOCK_NAME
from tests.support.fit import tiny_fit_config
from tests.support.paths import REPO


TINY = tiny_fit_config(callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                    "init_args": {"every_n_train_steps": 3, "save_top_k": -1, "save_last": True}}])


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Path:
    """The tiny recipe as a file; the working directory and cache are the test's own."""
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _fit(config: Path, run: Path, *args: str) -> int:
    return main(["fit", "--config", str(config), f"--trainer.default_root_dir={run}", *args])


def test_final_step_is_saved_when_max_steps_is_not_a_multiple(tiny, tmp_path):
    """every_n_train_steps 3, max_steps 5: steps 4 and 5 used to be lost."""
    run = tmp_path / "run"
    assert _fit(tiny, run) == 0
    ckpts = run / "checkpoints"
    assert _step(ckpts / "last.ckpt") == 5
    assert sorted(_step(p) for p in ckpts.glob("epoch=*.ckpt")) == [3, 5]


@pytest.mark.slow
def test_ckpt_path_last_resumes_from_the_newest_step_not_last_ckpt(tiny, tmp_path, capsys, monkeypatch):
    """A step-5 checkpoint and an older last.ckpt (step 3): the resumed run continues from step 5."""
    from diffusion_pl.training.module import DiffusionModule

    started_at = []  # the global step each fit starts training from (exact resume makes weights no witness)
    monkeypatch.setattr(DiffusionModule, "on_train_start", lambda self: started_at.append(self.global_step),
                        raising=False)
    run = tmp_path / "run"
    assert _fit(tiny, run) == 0
    ckpts = run / "checkpoints"
    newest = next(p for p in ckpts.glob("epoch=*.ckpt") if _step(p) == 5)
    shutil.copy(next(p for p in ckpts.glob("epoch=*.ckpt") if _step(p) == 3), ckpts / "last.ckpt")
    os.utime(ckpts / "last.ckpt")  # the newest file by time, the oldest by step
    capsys.readouterr()
    assert _fit(tiny, run, "--ckpt_path", "last", "--trainer.max_steps", "7") == 0
    err = capsys.readouterr().err
    assert f"resuming from {newest} (step 5)" in err
    assert started_at == [0, 5]
    # the resumed run restored step 5: it saved step 6 (every 3) and the final step 7, never step 4 again
    steps = sorted(_step(p) for p in ckpts.glob("epoch=*.ckpt"))
    assert steps == [3, 5, 6, 7]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["ckpt_path"] == str(newest)


def test_second_fit_into_a_used_folder_is_refused(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert _fit(tiny, run) == 0
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    capsys.readouterr()
    assert _fit(tiny, run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"diffusion-pl fit: error: run folder {run} holds a previous run")
    assert "--ckpt_path last" in err[-1] and "--overwrite" in err[-1]
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before  # nothing replaced


@pytest.mark.slow
def test_overwrite_starts_over_and_keeps_other_files(tiny, tmp_path):
    run = tmp_path / "run"
    assert _fit(tiny, run) == 0
    (run / "notes.txt").write_text("mine")
    assert _fit(tiny, run, "--overwrite", "--trainer.max_steps", "2") == 0
    assert sorted(_step(p) for p in (run / "checkpoints").iterdir()) == [2, 2]  # step-2 checkpoint, last.ckpt
    assert _step(run / "checkpoints" / "last.ckpt") == 2
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_concurrent_fit_into_the_same_folder_is_refused(tiny, tmp_path):
    """The first run holds the folder's lock for its whole life; the second stops at once with one line."""
    run = tmp_path / "run"
    env = {**os.environ, "DIFFUSION_PL_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "diffusion_pl", "fit", "--config", str(tiny), f"--trainer.default_root_dir={run}"]
    first = subprocess.Popen([*cmd, "--trainer.max_steps", "100000"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(run.glob("events.out.tfevents.*")):  # the logger starts with training
            assert first.poll() is None and time.time() < deadline, "the first fit did not start"
            time.sleep(0.2)
        second = subprocess.run([*cmd, "--trainer.max_steps", "2"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        last = second.stderr.strip().splitlines()[-1]
        assert last == (f"diffusion-pl fit: error: run folder {run} is in use by another `diffusion-pl fit` "
                        f"(pid {first.pid}): expected one run per folder; wait for it, or set "
                        "--trainer.default_root_dir to another folder")
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait(timeout=60)
    # a killed run leaves its lock file, but not its lock: the folder is usable with --ckpt_path last
    assert (run / LOCK_NAME).exists()
    assert _fit(tiny, run, "--ckpt_path", "last", "--trainer.max_steps", "1") == 0


@pytest.mark.slow
def test_one_option_moves_the_whole_run(tmp_path, monkeypatch):
    """The quickstart recipe with --trainer.default_root_dir elsewhere: nothing lands in its own runs/ folder."""
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["trainer"]["max_steps"] = 2
    config["model"]["net"]["init_args"].update(model_channels=8, channel_mult=[1, 2])
    config["data"]["init_args"].update(batch_size=4, num_workers=0)
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("SampleGrid"):
            callback["init_args"].update(every_n_steps=2, num_samples=4)
            callback["init_args"]["sampler"]["init_args"]["steps"] = 1
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(config))
    mine = tmp_path / "elsewhere" / "mine"
    assert main(["fit", "--config", "quick.yaml", f"--trainer.default_root_dir={mine}"]) == 0
    assert not (tmp_path / "runs").exists()
    assert (mine / "config.yaml").is_file()
    assert _step(mine / "checkpoints" / "last.ckpt") == 2
    assert list((mine / "samples").glob("*.png"))
    assert list(mine.glob("events.out.tfevents.*"))


def test_network_shape_is_filled_from_the_data(tiny, tmp_path, capsys):
    """Grey 8x8 shards and a recipe without in_channels / img_resolution: the net is built 1-channel 8x8."""
    import numpy as np

    from diffusion_pl.data.writer import Sample, write_shards
    from diffusion_pl.data.png import encode_png
    from diffusion_pl.training.module import load_module

    grey = np.random.default_rng(0).integers(0, 256, (12, 8, 8), dtype=np.uint8)
    write_shards((Sample(f"{i:04d}", encode_png(g), "png", i % 5, (8, 8, 1)) for i, g in enumerate(grey)),
                 tmp_path / "grey", classes=[str(c) for c in range(5)], shard_size=6)
    run = tmp_path / "run"
    assert _fit(tiny, run, f"--data.init_args.shards={tmp_path / 'grey'}", "--trainer.max_steps", "1") == 0
    assert "model.net in_channels=1, img_resolution=8 (from the data)" in capsys.readouterr().err
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["net"]["init_args"]
    assert (saved["in_channels"], saved["img_resolution"]) == (1, 8)
    module = load_module(str(run / "checkpoints" / "last.ckpt"))
    assert (module.net.in_channels, module.net.img_resolution) == (1, 8)
