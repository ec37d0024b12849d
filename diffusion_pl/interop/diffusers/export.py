"""`export --format diffusers`: a checkpoint's network as a diffusers model folder, with a DDPMScheduler config.

    OUT/config.json                          UNet2DModel or DiTTransformer2DModel config
    OUT/diffusion_pytorch_model.safetensors  its weights (EMA by default), diffusers' key names
    OUT/scheduler_config.json                DDPMScheduler config, where the process is DDPMDiscrete

`UNet2DModel.from_pretrained(OUT)` / `DiTTransformer2DModel.from_pretrained(OUT)` and
`DDPMScheduler.from_pretrained(OUT)` load them; `diffusion-pl import OUT` reads them back. This is the
inverse of unet.py / dit.py: the weight names come from the same tables (keys.py: UNET_KEYS, DIT_KEYS),
read backwards, so only what those map is written, and only where the outputs are the same:

- UNet: DDPM's architecture (unconditional; strided-conv resampling; additive time embedding, of width
  emb_mult x model_channels as UNet2DModel's time_embedding_dim; attention after every decoder block; one
  GroupNorm group count in every layer, as UNet2DModel's norm_num_groups: `norm_groups`, or norm_groups=None
  where that rule gives every layer the same count, e.g. 32 at widths >= 128). ADM's
  options (scale_shift, resample='resblock', class tables), DDPM++ / NCSN++'s (skip_rescale, Fourier
  embedding, FIR input pyramid) and EDM's augmentation labels have no UNet2DModel counterpart that
  the converters map, and are refused in one line naming the option.
- DiT: class-conditional, frequency_endpoint=True (diffusers' sinusoid ends at 1/10000,
  `downscale_freq_shift=1` in CombinedTimestepLabelEmbeddings); DiT's own models.py sinusoid
  (frequency_endpoint=False, our default and DiT's .pt files) gives other outputs and is refused, as
  are unconditional DiTs (ada_norm_zero's embedding is class-conditional) and augmentation labels.
- scheduler: DDPMDiscrete + eps / v / x0 prediction is a DDPMScheduler (variance_type learned_range for
  a network with a learned variance, fixed_small otherwise; clip_sample for 3-channel image models).
  Continuous-time processes (VP, VE, EDM, flows) and other parameterizations (EDM preconditioning,
  score, velocity) have none: the network is written alone, and the returned notes say why.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_pl.interop.diffusers.keys import DIT_KEYS, UNET_KEYS
from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.utils.fileio import atomic_path, writable_folder

__all__ = ["MODEL_WEIGHTS", "unet_to_diffusers", "dit_to_diffusers", "scheduler_config", "export_diffusers"]

MODEL_WEIGHTS = "diffusion_pytorch_model.safetensors"
# UNet options with no UNet2DModel counterpart in the converter: name -> (required value, why)
_UNET_FIXED = {
    "num_classes": (None, "class-conditional U-Nets are not mapped (UNet2DModel's class embedding is not converted)"),
    "resample": ("conv", "BigGAN-style resampling residual blocks (ADM, DDPM++) are not a UNet2DModel down/up block"),
    "scale_shift": (False, "ADM's scale-shift norm is not mapped"),
    "skip_rescale": (False, "DDPM++'s 1/sqrt(2) residual rescaling is not a UNet2DModel option"),
    "decoder_attention": ("every_block", "UNet2DModel's AttnUpBlock2D attends after every block"),
    "embedding": ("positional", "NCSN++'s random Fourier embedding is not mapped"),
    "noise_mult": (1, "UNet2DModel's sinusoid is block_out_channels[0] wide"),
    "augment_dim": (0, "EDM's augmentation labels have no UNet2DModel input"),
    "progressive_input": ("none", "NCSN++'s input pyramid has no UNet2DModel counterpart"),
}


def _refuse(network: str, option: str, value: Any, why: str) -> UserValueError:
    return UserValueError(f"{network} {option}={value!r} cannot be exported as diffusers: {why}")


def _common_groups(net: torch.nn.Module) -> int:
    """The most groups, at most 32, that divide every GroupNorm width of `net` and keep >= 4 channels per group
    in the narrowest (1 if none does): the norm_groups to suggest."""
    widths = {m.num_channels for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    return next((g for g in range(min(32, min(widths) // 4), 1, -1) if all(w % g == 0 for w in widths)), 1)


def unet_to_diffusers(init_args: dict[str, Any], net: torch.nn.Module,
                      state_dict: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(UNet2DModel config, its state dict) of our UNet (`init_args`: every constructor argument, `net`: built)."""
    for option, (value, why) in _UNET_FIXED.items():
        if init_args.get(option, value) != value:
            raise _refuse("UNet", option, init_args[option], why)
    if init_args.get("attn_head_channels") is None and init_args.get("attn_heads", 1) != 1:
        raise _refuse("UNet", "attn_heads", init_args["attn_heads"], "UNet2DModel sets heads per block from "
                      "attention_head_dim (channels per head); give attn_head_channels instead")
    groups = sorted({m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)})
    if len(groups) != 1:  # norm_groups=None gives narrow layers fewer groups
        raise _refuse("UNet", "norm_groups", init_args.get("norm_groups"), f"its GroupNorms have {groups} groups and "
                      "UNet2DModel one norm_num_groups for every layer; train with norm_groups set (e.g. "
                      f"{_common_groups(net)}, a divisor of every width)")
    size, mult, mc = net.img_resolution, list(init_args["channel_mult"]), int(init_args["model_channels"])
    emb_mult = int(init_args.get("emb_mult", 4))
    levels = [size >> i for i in range(len(mult))]
    attn = [int(r) for r in init_args["attn_resolutions"]]
    if any(r not in levels for r in attn):
        raise _refuse("UNet", "attn_resolutions", attn, f"expected encoder level resolutions {levels}")
    down = ["AttnDownBlock2D" if r in attn else "DownBlock2D" for r in levels]
    config = {
        "_class_name": "UNet2DModel", "sample_size": size, "in_channels": net.in_channels,
        "out_channels": net.out_channels, "center_input_sample": False, "time_embedding_type": "positional",
        "freq_shift": 1 if init_args.get("embedding_endpoint", True) else 0,
        "flip_sin_to_cos": init_args.get("embedding_order", "cos_sin") == "cos_sin",
        "down_block_types": down, "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
        "block_out_channels": [mc * m for m in mult], "layers_per_block": int(init_args["num_res_blocks"]),
        "mid_block_scale_factor": 1, "downsample_padding": 0 if init_args.get("downsample_padding") == "same" else 1,
        "downsample_type": "conv", "upsample_type": "conv", "dropout": float(init_args.get("dropout", 0.0)),
        "act_fn": "silu", "attention_head_dim": init_args.get("attn_head_channels"), "norm_num_groups": groups[0],
        "attn_norm_num_groups": None, "norm_eps": float(init_args.get("norm_eps", 1e-6)),
        "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
        "num_class_embeds": None,
        "time_embedding_dim": None if emb_mult == 4 else mc * emb_mult,
    }
    out, unmatched = UNET_KEYS.to_theirs(state_dict)
    if unmatched:
        raise UserValueError(f"UNet weight {unmatched[0]!r} has no UNet2DModel counterpart: expected DDPM's layers")
    return config, out


