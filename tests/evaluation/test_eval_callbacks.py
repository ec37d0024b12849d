"""SampleGrid and FIDCallback inside short CPU fits: values, files, the reference cache, DDP, preflight."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from PIL import Image

from diffusion_pl.data.pixels import to_uint8
from diffusion_pl.evaluation.metrics.inception import WEIGHTS_ENV, InceptionWeightsError
from diffusion_pl.evaluation.fid_callback import FIDCallback
from diffusion_pl.evaluation.sample_grid import SampleGrid
from diffusion_pl.data.datamodule import ShardDataModule
from diffusion_pl.sampling.posterior import DDIM
from tests.support.evaluation import DATA, IMAGE_SIZE, recording
from tests.support.paths import WORKERS, repo_pythonpath

RecordingGrid = recording(SampleGrid)  # keeps the paths of the grids it wrote

REFERENCE_IMAGES = int(DATA.rsplit("count=", 1)[1])


@pytest.fixture(scope="module")
def single(tmp_path_factory, stand_in_features, eval_callbacks, frozen_fit):
    """One in-process fit with both callbacks and TensorBoard; its FID values are the 1-process baseline."""
    root = tmp_path_factory.mktemp("single")
    env = {"DIFFUSION_PL_CACHE": str(root / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFUSION_PL_CACHE", env["DIFFUSION_PL_CACHE"])
        extractor = stand_in_features()
        fid, grid = eval_callbacks(extractor)
        trainer = frozen_fit(root, [fid, grid], logger=TensorBoardLogger(root, name="tb"))
        yield {"root": root, "fid": fid, "grid": grid, "trainer": trainer, "extractor": extractor, "env": env}


def test_fid_is_logged_with_the_sample_count(single):
    fid = single["fid"]
    assert set(fid.last) == {"fid12/ddim_2", "fid12/heunode_1"}
    assert all(math.isfinite(v) and v > 0 for v in fid.last.values())
    assert float(single["trainer"].callback_metrics["fid12/ddim_2"]) == pytest.approx(fid.last["fid12/ddim_2"])
    # real images once (reference), then 12 generated images per sampler
    assert single["extractor"].images_seen == REFERENCE_IMAGES + 2 * 12


def test_sample_grid_png_and_tensorboard(single):
    trainer, grid = single["trainer"], single["grid"]
    path = Path(trainer.log_dir) / "samples" / "ddim_2_step2.png"
    assert grid.written == [path] and path.is_file()  # once: step 2 is also the end of training
    with Image.open(path) as image:
        mode, (width, height) = image.mode, image.size
    # conditional: 5 rows (classes) of 10 // 5 = 2 images, 1-pixel padding
    assert mode == "RGB" and (height, width) == (5 * (IMAGE_SIZE + 1) + 1, 2 * (IMAGE_SIZE + 1) + 1)
    assert list(Path(trainer.log_dir).glob("events.out.tfevents.*"))


class _ImageLogger(Logger):
    """A logger with WandbLogger's `log_image(key, images, step)` and no TensorBoard experiment."""

    name, version = "images", 0

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple] = []

    @property
    def experiment(self) -> None:
        return None

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_image(self, key, images, step=None, **kwargs) -> None:
        self.images.append((key, images, step))


def test_sample_grid_goes_to_a_log_image_logger(tmp_path, monkeypatch, frozen_fit):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    logger, grid = _ImageLogger(), RecordingGrid(every_n_steps=2, num_samples=10, sampler=DDIM(steps=2))
    frozen_fit(tmp_path, [grid], logger=logger)
    assert [(key, step) for key, _, step in logger.images] == [("samples/ddim_2", 2)]
    (image,) = logger.images[0][1]
    with Image.open(grid.written[0]) as png:  # the logged grid is the PNG written to disk, as HWC uint8
        assert image.dtype == np.uint8 and np.array_equal(image, np.asarray(png.convert("RGB")))


