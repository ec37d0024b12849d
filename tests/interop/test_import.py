"""`diffusion-pl import`: diffusers folders, hub ids (offline, from the cache) and DiT `.pt` files into checkpoints.

No download here, so every reference is built from its config with random weights and saved the way
the hub holds it. The U-Nets are google/ddpm-cifar10-32's config.json at small size (SMALL: 16x16, two
levels of 128 channels; TINY: 8x8, one level of 128 channels, for the 1000-step sampling and the
fine-tuning runs on the CPU; narrower U-Nets and other GroupNorm groupings: test_interop_unet_groups.py). The DiT
`.pt` reference is diffusers' DiTTransformer2DModel with DiT's models.py sinusoid (downscale_freq_shift=0)
and LayerNorm eps (1e-6) put back, the two places where diffusers' port differs in its computation (README
"DiT: parity with DiT's models.py and diffusers"), its weights written under models.py's key names
(facebookresearch/DiT models.py:27-180). The float64 U-Net comparisons share one float32 timestep
sinusoid, which both libraries compute in float32 (compared on its own in tests/interop/test_interop_unet.py).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import yaml

from diffusion_pl.cli.main import main
from diffusion_pl.guidance import Guidance
from diffusion_pl.utils.errors import UserError
from diffusion_pl.interop.dit_reference import dit_from_reference
from diffusion_pl.interop.importer import import_pretrained, scheduler_spec
from diffusion_pl.training.module import load_module
from diffusion_pl.processes.variance_preserving import DDPMDiscrete
from diffusion_pl.sampling.posterior import DDPM
from diffusion_pl.sampling.grids import TimestepGrid
from diffusion_pl.sampling.api import sample
from tests.support.interop import DDPM_CIFAR10, LABELS, SMALL, TIMESTEPS, TINY, dit_reference_model

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


def assert_dit_parity(module, reference) -> None:
    """An imported DiT's EMA network gives the reference DiT's outputs (learned sigma: 8 channels) at several
    noise levels and labels, the null label included: <= 1e-10 in float64, <= 1e-5 in float32."""
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        ours, theirs = module.ema.to(dtype), reference.to(dtype)
        with torch.no_grad():
            expected = theirs(x.to(dtype), timestep=TIMESTEPS.to(dtype), class_labels=LABELS).sample
            diff = float((ours(x.to(dtype), TIMESTEPS.to(dtype), LABELS) - expected).abs().max())
        assert expected.shape == (4, 8, 8, 8) and expected.abs().max() > 0.5 and diff <= tol, (dtype, diff)


# -- diffusers UNet2DModel ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, weights", [("pipeline", "safetensors"), ("flat", "bin")])
def test_unet_folder_import_matches_diffusers(tmp_path, capsys, layout, weights, save_unet, our_sinusoid):
    scheduler = diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=True)
    reference = save_unet(tmp_path / "ddpm", SMALL, scheduler=scheduler, layout=layout, weights=weights)
    assert main(["import", str(tmp_path / "ddpm"), "--out", str(tmp_path / "ddpm.ckpt")]) == 0
    assert "DDPM" in capsys.readouterr().err
    module = load_module(str(tmp_path / "ddpm.ckpt"))
    hparams = torch.load(tmp_path / "ddpm.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["process"] == {"class_path": "diffusion_pl.processes.variance_preserving.DDPMDiscrete", "init_args": {
        "num_steps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}}
    assert hparams["prediction"]["class_path"] == "diffusion_pl.prediction.EpsPrediction"
    assert hparams["net"]["init_args"]["downsample_padding"] == "same"  # TF 'SAME' (downsample_padding=0)
    imported = torch.load(tmp_path / "ddpm.ckpt", weights_only=True)["diffusion_pl_import"]
    assert imported["sampler"]["init_args"] == {"variance": "fixedlarge"} and imported["clip_x0"] == 1.0
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        ours, theirs = module.ema.to(dtype).eval(), reference.to(dtype)
        if dtype == torch.float64:  # both sinusoids are float32 (compared in test_interop_unet.py): share ours
            theirs.time_proj = our_sinusoid(ours)
        with torch.no_grad():
            expected = theirs(x.to(dtype), TIMESTEPS).sample
            diff = float((ours(x.to(dtype), TIMESTEPS) - expected).abs().max())
        assert expected.abs().max() > 0.1 and diff <= tol, (dtype, diff)
    net, ema = module.net.state_dict(), module.ema.float().state_dict()
    assert net.keys() == ema.keys() and all(torch.equal(net[k], ema[k]) for k in net)  # EMA = net = the import


@pytest.mark.parametrize("steps", [100, pytest.param(1000, marks=pytest.mark.slow)])
def test_ddpm_sampling_of_an_import_equals_ddpm_pipeline(tmp_path, steps):
    """Ho et al.'s protocol (1000 ancestral steps, fixedlarge, clip 1; ~15 s here) on the import vs diffusers'
    DDPMPipeline; 100 steps: the same on diffusers' default 'leading' respacing."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(**{**TINY, "sample_size": 4}).eval()  # diffusers' init: samples at image scale
    scheduler = diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=True, clip_sample_range=1.0)
    unet.save_pretrained(tmp_path / "tiny")
    scheduler.save_pretrained(tmp_path / "tiny")
    import_pretrained(str(tmp_path / "tiny"), tmp_path / "tiny.ckpt")
    module = load_module(str(tmp_path / "tiny.ckpt")).eval()
    theirs = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    theirs.set_progress_bar_config(disable=True)
    images = theirs(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                    output_type="np").images  # (2, 4, 4, 3) in [0, 1]
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 4, generator=g)
    grid = None if steps == 1000 else TimestepGrid("leading")  # None: every timestep 999..0
    sampler = DDPM(steps, grid, variance="fixedlarge")
    out = sample(module.model(), module.process, module.prediction, sampler, (2, 3, 4, 4), noise=x_T, generator=g,
                 guidance=Guidance(clip_x0=1.0))
    ours = (out.x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert out.nfe == steps
    diff = float(abs(ours - images).max())
    print(f"DDPM {steps} steps, import vs DDPMPipeline: max |diff| = {diff:.2e}")
    assert diff <= 1e-4 and images.std() > 0.05


def test_scheduler_configs_map_to_processes():
    for schedule, start, end in (("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                 ("squaredcos_cap_v2", 1e-4, 0.02)):
        config = dict(diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=start, beta_end=end).config)
        process_spec, prediction, _ = scheduler_spec({"_class_name": "DDPMScheduler", **config})
        process = DDPMDiscrete(**process_spec["init_args"])
        alpha_bar = process.alpha(process.discrete_times()) ** 2
        reference = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=start, beta_end=end).alphas_cumprod
        torch.testing.assert_close(alpha_bar, reference.double(), rtol=1e-5, atol=1e-7)  # diffusers: float32 betas
    assert scheduler_spec({"prediction_type": "v_prediction"})[1]["class_path"].endswith("VPrediction")
    assert scheduler_spec({"prediction_type": "sample"})[1]["class_path"].endswith("X0Prediction")
    for bad, words in (({"_class_name": "ScoreSdeVeScheduler"}, "ScoreSdeVeScheduler"),
                       ({"beta_schedule": "sigmoid"}, "sigmoid"), ({"trained_betas": [0.1, 0.2]}, "trained_betas")):
        with pytest.raises(UserError, match=words):
            scheduler_spec(bad, "x/scheduler_config.json")


# -- diffusers DiTTransformer2DModel ---------------------------------------------------------------------------

@pytest.mark.parametrize("class_name", ["DiTTransformer2DModel", "Transformer2DModel"])
def test_dit_folder_import_matches_diffusers(tmp_path, class_name):
    reference = dit_reference_model()
    reference.save_pretrained(tmp_path / "dit" / "transformer")
    config_file = tmp_path / "dit" / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "_class_name": class_name}))  # facebook/DiT-XL-2-256's legacy name
    import_pretrained(str(tmp_path / "dit"), tmp_path / "dit.ckpt", vae=None)
    module = load_module(str(tmp_path / "dit.ckpt"))
    checkpoint = torch.load(tmp_path / "dit.ckpt", weights_only=True)
    assert checkpoint["diffusion_pl_import"]["sampler"]["init_args"]["variance"] == "learned"
    assert checkpoint["diffusion_pl_import"]["clip_x0"] is None and module.null_label == 1000
    assert_dit_parity(module, reference)


