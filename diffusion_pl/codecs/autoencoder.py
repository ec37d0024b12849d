"""A frozen autoencoder for latent diffusion: diffusers' `AutoencoderKL`, its scale / shift in one place.

Latent diffusion (Rombach et al. 2022) trains the diffusion model on z = normalize(E(x)) and
samples images as D(denormalize(z)). Three kinds of latent appear here:

- raw: the encoder's posterior N(mean, std^2) as the VAE outputs it (`encode`), what latent shards store;
- normalized: `normalize(z_raw) = (z_raw - shift) * scale`, then, with `latent_stats`, per-channel
  (z - mean) / std (EDM2's latent normalisation, statistics computed once over the data); the
  diffusion model's data. `denormalize` is its inverse; nothing else applies scale or shift;
- sampled: `sample_latents(mean, std)` draws z_raw = mean + std * eps and normalizes it (a fresh
  posterior sample each training step, as DiT's train.py does with `latent_dist.sample()`).

The autoencoder is a plain object, not an `nn.Module`: a DiffusionModule holding it registers no
parameters or state_dict entries for it, so it is never in the optimizer, the EMA or a checkpoint's
weights; the checkpoint's saved config (class_path + init_args) rebuilds it. It follows its inputs
to their device on first use and runs in `dtype` with autocast off (bf16-mixed training does not
change what it computes).

Weights, as for the Inception weights: `pretrained` is a local folder (a diffusers model folder, or a
pipeline folder with `subfolder: vae`) or a hub id, found in the Hugging Face cache or downloaded
once; without either it fails in one line (AutoencoderWeightsError) saying what to download and
where to put it. `config` builds an AutoencoderKL with seeded random weights instead (tests, the CPU
recipe).

The constructor reads only the VAE's config (its config.json, or `config`): the shapes (latent
channels, downsampling factor), scale and shift come from it, so building an Autoencoder to learn a
shape (`diffusion-pl fit` filling the network's shape, a module checking its network) neither loads
nor hashes weights. The weights load on first use (`encode`, `decode`, `spec`, `vae`, or `load()`).

`spec()` is the autoencoder's identity, recorded by latent shard manifests and compared with the
module's (`spec_mismatch`): the raw latents depend on the VAE's config and weights only, so those
two hashes must agree; scale, shift and latent statistics are applied at training time and may differ.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from diffusion_pl.utils.errors import MissingFileError, UserError, UserValueError, one_line
from diffusion_pl.utils.fileio import atomic_path, sha256_file
from diffusion_pl.utils.hub import hub_cache, looks_like_path, unreachable
from diffusion_pl.utils.recorded import RecordsInit

__all__ = ["Autoencoder", "AutoencoderWeightsError", "SPEC_IDENTITY_KEYS", "spec_mismatch", "latent_stats_of",
           "save_latent_stats"]

SPEC_IDENTITY_KEYS = ("config_sha256", "weights_sha256")  # what determines the raw posterior
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class AutoencoderWeightsError(UserError, RuntimeError):
    """The autoencoder's weights are missing or unreadable; the message says how to provide them."""


def _import_autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise UserError(f"the autoencoder needs diffusers, which is not importable ({type(err).__name__}): "
                        "install it with pip install 'diffusion-pl[latent]'") from err
    return AutoencoderKL


def _how_to_provide(name: str, subfolder: str | None, reason: str) -> str:
    sub = f" (with its {subfolder}/ subfolder)" if subfolder else ""
    if Path(name).expanduser().exists() or looks_like_path(name):  # a local folder: the hub cannot fill it by name
        return (f"the autoencoder {name} cannot be loaded: {reason}; expected a diffusers AutoencoderKL folder{sub} "
                "(config.json + diffusion_pytorch_model.safetensors, as `huggingface-cli download <hub id> "
                f"--local-dir {name}` writes one)")
    return (f"the autoencoder {name} cannot be loaded: {reason}; on a machine with internet run "
            f"`huggingface-cli download {name} --local-dir DIR`{sub} and pass pretrained: DIR, or copy the hub "
            f"cache there into {hub_cache()}")


