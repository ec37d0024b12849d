"""Latent diffusion in DiffusionModule: training on latents (shards and on-the-fly), bit-exact resume, the frozen
autoencoder kept out of the optimizer / EMA / checkpoint, decoded samples, FID on decoded images, refused data."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_pl.training.callbacks.checkpointing import AtomicCheckpointIO
from diffusion_pl.evaluation.fid_callback import FIDCallback
from diffusion_pl.data.writer import Sample, write_shards
from diffusion_pl.data.datamodule import ShardDataModule
from diffusion_pl.data.png import encode_png
from diffusion_pl.utils.errors import UserError
from diffusion_pl.evaluation.generation import generate
from diffusion_pl.codecs.base import Pixels
from diffusion_pl.codecs.latent import LatentCodec, codec_for
from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.training.shapes import check_data_fits
from diffusion_pl.networks.unet import UNet
from diffusion_pl.processes.variance_preserving import VPLinear
from diffusion_pl.sampling.posterior import DDIM
from tests.support.latent import tiny_autoencoder

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
IMAGES = "builtin:shapes?size=16&count=48"  # 16 x 16 images -> 4 x 8 x 8 latents of the tiny VAE


def make_net(in_channels: int = 4, size: int = 8) -> UNet:
    torch.manual_seed(0)
    return UNet(img_resolution=size, in_channels=in_channels, model_channels=8, channel_mult=(1, 2),
                num_res_blocks=1, attn_resolutions=(), dropout=0.1)


def make_module(autoencoder=None, **kwargs) -> DiffusionModule:
    return DiffusionModule(make_net(), VPLinear(), autoencoder=autoencoder or tiny_autoencoder(), ema_decay=0.5,
                           **kwargs)


def latent_shards(out, ae, n: int = 24) -> str:
    from diffusion_pl.data.latents import LatentEncoder

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(n)]
    encoder = LatentEncoder(ae, batch_size=8, device="cpu", flips=True)
    write_shards([Sample(f"{i:08d}", encode_png(im), "png", i % 3) for i, im in enumerate(images)], out,
                 classes=["a", "b", "c"], shard_size=8, records=encoder.records, meta=encoder.manifest_fields)
    return str(out)


def _fit(root, module, data: ShardDataModule, max_steps: int, ckpt_path=None, callbacks=()):
    L.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=2, save_top_k=-1, save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, plugins=[AtomicCheckpointIO()],
                        limit_val_batches=0, callbacks=[ckpt, *callbacks])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def test_batches_become_posterior_samples():
    ae = tiny_autoencoder()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = ae.encode(images)
    torch.manual_seed(5)
    from_shards = LatentCodec(ae).encode(torch.cat([mean, std], dim=1))  # the step's reseeded global generator
    torch.manual_seed(5)
    on_the_fly = LatentCodec(ae).encode(images)
    expected = ae.sample_latents(mean, std, torch.Generator().manual_seed(5))
    assert torch.equal(from_shards, expected) and torch.equal(on_the_fly, expected)
    assert Pixels().encode(images) is images
    with pytest.raises(UserError, match=r"expected images \(B, 3, H, W\) or a latent posterior \(B, 8, h, w\)"):
        LatentCodec(ae).encode(torch.zeros(2, 5, 8, 8))


def test_training_keeps_the_autoencoder_frozen_and_out_of_optimizer_ema_checkpoint(tmp_path):
    module = make_module()
    vae_before = {k: v.clone() for k, v in module.codec.autoencoder.vae.state_dict().items()}
    net_before = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = _fit(tmp_path, module, ShardDataModule(shards=IMAGES, batch_size=4, num_workers=0), 2)
    vae_ids = {id(p) for p in module.codec.autoencoder.vae.parameters()}
    optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert optimized and not vae_ids & {id(p) for p in optimized}
    assert {id(p) for p in optimized} == {id(p) for p in module.net.parameters()}
    assert not vae_ids & {id(p) for p in module.parameters()}  # not a submodule: not in the EMA copy either
    assert len(list(module.ema.parameters())) == len(list(module.net.parameters()))
    assert all(torch.equal(v, vae_before[k]) for k, v in module.codec.autoencoder.vae.state_dict().items())
    assert any(not torch.equal(v, net_before[k]) for k, v in module.net.state_dict().items())  # it trained
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(k.startswith(("net.", "ema.")) for k in state)
    assert not any(k.startswith(("autoencoder", "vae")) or ".vae." in k for k in state)
    # sampling decodes: the network samples 4 x 8 x 8 latents, generate yields 16 x 16 pixels
    (idx, images, _, nfe), = generate(module, DDIM(steps=2), range(3), (4, 8, 8))
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8 and nfe == 2


def _state(module, trainer) -> dict:
    state = {f"net.{k}": v for k, v in module.net.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in module.ema.state_dict().items()})
    opt = trainer.optimizers[0].state_dict()["state"]
    state.update({f"opt.{i}.{k}": v for i, s in opt.items() for k, v in s.items() if torch.is_tensor(v)})
    return state


def test_resume_is_bit_exact_on_latent_shards(tmp_path):
    """4 steps straight == 2 steps + resume from the step-2 checkpoint + 2 steps, on latent shards (posterior drawn
    each step from the per-step generator)."""
    shards = latent_shards(tmp_path / "latents", tiny_autoencoder())

    def data():
        return ShardDataModule(shards=shards, batch_size=4, num_workers=0, shuffle_buffer=8)

    straight = make_module()
    t_straight = _fit(tmp_path / "a", straight, data(), 4)
    _fit(tmp_path / "b", make_module(), data(), 2)
    resumed = make_module()
    t_resumed = _fit(tmp_path / "b", resumed, data(), 4, ckpt_path=str(tmp_path / "b" / "checkpoints" /
                                                                       "epoch=0-step=2.ckpt"))
    a, b = _state(straight, t_straight), _state(resumed, t_resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs")


def test_validation_loss_on_latents_is_deterministic(tmp_path):
    shards = latent_shards(tmp_path / "latents", tiny_autoencoder(), n=8)
    module = make_module()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    data = ShardDataModule(shards=shards, val_shards=shards, batch_size=4, num_workers=0)
    values = [trainer.validate(module, data, verbose=False)[0]["val/loss"] for _ in range(2)]
    assert np.isfinite(values[0]) and values[0] == values[1]


def test_data_that_does_not_fit_is_refused_in_one_line(tmp_path):
    ae = tiny_autoencoder()
    shards = latent_shards(tmp_path / "latents", ae, n=8)
    data = ShardDataModule(shards=shards, batch_size=4, num_workers=0)
    check_data_fits(make_net(), data, codec_for(ae))  # the encoding VAE, the net's latent shape: accepted
    for autoencoder, net, match in [
            (tiny_autoencoder(seed=1), make_net(), "weights_sha256"),  # another VAE's latents
            (None, make_net(), "has no autoencoder"),
            (ae, make_net(size=16), "img_resolution=16x16 but the latent shards give 8x8 latents")]:
        with pytest.raises(UserError) as err:
            check_data_fits(net, data, codec_for(autoencoder))
        assert match in str(err.value) and "\n" not in str(err.value)
    images = ShardDataModule(shards=IMAGES, batch_size=4, num_workers=0)
    check_data_fits(make_net(), images, codec_for(ae))  # 16 x 16 images encode to 4 x 8 x 8
    with pytest.raises(UserError, match="img_resolution=16x16 but the 16x16 images give 8x8 latents"):
        check_data_fits(make_net(size=16), images, codec_for(ae))
    with pytest.raises(UserError, match="in_channels=3 but the autoencoder has 4 latent channels"):
        DiffusionModule(make_net(in_channels=3), VPLinear(), autoencoder=ae)
    # a module whose autoencoder differs from the shards' stops before training, in one line
    with pytest.raises(UserError, match="weights_sha256"):
        _fit(tmp_path / "run", make_module(tiny_autoencoder(seed=1)), data, 1)


def test_fid_callback_scores_decoded_images(tmp_path, monkeypatch, stand_in_features, recording):
    """Latent shards train the module; FID reference images are pixels at the decoded size (16), the stand-in
    extractor sees decoded uint8 images."""
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))  # the reference is computed, not cached
    shards = latent_shards(tmp_path / "latents", tiny_autoencoder(), n=8)
    extractor = stand_in_features()
    fid = recording(FIDCallback)(every_n_steps=1, num_samples=4, data=IMAGES, sampler=DDIM(steps=2),
                                 feature_extractor=extractor, batch_size=4)
    _fit(tmp_path / "run", make_module(), ShardDataModule(shards=shards, batch_size=4, num_workers=0), 1,
         callbacks=[fid])
    assert set(fid.last) == {"fid4/ddim_2"} and np.isfinite(fid.last["fid4/ddim_2"])
    assert fid.image_shape == (4, 8, 8)  # what the network samples; the extractor got pixels (asserted 3 channels)
    assert extractor.images_seen == 48 + 4  # the reference images, then the decoded samples


def test_a_guide_must_share_the_latent_space():
    from diffusion_pl.evaluation.generation import guide_mismatch

    module = make_module()
    assert guide_mismatch(module, make_module()) is None
    assert "latent space" in guide_mismatch(module, make_module(tiny_autoencoder(seed=1)))
    assert "latent space" in guide_mismatch(module, make_module(tiny_autoencoder(scale=1.0)))
