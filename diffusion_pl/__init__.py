"""diffusion_pl: a PyTorch Lightning framework for training image diffusion models.

Two objects carry everything (docs/design.md):

- a forward process (`Process`, diffusion_pl/processes/) given by alpha(t), sigma(t):
  x_t = alpha(t) x0 + sigma(t) eps;
- a parameterization (`Prediction`, diffusion_pl/prediction.py) that turns any network output into
  (x0_hat, eps_hat), wrapped with guidance by `Denoiser`.

The package is layered; arrows point down only (docs/design.md, "Layout"):

    cli/                         front ends: argument parsing, then one library call
    interop/                     other libraries' weights in and out
    evaluation/                  generation, metrics, evaluation callbacks, post-hoc EMA sweep
    training/                    DiffusionModule, EMA, augmentation, REPA, training callbacks
    data/                        shards: prepare and stream
    codecs/                      the space the process runs in (pixels, VAE latents)
    the core (this folder)       processes/, prediction.py, guidance.py, sampling/, losses.py, meanflow.py, consistency.py, scm.py,
                                 vlb.py, likelihood.py, oracle.py, networks/
    utils/                       errors, file I/O, paths, seeds, trust, hub, Lightning internals

Glossary (names follow the papers):
    x0, x_t      clean sample, noisy sample at time t
    eps          standard Gaussian noise, x_t = alpha x0 + sigma eps
    alpha, sigma signal and noise scales; d_alpha, d_sigma their time derivatives
    f, g2        drift f = alpha'/alpha and squared diffusion g^2 of dx = f x dt + g dW
    log_snr      log(alpha^2 / sigma^2); EDM's sigma is the noise level sigma / alpha
    score        grad_x log p_t(x) = -eps_hat / sigma
    v            alpha eps - sigma x0 (Salimans & Ho 2022)
    velocity     u = alpha' x0 + sigma' eps (flow matching, Lipman et al. 2022)
    c_skip, c_out, c_in, c_noise   EDM preconditioning (Karras et al. 2022, Table 1)
    nfe          number of network evaluations

The public API below is importable from the package root (`from diffusion_pl import VPLinear`); each name
is imported from its defining module on first use, so `import diffusion_pl` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> defining module (the only re-exports in the package)
_PUBLIC = {
    **dict.fromkeys(("Process",), "processes.base"),
    **dict.fromkeys(("OrnsteinUhlenbeck", "VPLinear", "VPCosine", "DDPMDiscrete", "SubVP"),
                    "processes.variance_preserving"),
    **dict.fromkeys(("VE", "EDM"), "processes.exploding"),
    **dict.fromkeys(("RectifiedFlow", "Trigonometric"), "processes.interpolants"),
    **dict.fromkeys(("Guidance",), "guidance"),
    **dict.fromkeys(("Prediction", "EpsPrediction", "X0Prediction", "VPrediction", "ScorePrediction",
                     "ScaledScorePrediction", "VelocityPrediction", "EDMPreconditioning", "Denoiser",
                     "DenoiserOutput", "precondition"), "prediction"),
    **dict.fromkeys(("sample", "SampleOutput"), "sampling.api"),
    **dict.fromkeys(("Sampler",), "sampling.base"),
    **dict.fromkeys(("UniformGrid", "QuadraticGrid", "KarrasGrid", "LogSNRGrid", "ExplicitGrid", "TimestepGrid"),
                    "sampling.grids"),
    **dict.fromkeys(("DDPM", "DDIM"), "sampling.posterior"),
    **dict.fromkeys(("EulerMaruyama", "PredictorCorrector", "AnnealedLangevin"), "sampling.sde"),
    **dict.fromkeys(("EulerODE", "HeunODE", "AdaptiveODE"), "sampling.ode"),
    **dict.fromkeys(("EDMStochastic",), "sampling.edm"),
    **dict.fromkeys(("DPMSolverPP", "DPMSolverPPSDE"), "sampling.dpm_solver"),
    **dict.fromkeys(("UniPC",), "sampling.unipc"),
    **dict.fromkeys(("Consistency",), "sampling.consistency"),
    **dict.fromkeys(("ConsistencyLoss", "ECTSchedule"), "consistency"),
    **dict.fromkeys(("TrainingLoss", "DenoisingLoss", "UniformTime", "LogNormalNoise", "LogitNormalTime", "ModeTime", "ShiftedTime",
                     "OutputMSE", "EpsMSE", "LikelihoodWeighting", "MinSNR", "EDMWeighting", "VelocityMSE"), "losses"),
    **dict.fromkeys(("MeanFlowLoss", "MeanFlowTimes"), "meanflow"),
    **dict.fromkeys(("MeanFlow",), "sampling.meanflow"),
    **dict.fromkeys(("SCMLoss",), "scm"),
    **dict.fromkeys(("bits_per_dim", "ode_nll"), "likelihood"),
    **dict.fromkeys(("GaussianMixture", "GuidedMixture"), "oracle"),
    **dict.fromkeys(("ScoreNetwork",), "networks.base"),
    **dict.fromkeys(("UNet",), "networks.unet"),
    **dict.fromkeys(("DiT",), "networks.dit"),
    **dict.fromkeys(("Autoencoder",), "codecs.autoencoder"),
    **dict.fromkeys(("ShardDataModule",), "data.datamodule"),
    **dict.fromkeys(("DiffusionModule", "load_module"), "training.module"),
    **dict.fromkeys(("AugmentPipe",), "training.augment"),
    **dict.fromkeys(("RepresentationAlignment", "ImageEncoder"), "training.repa"),
    **dict.fromkeys(("Schedule", "Constant", "Cosine", "InverseSqrt"), "training.schedules"),
    **dict.fromkeys(("PowerEMA",), "training.callbacks.power_ema"),
    **dict.fromkeys(("TrainingMonitor",), "training.callbacks.monitor"),
    **dict.fromkeys(("PreemptionCheckpoint",), "training.callbacks.checkpointing"),
    **dict.fromkeys(("TF32",), "training.callbacks.tf32"),
    **dict.fromkeys(("BlockWrapPolicy",), "training.sharding"),
    **dict.fromkeys(("SampleGrid",), "evaluation.sample_grid"),
    **dict.fromkeys(("FIDCallback",), "evaluation.fid_callback"),
    **dict.fromkeys(("generate",), "evaluation.generation"),
    **dict.fromkeys(("evaluate", "evaluate_checkpoints", "EvalOptions"), "evaluation.evaluate"),
    **dict.fromkeys(("EvalReport",), "evaluation.report"),
    **dict.fromkeys(("DINOv2Features",), "evaluation.metrics.dinov2"),
    **dict.fromkeys(("precision_recall",), "evaluation.metrics.precision_recall"),
    **dict.fromkeys(("reconstruct", "ReconstructReport"), "evaluation.reconstruct"),
    **dict.fromkeys(("load_exported",), "interop.safetensors"),
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