def _kl_defaults() -> dict[str, Any]:
    """AutoencoderKL's constructor defaults: what a config (or a config.json) that leaves a key out gets."""
    params = inspect.signature(_import_autoencoder_kl().__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}


def _checked_config(config: dict) -> dict[str, Any]:
    """An AutoencoderKL config (constructor arguments) whose keys the constructor takes; refused in one line else."""
    if not isinstance(config, dict):
        raise UserValueError(f"autoencoder config is a {type(config).__name__}: expected a dict of diffusers "
                             "AutoencoderKL arguments")
    unknown = sorted(set(config) - set(_kl_defaults()))
    if unknown:
        raise UserValueError(f"autoencoder config is invalid (unknown arguments {', '.join(unknown)}): expected "
                             "diffusers AutoencoderKL arguments")
    return dict(config)


def _from_hub(load, name: str, subfolder: str | None, download_timeout: float):
    """`load(name)` from the Hugging Face cache, else downloaded when the hub answers in time; one line else."""
    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:  # the hub cache first: no network needed
        with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument
            warnings.simplefilter("ignore", UserWarning)
            return load(name, local_files_only=True, **kwargs)
    except Exception as err:
        reason = f"not in the Hugging Face cache ({_first_line(err)})"
    failure = unreachable(download_timeout)
    if failure is None:
        try:
            return load(name, **kwargs)
        except Exception as err:
            failure = _first_line(err)
    reason += f" and the download failed ({failure})"
    raise AutoencoderWeightsError(_how_to_provide(name, subfolder, reason))


def _local_config(name: str, subfolder: str | None) -> Path | None:
    """The config.json of a local VAE folder (refused in one line when absent), None for a hub id."""
    folder = Path(name).expanduser()
    if not (folder.exists() or looks_like_path(name)):
        return None
    if not folder.is_dir():  # a local path: downloading "./vae" from the hub would not help
        problem = "is a file" if folder.exists() else "does not exist"
        raise MissingFileError(f"the autoencoder folder {name} {problem}: expected a local diffusers "
                               "AutoencoderKL folder (config.json + weights) or a hub id owner/name")
    path = folder / (subfolder or "") / "config.json"
    if not path.is_file():
        raise AutoencoderWeightsError(_how_to_provide(name, subfolder, f"{path} does not exist"))
    return path


def _read_config(name: str, subfolder: str | None, download_timeout: float) -> dict[str, Any]:
    """The config of a pretrained VAE: its config.json (local, in the hub cache, or that file downloaded), no weights."""
    path = _local_config(name, subfolder)
    if path is None:
        return dict(_from_hub(_import_autoencoder_kl().load_config, name, subfolder, download_timeout))
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AutoencoderWeightsError(_how_to_provide(name, subfolder, f"{path} is not a JSON config "
                                                                        f"({_first_line(err)})")) from err
    found = config.get("_class_name", "AutoencoderKL") if isinstance(config, dict) else type(config).__name__
    if found != "AutoencoderKL":
        raise AutoencoderWeightsError(_how_to_provide(name, subfolder, f"{path.parent} is not an AutoencoderKL "
                                                                        f"folder (its config.json is a {found})"))
    return config


def _load_pretrained(name: str, subfolder: str | None, download_timeout: float):
    AutoencoderKL = _import_autoencoder_kl()
    if _local_config(name, subfolder) is None:
        return _from_hub(AutoencoderKL.from_pretrained, name, subfolder, download_timeout)
    folder, kwargs = Path(name).expanduser(), {"subfolder": subfolder} if subfolder else {}
    try:
        return AutoencoderKL.from_pretrained(str(folder), **kwargs)
    except Exception as err:  # a folder without weights, or with another model's
        raise AutoencoderWeightsError(_how_to_provide(
            name, subfolder, f"{folder} is not an AutoencoderKL folder ({_first_line(err)})")) from err