def test_latent_dit_import_records_the_vae(tmp_path, capsys):
    """A 4-channel DiT imports as a latent model: its config names the pipeline's VAE (here a random one) or --vae."""
    from tests.support.latent import TINY_VAE_CONFIG

    with torch.random.fork_rng():
        torch.manual_seed(0)
        diffusers.AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(tmp_path / "dit" / "vae")  # the pipeline's own
    dit_reference_model().save_pretrained(tmp_path / "dit" / "transformer")
    autoencoder = {"class_path": "diffusion_pl.codecs.autoencoder.Autoencoder", "init_args": {"scale": 0.18215}}
    assert main(["import", str(tmp_path / "dit"), "--out", str(tmp_path / "other.ckpt"),
                 "--vae", "stabilityai/sd-vae-ft-mse"]) == 0
    hparams = torch.load(tmp_path / "other.ckpt", weights_only=True)["hyper_parameters"]
    autoencoder["init_args"]["pretrained"] = "stabilityai/sd-vae-ft-mse"
    assert hparams["autoencoder"] == autoencoder
    assert main(["import", str(tmp_path / "dit"), "--out", str(tmp_path / "dit.ckpt")]) == 0  # --vae auto
    hparams = torch.load(tmp_path / "dit.ckpt", weights_only=True)["hyper_parameters"]
    autoencoder["init_args"].update(pretrained=str(tmp_path / "dit"), subfolder="vae")
    assert hparams["autoencoder"] == autoencoder
    module = load_module(str(tmp_path / "dit.ckpt"))
    assert module.codec.autoencoder.latent_channels == 4
    assert main(["sample", "--ckpt_path", str(tmp_path / "dit.ckpt"), "--num_samples", "2", "--sampler", "ddim", "--steps",
                 "2", "--class_labels", "3", "--out", str(tmp_path / "samples"), "--png"]) == 0
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    from PIL import Image

    assert len(pngs) == 2 and Image.open(pngs[0]).size == (16, 16)  # 8x8 latents, the VAE's 2x
    capsys.readouterr()
    assert main(["export", "--ckpt_path", str(tmp_path / "dit.ckpt"), "--out", str(tmp_path / "back"), "--format",
                 "diffusers"]) == 0
    assert f"the autoencoder ({tmp_path / 'dit'}) is not written" in capsys.readouterr().err


