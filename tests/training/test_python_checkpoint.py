"""A DiffusionModule built in Python and fitted with a plain Trainer: its checkpoints load in sample / evaluate / export
like those of `diffusion-pl fit` (diffusion_pl/utils/recorded.py)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from diffusion_pl.cli.main import main
from diffusion_pl.losses import DenoisingLoss, LogNormalNoise, MinSNR
from diffusion_pl.networks.unet import UNet
from diffusion_pl.prediction import VPrediction
from diffusion_pl.processes.variance_preserving import VPCosine
from diffusion_pl.training.module import DiffusionModule, load_module
from diffusion_pl.utils.recorded import NotRecordable, init_spec
from tests.support.training import IMAGE_SIZE, make_datamodule, make_net


def _fit(module: DiffusionModule, root) -> str:
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root)
    trainer.fit(module, datamodule=make_datamodule())
    path = str(root / "python.ckpt")
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def python_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("python_fit")
    loss = DenoisingLoss(proposal=LogNormalNoise(p_mean=-1.0, p_std=1.4), weighting=MinSNR(gamma=4.0))
    module = DiffusionModule(make_net(), VPCosine(), VPrediction(), loss, ema_decay=0.9)
    return module, _fit(module, root)


def test_load_module_rebuilds_the_components_and_weights(python_ckpt):
    module, path = python_ckpt
    loaded = load_module(path)
    assert isinstance(loaded.process, VPCosine) and isinstance(loaded.prediction, VPrediction)
    assert (loaded.loss_fn.proposal.p_mean, loaded.loss_fn.proposal.p_std, loaded.loss_fn.weighting.gamma) == \
        (-1.0, 1.4, 4.0)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert loaded.averaging.decay == 0.9


def test_sample_and_export_read_a_python_checkpoint(python_ckpt, tmp_path):
    _, path = python_ckpt
    assert main(["sample", "--ckpt_path", path, "--sampler", "ddim", "--steps", "2", "--num_samples", "2",
                 "--out", str(tmp_path / "samples")]) == 0
    assert len(list((tmp_path / "samples").rglob("*.png"))) == 2
    assert main(["export", "--ckpt_path", path, "--out", str(tmp_path / "export")]) == 0
    assert any((tmp_path / "export").iterdir())


def test_an_unimportable_network_warns_and_its_checkpoint_is_refused_in_one_line(tmp_path):
    class Inline(UNet):  # defined in a function: no import path
        pass

    net = Inline(img_resolution=IMAGE_SIZE, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=())
    with pytest.warns(UserWarning, match=r"net is a .*Inline defined in .*cannot be imported by name"):
        module = DiffusionModule(net, VPCosine(), VPrediction())
    path = _fit(module, tmp_path)
    with pytest.raises(ValueError, match="has no saved config") as err:
        load_module(path)
    assert "\n" not in str(err.value)


def test_init_spec_fills_defaults_nests_components_and_names_what_it_cannot_write():
    spec = init_spec(DenoisingLoss(proposal=LogNormalNoise(), weighting=MinSNR()), "loss")
    assert spec["class_path"] == "diffusion_pl.losses.DenoisingLoss"
    assert spec["init_args"]["proposal"] == {"class_path": "diffusion_pl.losses.LogNormalNoise",
                                             "init_args": {"p_mean": -1.2, "p_std": 1.2}}
    assert spec["init_args"]["p_uncond"] == 0.0  # a default, filled in
    net_spec = init_spec(make_net(), "net")
    assert net_spec["init_args"]["channel_mult"] == [1, 2]  # a tuple written as a list (YAML, jsonargparse)
    with pytest.raises(NotRecordable, match=r"^loss.proposal is a Tensor"):
        init_spec(DenoisingLoss(proposal=torch.zeros(1)), "loss")


def test_a_deep_copy_keeps_the_record_of_the_original():
    import copy

    net = make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert init_spec(copy.deepcopy(net), "net") == init_spec(net, "net")
