"""The `diffusion-pl` command: LightningCLI's fit / validate / test / predict plus prepare, sample, evaluate.

Training subcommands are LightningCLI (components picked by `class_path` in YAML, `--print_config`,
the resolved config saved in every run folder). The project's own subcommands have their own
argparse front ends and are dispatched before LightningCLI sees the arguments.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import ActionYesNo, Namespace
from jsonargparse._actions import _ActionPrintConfig  # skip_print_config: the first of two parses prints nothing
from jsonargparse.typing import import_object
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol  # as AtomicCheckpointIO uses it
from lightning.pytorch import __version__ as lightning_version
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_pl.training.callbacks.checkpointing import (AtomicCheckpointIO, DeferredRequeue, FinalCheckpoint,
                                                           PreemptionCheckpoint, checkpoint_step,
                                                           find_resume_checkpoint)
from diffusion_pl.training.callbacks.monitor import TrainingMonitor
from diffusion_pl.codecs.latent import codec_for
from diffusion_pl.utils.checkpoint import Checkpoint, read_checkpoint
from diffusion_pl.utils.classes import canonical_class_path
from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.training.shapes import FILLED, DataShape, network_fill
from diffusion_pl import processes
from diffusion_pl.networks.presets import PRESETS  # imports UNet and DiT: `fit --help` lists them for --model.net
from diffusion_pl.utils.classes import import_submodules
from diffusion_pl.cli.fit_parser import CONFIG_HELP, DiffusionArgumentParser, RecipeConfigFile
from diffusion_pl.cli.run_folder import (RunFolderError, lock_run_folder, previous_run_outputs, release_run_folder,
                                         remove_run_outputs)

__all__ = ["DiffusionCLI", "default_log_every_n_steps", "fill_network_shape", "missing_package"]

# the module arguments that make a checkpoint's network: an explicit --ckpt_path's saved ones are used
CHECKPOINT_MODEL_KEYS = ("net", "process", "prediction")
RESUME_KEYWORDS = ("last", "hpc", "best", "registry")  # --ckpt_path values that name no file

# Resuming writes into a checkpoint folder that holds the run's earlier checkpoints, on purpose; folders
# of other runs are refused before training (diffusion_pl.cli.run_folder), so Lightning's warning says nothing.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# Lightning 2.6 calls torch.utils._pytree's LeafSpec, which torch 2.14 deprecates (lightning/pytorch/utilities/
# _pytree.py:21), once per fit: nothing a user can act on (pyproject.toml filters it for the tests too).
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

class DiffusionCLI(LightningCLI):
    """LightningCLI for DiffusionModule and any LightningDataModule, with crash-safe checkpointing.

    On top of LightningCLI: `trainer.default_root_dir` is the one option that places a run (see
    diffusion_pl.cli.run_folder); network shape options left unset (`in_channels`, `img_resolution`) are
    filled from the data; `--ckpt_path last` resumes from the newest checkpoint by stored step; the
    network (net / process / prediction) a recipe leaves out comes from the --ckpt_path checkpoint's saved
    config (fine-tuning an import: `parse_arguments`), read by diffusion_pl.utils.checkpoint (older class paths
    rewritten; classes outside the trusted packages and the recipe's own refused unless `--trust_config`);
    every fit saves its final step and saves on SIGTERM.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", DiffusionArgumentParser)
        self._lock_fd: int | None = None
        self._checkpoint: Checkpoint | None = None  # the --ckpt_path file as read while parsing
        super().__init__(
            DiffusionModule,
            None,
            subclass_mode_data=True,
            auto_configure_optimizers=False,  # the module takes `optimizer:` itself
            args=args,
            run=run,
            **kwargs,
        )

    def init_parser(self, **kwargs: Any):
        """LightningCLI's parser (lightning/pytorch/cli.py `init_parser`) with `--config` that also takes a recipe name."""
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={lightning_version}"])
        parser = self.parser_class(**kwargs)
        parser.add_argument("-c", "--config", action=RecipeConfigFile, help=CONFIG_HELP)
        return parser

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit and validate only (diffusion_pl.cli.main says why test and predict are not offered)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def parse_arguments(self, parser, args: Any) -> None:
        # LightningCLI puts an explicit --ckpt_path's saved config (hyper_parameters) over the parsed model
        # section after parsing (_parse_ckpt_path), but model.net and model.process are required *while*
        # parsing. So a first parse, unvalidated, finds --ckpt_path wherever it was given (option, recipe,
        # env), and the checkpoint's net / process / prediction become the parser's defaults: a fine-tuning
        # command needs no model section (`fit --ckpt_path imported.ckpt --data.shards ...`). The recipe's
        # values still parse over these defaults, and the checkpoint's over those, as before.
        ckpt_path, saved = self._checkpoint_model_defaults(parser, args)
        super().parse_arguments(parser, args)
        if not saved or not Path(ckpt_path).is_file():  # `last`: the recipe's model section is kept, as before
            return
        model = self.config[self.config["subcommand"]].get("model")
        differ = [f"model.{key}" for key, value in saved.items() if _differs(model.get(key), value)]
        if differ:  # LightningCLI's rule, said aloud: the checkpoint's network wins over the recipe's
            fields = ", ".join(f"model.{key}" for key in CHECKPOINT_MODEL_KEYS)
            print(f"diffusion-pl: {fields} come from the checkpoint {ckpt_path} (its saved config); the recipe's "
                  f"{', '.join(differ)} {'is' if len(differ) == 1 else 'are'} not used", file=sys.stderr)

    def _checkpoint_model_defaults(self, parser, args: Any) -> tuple[str | None, dict[str, Any]]:
        """--ckpt_path and its saved net / process / prediction, now the subcommand parser's defaults."""
        if not getattr(self, "_subcommand_parsers", None):
            return None, {}  # run=False: no subcommand, no ckpt_path
        with _ActionPrintConfig.skip_print_config():  # --print_config: printed by the second parse
            first = (parser.parse_object(args, _skip_validation=True) if isinstance(args, (dict, Namespace))
                     else parser.parse_args(args, _skip_validation=True))
        subcommand = first.get("subcommand")
        ckpt_path = first[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return None, {}
        missing = [key for key in ("net", "process") if first[subcommand].get(f"model.{key}") is None]
        source, root = ckpt_path, Path(first[subcommand].get("trainer.default_root_dir") or os.getcwd())
        if ckpt_path == "last" and missing:  # resuming a run whose recipe names no network: its newest checkpoint
            source = find_resume_checkpoint(root, root / "checkpoints", recursive=False)
        # every local file is read here, before anything its config names is imported: missing, foreign and
        # untrusted files end in one line
        is_file = source is not None and source not in RESUME_KEYWORDS and _is_local_file_protocol(str(source))
        if is_file:
            config = first[subcommand]
            saved = _saved_model_config(self._read_checkpoint(source, config.get("trust_config"), _class_paths(config)))
        else:
            saved = {}
        unset = " and ".join(f"model.{key}" for key in missing if key not in saved)
        if unset:  # the second parse would fail on them: say why in one line
            where = ckpt_path if source == ckpt_path else f"{ckpt_path} ({source})"
            if source is None:
                raise UserValueError(f"--ckpt_path last finds no checkpoint in {root} and the recipe sets no {unset}: "
                                     f"expected a recipe (--config) that names {unset}, e.g. the run's config.yaml")
            if is_file:
                raise UserValueError(f"--ckpt_path {where} holds no saved {unset} (hyper_parameters) and the recipe "
                                     f"sets none: expected a recipe (--config) that names {unset}, or a checkpoint "
                                     "written by `diffusion-pl fit` or `diffusion-pl import`")
        if saved:
            self._subcommand_parsers[subcommand].set_defaults({f"model.{key}": v for key, v in saved.items()})
        return ckpt_path, saved

    def _read_checkpoint(self, path: str | os.PathLike, trust_config: bool, trusted: set[str]) -> Checkpoint:
        """`path` through the one checkpoint reader, kept for _parse_ckpt_path. Its config may import from the
        trusted packages, from `trusted` (the classes the recipe names itself: the user's own choice), or, with
        --trust_config, from anywhere."""
        if self._checkpoint is None or self._checkpoint.path != os.fspath(path):
            self._checkpoint = read_checkpoint(path, trust_config=bool(trust_config), trusted=trusted,
                                               trust_option="--trust_config")
        return self._checkpoint

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's `_parse_ckpt_path` (lightning/pytorch/cli.py) on the checkpoint as `_read_checkpoint` read
        it: the saved hyper-parameters, class paths of older checkpoints rewritten, over the parsed model section.
        (LightningCLI's own reads the file again and parses its config as it was saved.)"""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        # read while parsing (the same path); else checked against the trusted packages alone, as the parsed model
        # section holds the defaults taken from this very checkpoint
        checkpoint = self._read_checkpoint(ckpt_path, self.config[subcommand].get("trust_config"), set())
        hparams = copy.deepcopy(checkpoint.config)
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def add_arguments_to_parser(self, parser) -> None:
        # --help lists the known subclasses of each class-typed option: those imported by now
        import_submodules(processes)
        net = parser._option_string_actions.get("--model.net")  # argparse keeps no public map of its options
        if net is not None:
            modules: dict[str, list[str]] = {}
            for fn in PRESETS:
                modules.setdefault(fn.__module__, []).append(fn.__name__)
            names = "; ".join(f"{module}.{{{', '.join(fns)}}}" for module, fns in modules.items())
            net.help = (f"{net.help} Presets (a class_path, set like a class): {names}. `diffusion-pl list networks` "
                        "says what each is.")
        parser.add_argument("--overwrite", action=ActionYesNo, default=False,
                            help="fit: start over in a run folder that holds a previous run, deleting its "
                                 "checkpoints, samples, logs and config.yaml (other files stay)")
        parser.add_argument("--trust_config", action=ActionYesNo, default=False,
                            help="allow a --ckpt_path checkpoint whose saved config imports from packages other than "
                                 "diffusion_pl, torch, lightning, timm, diffusers and the recipe's own classes (a "
                                 "config is code: only for checkpoints you trust)")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, ModuleNotFoundError) as err:
            missing = missing_package(err)
            if missing is None:
                raise
            raise UserValueError(missing) from err

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        fill_network_shape(config)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        # No logger configured: TensorBoard straight into the run folder (Lightning's default would add
        # lightning_logs/version_N), so checkpoints (ModelCheckpoint without dirpath), samples and
        # config.yaml all follow --trainer.default_root_dir.
        if config.get("logger") in (None, True):
            from lightning.pytorch.loggers import TensorBoardLogger

            # default_hp_metric=False: no placeholder `hp_metric` -1 beside the hyper-parameters
            config["logger"] = TensorBoardLogger(save_dir=config.get("default_root_dir") or os.getcwd(), name="",
                                                 version="", default_hp_metric=False)
        if config.get("log_every_n_steps") is None:  # Lightning's 50 would log nothing in a 30-step run
            config["log_every_n_steps"] = default_log_every_n_steps(config.get("max_steps"))
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        # Always checkpoint atomically, save the final step, save on SIGTERM, requeue SLURM jobs at a step
        # boundary and log the learning rate, throughput, memory and EMA decay, whatever the recipe lists.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not any(isinstance(cb, FinalCheckpoint) for cb in trainer.callbacks):
            # first, so that its train-end save comes before ModelCheckpoint's own (last.ckpt only) one
            trainer.callbacks.insert(0, FinalCheckpoint())
        for cls in (PreemptionCheckpoint, DeferredRequeue, TrainingMonitor):
            if not any(isinstance(cb, cls) for cb in trainer.callbacks):
                trainer.callbacks.append(cls())
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:  # the run is over (or failed): free its folder, also for a next fit in this process
            release_run_folder(self._lock_fd)
            self._lock_fd = None

    def before_fit(self) -> None:
        trainer = self.trainer
        ckpt_path = self.config["fit"].get("ckpt_path")
        root = Path(trainer.default_root_dir)
        ckpt_cb = trainer.checkpoint_callback
        ckpt_dir = getattr(ckpt_cb, "dirpath", None) or root / "checkpoints"
        # (a missing --ckpt_path file was refused by _checkpoint_model_defaults, which reads every local one)
        if trainer.global_rank == 0:
            self._lock_fd = lock_run_folder(root)  # held until this process exits
            previous = previous_run_outputs(root, ckpt_dir)
            # a checkpoint from outside the run folder (an import, another run) starts a new run: rerunning the same
            # command (a requeued job) into a folder that has trained on would silently go back to that start
            foreign = ckpt_path not in (None, *RESUME_KEYWORDS) and _is_local_file_protocol(str(ckpt_path)) and not any(
                Path(ckpt_path).resolve().is_relative_to(Path(d).resolve()) for d in (root, ckpt_dir))
            if previous and (ckpt_path is None or foreign):
                if not self.config["fit"].get("overwrite"):
                    names = ", ".join(str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
                                      for p in previous[:3])
                    start = f" and --ckpt_path {ckpt_path} is from outside it (a new start)" if foreign else ""
                    raise RunFolderError(f"run folder {root} holds a previous run ({names}){start}: expected "
                                         "--ckpt_path last to continue it, --overwrite to start over, or another "
                                         "--trainer.default_root_dir")
                remove_run_outputs(previous)
                print(f"diffusion-pl: --overwrite: removed the previous run's outputs in {root}", file=sys.stderr)
        if ckpt_path == "last":
            self._resolve_last(root, ckpt_dir)

    def _resolve_last(self, root: Path, ckpt_dir: Path) -> None:
        """`--ckpt_path last`: the newest checkpoint in the run folder by stored global step."""
        # the run folder's top (SLURM's hpc_ckpt_N.ckpt) and the checkpoint folder: not a recursive
        # walk of default_root_dir, which defaults to the working directory
        path = find_resume_checkpoint(*dict.fromkeys([root, root / "checkpoints", Path(ckpt_dir)]), recursive=False)
        if self.trainer.global_rank != 0:
            pass  # every rank resolves the same file; rank 0 says which
        elif path is None:
            print(f"diffusion-pl: --ckpt_path last: no checkpoint in {root}; starting from scratch", file=sys.stderr)
        else:
            print(f"diffusion-pl: resuming from {path} (step {checkpoint_step(path)})", file=sys.stderr)
        # LightningCLI passes the *instantiated* config (config_init) to trainer.fit; the parsed one is
        # what config.yaml records. Both must say which checkpoint was loaded.
        self.config["fit"]["ckpt_path"] = path
        self.config_init["fit"]["ckpt_path"] = path


def default_log_every_n_steps(max_steps: int | None) -> int:
    """The Trainer's log_every_n_steps when the recipe sets none: 10, or a tenth of a run shorter than 100 steps."""
    if max_steps is None or max_steps < 0 or max_steps >= 100:
        return 10
    return max(1, max_steps // 10)


def missing_package(err: BaseException) -> str | None:
    """One line for a configured class (a logger) whose package is not installed, found in the chain of errors
    jsonargparse raises around it; None when no ModuleNotFoundError is in the chain.

    Lightning's loggers raise ModuleNotFoundError("Requirement 'wandb>=0.12.10' not met. HINT: ...") from
    __init__; a plain import failure names the module (`err.name`)."""
    seen, stack, missing, class_path = set(), [err], None, None
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ModuleNotFoundError) and missing is None:
            missing = current
        found = re.search(r"class_path '([^']+)'", str(current))
        class_path = class_path or (found.group(1) if found else None)
        stack += [current.__cause__, current.__context__]
    if missing is None:
        return None
    requirement = re.search(r"Requirement '([^']+)'", str(missing))
    package = requirement.group(1) if requirement else (missing.name or str(missing))
    what = f"{class_path} needs" if class_path else "the configuration needs"
    return f"{what} the package {package}, which is not installed: expected `pip install '{package}'`"


def _saved_model_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """A checkpoint's saved net / process / prediction (class_path + init_args), those it holds (not None)."""
    return {key: checkpoint.config[key] for key in CHECKPOINT_MODEL_KEYS if checkpoint.config.get(key) is not None}


def _class_paths(config: Any) -> set[str]:
    """Every `class_path` value in a parsed (sub)command config: the classes the recipe itself imports."""
    config = config.as_dict() if isinstance(config, Namespace) else config
    if isinstance(config, dict):
        found = {config["class_path"]} if isinstance(config.get("class_path"), str) else set()
        return found.union(*(_class_paths(value) for value in config.values()))
    if isinstance(config, (list, tuple)):
        return set().union(*(_class_paths(value) for value in config))
    return set()


def _differs(recipe: Any, saved: Any) -> bool:
    """Whether a recipe's parsed component says other than a checkpoint's saved one; None (unset: filled from
    the data, or not given) says nothing. Compared as YAML data: namespaces as dicts, tuples as lists."""
    def plain(value: Any) -> Any:
        value = value.as_dict() if isinstance(value, Namespace) else value
        if isinstance(value, dict):  # __path__: a file's; a class by any of its paths is the same class
            return {k: canonical_class_path(v) if k == "class_path" else plain(v) for k, v in value.items()
                    if not str(k).startswith("__")}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    recipe, saved = plain(recipe), plain(saved)
    if isinstance(recipe, dict) and isinstance(saved, dict):
        return any(_differs(value, saved.get(key)) for key, value in recipe.items())
    return recipe is not None and recipe != saved


def _throwaway(component: Any) -> Any:
    """An instance of a parsed `class_path` + `init_args` component, None when the config leaves it unset."""
    if not hasattr(component, "class_path"):
        return None
    init_args = component.get("init_args")
    return import_object(component.class_path)(**(init_args.as_dict() if init_args is not None else {}))


def fill_network_shape(config) -> None:
    """Set `model.net.init_args.in_channels` / `img_resolution` from the data when the config leaves them None.

    The shape is what the network sees of the data in the module's space (`Codec.network_view`): a latent
    module's codec takes it from the autoencoder's config, without loading or hashing its weights.
    """
    net, data = config.get("model.net"), config.get("data")
    if net is None or data is None or not hasattr(net, "init_args") or not hasattr(data, "class_path"):
        return
    unset = [key for key in FILLED if key in net.init_args and net.init_args[key] is None]
    if not unset:
        return
    # throwaway instances: ShardDataModule reads only its manifest (or one image) for these, an Autoencoder its config
    codec = codec_for(_throwaway(config.get("model.autoencoder")))
    seen = codec.network_view(_throwaway(data))  # what the network sees: images, or their latents
    values = network_fill(unset, DataShape.of(seen, size="img_resolution" in unset))
    for key, value in values.items():
        net.init_args[key] = value
    if values:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        print(f"diffusion-pl: model.net {shown} (from the data)", file=sys.stderr)
