"""The frozen autoencoder: shapes and dtypes, the scale/shift round trip, bf16, identity, offline errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_pl.codecs.autoencoder import (Autoencoder, AutoencoderWeightsError, latent_stats_of, save_latent_stats,
                                             spec_mismatch)
from diffusion_pl.utils.errors import UserError
from tests.support.latent import TINY_VAE_CONFIG

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def ae(tiny_autoencoder):
    return tiny_autoencoder()


def _images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_decode_shapes_and_dtypes(ae):
    assert (ae.latent_channels, ae.downsample, ae.latent_shape(16), ae.latent_shape((16, 8))) == (4, 2, (4, 8, 8),
                                                                                                  (4, 8, 4))
    mean, std = ae.encode(_images())
    assert mean.shape == std.shape == (2, 4, 8, 8) and mean.dtype == std.dtype == torch.float32
    assert (std > 0).all() and not mean.requires_grad
    z = ae.sample_latents(mean, std, torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8)
    images = ae.decode(z)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    with pytest.raises(UserError, match="not a multiple"):
        ae.latent_shape(15)
    with pytest.raises(UserError, match=r"expected \(B, 4, h, w\)"):
        ae.decode(torch.zeros(1, 8, 4, 4))


def test_scale_shift_in_one_place_and_round_trip(tiny_autoencoder):
    ae = tiny_autoencoder(scale=[0.5, 1.0, 2.0, 4.0], shift=0.25)
    z_raw = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    z = ae.normalize(z_raw)
    assert torch.allclose(z[:, 2], (z_raw[:, 2] - 0.25) * 2.0)
    assert torch.allclose(ae.denormalize(z), z_raw, atol=1e-6)
    # sample_latents is normalize(mean + std * eps) with eps from the generator
    mean, std = torch.randn(3, 4, 5, 5), torch.rand(3, 4, 5, 5)
    eps = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(7))
    drawn = ae.sample_latents(mean, std, torch.Generator().manual_seed(7))
    assert torch.allclose(drawn, ae.normalize(mean + std * eps))
    # defaults: the VAE config's scaling_factor and shift_factor
    assert tiny_autoencoder().scale_values == 0.18215 and tiny_autoencoder().shift_values == 0.0
    shifted = Autoencoder(config={**TINY_VAE_CONFIG, "scaling_factor": 1.5, "shift_factor": 0.1})
    assert (shifted.scale_values, shifted.shift_values) == (1.5, 0.1)
    with pytest.raises(UserError, match="expected 1 or 4"):
        tiny_autoencoder(scale=[1.0, 2.0])


def test_latent_stats_standardize_and_round_trip(ae, tmp_path, tiny_autoencoder):
    mean, std = ae.encode(_images(4))
    mean_c, std_c = latent_stats_of(ae.normalize(mean))
    path = save_latent_stats(tmp_path / "stats.npz", mean_c, std_c)
    ae_stats = tiny_autoencoder(latent_stats=str(path))
    z = ae_stats.normalize(mean)
    assert torch.allclose(z.transpose(0, 1).reshape(4, -1).mean(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.transpose(0, 1).reshape(4, -1).std(1), torch.ones(4), atol=1e-4)
    assert torch.allclose(ae_stats.denormalize(z), mean, atol=1e-5)
    assert ae_stats.spec()["latent_stats_sha256"] is not None and ae.spec()["latent_stats_sha256"] is None
    assert spec_mismatch(ae.spec(), ae_stats.spec()) is None  # the raw latents are the same
    np.savez(tmp_path / "bad.npz", mu=mean_c)
    with pytest.raises(UserError, match="expected 'mean' and 'std'"):
        tiny_autoencoder(latent_stats=str(tmp_path / "bad.npz"))
    with pytest.raises(UserError, match="does not exist"):
        tiny_autoencoder(latent_stats=str(tmp_path / "none.npz"))


def test_bfloat16_on_cpu(ae, tiny_autoencoder):
    bf = tiny_autoencoder(dtype="bfloat16")
    assert next(bf.vae.parameters()).dtype == torch.bfloat16
    mean, std = bf.encode(_images())
    assert mean.dtype == std.dtype == torch.float32
    ref_mean, _ = ae.encode(_images())
    assert (mean - ref_mean).abs().max() < 0.05  # bf16 rounding, same weights
    assert bf.decode(mean).dtype == torch.float32
    assert spec_mismatch(ae.spec(), bf.spec()) is None  # the dtype is not part of the identity


def test_autocast_does_not_change_what_it_computes(ae):
    x = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, _ = ae.encode(x)
    assert torch.equal(mean, ae.encode(x)[0])


def test_identity_spec_and_mismatch(ae, tmp_path, tiny_autoencoder):
    spec = ae.spec()
    assert spec == tiny_autoencoder().spec()  # seeded: rebuilt from a saved config, the same weights
    other = tiny_autoencoder(seed=1).spec()
    assert other["weights_sha256"] != spec["weights_sha256"]
    message = spec_mismatch(other, spec)
    assert "weights_sha256" in message and "\n" not in message
    assert "config_sha256" in spec_mismatch(Autoencoder(config={**TINY_VAE_CONFIG, "latent_channels": 2}).spec(), spec)
    assert spec_mismatch(None, spec) is not None
    # a local folder written by save_pretrained loads, with the same identity as the config it came from
    ae.vae.save_pretrained(tmp_path / "vae")
    local = Autoencoder(pretrained=str(tmp_path / "vae"))
    assert spec_mismatch(local.spec(), spec) is None and local.spec()["pretrained"] == str(tmp_path / "vae")
    assert torch.equal(local.encode(_images())[0], ae.encode(_images())[0])
    ae.vae.save_pretrained(tmp_path / "pipeline" / "vae")
    assert Autoencoder(pretrained=str(tmp_path / "pipeline"), subfolder="vae").spec()["weights_sha256"] == \
        spec["weights_sha256"]


def test_missing_weights_fail_in_one_line(tmp_path, monkeypatch):
    # a local folder that is not there: said so, not "download it from the hub" (by a path, that cannot work)
    for missing in (str(tmp_path / "no-such-vae"), "./no-such-vae", "models/vae/no-such"):
        with pytest.raises(FileNotFoundError) as err:
            Autoencoder(pretrained=missing)
        message = str(err.value)
        assert "\n" not in message and f"folder {missing} does not exist" in message, message
        assert "huggingface-cli" not in message, message
    (tmp_path / "novae").mkdir()
    with pytest.raises(AutoencoderWeightsError) as err:
        Autoencoder(pretrained=str(tmp_path / "novae"))
    assert "config.json does not exist" in str(err.value) and f"--local-dir {tmp_path / 'novae'}`" in str(err.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(AutoencoderWeightsError, match="not an AutoencoderKL folder"):
        Autoencoder(pretrained=str(tmp_path / "empty")).load()  # a config but no weights: refused when they load
    # a hub id neither cached nor downloadable (offline): what to download and where to put it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(AutoencoderWeightsError) as err:
        Autoencoder(pretrained="stabilityai/sd-vae-ft-ema")
    message = str(err.value)
    assert "\n" not in message and "not in the Hugging Face cache" in message
    assert "huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR" in message


def test_bad_arguments_are_one_line_errors(tiny_autoencoder):
    with pytest.raises(UserError, match="expected exactly one"):
        Autoencoder()
    with pytest.raises(UserError, match="expected exactly one"):
        Autoencoder(pretrained="x/y", config=TINY_VAE_CONFIG)
    with pytest.raises(UserError, match="dtype"):
        tiny_autoencoder(dtype="float16")
    with pytest.raises(UserError, match="config is invalid"):
        Autoencoder(config={**TINY_VAE_CONFIG, "no_such_argument": 1})