def dit_to_diffusers(init_args: dict[str, Any], net: torch.nn.Module,
                     state_dict: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(DiTTransformer2DModel config, its state dict) of our DiT."""
    checks = (("num_classes", net.num_classes is not None, "an unconditional DiT has no DiTTransformer2DModel "
               "counterpart (its ada_norm_zero embedding is class-conditional)"),
              ("frequency_endpoint", bool(init_args.get("frequency_endpoint", False)),
               "DiT's models.py sinusoid stops one frequency short of 1/10000, diffusers' ends at it "
               "(downscale_freq_shift=1): the outputs would differ"),
              ("augment_dim", int(init_args.get("augment_dim", 0)) == 0, "augmentation labels have no diffusers input"),
              ("mlp_ratio", float(init_args.get("mlp_ratio", 4.0)) == 4.0, "diffusers' FeedForward is 4x wide"),
              ("frequency_embedding_size", int(init_args.get("frequency_embedding_size", 256)) == 256,
               "diffusers' timestep sinusoid has 256 channels"),
              # LightningDiT's block options (networks/dit_blocks.py): DiTTransformer2DModel has none of them
              ("norm", init_args.get("norm", "layernorm") == "layernorm", "diffusers' DiT blocks use LayerNorm"),
              ("mlp", init_args.get("mlp", "gelu") == "gelu", "diffusers' DiT FeedForward is a GELU MLP"),
              ("qk_norm", not init_args.get("qk_norm", False), "diffusers' DiT attention has no query/key norm"),
              ("rope", not init_args.get("rope", False), "diffusers' DiT attention has no rotary embedding"),
              ("adaln_shift", bool(init_args.get("adaln_shift", True)), "diffusers' ada_norm_zero has the shift"))
    for option, ok, why in checks:
        if not ok:
            raise _refuse("DiT", option, init_args.get(option), why)
    depth, heads = int(init_args["depth"]), int(init_args["num_heads"])
    hidden = int(init_args["hidden_size"])
    config = {
        "_class_name": "DiTTransformer2DModel", "num_attention_heads": heads, "attention_head_dim": hidden // heads,
        "in_channels": net.in_channels, "out_channels": net.out_channels, "num_layers": depth, "dropout": 0.0,
        "norm_num_groups": 32, "attention_bias": True, "sample_size": net.img_resolution,
        "patch_size": net.patch_size, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": net.num_classes,
        "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
        "norm_eps": float(init_args.get("mlp_norm_eps", 1e-6)),
    }
    # every block's norm1.emb holds a copy of the one embedder (dit.py)
    out, unmatched = DIT_KEYS.to_theirs(state_dict, copies={"block": range(depth)})
    if unmatched:
        raise UserValueError(f"DiT weight {unmatched[0]!r} has no DiTTransformer2DModel counterpart: expected "
                             "DiT's layers")
    return config, out


def scheduler_config(process: Any, prediction: Any, learned_variance: bool,
                     clip: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(DDPMScheduler config, None) for a DDPMDiscrete process with eps / v / x0 prediction, else (None, why not)."""
    from diffusion_pl.interop.importer import PREDICTIONS
    from diffusion_pl.processes.variance_preserving import DDPMDiscrete

    kinds = {name: kind for kind, name in PREDICTIONS.items()}  # the importer's map, inverted
    if not isinstance(process, DDPMDiscrete):  # diffusers' scheduler holds discrete betas, nothing else
        return None, (f"no scheduler_config.json: the process {type(process).__name__} is not a discrete DDPM "
                      "process, which is the only one diffusers' DDPMScheduler represents")
    if type(prediction).__name__ not in kinds:
        return None, (f"no scheduler_config.json: the parameterization {type(prediction).__name__} is not a diffusers "
                      f"prediction_type ({', '.join(kinds.values())})")
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": process.num_steps,
            "beta_start": float(process.beta_start), "beta_end": float(process.beta_end),
            "beta_schedule": process.beta_schedule, "trained_betas": None,
            "variance_type": "learned_range" if learned_variance else "fixed_small", "clip_sample": clip,
            "clip_sample_range": 1.0, "prediction_type": kinds[type(prediction).__name__],
            "timestep_spacing": "leading", "steps_offset": 0}, None


