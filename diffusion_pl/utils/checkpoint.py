"""The one reader of the project's own checkpoint files: `.ckpt` files and PowerEMA snapshots.

A `.ckpt` is the dict that Lightning's Trainer saves (`diffusion-pl fit`, with LightningCLI's saved config
as `hyper_parameters`) or that `diffusion-pl import` writes in the same layout; a snapshot is the file the
PowerEMA callback writes (diffusion_pl/training/phema.py). Every command and library function that opens
one goes through `read_checkpoint` / `read_snapshot`, so all of them apply the same rules:

- tensors load with `weights_only=True` (no pickled code runs) and `mmap=True` (a large file is paged in,
  not copied);
- a file that is missing, not a torch archive, or not a checkpoint dict is refused in one line that names
  it and what was expected, the same line on every path;
- the saved config is code: LightningCLI and jsonargparse import every `class_path` it names. Every import
  path in it is checked against diffusion_pl.utils.trust.TRUSTED_PACKAGES *before* anything is imported,
  and refused in one line naming it unless the caller trusts the file (`trust_config=True`, the commands'
  `--trust_config`);
- class paths of older checkpoints are rewritten to today's modules (below).

Old checkpoints. Configs saved before the package was laid out in layers (commit 47eced5) name modules
that have moved since (`diffusion_pl.module.DiffusionModule` is now in diffusion_pl.training.module) and
names that the old subpackage __init__ files re-exported (`diffusion_pl.processes.VPLinear` is defined in
diffusion_pl.processes.variance_preserving; today's __init__ files re-export nothing). `ALIASES` maps each
old dotted path to the new one: a key that was a module rewrites every path under it, a key that was a
re-exported name rewrites that name; the longest matching key wins. No key resolves today, so a current
path is never rewritten (tests/utils/test_checkpoint_reader.py resolves both sides of every entry).
`read_checkpoint` applies the table to the saved config (and the snapshot format) as it reads a file; the
file itself is left as it is, and what is written from the read config (reconstruct-ema's copies, exports)
carries the new paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from diffusion_pl.utils.errors import MissingFileError, UserValueError
from diffusion_pl.utils.trust import TRUSTED_PACKAGES, untrusted_imports

__all__ = ["ALIASES", "EXPECTED", "Checkpoint", "read_checkpoint", "read_snapshot", "upgrade_config", "upgrade_path"]

EXPECTED = "a .ckpt file written by `diffusion-pl fit` or `diffusion-pl import`"
CONFIG_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")  # where Lightning saves the configs


def _moved(modules: dict[str, str]) -> dict[str, str]:
    return {f"diffusion_pl.{old}": f"diffusion_pl.{new}" for old, new in modules.items()}


def _names(old_package: str, new_module: str, names: str) -> dict[str, str]:
    return {f"diffusion_pl.{old_package}.{name}": f"diffusion_pl.{new_module}.{name}" for name in names.split()}


# old dotted path (before commit 47eced5) -> today's; see the module docstring
ALIASES: dict[str, str] = {
    # modules that moved
    **_moved({old: f"utils.{old}" for old in ("errors", "fileio", "hub", "lightning_compat", "paths", "seeding",
                                               "trust")}),
    **_moved({old: f"training.{old}" for old in ("module", "augment", "phema")}),
    **_moved({"autoencoder": "codecs.autoencoder", "run_folder": "cli.run_folder",
              "generation": "evaluation.generation", "callbacks.checkpointing": "training.callbacks.checkpointing",
              "callbacks.phema": "training.callbacks.power_ema", "callbacks.sample_grid": "evaluation.sample_grid",
              "callbacks.fid": "evaluation.fid_callback", "callbacks._every_n": "evaluation.every_n",
              "commands.ema_sweep": "evaluation.ema_sweep", "interop.export": "interop.safetensors"}),
    **_moved({f"metrics.{old}": f"evaluation.metrics.{old}" for old in ("inception", "statistics", "pixels",
                                                                        "published")}),
    **_moved({f"commands.{old}": f"cli.{old}" for old in ("common", "evaluate", "export", "import_model", "prepare",
                                                          "reconstruct_ema", "sample", "sampler_spec")}),
    **_moved({f"interop.diffusers_{old}": f"interop.diffusers.{old}" for old in ("unet", "dit", "export")}),
    # the old diffusion_pl/cli.py (today diffusion_pl.cli is a package; its `main` is now a module)
    **_names("cli", "cli.fit", "DiffusionCLI fill_network_shape"),
    # names the old package __init__ files (and the data/prepare.py shim) re-exported
    **_names("callbacks", "training.callbacks.checkpointing", "AtomicCheckpointIO PreemptionCheckpoint "
                                                              "find_resume_checkpoint"),
    **_names("callbacks", "training.callbacks.power_ema", "PowerEMA"),
    **_names("callbacks", "evaluation.sample_grid", "SampleGrid"),
    **_names("callbacks", "evaluation.fid_callback", "FIDCallback"),
    **_names("data", "data.datamodule", "ShardDataModule"),
    **_names("data", "data.stream", "ShardStream"),
    **_names("data", "data.pixels", "to_signed_unit"),
    **_names("generation", "data.pixels", "to_uint8"),
    **_names("data", "data.shards", "load_manifest resolve_shards"),
    **_names("data", "data.builtin", "SHAPES ensure_shapes render_shapes"),
    **_names("data", "data.writer", "PrepareError Sample prepare write_shards"),
    **_names("data", "data.sources", "cifar10_batches cifar10_torchvision image_folder"),
    **_names("data.prepare", "data.writer", "FORMAT MANIFEST ORDER_SEED SHARD_PATTERN PrepareError Sample Source "
                                            "Unreadable prepare write_shards"),
    **_names("data.prepare", "data.sources", "IMAGE_EXTS cifar10_batches cifar10_torchvision image_folder"),
    **_names("data.prepare", "data.png", "encode_png"),
    **_names("data.prepare", "data.tario", "tar_members"),
    **_names("data.prepare", "utils.paths", "cache_dir"),
    **_names("data.prepare", "cli.prepare", "main"),
    **_names("interop", "interop.safetensors", "Exported export_checkpoint load_exported read_export_config"),
    **_names("metrics", "evaluation.generation", "FULL_PROTOCOL_SAMPLES class_labels_for generate metric_prefix "
                                                 "rank_indices rank_world sampler_label"),
    **_names("metrics", "data.pixels", "to_uint8"),
    **_names("metrics", "evaluation.metrics.inception", "INCEPTION_URL InceptionFeatures InceptionWeightsError "
                                                        "WEIGHTS_ENV inception_weights_file load_inception "
                                                        "random_inception_weights"),
    **_names("metrics", "evaluation.metrics.statistics", "PROTOCOL ReferenceStats SampleMetrics extract fingerprint "
                                                         "frechet_distance gaussian_stats reference_stats"),
    **_names("metrics", "data.reference", "reference_images"),
    **_names("networks", "networks.unet", "UNet"),
    **_names("networks", "networks.dit", "DiT dit_s_2 dit_b_2 dit_l_2 dit_xl_2 dit_tiny"),
    **_names("networks", "networks.unet_presets", "unet_ddpm_cifar10 unet_ddpmpp_cifar10 unet_ddpmpp_score_sde "
                                                  "unet_adm_cifar10 unet_ncsnpp_cifar10 unet_tiny"),
    **_names("networks", "networks.presets", "PRESETS"),
    **_names("processes", "processes.base", "Process AttributeRepr append_dims check_positive check_nonnegative"),
    **_names("processes", "processes.variance_preserving", "OrnsteinUhlenbeck VPLinear VPCosine DDPMDiscrete SubVP"),
    **_names("processes", "processes.exploding", "VE EDM"),
    **_names("processes", "processes.interpolants", "RectifiedFlow Trigonometric"),
    **_names("sampling", "sampling.api", "sample SampleOutput"),
    **_names("sampling", "sampling.base", "Sampler"),
    **_names("sampling", "sampling.grids", "TimeGrid UniformGrid QuadraticGrid KarrasGrid LogSNRGrid ExplicitGrid "
                                           "TimestepGrid"),
    **_names("sampling", "sampling.noise", "Noise GeneratorNoise SeededNoise"),
    **_names("sampling", "sampling.posterior", "DDPM DDIM"),
    **_names("sampling", "sampling.sde", "EulerMaruyama PredictorCorrector AnnealedLangevin"),
    **_names("sampling", "sampling.ode", "EulerODE HeunODE AdaptiveODE"),
    **_names("sampling", "sampling.edm", "EDMStochastic"),
    **_names("sampling", "sampling.dpm_solver", "DPMSolverPP"),
}


def upgrade_path(path: str) -> str:
    """Today's dotted path for `path` (a class path, or a callable given by name) by `ALIASES`; others as given."""
    parts = path.split(".")
    for n in range(len(parts), 1, -1):  # the longest old prefix first: a re-exported name before its package
        new = ALIASES.get(".".join(parts[:n]))
        if new is not None:
            return ".".join([new, *parts[n:]])
    return path


