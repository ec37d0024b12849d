"""What the command tests share: the recipe of the 2-step `diffusion-pl fit` behind the `run` fixture
(tests/conftest.py), the DDIM specs the sample and evaluate records hold, and the one-line error check."""

from __future__ import annotations

from diffusion_pl.cli.main import main
from tests.support.evaluation import DATA, IMAGE_SIZE, STAND_IN

FIT_CONFIG = f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: ROOT, name: csv}}
  callbacks:
    - class_path: diffusion_pl.evaluation.sample_grid.SampleGrid
      init_args:
        every_n_steps: 2
        num_samples: 5
        sampler: [{{class_path: diffusion_pl.sampling.posterior.DDIM, init_args: {{steps: 2}}}}]
    - class_path: diffusion_pl.evaluation.fid_callback.FIDCallback
      init_args:
        every_n_steps: 2
        num_samples: 6
        sampler: {{class_path: diffusion_pl.sampling.ode.HeunODE, init_args: {{steps: 1}}}}
        feature_extractor: {{class_path: {STAND_IN}}}
model:
  net:
    class_path: diffusion_pl.networks.unet.UNet
    init_args: {{img_resolution: {IMAGE_SIZE}, model_channels: 8, channel_mult: [1, 2], num_res_blocks: 1,
                attn_resolutions: [], dropout: 0.0, num_classes: 5}}
  process: {{class_path: diffusion_pl.processes.variance_preserving.VPLinear}}
  ema_decay: 0.5
data:
  class_path: diffusion_pl.data.datamodule.ShardDataModule
  init_args: {{shards: "{DATA}", batch_size: 8, num_workers: 0}}
"""


DDIM_ETA1 = '{"class_path": "diffusion_pl.sampling.posterior.DDIM", "init_args": {"eta": 1.0}}'


def ddim_spec(steps: int = 2, eta: float = 0.0, grid: dict | None = None) -> dict:
    """The resolved spec of DDIM as sample_config.json and the evaluate report record it (defaults included)."""
    return {"class_path": "diffusion_pl.sampling.posterior.DDIM",
            "init_args": {"steps": steps, "grid": grid, "final_denoise": True, "eta": eta}}


def one_line_error(capsys, argv, *words):
    """Run a command expected to fail on its input: exit 2, one `diffusion-pl import: error:` line naming `words`."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0 and err.startswith(f"diffusion-pl {argv[0]}: error:"), err
    assert all(word in err for word in words), err
    return err
