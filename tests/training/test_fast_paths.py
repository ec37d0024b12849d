"""The fast-path switches of training (docs/guide/training.md, "Fast paths"): activation checkpointing and
foreach / fused Adam from a recipe, equal weights with every Adam implementation, and bf16-mixed with
float32 master weights."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
import yaml

from diffusion_pl.cli.main import main
from diffusion_pl.training.callbacks.tf32 import TF32
from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.utils.checkpoint import read_checkpoint
from tests.support.training import make_datamodule, make_module


def _trainer(root, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                     limit_val_batches=0, **kwargs)


def _fused_adam_on_cpu() -> str | None:
    """Why fused Adam cannot run on this CPU build (None when it can)."""
    try:
        param = torch.nn.Parameter(torch.zeros(2))
        param.grad = torch.ones(2)
        torch.optim.Adam([param], fused=True).step()
    except (RuntimeError, ValueError) as err:
        return f"fused Adam is not available on CPU in torch {torch.__version__}: {err}"
    return None


@pytest.mark.slow
def test_a_recipe_turns_on_checkpointing_and_foreach_adam(tmp_path, tiny_fit_config):
    config = tiny_fit_config(max_steps=2, logger=False, default_root_dir=str(tmp_path / "run"))
    config["model"]["net"]["init_args"]["checkpoint_activations"] = True
    config["model"]["optimizer"] = {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3, "foreach": True}}
    config["trainer"]["callbacks"] = [{"class_path": "diffusion_pl.training.callbacks.tf32.TF32",
                                       "init_args": {"matmul": True, "cudnn": False}}]
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "fit.yaml")]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert saved["net"]["init_args"]["checkpoint_activations"] is True
    assert saved["optimizer"]["init_args"]["foreach"] is True
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before  # restored at the end
    ckpt = str(max((tmp_path / "run").rglob("*.ckpt")))
    checkpoint = read_checkpoint(ckpt)
    assert checkpoint.raw["global_step"] == 2
    assert checkpoint.raw["optimizer_states"][0]["param_groups"][0]["foreach"] is True
    # the option adds no key: the checkpoint loads into a network built without it
    from diffusion_pl.training.module import load_module

    module = load_module(ckpt)
    assert module.net.checkpoint_activations is True
    plain = type(module.net)(**{**saved["net"]["init_args"], "checkpoint_activations": False,
                                "img_resolution": module.net.img_resolution, "in_channels": module.net.in_channels})
    plain.load_state_dict(module.net.state_dict(), strict=True)


def _train_with(root, optimizer, steps: int = 3, **trainer) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    module = make_module(optimizer=optimizer)
    _trainer(root, steps, **trainer).fit(module, make_datamodule())
    return {name: p.detach().clone() for name, p in module.net.named_parameters()}


IMPLEMENTATIONS = {"foreach": dict(foreach=True), "fused": dict(fused=True)}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fast_adam_gives_the_weights_of_the_plain_loop(tmp_path, optimizer, implementation):
    if implementation == "fused" and (reason := _fused_adam_on_cpu()):
        pytest.skip(reason)
    loop = _train_with(tmp_path / "loop", functools.partial(optimizer, lr=1e-3, foreach=False, fused=False))
    fast = _train_with(tmp_path / "fast", functools.partial(optimizer, lr=1e-3, **IMPLEMENTATIONS[implementation]))
    initial = make_module().net.state_dict()
    assert any(not torch.equal(loop[k], initial[k]) for k in loop)  # the steps moved the weights
    for name in loop:
        torch.testing.assert_close(fast[name], loop[name], rtol=1e-5, atol=1e-6, msg=name)


class _OutputDtypes(L.Callback):
    """Records the dtype of the network's output in each training step."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def on_train_start(self, trainer, pl_module):
        pl_module.net.conv_out.register_forward_hook(lambda _m, _i, out: self.dtypes.append(out.dtype))


@pytest.mark.slow
def test_bf16_mixed_trains_on_cpu_with_float32_master_weights(tmp_path):
    L.seed_everything(0, verbose=False)
    module = make_module()
    before = {name: p.detach().clone() for name, p in module.net.named_parameters()}
    recorder = _OutputDtypes()
    _trainer(tmp_path, 2, precision="bf16-mixed", callbacks=[recorder]).fit(module, make_datamodule())
    assert recorder.dtypes == [torch.bfloat16, torch.bfloat16]  # the network ran under bf16 autocast
    for name, p in module.net.named_parameters():
        assert p.dtype == torch.float32, name  # master weights, updated in float32
    assert any(not torch.equal(p, before[name]) for name, p in module.net.named_parameters())
    assert all(p.dtype == torch.float32 for p in module.ema.parameters())
    state = module.trainer.optimizers[0].state
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())


class _Policy(L.Callback):
    """Records the TF32 settings in force during the training steps."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, bool]] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.add((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))


@pytest.mark.slow
@pytest.mark.parametrize("matmul, cudnn, expected", [(True, True, ("high", True)), (False, False, ("highest", False))],
                         ids=["dit-policy", "edm-policy"])
def test_tf32_callback_sets_the_policy_for_the_run_and_restores_it(tmp_path, matmul, cudnn, expected):
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    policy = _Policy()
    _trainer(tmp_path, 2, callbacks=[TF32(matmul=matmul, cudnn=cudnn), policy]).fit(make_module(), make_datamodule())
    assert policy.seen == {expected}
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before


def test_tf32_callback_refuses_a_non_bool_in_one_line():
    with pytest.raises(UserValueError, match=r"TF32: matmul='high': expected true or false"):
        TF32(matmul="high")


@pytest.mark.parametrize("cuda", [True, False])
def test_batches_are_pinned_whenever_cuda_is_available(cuda, monkeypatch):
    """Pinned host memory on a CUDA machine (the loaders' pin_memory), so that Lightning's copy to the GPU, which
    passes non_blocking=True for every device but cpu and mps, overlaps the step."""
    from lightning.fabric.utilities.apply_func import _BLOCKING_DEVICE_TYPES

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    data = make_datamodule()
    data.setup("fit")
    assert data.train_dataloader().pin_memory is cuda
    assert "cuda" not in _BLOCKING_DEVICE_TYPES  # Lightning copies batches to a GPU with non_blocking=True