# -- facebookresearch/DiT .pt ------------------------------------------------------------------------------------

def models_py_reference(num_layers=12):
    """diffusers' DiT with models.py's sinusoid and eps (= DiT's models.py), and its state dict in models.py's names."""
    from diffusers.models.embeddings import Timesteps

    model = dit_reference_model(num_layers=num_layers, norm_eps=1e-6)
    for block in model.transformer_blocks:  # models.py:41-59: freqs exp(-ln(10^4) k / half), [cos, sin]
        block.norm1.emb.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    sd, emb = model.state_dict(), "transformer_blocks.0.norm1.emb."
    out = {"pos_embed": model.pos_embed.pos_embed.clone(),  # diffusers' own 2-D sin-cos table
           "x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
           "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
           "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
           "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
           "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"]}
    for kind in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{kind}"] = sd[emb + f"timestep_embedder.linear_1.{kind}"]
        out[f"t_embedder.mlp.2.{kind}"] = sd[emb + f"timestep_embedder.linear_2.{kind}"]
        for i in range(num_layers):
            src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
            out[dst + f"attn.qkv.{kind}"] = torch.cat([sd[src + f"attn1.to_{n}.{kind}"] for n in "qkv"])
            out[dst + f"attn.proj.{kind}"] = sd[src + f"attn1.to_out.0.{kind}"]
            out[dst + f"mlp.fc1.{kind}"] = sd[src + f"ff.net.0.proj.{kind}"]
            out[dst + f"mlp.fc2.{kind}"] = sd[src + f"ff.net.2.{kind}"]
            out[dst + f"adaLN_modulation.1.{kind}"] = sd[src + f"norm1.linear.{kind}"]
    return model, out


@pytest.fixture(scope="module")
def models_py():
    return models_py_reference()  # DiT-S/2 (12 blocks, 384 wide, 6 heads) at 8x8 latents (64 px images)


