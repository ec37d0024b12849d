"""`import_pretrained`: a published model as a diffusion_pl checkpoint (the `diffusion-pl import` command).

Sources (`source`), tried in this order:

- a `.ckpt` written by `diffusion-pl fit`: its network, process and parameterization with its EMA weights (as
  both the network and the EMA), the start of a fine-tune with another loss (ECT from an EDM run);
- a local folder: a diffusers model folder (config.json + diffusion_pytorch_model.safetensors or .bin)
  or a pipeline folder holding one in unet/ or transformer/; `UNet2DModel` becomes the `UNet`,
  `DiTTransformer2DModel` (or the legacy `Transformer2DModel` with norm_type ada_norm_zero, as
  facebook/DiT-XL-2-256 is saved) the `DiT` (diffusers_unet.py, diffusers_dit.py);
- a local `.pt` / `.pth` file: a facebookresearch/DiT state dict into the `DiT` (dit_reference.py),
  with `arch` (DiT-XL/2, ...) and the image size, which the file does not hold;
- a published DiT file name (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt): torch hub's cache, DiT's own
  pretrained_models/ folder, else downloaded into torch hub's cache;
- a hub id `owner/name`: the Hugging Face cache first (works offline), else downloaded once
  (huggingface_hub.snapshot_download). Without either, one line says what to download and where to
  put it, as for the Inception weights (diffusion_pl/evaluation/metrics/inception.py).

The process and parameterization come from the pipeline's scheduler_config.json (scheduler/ or next
to config.json; `scheduler_spec`): diffusers' DDPM-family schedulers share one forward process,
N betas from beta_schedule / beta_start / beta_end, which is `DDPMDiscrete` here; prediction_type
epsilon / v_prediction / sample is `EpsPrediction` / `VPrediction` / `X0Prediction`. Without a
scheduler config: DDPMScheduler's defaults (1000 linear betas 1e-4..0.02, epsilon), which is also
what DiT's `.pt` files were trained with (DiT's diffusion/__init__.py create_diffusion). A learned
variance needs no flag: the network's 2C output channels are it (prediction.split_variance).

The checkpoint (a torch file, loadable with weights_only=True):

    epoch, global_step         0
    state_dict                 net.* and ema.*, both the imported weights (float32)
    hyper_parameters           net / process / prediction as class_path + init_args, every argument,
                               and `_instantiator`, as LightningCLI saves them: `load_module` rebuilds it
    optimizer_states, lr_schedulers   [] (see fine-tuning)
    diffusion_pl_import        where it came from: source, format, weights sha256, scheduler config,
                               the sampler the scheduler config suggests

`sample`, `evaluate`, `export` and `load_module` take it like a `fit` checkpoint. Fine-tuning is
`diffusion-pl fit --config RECIPE --ckpt_path IMPORTED.ckpt`: LightningCLI reads the checkpoint's
hyper_parameters over the recipe's model section (lightning/pytorch/cli.py `_parse_ckpt_path`; the recipe may
leave model.net / process / prediction out, DiffusionCLI then takes them from the checkpoint), so the
network, process and prediction are the imported ones and everything else (loss, optimizer, EMA,
data, trainer) is the recipe's; Lightning then loads state_dict, and the empty optimizer and
scheduler lists restore nothing (strategy.load_optimizer_state_dict zips optimizers with states),
nor does the absent `loops` entry: training starts at step 0 with the recipe's fresh optimizer.
"""

from __future__ import annotations

import inspect
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from diffusion_pl.utils.errors import MissingFileError, UserError, UserValueError, one_line
from diffusion_pl.utils.hub import hub_cache, unreachable
from diffusion_pl.utils.fileio import atomic_path, sha256_file, writable_folder

__all__ = ["PretrainedWeightsError", "import_pretrained", "scheduler_spec", "write_imported_checkpoint"]

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
MODEL_SUBFOLDERS = ("", "unet", "transformer")
# schedulers whose config describes the betas of one DDPM training process (diffusers' schedulers/)
DDPM_FAMILY = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
               "DPMSolverSinglestepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
               "HeunDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
               "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
