"""Exported models: one network's weights as a safetensors file, with what samples from it as metadata.

`export_checkpoint(ckpt, out)` (the `diffusion-pl export` command) writes, from a `diffusion-pl fit`
checkpoint,

    OUT/model.safetensors   the EMA network's state_dict (or the raw network's, ema=False), keys as
                            `net.state_dict()` names them, dtypes as trained
    OUT/config.json         the same metadata as one JSON object, for people

Nothing in either file is pickled: `safetensors.torch.load_file` reads the tensors and
`safetensors.safe_open(path, "pt").metadata()` the metadata, a str -> str mapping:

    format                     "pt" (the safetensors convention for torch state_dicts)
    export_format              "1", the version of this layout
    net, process, prediction   JSON {"class_path": ..., "init_args": {...}}: model.net, model.process and
                               model.prediction exactly as the checkpoint's saved LightningCLI config holds
                               them (a prediction left unset is the module's default, EpsPrediction)
    weights                    "ema" or "raw"
    diffusion_pl_version       the framework version that wrote the file
    source_checkpoint_sha256   sha256 of the checkpoint file it was exported from
    global_step                the optimizer step of that checkpoint

`load_exported(path)` rebuilds the network, process and prediction from those class paths (jsonargparse,
as LightningCLI builds them from a recipe; class paths only from diffusion_pl.utils.trust.TRUSTED_PACKAGES
unless trust_config=True, the rule of `load_module`) and loads the weights strictly:

    from diffusion_pl import DDIM, Guidance, load_exported, sample

    exported = load_exported("exported/")              # or exported/model.safetensors
    out = sample(exported.model(), exported.process, exported.prediction, DDIM(steps=50),
                 (16, *exported.image_shape), seeds=range(16), guidance=Guidance(null_label=exported.null_label))
    images = out.x                                      # (16, C, H, W) in [-1, 1]
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion_pl.utils.checkpoint import read_checkpoint
from diffusion_pl.utils.errors import MissingFileError, UserValueError, one_line
from diffusion_pl.utils.fileio import atomic_path, sha256_file, writable_folder
from diffusion_pl.interop.weights import check_state_dict
from diffusion_pl.networks.base import ScoreNetwork, check_score_network
from diffusion_pl.prediction import EpsPrediction, Prediction, precondition
from diffusion_pl.processes.base import Process

__all__ = ["EXPORT_FORMAT", "WEIGHTS_FILE", "CONFIG_FILE", "Exported", "export_checkpoint", "load_exported",
           "read_export_config"]

EXPORT_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
COMPONENTS = {"net": nn.Module, "process": Process, "prediction": Prediction}  # metadata key -> base type
_INT_KEYS = ("export_format", "global_step")
_KEYS = ("export_format", *COMPONENTS, "weights", "diffusion_pl_version", "source_checkpoint_sha256", "global_step")
# the prediction DiffusionModule uses when the config leaves it unset
DEFAULT_PREDICTION = {"class_path": f"{EpsPrediction.__module__}.{EpsPrediction.__name__}", "init_args": {}}


@dataclass
class Exported:
    """An exported model rebuilt: the network (eval mode, weights loaded), its process and parameterization.

    config: the export's metadata decoded (what config.json holds), e.g. config["weights"] is "ema" or "raw".
    """

    net: ScoreNetwork
    process: Process
    prediction: Prediction
    config: dict[str, Any] = field(default_factory=dict)

    def model(self) -> nn.Module:
        """The network in the sampler's model contract (x_t, t, class_labels) -> F (`prediction.precondition`)."""
        return precondition(self.net, self.process, self.prediction)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the network generates (its declared `ScoreNetwork.image_shape`)."""
        return self.net.image_shape

    @property
    def null_label(self) -> int | None:
        """The unconditional label index for classifier-free guidance (as DiffusionModule.null_label), or None."""
        return self.net.null_label


# -- writing ---------------------------------------------------------------------------------------------

def _component_spec(value: Any, key: str) -> dict:
    """A saved config entry as {"class_path", "init_args"} JSON data (None: the module's default prediction)."""
    if value is None and key == "prediction":
        return dict(DEFAULT_PREDICTION)
    if not isinstance(value, dict) or not isinstance(value.get("class_path"), str):
        raise UserValueError(f"the checkpoint's saved config model.{key} is {str(value)[:80]!r}: expected a "
                             "class_path / init_args mapping as `diffusion-pl fit` saves it")
    spec = json.loads(json.dumps(value, default=str))  # plain JSON data (tuples -> lists)
    spec.setdefault("init_args", {})
    return spec


def _metadata(config: dict[str, Any]) -> dict[str, str]:
    """config -> safetensors metadata: the components as JSON, everything else as its str."""
    out = {"format": "pt"}
    for key in _KEYS:
        value = config[key]
        out[key] = json.dumps(value) if key in COMPONENTS else str(value)
    return out


def _check_out(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse an --out folder that holds another export (of another checkpoint, or the other weights)."""
    weights = out / WEIGHTS_FILE
    if overwrite or not weights.exists():
        return
    try:
        old = read_export_config(weights)
    except UserValueError:
        old = None
    same = old is not None and all(old.get(k) == config[k] for k in ("source_checkpoint_sha256", "weights"))
    if not same:
        raise UserValueError(f"--out {out} already holds {WEIGHTS_FILE} of another export: pass --overwrite to "
                             "replace it or choose another folder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` as a safetensors file atomically, with the umask's mode (safetensors itself writes 0600)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # a file meant to be shared


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, ema: bool = True, trust_config: bool = False,
                      overwrite: bool = False) -> Path:
    """Write OUT/model.safetensors and OUT/config.json from a `diffusion-pl fit` checkpoint; returns the weights file.

    The checkpoint is read by diffusion_pl.utils.checkpoint.read_checkpoint and rebuilt as `load_module` does
    (same trust rule, same errors), so a checkpoint whose config does not build, or whose weights do not fit
    it, is refused here rather than at load time. A rerun into the same folder with the same checkpoint and
    weights rewrites both files; another export there is refused unless `overwrite`. Each file is written
    atomically.
    """
    from diffusion_pl import __version__
    from diffusion_pl.training.module import module_from_checkpoint

    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # before reading a possibly large checkpoint
        raise UserValueError(f"--out {out} is a file: expected a folder (created if missing)")
    writable_folder(out, "--out")
    checkpoint = read_checkpoint(ckpt_path, trust_config=trust_config,
                                 trust_option="trust_config=True (--trust_config)")
    module = module_from_checkpoint(checkpoint)  # refuses a checkpoint without a saved config
    hparams = checkpoint.config  # as saved (older class paths rewritten), not re-resolved
    config: dict[str, Any] = {"export_format": EXPORT_FORMAT,
                              **{key: _component_spec(hparams.get(key), key) for key in COMPONENTS},
                              "weights": "ema" if ema else "raw", "diffusion_pl_version": __version__,
                              "source_checkpoint_sha256": sha256_file(ckpt_path),
                              "global_step": checkpoint.global_step}
    _check_out(out, config, overwrite)
    net = module.ema if ema else module.net
    # own contiguous copies: safetensors refuses tensors that share storage (tied weights) or are strided
    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for k, v in net.state_dict().items()}
    weights = out / WEIGHTS_FILE
    save_safetensors(weights, tensors, _metadata(config))
    with atomic_path(out / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=1) + "\n")
    return weights


# -- reading ---------------------------------------------------------------------------------------------

def _weights_file(path: str | Path) -> Path:
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise MissingFileError(f"exported model {file} does not exist: expected a folder written by "
                               f"`diffusion-pl export` or its {WEIGHTS_FILE}")
    return file


def read_export_config(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported model (a folder or its model.safetensors) decoded; no tensor is read."""
    from safetensors import safe_open

    file = _weights_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors' own error type for a foreign or truncated file
        raise UserValueError(f"{file} is not a safetensors file ({one_line(err, 80)}): expected the "
                             f"{WEIGHTS_FILE} written by `diffusion-pl export`") from err
    missing = [key for key in _KEYS if key not in metadata]
    if missing:
        raise UserValueError(f"{file} has no {', '.join(missing)} in its metadata: expected a file written by "
                             "`diffusion-pl export` (safetensors files from elsewhere need their own loader)")
    config: dict[str, Any] = {}
    for key in _KEYS:
        value = metadata[key]
        try:
            config[key] = json.loads(value) if key in COMPONENTS else int(value) if key in _INT_KEYS else value
        except ValueError as err:
            raise UserValueError(f"{file} metadata {key} is {value[:80]!r}: expected "
                                 f"{'a class_path / init_args JSON object' if key in COMPONENTS else 'an integer'}") \
                from err
    if config["export_format"] != EXPORT_FORMAT:
        raise UserValueError(f"{file} has export_format {config['export_format']}: expected {EXPORT_FORMAT} "
                             "(written by another diffusion_pl version)")
    for key in COMPONENTS:
        if not isinstance(config[key], dict) or not isinstance(config[key].get("class_path"), str):
            raise UserValueError(f"{file} metadata {key} is {metadata[key][:80]!r}: expected a JSON object with a "
                                 "class_path")
    return config


def _build(config: dict[str, Any], file: Path) -> dict[str, Any]:
    """The net, process and prediction the class paths name, built by jsonargparse as LightningCLI does."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    for key, base in COMPONENTS.items():
        parser.add_argument(f"--{key}", type=base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jsonargparse's deprecation notices; its errors are raised
        try:
            cfg = parser.parse_object({key: config[key] for key in COMPONENTS})
            instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
            built = instantiate(cfg)
        except Exception as err:  # a class path that does not import, or init_args the class does not take
            raise UserValueError(f"{file} metadata does not build ({one_line(err, 160)}): expected class paths and "
                                 "init_args of this diffusion_pl version") from err
    return {key: built[key] for key in COMPONENTS}


def load_exported(path: str | Path, device: str | torch.device = "cpu", trust_config: bool = False) -> Exported:
    """Rebuild an exported model (a `diffusion-pl export` folder or its model.safetensors), unpickling nothing.

    The metadata's class paths are imported only from diffusion_pl.utils.trust.TRUSTED_PACKAGES unless
    `trust_config` (a config is code, as for `load_module`); the weights must match the network
    exactly (every key, every shape), else a UserValueError names the keys that differ. The network
    is returned in eval mode on `device`.
    """
    from safetensors.torch import load_file

    from diffusion_pl.utils.trust import TRUSTED_PACKAGES, untrusted_imports

    file = _weights_file(path)
    config = read_export_config(file)
    untrusted = untrusted_imports({key: config[key] for key in COMPONENTS})
    if untrusted and not trust_config:
        raise UserValueError(f"{file} names classes outside {', '.join(TRUSTED_PACKAGES)} "
                             f"({', '.join(untrusted[:3])}): its config is code; pass trust_config=True if you "
                             "trust where it came from")
    built = _build(config, file)
    net = check_score_network(built["net"], f"{file} metadata net")
    tensors = load_file(str(file), device="cpu")
    check_state_dict(net, tensors, str(file), "the state_dict of the network its metadata describes")
    net.load_state_dict(tensors, strict=True)
    return Exported(net=net.to(device).eval(), process=built["process"], prediction=built["prediction"],
                    config=config)
