"""A latent checkpoint records its autoencoder (`Autoencoder.spec()` under checkpoint["autoencoder_spec"]); loading it
(`load_module`, resuming `fit`) refuses, in one line, a rebuilt autoencoder that no longer gives the same latents."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffusion_pl.cli.main import main
from diffusion_pl.data.datamodule import ShardDataModule
from diffusion_pl.utils.errors import UserError
from diffusion_pl.codecs.base import Pixels
from diffusion_pl.codecs.latent import SPEC_KEY, LatentCodec
from diffusion_pl.training.module import load_module
from tests.support.latent import TINY_VAE_CONFIG, tiny_autoencoder
from tests.support.paths import REPO

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
IMAGES = "builtin:shapes?size=16&count=16"
# model.autoencoder as configs/cpu_latent_tiny.yaml's checkpoints saved it before codecs existed (hyper_parameters)
SAVED_BEFORE_CODECS = {"class_path": "diffusion_pl.codecs.autoencoder.Autoencoder", "init_args": {
    "pretrained": None, "subfolder": None, "config": TINY_VAE_CONFIG, "seed": 0, "scale": 0.5, "shift": None,
    "dtype": "float32", "latent_stats": None, "download_timeout": 10.0}}


def _vae_folder(path: Path, seed: int) -> Path:
    """A local diffusers AutoencoderKL folder holding the tiny VAE with `seed`'s random weights."""
    tiny_autoencoder(seed=seed).vae.save_pretrained(path)
    return path


def _fit(root: Path, *overrides: str) -> Path:
    assert main(["fit", "--config", str(REPO / "configs" / "cpu_latent_tiny.yaml"), "--trainer.max_steps=1",
                 f"--trainer.default_root_dir={root}", f"--data.init_args.shards={IMAGES}",
                 "--data.init_args.batch_size=4", "--trainer.callbacks=[]", *overrides]) == 0
    return next(root.rglob("*.ckpt"))


def _forge(ckpt: Path, out: Path, **spec_changes) -> Path:
    checkpoint = torch.load(ckpt, weights_only=True, map_location="cpu")
    if spec_changes.pop("drop", False):
        del checkpoint[SPEC_KEY]
    checkpoint.get(SPEC_KEY, {}).update(spec_changes)
    torch.save(checkpoint, out)
    return out


def _refused(fn, *args) -> str:
    with pytest.raises(UserError) as err:
        fn(*args)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.slow
def test_load_module_refuses_a_vae_folder_whose_weights_changed(tmp_path):
    vae = _vae_folder(tmp_path / "vae", seed=0)
    ckpt = _fit(tmp_path / "run", f"--model.autoencoder.init_args.pretrained={vae}",
                "--model.autoencoder.init_args.config=null")
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")[SPEC_KEY]
    assert saved == tiny_autoencoder(scale=0.5).spec() | {"pretrained": str(vae)}  # the config-built identity
    assert load_module(str(ckpt)).codec.spec() == saved
    _vae_folder(vae, seed=1)  # the folder's weights change after training
    message = _refused(load_module, str(ckpt))
    assert message.startswith(f"checkpoint {ckpt} was trained with autoencoder pretrained: {vae} (weights sha256 "
                              f"{saved['weights_sha256'][:12]}) but pretrained: {vae} now gives "
                              f"{tiny_autoencoder(seed=1).spec()['weights_sha256'][:12]}: expected the same VAE")


@pytest.mark.slow
def test_load_module_checks_the_saved_spec_and_loads_older_checkpoints(tmp_path):
    ckpt = _fit(tmp_path / "run")
    spec = torch.load(ckpt, weights_only=True, map_location="cpu")[SPEC_KEY]
    assert spec == tiny_autoencoder(scale=0.5).spec()
    for change, what in [({"weights_sha256": "0" * 64}, "weights sha256 000000000000"),
                         ({"config_sha256": "1" * 64}, "config sha256 111111111111"),
                         ({"scale": 0.25}, "scale 0.25"), ({"latent_stats_sha256": "2" * 64}, "latent stats sha256")]:
        forged = _forge(ckpt, tmp_path / "forged.ckpt", **change)
        message = _refused(load_module, str(forged))
        assert f"checkpoint {forged} was trained with autoencoder a config-built VAE ({what}" in message, message
    older = _forge(ckpt, tmp_path / "older.ckpt", drop=True)  # written before checkpoints recorded the spec
    assert load_module(str(older)).codec.spec() == spec


def test_resuming_fit_refuses_another_autoencoder(tmp_path):
    import lightning as L

    from diffusion_pl.training.module import DiffusionModule
    from diffusion_pl.networks.unet import UNet
    from diffusion_pl.processes.variance_preserving import VPLinear

    def fit(ae, steps, ckpt_path=None):
        torch.manual_seed(0)
        net = UNet(img_resolution=8, in_channels=4, model_channels=8, channel_mult=(1,), num_res_blocks=1,
                   attn_resolutions=())
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
        data = ShardDataModule(shards=IMAGES, batch_size=4, num_workers=0)
        trainer.fit(DiffusionModule(net, VPLinear(), autoencoder=ae), data, ckpt_path=ckpt_path)
        return trainer

    trainer = fit(tiny_autoencoder(), 1)
    ckpt = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(ckpt)
    fit(tiny_autoencoder(), 2, str(ckpt))  # the same VAE resumes
    message = _refused(fit, tiny_autoencoder(seed=1), 2, str(ckpt))
    assert message.startswith(f"checkpoint {ckpt} was trained with autoencoder a config-built VAE (weights sha256")
    # the rule itself: a pixel-space module or a checkpoint without a spec is not checked
    LatentCodec(tiny_autoencoder(seed=1)).check_checkpoint({})
    Pixels().check_checkpoint({SPEC_KEY: tiny_autoencoder().spec()})


@pytest.mark.slow
def test_saved_configs_of_latent_checkpoints_from_before_codecs_load_and_resume(tmp_path):
    """`load_module` and `fit --ckpt_path` (LightningCLI parses the saved hyper_parameters over the recipe) rebuild
    the latent codec from a saved `autoencoder:` entry."""
    checkpoint = torch.load(_fit(tmp_path / "run"), weights_only=True, map_location="cpu")
    checkpoint["hyper_parameters"]["autoencoder"] = SAVED_BEFORE_CODECS
    del checkpoint["callbacks"]  # their state names the first run's folder, not the one resumed into below
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    module = load_module(str(old))
    assert isinstance(module.codec, LatentCodec) and module.codec.spec() == checkpoint[SPEC_KEY]
    assert module.codec.pixel_shape((4, 8, 8)) == (3, 16, 16)
    resumed = _fit(tmp_path / "resumed", "--trainer.max_steps=2", f"--ckpt_path={old}")
    assert torch.load(resumed, weights_only=True, map_location="cpu")["global_step"] == 2
