"""`TF32`: the TensorFloat-32 policy of a run, from a recipe.

On Ampere and newer NVIDIA GPUs, float32 matmuls and convolutions can run on the tensor cores in
TensorFloat-32 (10-bit mantissa inputs, float32 accumulation), several times faster. PyTorch's defaults
differ between the two: float32 matmuls are exact (`torch.get_float32_matmul_precision() == "highest"`)
while cuDNN convolutions may use TF32 (`torch.backends.cudnn.allow_tf32 = True`). DiT trains with both on
(facebookresearch/DiT train.py:12-13); EDM trains with both off (NVlabs/edm training/training_loop.py:55-56).
A recipe has no Python line to set them, so this callback does, for the run's life:

    trainer:
      callbacks:
        - class_path: diffusion_pl.training.callbacks.tf32.TF32
          init_args: {matmul: true, cudnn: true}   # DiT's policy; {matmul: false, cudnn: false} is EDM's

Both are process-wide settings of PyTorch: they apply to everything the process runs (sampling and FID
callbacks included) until the run ends, when the previous values come back. On a CPU they change nothing.
"""

from __future__ import annotations

import lightning as L
import torch

from diffusion_pl.utils.errors import UserValueError

__all__ = ["TF32"]


class TF32(L.Callback):
    """Allow (or forbid) TF32 in float32 matmuls and cuDNN convolutions while the run lasts.

    Args:
        matmul: float32 matmuls in TF32 (`torch.set_float32_matmul_precision("high")`); False: exact
            ("highest", PyTorch's default).
        cudnn: cuDNN convolutions in TF32 (`torch.backends.cudnn.allow_tf32`, True by PyTorch's default).
    """

    def __init__(self, matmul: bool = True, cudnn: bool = True) -> None:
        for name, value in (("matmul", matmul), ("cudnn", cudnn)):
            if not isinstance(value, bool):
                raise UserValueError(f"TF32: {name}={value!r}: expected true or false")
        self.matmul, self.cudnn = matmul, cudnn
        self._previous: tuple[str, bool] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is None:
            self._previous = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        torch.set_float32_matmul_precision("high" if self.matmul else "highest")
        torch.backends.cudnn.allow_tf32 = self.cudnn

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            precision, torch.backends.cudnn.allow_tf32 = self._previous
            torch.set_float32_matmul_precision(precision)
            self._previous = None