@pytest.mark.slow
def test_dit_pt_import_matches_models_py(models_py, tmp_path):
    reference, state_dict = models_py
    torch.save(state_dict, tmp_path / "DiT-S-2-64.pt")
    import_pretrained(str(tmp_path / "DiT-S-2-64.pt"), tmp_path / "s2.ckpt", arch="DiT-S/2", image_size=64, vae=None)
    module = load_module(str(tmp_path / "s2.ckpt"))
    hparams = torch.load(tmp_path / "s2.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["net"]["init_args"]["frequency_endpoint"] is False and hparams["net"]["init_args"]["depth"] == 12
    assert_dit_parity(module, reference)
    reference.float()


def test_dit_pt_sizes_are_checked(models_py):
    _, state_dict = models_py
    # a train.py checkpoint: the EMA, with arch and image size from its args
    args = argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=1000)
    trained = {"model": {}, "ema": state_dict, "args": args}
    net, kwargs = dit_from_reference(trained)
    assert kwargs["img_resolution"] == 8 and kwargs["num_classes"] == 1000 and kwargs["out_channels"] == 8
    cases = [(dict(arch="DiT-B/2", image_size=64), "x_embedder.proj.weight has shape (384, 4, 2, 2)"),
             (dict(arch="DiT-S/4", image_size=64), "expected DiT-S/4's (384, C, 4, 4)"),
             (dict(arch="DiT-S/2", image_size=256), "expected --image_size 64, not 256"),
             (dict(arch=None, image_size=64), "expected --arch"),
             (dict(arch="DiT-Z/2", image_size=64), "not a DiT architecture")]
    for kwargs, words in cases:
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
            dit_from_reference(state_dict, source="DiT-S-2-64.pt", **kwargs)
    with pytest.raises(UserError, match="pos_embed differs"):
        dit_from_reference({**state_dict, "pos_embed": state_dict["pos_embed"] + 0.01}, "DiT-S/2", 64)
    with pytest.raises(UserError, match="--arch DiT-B/2 but x.pt was trained with DiT-S/2"):
        dit_from_reference(trained, "DiT-B/2", source="x.pt")


# -- hub ids, published names, and bad input --------------------------------------------------------------------

def test_hub_id_imports_offline_from_the_cache(tmp_path, monkeypatch, capsys, save_unet, one_line_error):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = tmp_path / "hub" / "models--google--ddpm-tiny" / "snapshots" / ("0" * 40)
    reference = save_unet(snapshot, TINY, scheduler=diffusers.DDPMScheduler(), layout="flat")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    assert main(["import", "google/ddpm-tiny", "--out", str(tmp_path / "tiny.ckpt")]) == 0
    module = load_module(str(tmp_path / "tiny.ckpt"))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert float((module.ema(x, TIMESTEPS[:2]) - reference(x, TIMESTEPS[:2]).sample).abs().max()) <= 1e-5
    capsys.readouterr()
    one_line_error(capsys, ["import", "google/ddpm-cifar10-32", "--out", str(tmp_path / "x.ckpt")],
                   "google/ddpm-cifar10-32", "not in the Hugging Face cache", "huggingface-cli download", str(tmp_path))


def test_published_dit_names(tmp_path, monkeypatch, models_py, capsys, one_line_error):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, ["import", "DiT-XL-2-256x256.pt", "--out", "x.ckpt", "--download_timeout", "0.5"],
                   "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", str(tmp_path / "torch"))
    (tmp_path / "pretrained_models").mkdir()  # DiT's download.py folder, found before any download
    torch.save(models_py[1], tmp_path / "pretrained_models" / "DiT-XL-2-256x256.pt")
    with pytest.raises(UserError, match=r"expected DiT-XL/2's \(1152, C, 2, 2\)"):  # the name implies DiT-XL/2
        import_pretrained("DiT-XL-2-256x256.pt", tmp_path / "y.ckpt", vae=None)


def test_bad_inputs_are_one_line(tmp_path, capsys, save_unet, one_line_error):
    save_unet(tmp_path / "ok", SMALL)
    out = str(tmp_path / "x.ckpt")
    # an unsupported architecture: Stable Diffusion's text-conditional U-Net
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    one_line_error(capsys, ["import", str(tmp_path / "sd"), "--out", out], "UNet2DConditionModel",
                   str(tmp_path / "sd" / "unet" / "config.json"), "expected a UNet2DModel or DiTTransformer2DModel")
    # a config that does not match the weights
    config_file = tmp_path / "ok" / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "block_out_channels": [256, 256]}))
    one_line_error(capsys, ["import", str(tmp_path / "ok"), "--out", out], "diffusers UNet2DModel weights do not fit",
                   "shape mismatches (file vs network)")
    config_file.write_text(json.dumps({**config, "layers_per_block": 2}))
    one_line_error(capsys, ["import", str(tmp_path / "ok"), "--out", out], "do not fit the UNet", "missing keys")
    # missing files: the weights, the folder, a DiT .pt's architecture
    config_file.write_text(json.dumps(config))
    (tmp_path / "ok" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    one_line_error(capsys, ["import", str(tmp_path / "ok"), "--out", out], str(tmp_path / "ok" / "unet"),
                   "diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin")
    one_line_error(capsys, ["import", str(tmp_path / "nowhere"), "--out", out], "nowhere", "does not exist",
                   "expected a diffusers model or pipeline folder")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["import", str(tmp_path / "empty"), "--out", out], "has no config.json")
    torch.save({"x_embedder.proj.weight": torch.zeros(1)}, tmp_path / "custom.pt")
    one_line_error(capsys, ["import", str(tmp_path / "custom.pt"), "--out", out], "expected --arch")
    save_unet(tmp_path / "ok2", TINY)
    assert main(["import", str(tmp_path / "ok2"), "--out", out]) == 0
    capsys.readouterr()
    one_line_error(capsys, ["import", str(tmp_path / "ok2"), "--out", out], "already exists", "--overwrite")


