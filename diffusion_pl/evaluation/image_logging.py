"""log_image: one image (a sample grid) to every logger of a run that takes images.

Lightning's Logger interface has no image method; each logger's own API is called here:

    TensorBoardLogger   experiment.add_image(tag, image CHW uint8, global_step=step)       (SummaryWriter)
    WandbLogger         log_image(key=tag, images=[image HWC uint8], step=step)            (Lightning's method)
    MLFlowLogger        experiment.log_image(run_id, image HWC uint8, artifact_file=...)    (MlflowClient, mlflow>=2)
                        as the artifact `<tag>/step_<step, 9 digits>.png`
    CometLogger         experiment.log_image(image HWC uint8, name=tag, step=step)         (comet_ml Experiment)
    any other logger    its own `log_image(key=, images=, step=)` when it has one (W&B's signature), else nothing

CSVLogger and loggers without images are skipped. The logger classes are Lightning's, importable without their
packages; their experiments are only touched here, when a grid is logged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.loggers import CometLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

__all__ = ["log_image"]


def log_image(loggers: Iterable[Logger], tag: str, image: torch.Tensor, step: int) -> list[Logger]:
    """Log `image`, uint8 (3, H, W), under `tag` at `step` to each logger that takes images; returns those loggers."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"log_image: image is {image.dtype} {tuple(image.shape)}: expected uint8 (3, H, W)")
    chw = image.detach().cpu()
    hwc = chw.permute(1, 2, 0).contiguous().numpy()
    logged = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, chw, global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[hwc], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, hwc, artifact_file=f"{tag}/step_{step:09d}.png")
        elif isinstance(logger, CometLogger):
            logger.experiment.log_image(hwc, name=tag, step=step)
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=tag, images=[hwc], step=step)
        else:
            continue
        logged.append(logger)
    return logged
