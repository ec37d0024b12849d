"""The tiny `diffusion-pl fit` recipe and the crash-in-a-write script lines shared by the fit tests (the
`tiny_fit_config` fixture hands the recipe to test bodies)."""

from __future__ import annotations


def tiny_fit_config(**trainer: object) -> dict:
    """A `diffusion-pl fit` recipe that trains in well under a second per step: a 8-channel U-Net on the
    built-in 8x8 shapes (5 classes), its shape filled from the data; `trainer` entries override."""
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 5, "enable_progress_bar": False,
                    "enable_model_summary": False, "limit_val_batches": 0, **trainer},
        "model": {
            "net": {"class_path": "diffusion_pl.networks.unet.UNet",
                    "init_args": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                  "attn_resolutions": [], "dropout": 0.0}},
            "process": {"class_path": "diffusion_pl.processes.variance_preserving.VPLinear"},
            "ema_decay": 0.5,
        },
        "data": {"class_path": "diffusion_pl.data.datamodule.ShardDataModule",
                 "init_args": {"shards": "builtin:shapes?size=8&count=64", "batch_size": 4, "num_workers": 0}},
    }


# Script lines that make the next torch.save write half its bytes, fsync them and SIGKILL the process:
# a crash in the middle of a write, for the subprocess crash-safety tests (insert after the imports).
DYING_TORCH_SAVE = """
real_save = torch.save
def dying_save(obj, f, *args, **kwargs):
    buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
"""