def test_reference_cache_is_hit_on_the_second_run(single, tmp_path, monkeypatch, stand_in_features, eval_callbacks,
                                                    frozen_fit):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", single["env"]["DIFFUSION_PL_CACHE"])
    extractor = stand_in_features()  # a new instance with the same weights: the same cache key
    fid, _ = eval_callbacks(extractor)
    frozen_fit(tmp_path, [fid])
    assert extractor.images_seen == 2 * 12  # generated images only: no real image went through it
    assert fid.last == pytest.approx(single["fid"].last, rel=1e-12)


@pytest.mark.slow
def test_ddp_two_ranks_give_the_one_rank_fid(single, tmp_path):
    # a fresh cache: rank 0 computes the reference under DDP while rank 1 waits
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFUSION_PL_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": repo_pythonpath()}
    proc = subprocess.run([sys.executable, str(WORKERS / "eval_ddp.py"), str(tmp_path), "--devices", "2"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["fid"].keys() == single["fid"].last.keys()
        for key, value in single["fid"].last.items():
            assert rank["fid"][key] == pytest.approx(value, rel=1e-6), key
    assert len(ranks[0]["grids"]) == 1 and ranks[1]["grids"] == []  # rank 0 alone writes the grid
    # rank 0 saw the reference images and its 6 of 12 samples per sampler; rank 1 only its 6
    assert ranks[0]["images_seen"] == REFERENCE_IMAGES + 2 * 6 and ranks[1]["images_seen"] == 2 * 6


def test_explicit_reference_data_is_resized_to_the_training_size(tmp_path, monkeypatch, stand_in_features,
                                                                   frozen_fit):
    """`data:` stored at 2x the training size: its images are scored as the training pipeline resizes them."""
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    big = f"builtin:shapes?size={2 * IMAGE_SIZE}&count=20"
    extractor = stand_in_features()
    fid = FIDCallback(every_n_steps=100, num_samples=4, data=big, feature_extractor=extractor)
    frozen_fit(tmp_path, [fid], max_steps=1)
    dm = ShardDataModule(shards=big, val_shards=big, batch_size=8, num_workers=0, image_size=IMAGE_SIZE,
                         random_flip=False)
    dm.setup("validate")
    features = torch.cat([extractor(to_uint8(x))[0] for x, _ in dm.val_dataloader()]).double()
    assert fid.reference.n == 20
    torch.testing.assert_close(fid.reference.feature_sum, features.sum(0))


def test_preflight_stops_fit_before_training(tmp_path, monkeypatch, frozen_fit):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    grid = RecordingGrid(every_n_steps=1, sampler=DDIM(steps=1))
    with pytest.raises(InceptionWeightsError, match="--inception_weights PATH"):
        frozen_fit(tmp_path, [FIDCallback(every_n_steps=1, num_samples=4), grid])
    assert grid.written == [] and grid.image_shape is None  # no training batch was run


def test_sample_grid_layout():
    unconditional = SampleGrid(num_samples=10)
    indices, labels, nrow = unconditional.layout(None)
    assert indices == list(range(10)) and labels is None and nrow == 4
    indices, labels, nrow = SampleGrid(num_samples=64).layout(10)  # one row per class
    assert nrow == 6 and labels == [k for k in range(10) for _ in range(6)] and len(indices) == 60
    with pytest.raises(ValueError, match="every_n_steps"):
        SampleGrid(every_n_steps=0)


class _CountingFID(FIDCallback):
    """FIDCallback that records the global step of every evaluation."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[int] = []

    def evaluate(self, trainer, pl_module):
        self.steps.append(trainer.global_step)
        return super().evaluate(trainer, pl_module)


def test_callbacks_fire_once_per_reached_step_under_accumulation(tmp_path, monkeypatch, stand_in_features,
                                                                   eval_module):
    """accumulate_grad_batches=2: step 0 (untrained) never fires, and a resumed run does not repeat its step."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))

    def run(max_steps: int, ckpt_path=None):
        fid = _CountingFID(every_n_steps=1, num_samples=4, sampler=DDIM(steps=1), feature_extractor=stand_in_features(),
                           batch_size=4)
        grid = RecordingGrid(every_n_steps=1, num_samples=2, sampler=DDIM(steps=1), at_train_end=False)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=2,
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, limit_val_batches=0, callbacks=[fid, grid, ckpt])
        trainer.fit(eval_module(num_classes=5), ShardDataModule(shards=DATA, batch_size=4, num_workers=0),
                    ckpt_path=ckpt_path)
        return fid, grid

    fid, grid = run(2)
    assert fid.steps == [1, 2]
    assert [p.name for p in grid.written] == ["ddim_1_step1.png", "ddim_1_step2.png"]
    fid, grid = run(3, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert fid.steps == [3]
    assert [p.name for p in grid.written] == ["ddim_1_step3.png"]


def test_two_grids_with_the_same_sampler_keep_their_own_files_and_tags(tmp_path, monkeypatch, frozen_fit):
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    grids = [RecordingGrid(every_n_steps=2, num_samples=5, sampler=DDIM(steps=2), seed=seed)
             for seed in (0, 1)]
    named = RecordingGrid(every_n_steps=2, num_samples=5, sampler=DDIM(steps=2), name="cfg")
    logger = _ImageLogger()
    frozen_fit(tmp_path, [*grids, named], logger=logger)
    assert [p.name for g in (*grids, named) for p in g.written] == ["ddim_2_step2.png", "ddim_2_2_step2.png",
                                                                    "cfg_ddim_2_step2.png"]
    assert [key for key, _, _ in logger.images] == ["samples/ddim_2", "samples/ddim_2_2", "samples/cfg_ddim_2"]
    first, second = (np.asarray(Image.open(g.written[0])) for g in grids)
    assert not np.array_equal(first, second)  # seed 1's grid did not overwrite seed 0's


def test_sample_grid_name_is_checked():
    with pytest.raises(ValueError, match="name 'a/b' is invalid"):
        SampleGrid(name="a/b")


def test_log_image_reaches_each_logger_through_its_own_api(tmp_path):
    from unittest import mock

    from lightning.pytorch.loggers import CometLogger, CSVLogger, MLFlowLogger, WandbLogger

    from diffusion_pl.evaluation.image_logging import log_image

    grid = torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8)
    hwc = grid.permute(1, 2, 0).numpy()
    tensorboard, wandb = mock.MagicMock(spec=TensorBoardLogger), mock.MagicMock(spec=WandbLogger)
    mlflow, comet = mock.MagicMock(spec=MLFlowLogger), mock.MagicMock(spec=CometLogger)
    csv_logger = CSVLogger(tmp_path)
    loggers = [tensorboard, wandb, mlflow, comet, csv_logger]
    assert log_image(loggers, "samples/ddim_2", grid, 7) == loggers[:4]
    (tag, image), kwargs = tensorboard.experiment.add_image.call_args
    assert tag == "samples/ddim_2" and torch.equal(image, grid) and kwargs == {"global_step": 7}
    kwargs = wandb.log_image.call_args.kwargs
    assert kwargs["key"] == "samples/ddim_2" and kwargs["step"] == 7 and np.array_equal(kwargs["images"][0], hwc)
    (run_id, image), kwargs = mlflow.experiment.log_image.call_args
    assert run_id is mlflow.run_id and np.array_equal(image, hwc)
    assert kwargs == {"artifact_file": "samples/ddim_2/step_000000007.png"}
    (image,), kwargs = comet.experiment.log_image.call_args
    assert np.array_equal(image, hwc) and kwargs == {"name": "samples/ddim_2", "step": 7}
    with pytest.raises(ValueError, match=r"expected uint8 \(3, H, W\)"):
        log_image(loggers, "x", grid.float(), 7)
