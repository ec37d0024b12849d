"""Lightning internals the project relies on: each test fails loudly when an upgrade renames one.

diffusion_pl/utils/lightning_compat.py wraps the ModelCheckpoint ones; DiffusionCLI overrides a few private
LightningCLI methods; the module and the data stream read two more private names.
"""

from __future__ import annotations

import inspect

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from diffusion_pl.utils import lightning_compat


def test_model_checkpoint_internals_used_by_final_checkpoint(tmp_path):
    callback = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    assert lightning_compat.last_step_saved(callback) == 0
    for name in ("_monitor_candidates", "_save_topk_checkpoint", "_save_last_checkpoint"):
        assert callable(getattr(callback, name, None)), f"ModelCheckpoint.{name} is gone"


def test_lightning_cli_internals_overridden_by_diffusion_cli():
    for name, params in {"_parse_ckpt_path": ["self"], "_instantiate_trainer": ["self", "config", "callbacks"],
                         "_run_subcommand": ["self", "subcommand"],
                         "parse_arguments": ["self", "parser", "args"]}.items():
        method = getattr(LightningCLI, name, None)
        assert method is not None, f"LightningCLI.{name} is gone"
        assert list(inspect.signature(method).parameters) == params, f"LightningCLI.{name} changed its signature"
    # before_fit reads config_init (what LightningCLI passes to trainer.fit)
    assert "self.config_init[subcommand]" in inspect.getsource(LightningCLI._prepare_subcommand_kwargs)
    # DiffusionCLI.parse_arguments: the checkpoint's network as the defaults, after LightningCLI's parse of the
    # arguments into self.config and before _parse_ckpt_path puts its hyperparameters over them; the first,
    # unvalidated parse uses jsonargparse's private _skip_validation and skip_print_config
    source = inspect.getsource(LightningCLI.__init__)
    assert source.index("self.parse_arguments(") < source.index("self._parse_ckpt_path()")
    from jsonargparse._actions import _ActionPrintConfig

    assert callable(getattr(_ActionPrintConfig, "skip_print_config", None))


def test_module_and_data_internals(tmp_path, monkeypatch, tiny_fit_config):
    """built_by_cli is True only inside LightningCLI's instantiation; batches_processed counts batches."""
    from diffusion_pl.cli.fit import DiffusionCLI
    from diffusion_pl.training.module import DiffusionModule

    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    assert not lightning_compat.built_by_cli()
    module = DiffusionCLI(args=tiny_fit_config(default_root_dir=str(tmp_path)), run=False).model
    assert isinstance(module, DiffusionModule) and "_instantiator" in module.hparams  # the CLI path was taken
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert lightning_compat.batches_processed(trainer) == 0


def test_module_from_checkpoint_rebuilds_what_load_from_checkpoint_does(tmp_path, monkeypatch, tiny_fit_config):
    """module_from_checkpoint runs the rest of Lightning's load_from_checkpoint (`_pl_migrate_checkpoint`, then
    `core.saving._load_state`) on a dict already read: the same module as load_from_checkpoint on the file."""
    import torch

    from diffusion_pl.cli.fit import DiffusionCLI
    from diffusion_pl.training.module import DiffusionModule

    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))
    config = tiny_fit_config(default_root_dir=str(tmp_path))
    config["model"]["net"]["init_args"].update(in_channels=3, img_resolution=8)
    module = DiffusionCLI(args=config, run=False).model
    path = tmp_path / "module.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0,
                "pytorch-lightning_version": L.__version__}, path)
    rebuilt = lightning_compat.module_from_checkpoint(DiffusionModule, torch.load(path, weights_only=True))
    reference = DiffusionModule.load_from_checkpoint(path, weights_only=True)
    assert type(rebuilt.net) is type(reference.net) and type(rebuilt.process) is type(reference.process)
    assert rebuilt.state_dict().keys() == reference.state_dict().keys() == module.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in rebuilt.state_dict().items())