PREDICTIONS = {"epsilon": "EpsPrediction", "v_prediction": "VPrediction", "sample": "X0Prediction"}
VARIANCES = {"fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall", "fixed_large": "fixedlarge",
             "fixed_large_log": "fixedlarge", "learned_range": "learned"}
SD_VAE = "stabilityai/sd-vae-ft-ema"  # DiT sample_ddp.py:152 (its FID sampling) --vae ema; scale 0.18215 (:131)
SD_VAE_SCALE = 0.18215


class PretrainedWeightsError(UserError, RuntimeError):
    """A model to import is neither local nor downloadable; the message says what to download and where to put it."""


# -- finding the files --------------------------------------------------------------------------------------

def _hub_snapshot(repo_id: str, timeout: float) -> Path:
    """The folder of a hub repo's files: the Hugging Face cache, else a download (config files and weights only)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError and kin: not cached
        reason = f"not in the Hugging Face cache {hub_cache()} ({type(err).__name__})"
    failure = unreachable(timeout)
    if failure is None:
        patterns = ["*.json", *(f"{s}/{w}" if s else w for s in MODEL_SUBFOLDERS for w in WEIGHT_NAMES[:1])]
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
            if not any((folder / s / WEIGHT_NAMES[0]).is_file() for s in MODEL_SUBFOLDERS):  # .bin-only repos
                folder = Path(snapshot_download(repo_id, allow_patterns=[p.replace(".safetensors", ".bin")
                                                                         for p in patterns]))
            return folder
        except Exception as err:
            failure = one_line(err, 160)
    reason += f" and the download failed ({failure})"
    raise PretrainedWeightsError(f"hub model {repo_id} cannot be imported: {reason}; on a machine with internet run "
                                 f"`huggingface-cli download {repo_id} --local-dir DIR` and import DIR, or copy that "
                                 f"machine's hub cache into {hub_cache()}")


def _published_dit(name: str, timeout: float) -> Path:
    """A published DiT .pt by name: torch hub's cache, DiT's pretrained_models/, else downloaded into the cache."""
    from diffusion_pl.interop.dit_reference import DOWNLOAD_URL

    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    for path in (cached, Path("pretrained_models") / name):
        if path.is_file():
            return path
    url = DOWNLOAD_URL.format(name)
    from diffusion_pl.utils.hub import download_once

    reason = download_once(url, cached, timeout)
    if reason is None:
        return cached
    raise PretrainedWeightsError(f"{name} cannot be imported: not in {cached.parent} and the download failed "
                                 f"({reason}); download {url} on a machine with internet and import that file, "
                                 f"or copy it to {cached}")


def _resolve(source: str, timeout: float) -> Path:
    from diffusion_pl.interop.dit_reference import PUBLISHED

    path = Path(source).expanduser()
    if path.exists():
        return path
    if source in PUBLISHED:
        return _published_dit(source, timeout)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "~")) and not source.endswith((".pt", ".ckpt")):
        return _hub_snapshot(source, timeout)
    raise MissingFileError(f"{source} does not exist: expected a diffusers model or pipeline folder, a hub id "
                           f"owner/name, a facebookresearch/DiT .pt file, or one of {', '.join(PUBLISHED)}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserValueError(f"{path} is not readable JSON ({type(err).__name__}): expected a diffusers config") \
            from err
    if not isinstance(value, dict):
        raise UserValueError(f"{path} holds a {type(value).__name__}: expected a diffusers config object")
    return value


def _model_folder(root: Path) -> tuple[Path, str, dict[str, Any]]:
    """(folder, "unet" or "dit", config) of the supported diffusers model in `root` or its unet/ transformer/."""
    found = []
    for sub in MODEL_SUBFOLDERS:
        config_file = root / sub / "config.json"
        if not config_file.is_file():
            continue
        config = _read_json(config_file)
        name = config.get("_class_name")
        if name == "UNet2DModel":
            return config_file.parent, "unet", config
        if name == "DiTTransformer2DModel" or (name == "Transformer2DModel" and config.get("norm_type") ==
                                               "ada_norm_zero" and config.get("patch_size") is not None):
            return config_file.parent, "dit", config
        found.append(f"{config_file} is a diffusers {name}")
    if found:
        raise UserValueError(f"{'; '.join(found)}: expected a UNet2DModel or DiTTransformer2DModel (unconditional "
                             "or class-conditional image models; text-conditional UNet2DConditionModel is not "
                             "supported)")
    raise MissingFileError(f"{root} has no config.json (nor unet/config.json, transformer/config.json): expected a "
                           "diffusers UNet2DModel or DiTTransformer2DModel folder, or a pipeline folder holding one")


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise MissingFileError(f"{folder} has no {' or '.join(WEIGHT_NAMES)}: expected the weights next to its "
                           "config.json")


def _scheduler_file(root: Path, model_folder: Path) -> Path | None:
    for folder in dict.fromkeys([root, model_folder, model_folder.parent]):
        for path in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
            if path.is_file():
                return path
    return None


# -- the scheduler config -> process, prediction, sampler ---------------------------------------------------

def scheduler_spec(config: dict[str, Any] | None, source: str = "scheduler_config.json"
                   ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(process spec, prediction spec, sampling hints) of a diffusers scheduler config (None: DDPMScheduler's defaults).

    The hints are what the config says about sampling: `sampler` (a DDPM spec with its variance_type)
    and `clip_x0` (clip_sample_range when clip_sample), for `diffusion-pl sample` / `evaluate`.
    """
    config = dict(config or {"_class_name": "DDPMScheduler"})
    name = config.get("_class_name", "DDPMScheduler")
    if name not in DDPM_FAMILY:
        raise UserValueError(f"{source} is a {name}: expected a scheduler of the DDPM betas ({', '.join(DDPM_FAMILY)})")
    if config.get("trained_betas") is not None:
        raise UserValueError(f"{source} lists trained_betas: expected beta_schedule linear, scaled_linear or "
                             "squaredcos_cap_v2 (an explicit beta list is not supported)")
    if config.get("rescale_betas_zero_snr"):
        raise UserValueError(f"{source} has rescale_betas_zero_snr: expected false (a zero terminal SNR is not a "
                             "DDPMDiscrete process)")
    schedule = config.get("beta_schedule", "linear")
    if schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise UserValueError(f"{source} has beta_schedule {schedule!r}: expected linear, scaled_linear or "
                             "squaredcos_cap_v2")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTIONS:
        raise UserValueError(f"{source} has prediction_type {prediction_type!r}: expected one of "
                             f"{', '.join(PREDICTIONS)}")
    process = {"class_path": "diffusion_pl.processes.variance_preserving.DDPMDiscrete",
               "init_args": {"num_steps": int(config.get("num_train_timesteps", 1000)),
                             "beta_start": float(config.get("beta_start", 0.0001)),
                             "beta_end": float(config.get("beta_end", 0.02)), "beta_schedule": schedule}}
    prediction = {"class_path": f"diffusion_pl.prediction.{PREDICTIONS[prediction_type]}", "init_args": {}}
    variance = VARIANCES.get(config.get("variance_type", "fixed_small"))
    hints: dict[str, Any] = {"sampler": None, "clip_x0": None}
    if variance is not None:
        hints["sampler"] = {"class_path": "diffusion_pl.sampling.posterior.DDPM", "init_args": {"variance": variance}}
    if config.get("clip_sample", name == "DDPMScheduler"):  # DDPMScheduler clips by default
        hints["clip_x0"] = float(config.get("clip_sample_range", 1.0))
    return process, prediction, hints


