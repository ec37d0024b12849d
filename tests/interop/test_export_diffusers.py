"""`diffusion-pl export --format diffusers`: diffusers loads the folder and computes what the checkpoint computes.

Round trips: a `fit` checkpoint of a DDPM-style U-Net -> export -> `UNet2DModel.from_pretrained` gives
our outputs (float32 <= 1e-5, float64 <= 1e-10 with one shared float32 sinusoid, as in
tests/interop/test_interop_unet.py) and `DDPMScheduler.from_pretrained` our betas; a diffusers DiT -> import ->
export -> `DiTTransformer2DModel.from_pretrained` is the original, tensor for tensor. Networks and
processes diffusers cannot represent are refused, or written without a scheduler, in one line.
The safetensors round trip (fit -> export -> load_exported -> sample) is tests/interop/test_export.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from diffusion_pl.cli.main import main
from diffusion_pl.interop.diffusers.export import constructor_arguments
from diffusion_pl.interop.importer import import_pretrained, write_imported_checkpoint
from diffusion_pl.training.module import load_module
from diffusion_pl.networks.dit import DiT
from diffusion_pl.networks.unet import UNet
from tests.support.interop import DIT, LABELS, TIMESTEPS

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

DDPM_NET = {"class_path": "diffusion_pl.networks.unet.UNet",
            "init_args": {"model_channels": 128, "channel_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [8],
                          "dropout": 0.0, "downsample_padding": "same", "embedding_order": "sin_cos"}}
PROCESS = {"class_path": "diffusion_pl.processes.variance_preserving.DDPMDiscrete",
           "init_args": {"num_steps": 1000, "beta_start": 0.0002, "beta_end": 0.03, "beta_schedule": "scaled_linear"}}


@pytest.fixture(scope="module")
def fit_ckpt(tmp_path_factory, tiny_fit_config) -> str:
    """One step of a DDPM-style U-Net (128 channels, 8x8, attention at 8) on the built-in shapes, then every
    weight of the checkpoint re-randomised (DDPM's zero-initialised layers would hide a wrong mapping), the
    EMA's differently from the raw network's."""
    root = tmp_path_factory.mktemp("export_diffusers")
    config = tiny_fit_config(max_steps=1, logger=False, default_root_dir=str(root / "run"))
    config["model"].update(net=DDPM_NET, process=PROCESS)
    (root / "fit.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(root / "fit.yaml")]) == 0
    path = next((root / "run").rglob("*.ckpt"))
    checkpoint = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name, value in checkpoint["state_dict"].items():
        noise = torch.randn(value.shape, generator=generator)
        scale = 1 / value[0].numel() ** 0.5 if value.ndim > 1 else 0.1
        value.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else scale * noise)
    torch.save(checkpoint, path)
    return str(path)


def test_fit_checkpoint_exports_to_diffusers(fit_ckpt, tmp_path, capsys, our_sinusoid):
    assert main(["export", "--ckpt_path", fit_ckpt, "--out", str(tmp_path / "d"), "--format", "diffusers"]) == 0
    assert "UNet as diffusers UNet2DModel (EMA weights)" in capsys.readouterr().err
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "d").eval()
    module = load_module(fit_ckpt).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        ours, model = module.ema.to(dtype), theirs.to(dtype)
        if dtype == torch.float64:
            model.time_proj = our_sinusoid(ours)
        with torch.no_grad():
            expected = model(x.to(dtype), TIMESTEPS).sample
            diff = float((ours(x.to(dtype), TIMESTEPS) - expected).abs().max())
        assert expected.abs().max() > 0.1 and diff <= tol, (dtype, diff)
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "d")
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.prediction_type == "epsilon"
    alpha_bar = module.process.alpha(module.process.discrete_times()) ** 2
    torch.testing.assert_close(alpha_bar, scheduler.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    # and back: import the export, the same network and process
    import_pretrained(str(tmp_path / "d"), tmp_path / "back.ckpt")
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)
    saved = torch.load(fit_ckpt, weights_only=True)
    assert back["hyper_parameters"]["process"] == saved["hyper_parameters"]["process"]
    ema = {k: v for k, v in saved["state_dict"].items() if k.startswith("ema.")}
    assert all(torch.equal(back["state_dict"][k], v) for k, v in ema.items())


def test_raw_weights_and_overwrite(fit_ckpt, tmp_path, capsys, one_line_error):
    out = str(tmp_path / "d")
    assert main(["export", "--ckpt_path", fit_ckpt, "--out", out, "--format", "diffusers", "--no_ema"]) == 0
    theirs = diffusers.UNet2DModel.from_pretrained(out)
    module = load_module(fit_ckpt)
    raw, ema = module.net.state_dict()["conv_in.weight"], module.ema.state_dict()["conv_in.weight"]
    assert torch.equal(theirs.state_dict()["conv_in.weight"], raw) and not torch.equal(raw, ema)
    capsys.readouterr()
    one_line_error(capsys, ["export", "--ckpt_path", fit_ckpt, "--out", out, "--format", "diffusers"], "already holds",
                   "--overwrite")
    assert main(["export", "--ckpt_path", fit_ckpt, "--out", out, "--format", "diffusers", "--overwrite"]) == 0


def test_dit_round_trip_is_the_original(tmp_path, dit_reference_model):
    reference = dit_reference_model()
    reference.save_pretrained(tmp_path / "dit")
    import_pretrained(str(tmp_path / "dit"), tmp_path / "dit.ckpt", vae=None)
    assert main(["export", "--ckpt_path", str(tmp_path / "dit.ckpt"), "--out", str(tmp_path / "back"),
                 "--format", "diffusers"]) == 0
    back = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "back").eval()
    original = reference.state_dict()
    assert back.state_dict().keys() == original.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in original.items())
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert all(config[k] == v for k, v in DIT.items())
    assert json.loads((tmp_path / "back" / "scheduler_config.json").read_text())["variance_type"] == "learned_range"
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    module = load_module(str(tmp_path / "dit.ckpt"))
    with torch.no_grad():
        expected = back(x, timestep=TIMESTEPS.float(), class_labels=LABELS).sample
        assert float((module.ema(x, TIMESTEPS.float(), LABELS) - expected).abs().max()) <= 1e-5


def test_preset_arguments_are_resolved():
    args = constructor_arguments({"class_path": "diffusion_pl.networks.unet_presets.unet_ddpm_cifar10",
                                  "init_args": {"img_resolution": 32}}, UNet)
    assert args["channel_mult"] == [1, 2, 2, 2] and args["downsample_padding"] == "same" and args["dropout"] == 0.1
    args = constructor_arguments({"class_path": "diffusion_pl.networks.dit.dit_xl_2", "init_args": {}}, DiT)
    assert (args["depth"], args["hidden_size"], args["num_heads"]) == (28, 1152, 16)
    assert UNet.__init__.__name__ == "__init__" and DiT.__init__.__name__ == "__init__"  # constructors restored


def checkpoint(tmp_path, name, net, process=PROCESS, prediction=None):
    """An imported-style checkpoint of `net` (a spec built here) with its own initial weights."""
    from jsonargparse.typing import import_object

    built = import_object(net["class_path"])(**net["init_args"])
    prediction = prediction or {"class_path": "diffusion_pl.prediction.EpsPrediction", "init_args": {}}
    return str(write_imported_checkpoint(tmp_path / f"{name}.ckpt", net, process, prediction, built.state_dict(),
                                         {"source": name}))


UNET8 = dict(img_resolution=8, model_channels=128, channel_mult=[1], num_res_blocks=1, attn_resolutions=[])
REFUSED = [
    ("adm", {"class_path": "diffusion_pl.networks.unet.UNet", "init_args": {**UNET8, "scale_shift": True}},
     ("UNet scale_shift=True", "ADM's scale-shift norm")),
    ("ncsnpp", {"class_path": "diffusion_pl.networks.unet.UNet", "init_args": {**UNET8, "embedding": "fourier"}},
     ("embedding='fourier'", "Fourier")),
    ("resblock", {"class_path": "diffusion_pl.networks.unet.UNet", "init_args": {**UNET8, "resample": "resblock",
                                                                           "channel_mult": [1, 1]}},
     ("resample='resblock'", "BigGAN")),
    ("narrow", {"class_path": "diffusion_pl.networks.unet.UNet", "init_args": {**UNET8, "model_channels": 32}},
     ("UNet norm_groups=None", "[8, 16] groups", "norm_groups set (e.g. 8")),
    ("conditional", {"class_path": "diffusion_pl.networks.unet.UNet", "init_args": {**UNET8, "num_classes": 10}},
     ("num_classes=10", "class-conditional")),
    ("dit-models-py", {"class_path": "diffusion_pl.networks.dit.dit_tiny", "init_args": {"img_resolution": 8,
                                                                                   "num_classes": 10}},
     ("DiT frequency_endpoint=False", "downscale_freq_shift=1")),
    ("dit-unconditional", {"class_path": "diffusion_pl.networks.dit.DiT", "init_args": {
        "img_resolution": 8, "hidden_size": 64, "depth": 1, "num_heads": 4, "frequency_endpoint": True}},
     ("unconditional DiT",)),
    ("lightningdit", {"class_path": "diffusion_pl.networks.dit.DiT", "init_args": {
        "img_resolution": 8, "num_classes": 10, "hidden_size": 64, "depth": 1, "num_heads": 4,
        "frequency_endpoint": True, "norm": "rmsnorm", "mlp": "swiglu", "rope": True}},
     ("DiT norm='rmsnorm'", "LayerNorm")),
]


@pytest.mark.parametrize("name, net, words", REFUSED, ids=[r[0] for r in REFUSED])
def test_unrepresentable_networks_are_refused(tmp_path, capsys, name, net, words, one_line_error):
    ckpt = checkpoint(tmp_path, name, net)
    one_line_error(capsys, ["export", "--ckpt_path", ckpt, "--out", str(tmp_path / "out"), "--format", "diffusers"],
                   "cannot be exported as diffusers", *words)
    assert not (tmp_path / "out" / "diffusion_pytorch_model.safetensors").exists()


def test_processes_without_a_scheduler_are_said(tmp_path, capsys):
    net = {"class_path": "diffusion_pl.networks.unet.UNet", "init_args": UNET8}
    edm = checkpoint(tmp_path, "edm", net, {"class_path": "diffusion_pl.processes.exploding.EDM", "init_args": {}},
                     {"class_path": "diffusion_pl.prediction.EDMPreconditioning", "init_args": {}})
    assert main(["export", "--ckpt_path", edm, "--out", str(tmp_path / "edm"), "--format", "diffusers"]) == 0
    assert "no scheduler_config.json: the process EDM is not a discrete DDPM process" in capsys.readouterr().err
    assert not (tmp_path / "edm" / "scheduler_config.json").exists()
    loaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "edm").state_dict()  # the network alone is written
    assert loaded.keys() and all(v.isfinite().all() for v in loaded.values())
    score = checkpoint(tmp_path, "score", net, prediction={"class_path": "diffusion_pl.prediction.ScorePrediction",
                                                          "init_args": {}})
    assert main(["export", "--ckpt_path", score, "--out", str(tmp_path / "score"), "--format", "diffusers"]) == 0
    assert "the parameterization ScorePrediction is not a diffusers prediction_type" in capsys.readouterr().err