# -- the checkpoint in the other commands: sample, fine-tuning with fit --ckpt_path ------------------------------

@pytest.mark.slow
def test_imported_checkpoint_samples_evaluates_and_fine_tunes(tmp_path, capsys, monkeypatch, save_unet,
                                                               tiny_fit_config):
    save_unet(tmp_path / "tiny", TINY, scheduler=diffusers.DDPMScheduler())
    ckpt = tmp_path / "tiny.ckpt"
    import_pretrained(str(tmp_path / "tiny"), ckpt)
    assert main(["sample", "--ckpt_path", str(ckpt), "--num_samples", "2", "--sampler", "ddim", "--steps", "2",
                 "--out", str(tmp_path / "samples"), "--png"]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2
    monkeypatch.setenv("DIFFUSION_PL_CACHE", str(tmp_path / "cache"))  # the reference statistics
    ddpm = '{"class_path": "diffusion_pl.sampling.posterior.DDPM", "init_args": {"steps": 3, "variance": "fixedlarge"}}'
    assert main(["evaluate", "--ckpt_path", str(ckpt), "--data", "builtin:shapes?size=8&count=16", "--num_samples", "4",
                 "--sampler", ddpm, "--clip_x0", "1", "--feature_extractor", "tests.support.evaluation.StandInFeatures",
                 "--report", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["results"][0]["nfe"] == 3 and report["results"][0]["fid"] >= 0
    # fine-tuning: the recipe's network (8 channels here) and process are replaced by the checkpoint's, its
    # optimizer (lr 0: the weights must stay the imported ones) and data are kept, training starts at step 0
    config = tiny_fit_config(max_steps=2, logger=False, default_root_dir=str(tmp_path / "ft"))
    config["model"]["optimizer"] = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.0}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "ft.yaml"), "--ckpt_path", str(ckpt)]) == 0
    tuned = torch.load(next((tmp_path / "ft").rglob("*.ckpt")), weights_only=True)
    imported = torch.load(ckpt, weights_only=True)
    assert tuned["global_step"] == 2 and tuned["hyper_parameters"]["net"] == imported["hyper_parameters"]["net"]
    assert tuned["hyper_parameters"]["process"]["class_path"] == "diffusion_pl.processes.variance_preserving.DDPMDiscrete"
    assert tuned["hyper_parameters"]["optimizer"]["init_args"]["lr"] == 0.0
    assert tuned["optimizer_states"][0]["state"]  # the recipe's Adam ran two steps
    state = imported["state_dict"]
    assert all(torch.equal(tuned["state_dict"][k], v) for k, v in state.items() if k.startswith("net."))


# The 256x256 family of DDPM (CelebA-HQ, LSUN church / bedroom / cat; google/ddpm-*-256): six levels with channel
# multipliers (1, 1, 2, 2, 4, 4) and attention at 16x16 only, the fifth level (hojonathanho/diffusion
# scripts/run_celebahq.py and run_lsun.py, model 'unet2d16b2c112244'). Here at 64x64 (attention at 4x4, the same fifth
# level) with 128 channels per level and one block per level, so that the CPU runs it; the structure is the family's.
DDPM_256_FAMILY = {**DDPM_CIFAR10, "sample_size": 64, "block_out_channels": (128,) * 6, "layers_per_block": 1,
                   "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                   "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4}


@pytest.mark.slow
def test_the_256_family_structure_imports_with_parity(tmp_path, save_unet):
    reference = save_unet(tmp_path / "ddpm256", DDPM_256_FAMILY, scheduler=diffusers.DDPMScheduler(), layout="flat")
    import_pretrained(str(tmp_path / "ddpm256"), tmp_path / "ddpm256.ckpt")
    module = load_module(str(tmp_path / "ddpm256.ckpt"))
    init = torch.load(tmp_path / "ddpm256.ckpt", weights_only=True)["hyper_parameters"]["net"]["init_args"]
    assert tuple(init["channel_mult"]) == (1,) * 6 and tuple(init["attn_resolutions"]) == (4,)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([3, 700])
    with torch.no_grad():
        expected = reference.eval()(x, t).sample
        diff = float((module.ema.eval()(x, t) - expected).abs().max())
    assert expected.abs().max() > 0.1 and diff <= 1e-5, diff
