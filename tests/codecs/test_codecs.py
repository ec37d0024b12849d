"""The codec contract (diffusion_pl/codecs/): `Pixels` is the identity; the latent codec's shapes come from the
autoencoder's config, so building one, a module, or parsing `fit` loads and hashes no weights."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from diffusion_pl.cli.main import main
from diffusion_pl.codecs import autoencoder as autoencoder_module
from diffusion_pl.codecs.autoencoder import Autoencoder, AutoencoderWeightsError
from diffusion_pl.codecs.base import Pixels
from diffusion_pl.codecs.latent import SPEC_KEY, LatentCodec
from diffusion_pl.networks.unet import UNet
from diffusion_pl.processes.variance_preserving import VPLinear
from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.utils.errors import UserError
from tests.support.latent import TINY_VAE_CONFIG
from tests.support.paths import REPO

IMAGES = "builtin:shapes?size=16&count=16"


def _net(in_channels: int, size: int) -> UNet:
    return UNet(img_resolution=size, in_channels=in_channels, model_channels=8, channel_mult=(1,), num_res_blocks=1,
                attn_resolutions=())


def _one_line_error(fn, *args) -> str:
    with pytest.raises(UserError) as err:
        fn(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_pixels_is_the_identity():
    codec = Pixels()
    x = torch.randn(2, 3, 8, 8)
    assert codec.encode(x) is x and codec.encode(x, torch.Generator()) is x and codec.decode(x) is x
    assert codec.sample_shape((3, 8, 6)) == codec.pixel_shape((3, 8, 6)) == (3, 8, 6)
    data = SimpleNamespace(image_size=8, channels=3, output_size=(8, 8), latent=None)
    assert codec.reference_size(data) == 8 and codec.network_view(data) is data
    assert codec.space == "pixels" and codec.spec() is None
    checkpoint = {"state_dict": {}}
    codec.save_spec(checkpoint)
    assert checkpoint == {"state_dict": {}}  # a pixel-space checkpoint records nothing
    codec.check_checkpoint(checkpoint, "x.ckpt")
    codec.check_pixel_likelihood("--bpd")
    codec.check_data(_net(3, 8), data)
    latent_shards = SimpleNamespace(latent={"shape": [4, 8, 8]}, autoencoder_spec={"pretrained": "org/vae"})
    assert "encoded by org/vae) but the module has no autoencoder" in _one_line_error(codec.check_data, _net(4, 8),
                                                                                       latent_shards)
    module = DiffusionModule(_net(3, 8), VPLinear())
    assert isinstance(module.codec, Pixels)  # the neutral default: every module has a codec


@pytest.fixture
def config_only_vae(tmp_path, monkeypatch) -> SimpleNamespace:
    """A VAE folder (`path`) holding its config.json and no weights; `loads` records every weight load, and hashing
    weights fails the test."""
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **TINY_VAE_CONFIG,
                                                    "scaling_factor": 0.5}))
    loads = []
    load_pretrained = autoencoder_module._load_pretrained
    monkeypatch.setattr(autoencoder_module, "_load_pretrained", lambda *a: loads.append(a) or load_pretrained(*a))
    monkeypatch.setattr(autoencoder_module, "_weights_sha256", lambda vae: pytest.fail("weights were hashed"))
    return SimpleNamespace(path=folder, loads=loads)


def test_latent_shapes_come_from_the_config_without_weights(config_only_vae):
    pytest.importorskip("diffusers")
    ae = Autoencoder(pretrained=str(config_only_vae.path))
    codec = LatentCodec(ae)
    assert (ae.latent_channels, ae.image_channels, ae.downsample, ae.scale_values) == (4, 3, 2, 0.5)
    assert codec.sample_shape((3, 16, 12)) == (4, 8, 6)  # images: their latents
    assert codec.sample_shape((8, 8, 6)) == (4, 8, 6)  # latent shards: the raw posterior (mean, std)
    assert codec.pixel_shape((4, 8, 6)) == (3, 16, 12)
    images = SimpleNamespace(image_size=16, channels=3, output_size=(16, 16), latent=None)
    seen = codec.network_view(images)
    assert (seen.channels, seen.image_size, seen.output_size) == (4, 8, (8, 8))
    shards = SimpleNamespace(image_size=8, channels=4, output_size=(8, 8), latent={"shape": [4, 8, 8]})
    assert codec.network_view(shards) is shards
    assert codec.reference_size(images) == codec.reference_size(shards) == 16  # the decoded samples' side
    module = DiffusionModule(_net(4, 8), VPLinear(), autoencoder=ae)  # checks the net's channels from the config
    assert module.codec.autoencoder is ae
    assert "in_channels=3 but the autoencoder has 4 latent channels" in _one_line_error(
        lambda: DiffusionModule(_net(3, 8), VPLinear(), autoencoder=ae))
    assert "expected images (B, 3, H, W) or a latent posterior (B, 8, h, w)" in _one_line_error(
        codec.sample_shape, (5, 8, 8))
    assert "a latent diffusion model: expected a pixel-space" in _one_line_error(codec.check_pixel_likelihood, "--bpd")
    assert not ae.loaded and config_only_vae.loads == []
    # the weights load when first needed, and this folder has none: one line saying so
    with pytest.raises(AutoencoderWeightsError, match="not an AutoencoderKL folder"):
        codec.encode(torch.zeros(1, 3, 16, 16))
    assert len(config_only_vae.loads) == 1


def test_latent_codec_spec_is_saved_and_checked(tiny_autoencoder):
    pytest.importorskip("diffusers")

    codec = LatentCodec(tiny_autoencoder())
    checkpoint: dict = {}
    codec.save_spec(checkpoint)
    assert checkpoint == {SPEC_KEY: tiny_autoencoder().spec()}
    codec.check_checkpoint(checkpoint, "a.ckpt")
    assert codec.space.startswith("latents config_sha256=") and codec.space == LatentCodec(tiny_autoencoder()).space
    other = LatentCodec(tiny_autoencoder(scale=1.0))
    assert other.space != codec.space
    assert "checkpoint a.ckpt was trained with autoencoder a config-built VAE (scale 0.18215" in _one_line_error(
        other.check_checkpoint, checkpoint, "a.ckpt")


@pytest.mark.slow
def test_fit_parses_without_loading_the_vae(tmp_path, capsys, config_only_vae):
    """`fit` fills the network's latent shape from the VAE's config.json: the weights (absent here) load only when
    training first encodes; `--print_config` of a recipe whose VAE folder does not exist prints."""
    pytest.importorskip("diffusers")
    recipe = ["fit", "--config", str(REPO / "configs" / "cpu_latent_tiny.yaml"), "--trainer.max_steps=1",
              f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.init_args.shards={IMAGES}",
              "--data.init_args.batch_size=4", "--trainer.callbacks=[]", "--model.autoencoder.init_args.config=null",
              "--model.net.init_args.in_channels=null", "--model.net.init_args.img_resolution=null"]
    with pytest.raises(SystemExit) as done:
        main([*recipe, f"--model.autoencoder.init_args.pretrained={tmp_path / 'no-such-vae'}", "--print_config"])
    assert done.value.code in (0, None) and "no-such-vae" in capsys.readouterr().out
    assert main([*recipe, f"--model.autoencoder.init_args.pretrained={config_only_vae.path}"]) == 2
    err = capsys.readouterr().err
    assert "model.net in_channels=4, img_resolution=8 (from the data)" in err  # parsed, filled, module built
    assert f"error: the autoencoder {config_only_vae.path} cannot be loaded" in err and "not an AutoencoderKL" in err
    assert len(config_only_vae.loads) == 1  # once: when the first training batch was encoded