def upgrade_config(config: Any) -> Any:
    """A copy of a saved config with every dotted `diffusion_pl.` path in its values passed through `upgrade_path`."""
    if isinstance(config, dict):
        return {key: upgrade_config(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(upgrade_config(value) for value in config)
    if isinstance(config, str) and config.startswith("diffusion_pl.") and all(
            part.isidentifier() for part in config.split(".")):
        return upgrade_path(config)
    return config


@dataclass(frozen=True)
class Checkpoint:
    """A `.ckpt` file as read: the parts the project uses, and the whole dict for Lightning.

    `config` is the saved `hyper_parameters` with old class paths rewritten ({} when the file has none);
    `raw` is everything torch.load returned, holding that same rewritten config. Nothing is copied: with the
    default map_location the tensors are the memory-mapped ones of the file.
    """

    path: str
    global_step: int
    config: dict[str, Any]
    state_dict: dict[str, Tensor]
    raw: dict[str, Any]


def _load(path: str, map_location: Any, what: str, expected: str) -> Any:
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} {path} does not exist: expected {expected}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as err:  # truncated, foreign or text files: torch's own message talks of zip archives
        raise UserValueError(f"{path} is not a {what} (torch.load failed: {type(err).__name__}): "
                             f"expected {expected}") from err


def _layout_problem(raw: Any) -> str | None:
    """Why a loaded object is not a checkpoint dict, or None."""
    if not isinstance(raw, dict):
        return f"it holds a {type(raw).__name__}"
    if not isinstance(raw.get("global_step"), int):
        return "no global_step"
    for key in ("state_dict", *CONFIG_KEYS):
        if key in raw and not isinstance(raw[key], dict):
            return f"its {key} is a {type(raw[key]).__name__}"
    return None


def read_checkpoint(path: str | os.PathLike, *, trust_config: bool = False, trusted: Iterable[str] = (),
                    map_location: Any = "cpu", trust_option: str = "--trust_config") -> Checkpoint:
    """Read a `.ckpt` file (weights_only, mmap), rewrite old class paths, check the config's imports.

    Args:
        path: the file.
        trust_config: skip the trust check: the caller trusts the file, or imports nothing it names (reading
            only the step or the weights).
        trusted: import paths allowed besides TRUSTED_PACKAGES (the classes a recipe names itself).
        map_location: as torch.load's.
        trust_option: how the refusal tells the user to trust the file (the caller's option).

    Raises (each one line): MissingFileError; UserValueError for a file that is not a checkpoint and for a
    config that imports from outside TRUSTED_PACKAGES and `trusted`.
    """
    path = os.fspath(path)
    raw = _load(path, map_location, "checkpoint", EXPECTED)
    problem = _layout_problem(raw)
    if problem is not None:
        raise UserValueError(f"{path} is not a checkpoint ({problem}): expected {EXPECTED}")
    for key in CONFIG_KEYS:
        if key in raw:
            raw[key] = upgrade_config(raw[key])
    config = raw.get("hyper_parameters", {})
    if not trust_config:
        allowed = set(trusted)
        untrusted = [name for name in untrusted_imports(config) if name not in allowed]
        if untrusted:
            raise UserValueError(f"checkpoint {path} names {', '.join(untrusted[:3])}, outside the trusted packages "
                                 f"{', '.join(TRUSTED_PACKAGES)}: its config is code (loading it imports and runs "
                                 f"that module); pass {trust_option} only if you trust where the file came from")
    return Checkpoint(path, raw["global_step"], config, raw.get("state_dict", {}), raw)


def read_snapshot(path: str | os.PathLike, expected_format: str) -> dict[str, Any]:
    """A PowerEMA snapshot file (weights_only, mmap) as the dict the callback saved.

    Its `format` ("<module>/<version>") must be `expected_format`, the module part read through `ALIASES`
    (snapshots written before the re-layout say "diffusion_pl.phema/1").
    """
    path = os.fspath(path)
    expected = f"a snapshot written by the PowerEMA callback (format {expected_format!r})"
    data = _load(path, "cpu", "snapshot", expected)
    found = data.get("format") if isinstance(data, dict) else None
    module, _, version = found.partition("/") if isinstance(found, str) else ("", "", "")
    if f"{upgrade_path(module)}/{version}" != expected_format:
        what = f"format {found!r}" if isinstance(data, dict) else f"it holds a {type(data).__name__}"
        raise UserValueError(f"{path} is not a snapshot ({what}): expected {expected}")
    return data