class _Captured(Exception):
    pass


def constructor_arguments(spec: dict[str, Any], cls: type) -> dict[str, Any]:
    """Every argument `cls.__init__` receives when the saved class_path / init_args are built (presets resolved).

    A preset (`unet_ddpm_cifar10`, `dit_xl_2`) merges its own values before calling the class; its
    call is run with the constructor replaced by one that records the bound arguments and stops, so
    nothing is built.
    """
    from jsonargparse.typing import import_object

    target = import_object(spec["class_path"])
    init_args = dict(spec.get("init_args") or {})
    captured: dict[str, Any] = {}
    original = cls.__init__

    def record(self, *args, **kwargs):
        bound = inspect.signature(original).bind(self, *args, **kwargs)
        bound.apply_defaults()
        captured.update({k: v for k, v in bound.arguments.items() if k != "self"})
        raise _Captured

    cls.__init__ = record
    try:
        target(**init_args)
    except _Captured:
        pass
    finally:
        cls.__init__ = original
    if not captured:
        raise UserValueError(f"{spec['class_path']} does not build a {cls.__name__}: expected the class or one of its "
                             "presets")
    return json.loads(json.dumps(captured, default=list))


def _json_file(path: Path, value: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def export_diffusers(ckpt_path: str | Path, out_dir: str | Path, ema: bool = True, trust_config: bool = False,
                     overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write OUT/config.json, OUT/diffusion_pytorch_model.safetensors (+ scheduler_config.json); (weights, notes)."""
    from diffusion_pl.interop.safetensors import save_safetensors

    from diffusion_pl.training.module import load_module

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserValueError(f"--out {out} is a file: expected a folder (created if missing)")
    writable_folder(out, "--out")
    if (out / MODEL_WEIGHTS).exists() and not overwrite:
        raise UserValueError(f"--out {out} already holds {MODEL_WEIGHTS}: pass --overwrite to replace it or choose "
                             "another folder")
    module = load_module(str(ckpt_path), map_location="cpu", trust_config=trust_config)
    hparams = module.saved_config  # the config as saved (load_module keeps it)
    net = module.ema if ema else module.net
    class_path = hparams["net"]["class_path"]
    name = class_path.rsplit(".", 1)[-1]
    state_dict = {k: v.detach().to("cpu") for k, v in net.state_dict().items()}
    from diffusion_pl.networks.dit import DiT
    from diffusion_pl.networks.unet import UNet

    if type(net) is UNet:
        config, tensors = unet_to_diffusers(constructor_arguments(hparams["net"], UNet), net, state_dict)
    elif type(net) is DiT:
        config, tensors = dit_to_diffusers(constructor_arguments(hparams["net"], DiT), net, state_dict)
    else:
        raise UserValueError(f"network {class_path} ({type(net).__name__}) cannot be exported as diffusers: expected "
                             "diffusion_pl.networks UNet (or its presets) or DiT")
    try:
        import diffusers

        config["_diffusers_version"] = diffusers.__version__
    except ImportError:
        pass
    scheduler, note = scheduler_config(module.process, module.prediction, net.learned_variance,
                                       clip=net.in_channels == 3)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    save_safetensors(out / MODEL_WEIGHTS, tensors, {"format": "pt"})
    _json_file(out / "config.json", config)
    notes = [f"{name} as diffusers {config['_class_name']} ({'EMA' if ema else 'raw'} weights)"]
    if scheduler is not None:
        _json_file(out / "scheduler_config.json", scheduler)
    elif (out / "scheduler_config.json").exists() and overwrite:
        (out / "scheduler_config.json").unlink()  # a previous export's scheduler would not describe this model
    if note is not None:
        notes.append(note)
    autoencoder = hparams.get("autoencoder")
    if isinstance(autoencoder, dict):  # a latent model: the VAE stays where it came from
        where = (autoencoder.get("init_args") or {}).get("pretrained") or "a config-built VAE"
        notes.append(f"the autoencoder ({where}) is not written: a diffusers pipeline takes it as its vae")
    return out / MODEL_WEIGHTS, notes
