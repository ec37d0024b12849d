"""REPA (diffusion_pl/training/repa.py): the alignment loss, the projector, the frozen encoder kept out of the
optimizer / EMA / state_dict, where gradients go, and a fit from YAML that logs train/repa."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from diffusion_pl.cli.main import main
from diffusion_pl.networks.dit import dit_tiny
from diffusion_pl.networks.unet import UNet
from diffusion_pl.processes.interpolants import RectifiedFlow
from diffusion_pl.training.module import DiffusionModule, load_module
from diffusion_pl.training.repa import (EncoderWeightsError, ImageEncoder, RepresentationAlignment,
                                        alignment_loss)
from diffusion_pl.utils.errors import UserValueError

# a 2-block ViT with 4-pixel patches and random weights: small and fast on a CPU
TINY_ENCODER = dict(name="vit_tiny_patch16_224", pretrained=False, model_args={"depth": 2, "patch_size": 4})


def tiny_repa(block: str = "blocks.1", **kwargs) -> RepresentationAlignment:
    return RepresentationAlignment(ImageEncoder(**TINY_ENCODER), block=block, projector_dim=32, **kwargs)


def tiny_module(**kwargs) -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(dit_tiny(img_resolution=16, num_classes=5), RectifiedFlow(), repa=tiny_repa(), **kwargs)


def test_alignment_loss_is_minus_the_mean_token_cosine():
    g = torch.Generator().manual_seed(0)
    projected, features = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    # one token at a time: -cos(a, b) = -a.b / (|a| |b|), averaged over the tokens of each sample
    expected = torch.tensor([-sum(float(F.cosine_similarity(projected[i, j], features[i, j], dim=0))
                                  for j in range(5)) / 5 for i in range(3)])
    assert torch.allclose(alignment_loss(projected, features), expected, atol=1e-6)
    # aligned tokens (any positive scale) give the minimum, -1
    assert torch.allclose(alignment_loss(features * 3.0, features), torch.full((3,), -1.0), atol=1e-6)


@pytest.mark.skipif(not os.environ.get("DIFFUSION_PL_REPA_REPO"),
                    reason="DIFFUSION_PL_REPA_REPO (a checkout of sihyun-yu/REPA, checked at 67f7145) not set")
def test_alignment_loss_is_repas_projection_loss(monkeypatch):
    """REPA's own SILoss (loss.py, loaded from the checkout and run unchanged) on the same (8, 256, 768) tokens:
    its proj_loss is the batch mean of `alignment_loss`."""
    spec = importlib.util.spec_from_file_location("repa_reference_loss",
                                                  os.path.join(os.environ["DIFFUSION_PL_REPA_REPO"], "loss.py"))
    reference = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, reference)
    spec.loader.exec_module(reference)
    g = torch.Generator().manual_seed(0)
    projected, features = torch.randn(8, 256, 768, generator=g), torch.randn(8, 256, 768, generator=g)
    images = torch.randn(8, 4, 4, 4, generator=g)
    _, proj_loss = reference.SILoss()(lambda x, t: (torch.zeros_like(x), [projected]), images, zs=[features])
    assert torch.allclose(alignment_loss(projected, features).mean(), proj_loss, rtol=0, atol=1e-6)


def test_projector_is_reprs_three_layer_silu_mlp_into_the_encoder_width():
    repa = tiny_module().repa
    layers = list(repa.projector)
    assert [type(m) for m in layers] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    # dit_tiny's width 64 in, projector_dim hidden, vit_tiny's width 192 out
    assert [(m.in_features, m.out_features) for m in layers[::2]] == [(64, 32), (32, 32), (32, 192)]
    assert repa.grid == (8, 8) and repa.encoder.input_size == (32, 32)  # one 4-pixel encoder patch per token


def test_dinov2_input_is_repas_preprocessing():
    encoder = ImageEncoder()  # DINOv2 ViT-B/14 (its shape only: nothing loads before features)
    encoder.configure((2, 2))  # 2 x 14 pixels
    raw = torch.randint(0, 256, (2, 3, 16, 16)).float()  # REPA's raw uint8 images
    # REPA train.py:48-51 (DINOv2): x / 255, ImageNet normalisation, bicubic resize to the encoder's size
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = F.interpolate((raw / 255.0 - mean) / std, size=(28, 28), mode="bicubic")
    assert torch.allclose(encoder.preprocess(raw / 127.5 - 1.0), expected, atol=1e-5)


def test_encoder_is_in_neither_optimizer_nor_ema_nor_state_dict():
    module = tiny_module()
    module.repa.encoder.load()  # built: its weights exist now
    encoder_params = {id(p) for p in module.repa.encoder.load().parameters()}
    optimized = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert optimized == {id(p) for p in [*module.net.parameters(), *module.repa.projector.parameters()]}
    assert not optimized & encoder_params
    keys = module.state_dict().keys()
    assert {k for k in keys if k.startswith("repa.")} == {f"repa.projector.{i}.{w}" for i in (0, 2, 4)
                                                         for w in ("weight", "bias")}
    # the EMA averages the network only (the projector is never used for sampling)
    assert [n for n, _ in module.ema.named_parameters()] == [n for n, _ in module.net.named_parameters()]


def test_gradients_reach_the_projector_and_earlier_blocks_not_later_blocks_or_the_encoder():
    module = tiny_module()
    net, repa = module.net, module.repa
    for p in net.parameters():  # leave adaLN-Zero's zero gates, so that every block passes gradients
        nn.init.normal_(p, std=0.05)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with repa.capture(net) as tokens:
        net(x, torch.rand(4), None)
    repa.loss(tokens, x).backward()
    assert repa.projector[0].weight.grad.abs().sum() > 0
    assert net.x_embedder.proj.weight.grad.abs().sum() > 0 and net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert net.blocks[2].attn.qkv.weight.grad is None and net.final_layer.linear.weight.grad is None  # after block 1
    assert all(p.grad is None and not p.requires_grad for p in repa.encoder.load().parameters())


def test_unet_block_feature_map_is_aligned_per_position():
    unet = UNet(img_resolution=16, model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[])
    repa = tiny_repa(block="enc.1.0")
    repa.bind(unet)
    assert repa.grid == (8, 8) and repa.projector[0].in_features == 16  # 16 channels at 8x8
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with repa.capture(unet) as tokens:
        unet(x, torch.rand(2), None)
    assert torch.isfinite(repa.loss(tokens, x))


def test_encoder_features_resized_to_the_token_grid():
    encoder = ImageEncoder(**{**TINY_ENCODER, "image_size": 24})  # a 6x6 encoder grid under 8x8 tokens
    encoder.configure((8, 8))
    assert encoder.features(torch.zeros(2, 3, 16, 16), (8, 8)).shape == (2, 64, 192)


def test_bad_block_and_encoder_fail_in_one_line(monkeypatch):
    with pytest.raises(UserValueError, match="repa block 'blocks.9' is not a submodule of DiT"):
        DiffusionModule(dit_tiny(img_resolution=16), RectifiedFlow(), repa=tiny_repa(block="blocks.9"))
    with pytest.raises(UserValueError, match="is not a timm model"):
        ImageEncoder("no_such_vit", pretrained=False)
    with pytest.raises(UserValueError, match="weight is 0"):
        tiny_repa(weight=0.0)

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("cannot find the requested files in the local cache")
        return real(*args, **kwargs)

    import timm
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    encoder = ImageEncoder("vit_base_patch14_dinov2.lvd142m")
    encoder.configure((16, 16))
    with pytest.raises(EncoderWeightsError, match=r"timm.create_model\('vit_base_patch14_dinov2.lvd142m', "
                                                  r"pretrained=True\)") as err:
        encoder.load()
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_fit_from_yaml_logs_the_alignment_loss_and_checkpoints_the_projector(tmp_path, tiny_fit_config):
    config = tiny_fit_config(max_steps=3, default_root_dir=str(tmp_path / "run"), log_every_n_steps=1, logger={
        "class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "run")}})
    config["model"]["net"] = {"class_path": "diffusion_pl.networks.dit.DiT",
                             "init_args": {"hidden_size": 32, "depth": 2, "num_heads": 2}}
    config["model"]["repa"] = {"class_path": "diffusion_pl.training.repa.RepresentationAlignment",
                               "init_args": {"block": "blocks.0", "projector_dim": 16, "encoder": {
                                   "class_path": "diffusion_pl.training.repa.ImageEncoder", "init_args": {
                                       **TINY_ENCODER, "model_args": {"depth": 1, "patch_size": 2}}}}}
    path = tmp_path / "repa.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) in (0, None)
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    values = [float(r["train/repa"]) for r in rows if r.get("train/repa")]
    assert len(values) == 3 and all(-1.0 <= v <= 1.0 and math.isfinite(v) for v in values)
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    module = load_module(str(ckpt))  # rebuilt from the saved config, projector weights restored
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(module.repa.projector[0].weight, saved["repa.projector.0.weight"])
    assert not any("encoder" in k for k in saved)


def test_the_encoder_sees_pixels_in_latent_training(tiny_autoencoder):
    from diffusion_pl.codecs.base import Pixels
    from diffusion_pl.codecs.latent import LatentCodec

    ae = tiny_autoencoder()
    codec = LatentCodec(ae)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert Pixels().pixels(images, images) is images
    assert codec.pixels(images, codec.encode(images)) is images  # image shards: the batch itself
    mean, std = ae.encode(images)
    posterior = torch.cat([mean, std], dim=1)  # latent shards (prepare --encode): decoded at the posterior mean
    decoded = codec.pixels(posterior, codec.encode(posterior))
    assert torch.allclose(decoded, ae.decode(ae.normalize(mean))) and decoded.shape == images.shape


def test_latent_shards_that_keep_images_feed_them_to_the_encoder_without_a_decode(tmp_path, tiny_autoencoder,
                                                                                    monkeypatch):
    """`prepare --encode --keep_images` + data latent_images: REPA's encoder gets the stored images (flipped with
    their latents), and the VAE never decodes during training."""
    import lightning as L
    import numpy as np

    from diffusion_pl.data.datamodule import ShardDataModule
    from diffusion_pl.data.latents import LatentEncoder
    from diffusion_pl.data.png import encode_png
    from diffusion_pl.data.writer import Sample, write_shards

    ae = tiny_autoencoder()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(8)]
    encoder = LatentEncoder(ae, batch_size=4, device="cpu", images=True)
    write_shards([Sample(f"{i:08d}", encode_png(im), "png", i % 2) for i, im in enumerate(images)], tmp_path / "s",
                 classes=["a", "b"], shard_size=4, records=encoder.records, meta=encoder.manifest_fields)
    torch.manual_seed(0)
    module = DiffusionModule(dit_tiny(img_resolution=8, in_channels=4, num_classes=2), RectifiedFlow(),
                             autoencoder=ae, repa=tiny_repa())
    seen = []
    loss = module.repa.loss
    monkeypatch.setattr(module.repa, "loss", lambda captured, pixels: seen.append(pixels) or loss(captured, pixels))
    monkeypatch.setattr(type(ae), "decode", lambda *a, **k: pytest.fail("the VAE decoded during training"))
    data = ShardDataModule(str(tmp_path / "s"), batch_size=4, num_workers=0, latent_images=True, seed=1)
    L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(module, data)
    source = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    candidates = torch.cat([source, source.flip(-1)])
    rows = torch.cat(seen)
    assert rows.shape == (12, 3, 16, 16)
    assert all(any(torch.allclose(row, c, atol=1e-6) for c in candidates) for row in rows)
    assert any(not any(torch.allclose(row, c, atol=1e-6) for c in source) for row in rows)  # flipped ones too