def _first_line(err: Exception) -> str:
    return one_line(err, 160)


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _weights_sha256(vae) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(vae.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _shapes(vae_config: dict[str, Any]) -> tuple[int, int, int]:
    """(latent channels, image channels, downsampling factor) of an AutoencoderKL config with its defaults filled."""
    return (int(vae_config["latent_channels"]), int(vae_config["in_channels"]),
            2 ** (len(vae_config["block_out_channels"]) - 1))


def _channel_values(value: float | Sequence[float], channels: int, name: str) -> Tensor:
    """A scalar or one value per channel as a float32 (1, C, 1, 1) broadcastable tensor."""
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) not in (1, channels):
        raise UserValueError(f"autoencoder {name} has {len(values)} values: expected 1 or {channels} (one per "
                             "latent channel)")
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


class Autoencoder(RecordsInit):
    """A frozen AutoencoderKL with its latent normalisation; plain-value arguments (LightningCLI, saved configs).

    Args:
        pretrained: a hub id (`stabilityai/sd-vae-ft-ema`) or a local diffusers folder.
        subfolder: the VAE's subfolder in a pipeline folder or repo (`vae`).
        config: an AutoencoderKL config (its constructor arguments) to build with random weights instead.
        seed: seed of those random weights.
        scale, shift: normalize(z) = (z - shift) * scale, scalars or one value per channel; default the VAE
            config's scaling_factor (0.18215 for the SD VAEs) and shift_factor (else 0).
        dtype: "float32" or "bfloat16", what the VAE computes in (inputs and outputs stay float32).
        latent_stats: an npz with per-channel `mean` and `std` (C,) of the scale/shift-normalized latents
            (`save_latent_stats`); normalize then standardizes each channel (EDM2).
        download_timeout: seconds to wait for the hub before failing.
    """

    def __init__(self, pretrained: str | None = None, subfolder: str | None = None, config: dict | None = None,
                 seed: int = 0, scale: float | list[float] | None = None, shift: float | list[float] | None = None,
                 dtype: Literal["float32", "bfloat16"] = "float32", latent_stats: str | None = None,
                 download_timeout: float = 10.0) -> None:
        if (pretrained is None) == (config is None):
            raise UserValueError(f"autoencoder has pretrained={pretrained!r} and config={'set' if config else None}: "
                                 "expected exactly one (a hub id or folder, or an AutoencoderKL config)")
        if dtype not in _DTYPES:
            raise UserValueError(f"autoencoder dtype is {dtype!r}: expected one of {', '.join(_DTYPES)}")
        # the config only: shapes, scale and shift; the weights load on first use (load)
        raw = _read_config(pretrained, subfolder, download_timeout) if pretrained is not None else \
            _checked_config(config)
        vae_config = {**_kl_defaults(), **{k: v for k, v in raw.items() if not k.startswith("_")}}
        self.pretrained, self.subfolder, self.config, self.seed = pretrained, subfolder, config, seed
        self.download_timeout = download_timeout
        self.latent_channels, self.image_channels, self.downsample = _shapes(vae_config)
        scale = vae_config.get("scaling_factor", 1.0) if scale is None else scale
        shift = (vae_config.get("shift_factor") or 0.0) if shift is None else shift
        self.scale_values, self.shift_values = scale, shift
        self._scale = _channel_values(scale, self.latent_channels, "scale")
        self._shift = _channel_values(shift, self.latent_channels, "shift")
        self.latent_stats = latent_stats
        self._stats_mean, self._stats_std = self._read_stats(latent_stats) if latent_stats else (None, None)
        # hashed once, with the statistics it loaded: spec() then describes them, not the file as it is later
        self._stats_sha256 = sha256_file(latent_stats) if latent_stats else None
        self.dtype_name, self.dtype = dtype, _DTYPES[dtype]
        self.device = torch.device("cpu")
        self._vae: Any = None  # the AutoencoderKL, once loaded
        self._identity: dict[str, str] = {}  # its config and weights hashes, taken when it loads

    @property
    def loaded(self) -> bool:
        """Whether the weights are loaded (they load on first use)."""
        return self._vae is not None

    @property
    def vae(self):
        """The frozen diffusers AutoencoderKL, loaded (and hashed) on first access."""
        return self.load()._vae

    def load(self) -> "Autoencoder":
        """Load (or build from `config`) the weights now, if not yet: fails in one line when they are missing."""
        if self._vae is not None:
            return self
        if self.pretrained is not None:
            vae = _load_pretrained(self.pretrained, self.subfolder, self.download_timeout)
        else:
            AutoencoderKL = _import_autoencoder_kl()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                try:
                    vae = AutoencoderKL(**self.config)
                except (TypeError, ValueError) as err:
                    raise UserValueError(f"autoencoder config is invalid ({_first_line(err)}): expected "
                                         "diffusers AutoencoderKL arguments") from err
        vae_config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
        loaded = _shapes(vae_config)
        if loaded != (self.latent_channels, self.image_channels, self.downsample):  # the cache changed under us
            raise AutoencoderWeightsError(f"the autoencoder {self.pretrained} loaded with (latent channels, image "
                                          f"channels, downsampling) {loaded} but its config said "
                                          f"{(self.latent_channels, self.image_channels, self.downsample)}: expected "
                                          "the same (re-download the VAE folder)")
        self._identity = {"config_sha256": _sha256_json(vae_config), "weights_sha256": _weights_sha256(vae)}
        # nn.Module.to: diffusers' own `to` warns on every dtype cast (modeling_utils.py, an empty fp32 list)
        self._vae = torch.nn.Module.to(vae.requires_grad_(False).eval(), device=self.device, dtype=self.dtype)
        return self

    def _read_stats(self, path: str) -> tuple[Tensor, Tensor]:
        if not Path(path).is_file():
            raise MissingFileError(f"autoencoder latent_stats {path} does not exist: expected an npz with per-channel "
                                   "'mean' and 'std' (diffusion_pl.codecs.autoencoder.save_latent_stats)")
        with np.load(path) as f:
            if "mean" not in f or "std" not in f:
                raise UserValueError(f"autoencoder latent_stats {path} has keys {sorted(f.keys())}: expected 'mean' "
                                     "and 'std'")
            mean, std = np.asarray(f["mean"], np.float32), np.asarray(f["std"], np.float32)
        if mean.shape != (self.latent_channels,) or std.shape != mean.shape or not (std > 0).all():
            raise UserValueError(f"autoencoder latent_stats {path} has mean {mean.shape}, std {std.shape}: expected "
                                 f"({self.latent_channels},) each, std > 0")
        return torch.from_numpy(mean).view(1, -1, 1, 1), torch.from_numpy(std).view(1, -1, 1, 1)

    # -- identity and shapes ----------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """JSON-able identity: source, config / weights hashes, scale, shift, latent stats hash, shapes.

        The hashes are of the loaded weights: this loads them if they are not yet."""
        self.load()
        return {"pretrained": self.pretrained, "subfolder": self.subfolder, **self._identity,
                "scale": self.scale_values, "shift": self.shift_values,
                "latent_stats_sha256": self._stats_sha256,
                "latent_channels": self.latent_channels, "downsample": self.downsample}

    def latent_shape(self, image_size: int | Sequence[int]) -> tuple[int, int, int]:
        """(C, h, w) of the latents of images of `image_size` (an int or (H, W)); sizes must divide."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if h % self.downsample or w % self.downsample:
            raise UserValueError(f"image size {h}x{w} is not a multiple of the autoencoder's downsampling factor "
                                 f"{self.downsample}: expected sizes divisible by {self.downsample}")
        return self.latent_channels, h // self.downsample, w // self.downsample

    def image_shape(self, latent_size: Sequence[int]) -> tuple[int, int, int]:
        """(3, H, W) of the images decoded from latents of spatial size (h, w)."""
        h, w = latent_size
        return self.image_channels, h * self.downsample, w * self.downsample

    # -- normalisation: the one place scale, shift and the latent statistics are applied ----------------
    def normalize(self, z_raw: Tensor) -> Tensor:
        """Raw latents -> the diffusion model's data: (z_raw - shift) * scale, then (z - mean) / std."""
        z = (z_raw.float() - self._shift.to(z_raw.device)) * self._scale.to(z_raw.device)
        if self._stats_mean is not None:
            z = (z - self._stats_mean.to(z.device)) / self._stats_std.to(z.device)
        return z

    def denormalize(self, z: Tensor) -> Tensor:
        """The inverse of `normalize`."""
        z = z.float()
        if self._stats_mean is not None:
            z = z * self._stats_std.to(z.device) + self._stats_mean.to(z.device)
        return z / self._scale.to(z.device) + self._shift.to(z.device)

    def sample_latents(self, mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """normalize(mean + std * eps), eps from `generator` (the global generator when None)."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        return self.normalize(mean.float() + std.float() * eps)

    # -- the networks ------------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "Autoencoder":
        device = torch.device(device)
        if device != self.device and self._vae is not None:  # else the weights load onto `device`
            torch.nn.Module.to(self._vae, device)
        self.device = device
        return self

    def _run(self, x: Tensor):
        self.to(x.device)
        autocast = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cuda", "cpu") else nullcontext()
        return autocast, x.to(self.dtype)

    @torch.no_grad()
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> the raw posterior (mean, std), float32 (B, C, H/f, W/f) each."""
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise UserValueError(f"autoencoder input is {tuple(images.shape)}: expected (B, {self.image_channels}, "
                                 "H, W) images in [-1, 1]")
        autocast, x = self._run(images)
        with autocast:
            dist = self.vae.encode(x).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Normalized latents (B, C, h, w) -> images (B, 3, h f, w f) in [-1, 1], float32."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise UserValueError(f"autoencoder latents are {tuple(z.shape)}: expected (B, {self.latent_channels}, "
                                 "h, w)")
        autocast, z_raw = self._run(self.denormalize(z))
        with autocast:
            images = self.vae.decode(z_raw).sample
        return images.float().clamp(-1.0, 1.0)

    def __repr__(self) -> str:
        source = self.pretrained or f"config (seed {self.seed})"
        return (f"Autoencoder({source}, latent_channels={self.latent_channels}, downsample={self.downsample}, "
                f"scale={self.scale_values}, shift={self.shift_values}, dtype={self.dtype_name})")


def spec_mismatch(data_spec: dict | None, module_spec: dict) -> str | None:
    """None when latents recorded with `data_spec` fit an autoencoder with `module_spec`, else which key differs."""
    if not isinstance(data_spec, dict):
        return f"the data records no autoencoder spec ({data_spec!r})"
    for key in SPEC_IDENTITY_KEYS:
        if data_spec.get(key) != module_spec.get(key):
            return (f"the data was encoded by {data_spec.get('pretrained') or 'a config-built VAE'} with {key} "
                    f"{str(data_spec.get(key))[:12]} but the module's autoencoder "
                    f"({module_spec.get('pretrained') or 'config-built'}) has {str(module_spec.get(key))[:12]}")
    return None


def latent_stats_of(latents: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (C,) of normalized latents (N, C, h, w) (before any latent statistics)."""
    z = latents.detach().double().transpose(0, 1).reshape(latents.shape[1], -1)
    return z.mean(1).float().numpy(), z.std(1).float().numpy()


def save_latent_stats(path: str | Path, mean: np.ndarray, std: np.ndarray) -> Path:
    """Write `latent_stats` npz (keys mean, std, float32 (C,)) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        np.savez(tmp, mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32))
    return path