# -- the checkpoint ------------------------------------------------------------------------------------------

def _full_spec(cls: type, kwargs: dict[str, Any], class_path: str) -> dict[str, Any]:
    """class_path + every init_arg (defaults filled in), as JSON data, as LightningCLI saves a component."""
    args = {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD}
    return json.loads(json.dumps({"class_path": class_path, "init_args": {**args, **kwargs}}))


def write_imported_checkpoint(out: str | Path, net_spec: dict, process_spec: dict, prediction_spec: dict,
                              weights: dict[str, torch.Tensor], provenance: dict[str, Any],
                              extra_hparams: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint (see the module docstring) for a network the specs describe and its weights."""
    import lightning
    from lightning.pytorch.cli import instantiate_module

    from diffusion_pl.interop.weights import check_state_dict
    from diffusion_pl.utils.lightning_compat import INSTANTIATOR
    from diffusion_pl.training.module import DiffusionModule

    out = Path(out)
    if out.is_dir():
        raise UserValueError(f"--out {out} is a folder: expected a checkpoint file name (e.g. {out}/imported.ckpt)")
    if out.exists() and not overwrite:
        raise UserValueError(f"--out {out} already exists: pass --overwrite to replace it or choose another name")
    hparams = {"net": net_spec, "process": process_spec, "prediction": prediction_spec}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jsonargparse's notices
        module = instantiate_module(DiffusionModule, json.loads(json.dumps(hparams)))
    check_state_dict(module.net, weights, provenance["source"], f"the state dict of {net_spec['class_path']}")
    module.net.load_state_dict(weights, strict=True)
    module.ema.load_state_dict(weights, strict=True)
    checkpoint = {"epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning.__version__,
                  "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
                  "hyper_parameters": {**hparams, **(extra_hparams or {}), "_instantiator": INSTANTIATOR},
                  "hparams_name": "kwargs", "optimizer_states": [], "lr_schedulers": [],
                  "diffusion_pl_import": provenance}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(checkpoint, tmp)
    return out


def _autoencoder_hparams(vae: str | None, pipeline: str | None = None) -> dict[str, Any]:
    """The VAE entry (model.autoencoder) of a latent DiT's config.

    vae "auto": the pipeline's own vae/ subfolder (`pipeline`: its hub id or folder) when it has one, else
    the SD VAE DiT samples with; None: no autoencoder (the checkpoint then generates latents).
    """
    if vae is None:
        return {}
    args: dict[str, Any] = {"pretrained": SD_VAE if vae == "auto" else vae, "scale": SD_VAE_SCALE}
    if vae == "auto" and pipeline is not None:
        args = {"pretrained": pipeline, "subfolder": "vae", "scale": SD_VAE_SCALE}
    return {"autoencoder": {"class_path": "diffusion_pl.codecs.autoencoder.Autoencoder", "init_args": args}}


def _import_fit_checkpoint(path: Path, out: str | Path, provenance: dict[str, Any], overwrite: bool) -> Path:
    """A checkpoint of `diffusion-pl fit` as a starting point: its network, process, parameterization (and
    autoencoder), with its EMA weights as both the network and the EMA, and nothing else (no loss, optimizer or
    loops), so that `fit --ckpt_path` tunes it with the recipe's loss from step 0. ECT starts so from EDM's
    checkpoint (locuslab/ect training/ct_training_loop.py:192-193: the `ema` copied into net and ema)."""
    from diffusion_pl.utils.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    missing = [key for key in ("net", "process") if key not in checkpoint.config]
    if missing:
        raise UserValueError(f"{path} holds no saved model.{' and model.'.join(missing)}: expected a checkpoint "
                             "written by `diffusion-pl fit`")
    weights = {k[len("ema."):]: v for k, v in checkpoint.state_dict.items() if k.startswith("ema.")}
    if not weights:
        raise UserValueError(f"{path} holds no EMA weights (ema.*): expected a checkpoint written by `diffusion-pl fit`")
    config = checkpoint.config
    prediction = config.get("prediction") or {"class_path": "diffusion_pl.prediction.EpsPrediction", "init_args": {}}
    extra = {"autoencoder": config["autoencoder"]} if config.get("autoencoder") else {}
    provenance.update(format="diffusion_pl fit checkpoint (EMA weights)", weights_file=str(path),
                      global_step=checkpoint.global_step, weights_sha256=sha256_file(path), sampler=None, clip_x0=None)
    weights = {k: v.detach().clone() for k, v in weights.items()}
    return write_imported_checkpoint(out, config["net"], config["process"], prediction, weights, provenance, extra,
                                     overwrite)


def import_pretrained(source: str, out: str | Path, arch: str | None = None, image_size: int | None = None,
                      vae: str | None = "auto", overwrite: bool = False, download_timeout: float = 10.0) -> Path:
    """Write a diffusion_pl checkpoint at `out` from a published model (see the module docstring); returns `out`.

    arch / image_size: for facebookresearch/DiT .pt files (DiT-XL/2, 256). vae: the autoencoder a latent
    (4-channel) DiT's config records: "auto" (the pipeline's vae/, else stabilityai/sd-vae-ft-ema at
    scale 0.18215), a hub id or folder, or None for none.
    """
    from diffusion_pl import __version__
    from diffusion_pl.interop.weights import read_weights

    if Path(out).is_dir():  # before a download
        raise UserValueError(f"--out {out} is a folder: expected a checkpoint file name (e.g. {out}/imported.ckpt)")
    writable_folder(Path(out).parent, "--out folder")
    path = _resolve(str(source), download_timeout)
    provenance: dict[str, Any] = {"source": str(source), "diffusion_pl_version": __version__}
    extra: dict[str, Any] = {}
    if path.is_file() and path.suffix == ".ckpt":
        return _import_fit_checkpoint(path, out, provenance, overwrite)
    if path.is_file():  # a facebookresearch/DiT file
        from diffusion_pl.interop.dit_reference import PUBLISHED, dit_from_reference
        from diffusion_pl.networks.dit import DiT

        if path.suffix not in (".pt", ".pth"):
            raise UserValueError(f"{path} is a file but not a .pt / .pth: expected a facebookresearch/DiT state "
                                 "dict, or a diffusers folder")
        arch, image_size = (arch, image_size) if path.name not in PUBLISHED else \
            (arch or PUBLISHED[path.name][0], image_size or PUBLISHED[path.name][1])
        net, kwargs = dit_from_reference(read_weights(path), arch, image_size, source=str(path))
        net_spec = _full_spec(DiT, kwargs, "diffusion_pl.networks.dit.DiT")
        process, prediction, hints = scheduler_spec(None)
        hints["clip_x0"] = None  # DiT samples latents without clipping (sample.py, clip_denoised=False)
        provenance.update(format="facebookresearch/DiT", weights_file=str(path))
        extra = _autoencoder_hparams(vae)
        weights = net.state_dict()
    else:
        folder, kind, config = _model_folder(path)
        file = _weights_file(folder)
        state_dict = {k: v.float() for k, v in read_weights(file).items()}
        if kind == "unet":
            from diffusion_pl.interop.diffusers.unet import unet_from_diffusers_state, unet_kwargs_from_diffusers
            from diffusion_pl.networks.unet import UNet

            net = unet_from_diffusers_state(config, state_dict)
            net_spec = _full_spec(UNet, unet_kwargs_from_diffusers(config), "diffusion_pl.networks.unet.UNet")
        else:
            from diffusion_pl.interop.diffusers.dit import dit_from_diffusers_state, dit_kwargs_from_diffusers
            from diffusion_pl.networks.dit import DiT

            net = dit_from_diffusers_state(config, state_dict, source=str(file))
            net_spec = _full_spec(DiT, dit_kwargs_from_diffusers(config), "diffusion_pl.networks.dit.DiT")
            own_vae = (path / "vae" / "config.json").is_file()
            pipeline = (str(source) if not Path(str(source)).expanduser().exists() else str(path.resolve())) \
                if own_vae else None  # a hub id stays a hub id: the VAE's weights come with its first use
            extra = _autoencoder_hparams(vae, pipeline) if net.in_channels == 4 else {}
        scheduler_file = _scheduler_file(path, folder)
        scheduler = _read_json(scheduler_file) if scheduler_file is not None else None
        process, prediction, hints = scheduler_spec(scheduler, str(scheduler_file or "scheduler_config.json"))
        if kind == "dit" and scheduler is None:
            hints["clip_x0"] = None  # DiT samples latents without clipping (DiT sample.py, clip_denoised=False)
        provenance.update(format=f"diffusers {config.get('_class_name')}", weights_file=str(file),
                          scheduler=scheduler, scheduler_file=None if scheduler_file is None else str(scheduler_file))
        weights = net.state_dict()
    if hints["sampler"] is not None and net.learned_variance:
        hints["sampler"]["init_args"]["variance"] = "learned"
    provenance.update(weights_sha256=sha256_file(provenance["weights_file"]), sampler=hints["sampler"],
                      clip_x0=hints["clip_x0"])
    return write_imported_checkpoint(out, net_spec, process, prediction, weights, provenance, extra, overwrite)
