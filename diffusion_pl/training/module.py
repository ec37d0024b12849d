"""The LightningModule: network + forward process + parameterization + loss + EMA.

A training batch reads top to bottom in `training_step`:
images -> (t, eps) -> x_t -> network -> wrapper -> weighted loss.

Randomness of a training step (t, eps, label dropout, network dropout) is a pure function of
(seed, rank, step): the step reseeds the global generators from those three numbers. Runs
therefore resume bit-exactly without storing generator states, ranks draw different noise,
and nothing depends on how many steps a previous job ran (as EDM2 seeds from images seen).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from diffusion_pl.utils import lightning_compat
from diffusion_pl.training.augment import AugmentPipe
from diffusion_pl.training import sharding
from diffusion_pl.training.repa import RepresentationAlignment
from diffusion_pl.training.ema import EMA, STATE_KEY as EMA_STATE_KEY
from diffusion_pl.training.schedules import Constant, Schedule
from diffusion_pl.training.log_step import STEP_KEY, log_step, step_in_progress
from diffusion_pl.codecs.autoencoder import Autoencoder
from diffusion_pl.codecs.base import Codec
from diffusion_pl.codecs.latent import codec_for
from diffusion_pl.utils.checkpoint import Checkpoint, read_checkpoint
from diffusion_pl.utils.errors import NonFiniteLossError, UserValueError, one_line
from diffusion_pl.utils.recorded import NotRecordable, component_specs
from diffusion_pl.losses import DenoisingLoss, TrainingLoss, bucket_losses, log_snr_grid
from diffusion_pl.networks.base import ScoreNetwork, check_score_network
from diffusion_pl.prediction import EpsPrediction, Model, Prediction, precondition
from diffusion_pl.processes.base import Process
from diffusion_pl.training.shapes import check_augment_labels, check_data_fits
from diffusion_pl.utils.seeding import mix_seed as step_seed

__all__ = ["DiffusionModule", "load_module", "module_from_checkpoint"]

# Lightning warns about submodules in eval mode at the start of fit; the EMA copy is one on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# nonfinite_loss: skip returns None from training_step on purpose (the step is skipped on every rank)
warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=2e-4)


class DiffusionModule(L.LightningModule):
    """Trains `net` as a diffusion model of `process` in the `prediction` parameterization, with an EMA copy.

    Args:
        net: a network `net(x_in, noise_label, class_labels) -> tensor like x_in` that declares its shapes and
            classes (a `diffusion_pl.networks.base.ScoreNetwork`: UNet, DiT or a subclass); others are refused.
        process: the forward process (alpha(t), sigma(t)).
        prediction: what the network predicts (eps, x0, v, score, velocity, EDM preconditioning).
        loss: a `TrainingLoss`: `DenoisingLoss` (time proposal x weighting, with label dropout for classifier-free
            guidance; the default), `diffusion_pl.consistency.ConsistencyLoss` (consistency training, ECT),
            `diffusion_pl.meanflow.MeanFlowLoss` (an average-velocity model for one-step sampling) or
            `diffusion_pl.scm.SCMLoss` (continuous-time consistency training; its adaptive weight trains with the
            net). It gets the run's images seen at every call (ECT's schedule reads them), and the step where it
            declares `takes_step` (sCM's tangent warm-up).
        optimizer: a callable params -> optimizer (LightningCLI fills it from `optimizer:`).
        lr_warmup_steps: linear learning-rate warm-up over this many optimizer steps (DDPM: 5000); the same as
            `lr_schedule=Constant(lr_warmup_steps)`, kept for the recipes and saved configs that set it.
        lr_schedule: the learning rate's multiplier per optimizer step (`Constant`, `Cosine`, `InverseSqrt`;
            diffusion_pl/training/schedules.py); None: the optimizer's lr (after `lr_warmup_steps`).
        ema_decay: per-step EMA decay, used when `ema_half_life_images` is None (DDPM: 0.9999).
        ema_warmup: use min(ema_decay, (1 + step) / (10 + step)) so early EMA tracks the net.
        ema_half_life_images: EMA half-life counted in training images (EDM: 500k images).
        ema_rampup_ratio: EDM's ramp-up: half-life <= ratio x images seen (EDM: 0.05); None disables.
            The four ema_* arguments build `self.averaging`, an `EMA` (diffusion_pl/training/ema.py): the
            update rule of `self.ema` and the run's images-seen counter.
        seed: base seed of the per-step noise; each rank and step derives its own.
        nonfinite_loss: "raise" stops with an error naming the step, "skip" skips that step.
        max_nonfinite_skips: with "skip", stop after this many consecutive skipped steps (a dead model
            would otherwise skip forever and exit 0).
        val_num_times: validation loss uses this many fixed times, evenly spaced in log-SNR.
        channels_last: run the network in channels_last memory format (faster convolutions on GPU).
        compile: wrap the network in torch.compile for training.
        augment: EDM's non-leaking augmentation (`AugmentPipe`; Karras et al. 2022, Sec. 5): training
            images are augmented and the network gets their augmentation labels; validation and
            sampling (`model()`) pass none, i.e. zeros. The net's `augment_dim` must equal its `label_dim`.
        grad_nan_to_num: replace NaN / +inf / -inf gradient entries by 0 / 1e5 / -1e5 before each optimizer
            step, as EDM does (NVlabs/edm training/training_loop.py:137-139).
        autoencoder: a frozen `Autoencoder` for latent diffusion: the module's codec (`self.codec`, `Pixels` when
            None; diffusion_pl/codecs/) is then its latents: batches become latents, samples are decoded; it is
            never in the optimizer, the EMA or the state_dict.
        repa: REPA's representation alignment (`RepresentationAlignment`, diffusion_pl/training/repa.py): adds
            weight x the alignment loss (logged as train/repa; train/loss stays the denoising loss); its projector
            trains with the net (optimizer, state_dict; no EMA), its frozen encoder is in neither.
    """

    def __init__(
        self,
        net: ScoreNetwork,
        process: Process,
        prediction: Prediction | None = None,
        loss: TrainingLoss | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_warmup_steps: int = 0,
        lr_schedule: Schedule | None = None,
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        ema_half_life_images: float | None = None,
        ema_rampup_ratio: float | None = None,
        seed: int = 0,
        nonfinite_loss: Literal["raise", "skip"] = "raise",
        max_nonfinite_skips: int = 20,
        val_num_times: int = 8,
        channels_last: bool = False,
        compile: bool = False,
        augment: AugmentPipe | None = None,
        grad_nan_to_num: bool = False,
        autoencoder: Autoencoder | None = None,
        repa: RepresentationAlignment | None = None,
    ) -> None:
        super().__init__()
        check_score_network(net, "net")
        if augment is not None:
            if not hasattr(augment, "label_dim"):
                raise UserValueError(f"augment is a {type(augment).__name__}: "
                                     "expected a diffusion_pl.training.augment.AugmentPipe")
            check_augment_labels(net, augment.label_dim)
        averaging = EMA(ema_decay, ema_warmup, ema_half_life_images, ema_rampup_ratio)
        if lr_warmup_steps < 0:
            raise UserValueError(f"lr_warmup_steps is {lr_warmup_steps}: expected an integer >= 0")
        if lr_schedule is not None and not isinstance(lr_schedule, Schedule):
            raise UserValueError(f"lr_schedule is a {type(lr_schedule).__name__}: expected a "
                                 "diffusion_pl.training.schedules.Schedule (Constant, Cosine, InverseSqrt) or None")
        if lr_schedule is not None and lr_warmup_steps:
            raise UserValueError(f"lr_warmup_steps is {lr_warmup_steps} and lr_schedule is {lr_schedule!r}: expected "
                                 "one of them (lr_warmup_steps: 0, the warm-up as the schedule's warmup_steps)")
        if max_nonfinite_skips < 1:
            raise UserValueError(f"max_nonfinite_skips is {max_nonfinite_skips}: expected an integer >= 1")
        if val_num_times < 1:
            raise UserValueError(f"val_num_times is {val_num_times}: expected an integer >= 1")
        # Under LightningCLI the hparams are the YAML config (class_path + init_args), which lets
        # `load_module` rebuild everything from a checkpoint; built from Python, the objects are left
        # out so that checkpoints stay loadable with weights_only=True.
        if lightning_compat.built_by_cli():
            self.save_hyperparameters()
        else:
            components = {"net": net, "process": process, "prediction": prediction, "loss": loss,
                          "lr_schedule": lr_schedule, "augment": augment, "autoencoder": autoencoder,
                          "repa": repa}
            self.save_hyperparameters(ignore=[*components, "optimizer"])
            # the components' constructor calls as the CLI's config, so that sample / evaluate / export read the
            # checkpoints of a module fitted with a plain Trainer (the optimizer, a callable, is left out)
            try:
                self.hparams.update(component_specs(components), _instantiator=lightning_compat.INSTANTIATOR)
            except NotRecordable as err:
                rank_zero_warn(f"this DiffusionModule's checkpoints will hold no config, so `diffusion-pl sample`, "
                               f"`evaluate` and `export` will not read them: {err}")
        self.net = net
        # The EMA lives in the module, not in Lightning's EMAWeightAveraging callback: sampling and FID
        # callbacks need the averaged network at arbitrary steps (not only inside validation, where the
        # callback swaps weights), and `sample` / `evaluate` read it straight from a checkpoint.
        self.ema = copy.deepcopy(net).requires_grad_(False).eval()
        self.process = process
        self.prediction = prediction if prediction is not None else EpsPrediction()
        self.loss_fn = loss if loss is not None else DenoisingLoss()
        if not isinstance(self.loss_fn, TrainingLoss):
            raise UserValueError(f"loss is a {type(self.loss_fn).__name__}: expected a diffusion_pl.losses.TrainingLoss "
                                 "(DenoisingLoss, ConsistencyLoss, MeanFlowLoss)")
        try:
            self.loss_fn.check(process, self.prediction)
        except ValueError as err:
            raise UserValueError(f"loss {type(self.loss_fn).__name__}: {one_line(err)}") from err
        self.optimizer_fn = optimizer
        self.lr_warmup_steps = lr_warmup_steps
        if lr_schedule is None and lr_warmup_steps:  # the warm-up it always was
            lr_schedule = Constant(lr_warmup_steps)
        self.lr_schedule = lr_schedule
        self.averaging = averaging
        self.seed = seed
        self.nonfinite_loss, self.max_nonfinite_skips = nonfinite_loss, max_nonfinite_skips
        self._nonfinite_run = 0  # consecutive skipped steps
        self.val_num_times = val_num_times
        self.channels_last = channels_last
        self.compile = compile
        self.augment, self.grad_nan_to_num = augment, grad_nan_to_num
        # the space the process runs in; a plain object (not an nn.Module): no parameters, no state_dict entries
        self.codec: Codec = codec_for(autoencoder)
        self.codec.check_module(net, augment)
        if repa is not None and autoencoder is not None and augment is not None:
            raise UserValueError("repa with augment in a latent space: expected one of them (the encoder sees pixels, "
                                 "the augmentation would change latents only)")
        self.repa = repa
        if repa is not None:
            repa.bind(net)  # the projector, for the block's width
        self._train_model: Model | None = None
        self._pending_images = 0  # local images of the micro-batches since the last optimizer step

    def train(self, mode: bool = True) -> "DiffusionModule":
        super().train(mode)
        self.ema.eval()  # the EMA network only ever evaluates (no dropout when sampling)
        return self

    # -- models in the sampler contract -------------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        return self.net.num_classes

    @property
    def null_label(self) -> int | None:
        """Label index of the unconditional embedding (classifier-free guidance), or None: the network's
        declared `null_label` (num_classes; None for ADM's class table without a null row)."""
        return self.net.null_label

    def model(self, ema: bool = True) -> Model:
        """The network (EMA by default) as a model `(x_t, t, class_labels) -> output` for samplers."""
        return precondition(self.ema if ema else self.net, self.process, self.prediction)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.codec.save_spec(checkpoint)  # the codec's identity (a latent space's VAE)
        checkpoint[EMA_STATE_KEY] = self.averaging.state_dict()  # the images-seen counter

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.averaging.load_state_dict(checkpoint.get(EMA_STATE_KEY))  # absent in older checkpoints (ema.py)
        # a checkpoint a Trainer restores (resuming `fit`); load_module checks what it loads itself (it knows the
        # path; load_from_checkpoint has no trainer)
        if self._trainer is not None:
            self.codec.check_checkpoint(checkpoint, self._trainer.ckpt_path)
            # FSDPStrategy has loaded the weights itself (strictly) and removed them from `checkpoint`
            problem = _network_mismatch(self.net, checkpoint["state_dict"]) if "state_dict" in checkpoint else None
            if problem is not None:  # else load_state_dict prints one "size mismatch" line per tensor
                raise UserValueError(f"checkpoint {self._trainer.ckpt_path} holds another network than the configured "
                                     f"model.net: {problem}: expected the recipe the run was trained with (its "
                                     "config.yaml), or --overwrite / another run folder to start a new run")

    # -- training ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:  # the datamodule is set up before the module: its shapes are known
            check_data_fits(self.net, datamodule, self.codec)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
            self.ema.to(memory_format=torch.channels_last)

    def on_fit_start(self) -> None:
        # Here, after the strategy has set the module up, not in `setup`: FSDP replaces `self.net` by its
        # wrapped unit then (training/sharding.py), and the training model must call that unit.
        net = torch.compile(self.net) if self.compile else self.net
        # Kept out of the module tree so the compiled wrapper adds no state_dict keys.
        object.__setattr__(self, "_train_model", precondition(net, self.process, self.prediction))

    def _reseed(self, batch_idx: int) -> None:
        micro = batch_idx % max(1, self.trainer.accumulate_grad_batches)
        torch.manual_seed(step_seed(self.seed, self.global_rank, self.global_step, micro))

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor | None:
        self._reseed(batch_idx)
        self.log(STEP_KEY, float(step_in_progress(self.trainer)))  # this batch's metrics' index (log_step.py)
        images, class_labels, *kept = batch  # (B, C, H, W) in [-1, 1] (or latents), (B,), [images beside latents]
        x0 = self.codec.encode(images)  # latents: one posterior draw, after the reseed
        self._pending_images += x0.shape[0]  # every rank draws batches of the same size (optimizer_step)
        model = self._train_model
        if self.augment is not None:  # drawn from the generator reseeded above, before the loss's draws
            x0, augment_labels = self.augment(x0)  # (B, C, H, W), (B, label_dim)
            model = functools.partial(model, augment_labels=augment_labels)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        labels = class_labels if self.num_classes is not None else None
        with self.repa.capture(self.net) if self.repa is not None else contextlib.nullcontext() as tokens:
            step = {"step": self.global_step} if getattr(self.loss_fn, "takes_step", False) else {}  # sCM's warm-up
            out = self.loss_fn(model, x0, self.process, self.prediction, labels, self.null_label,
                               images_seen=self._images_seen(x0.shape[0]), **step)
        loss = out.loss.mean()
        pixels = kept[0] if kept else images  # the codec decodes latents only if REPA asks for pixels
        align = None if self.repa is None else self.repa.loss(tokens, self.codec.pixels(pixels, x0))
        total = loss if align is None else loss + self.repa.weight * align
        if not self._loss_is_finite(total):
            return None
        self.log("train/loss", loss, prog_bar=True)
        if align is not None:
            self.log("train/repa", align, prog_bar=True)
        for name, value in bucket_losses(out.loss.detach(), out.t, self.process).items():
            self.log(f"train/{name}", value)
        return total

    def _images_seen(self, batch: int) -> int:
        """Training images of every optimizer step so far (the EMA's counter; for a checkpoint written before the
        counter was saved, the first step's estimate `EMA.update` uses: steps x this batch x ranks)."""
        seen = self.averaging.images_seen
        if seen is None:
            seen = self.global_step * batch * max(1, self.trainer.accumulate_grad_batches) * self.trainer.world_size
        return int(seen)

    def _loss_is_finite(self, loss: Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        # every rank must take the same branch, or DDP's gradient all-reduce would hang
        finite = self.trainer.strategy.reduce(finite, reduce_op="min") if self.trainer.world_size > 1 else finite
        if finite.item() == 1.0:
            self._nonfinite_run = 0
            return True
        step = self.global_step
        if self.nonfinite_loss == "raise":
            raise NonFiniteLossError(f"non-finite training loss at step {step} ({loss.item()}); lower the learning "
                                     "rate, enable gradient clipping, or set nonfinite_loss: skip")
        self._nonfinite_run += 1
        if self._nonfinite_run >= self.max_nonfinite_skips:
            raise NonFiniteLossError(f"non-finite training loss at {self._nonfinite_run} consecutive steps (up to step "
                                     f"{step}; max_nonfinite_skips={self.max_nonfinite_skips}): the model is diverged; "
                                     "resume from an earlier checkpoint with a lower learning rate")
        self.print(f"warning: non-finite training loss at step {step}; step skipped (nonfinite_loss=skip)")
        self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum")
        return False

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the total gradient norm before clipping (all-reduced under DDP, unscaled under fp16); then,
        with grad_nan_to_num, replace non-finite entries (before clipping, which would spread a NaN)."""
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if sharding.is_sharded(self.trainer.strategy):  # a rank holds a slice: every rank joins the sum
            self.log("train/grad_norm", sharding.global_grad_norm(grads, self.trainer.strategy))
        elif grads:
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        if self.grad_nan_to_num:
            for grad in grads:
                torch.nan_to_num(grad, nan=0.0, posinf=1e5, neginf=-1e5, out=grad)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: callbacks (ModelCheckpoint) run their batch-end hooks
        # before the module's, so a checkpoint saved at this step would miss this EMA update. global_step
        # still counts the earlier steps here (Lightning increments it after this hook).
        images, self._pending_images = self._pending_images * self.trainer.world_size, 0
        self.averaging.update(self.ema, self.net, self.global_step, images)

    def configure_optimizers(self) -> Any:
        try:
            extra = () if self.repa is None else self.repa.parameters()  # REPA's projector trains with the net
            own = self.loss_fn.parameters() if isinstance(self.loss_fn, nn.Module) else ()  # sCM's adaptive weight
            optimizer = self.optimizer_fn([*self.net.parameters(), *extra, *own])
        except ValueError as err:  # torch.optim checks its values (lr, betas, eps, weight_decay) this way
            raise UserValueError(f"optimizer: {one_line(err)}: expected the optimizer's valid range") from err
        if self.lr_schedule is None:
            return optimizer
        schedule = self.lr_schedule.bind(self.trainer)  # a total or a batch it left to the run
        # LambdaLR counts the optimizer steps (interval "step") and Lightning checkpoints that count, so the
        # multiplier is a function of the step alone on resume. A plain function, not the schedule object: LambdaLR
        # would save a callable object's attributes and restore them over the recipe's on resume.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation: a deterministic denoising loss with EMA weights ----------------------------------
    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x0, class_labels, *_ = batch  # images kept beside latents are not needed here
        n = x0.shape[0]
        # fixed times: val_num_times log-SNRs evenly spaced over the process's range (the same noise
        # levels for every process), cycled over the batch; fixed noise per batch index
        grid = log_snr_grid(self.process, self.val_num_times)
        t = grid[torch.arange(n) % self.val_num_times].to(device=x0.device, dtype=x0.dtype)
        g = torch.Generator(device=x0.device).manual_seed(step_seed(self.seed, 1, batch_idx))
        x0 = self.codec.encode(x0, g)
        eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        labels = class_labels if self.num_classes is not None else None
        # the generator also draws the label dropout (p_uncond), so val/loss is deterministic
        out = self.loss_fn(self.model(ema=True), x0, self.process, self.prediction, labels, self.null_label,
                           generator=g, t=t, eps=eps, images_seen=self._images_seen(n))
        loss = out.loss.mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log(STEP_KEY, float(log_step(self.trainer)))  # after step k: logged at k, as training's (log_step.py)
        for name, value in bucket_losses(out.loss, out.t, self.process).items():
            self.log(f"val/{name}", value, sync_dist=True)
        return loss


def load_module(ckpt_path: str, map_location: str | torch.device = "cpu",
                trust_config: bool = False) -> DiffusionModule:
    """Rebuild a DiffusionModule (net, EMA, process, prediction) from a checkpoint written by `diffusion-pl fit`.

    The file is read by diffusion_pl.utils.checkpoint.read_checkpoint: tensors with weights_only=True, class
    paths of older checkpoints rewritten, and the saved config refused unless every class it names comes
    from TRUSTED_PACKAGES or `trust_config` (a checkpoint from elsewhere could otherwise import and run any
    installed module).
    """
    checkpoint = read_checkpoint(ckpt_path, trust_config=trust_config,
                                 trust_option="trust_config=True (--trust_config)")
    return module_from_checkpoint(checkpoint, map_location)


def module_from_checkpoint(checkpoint: Checkpoint, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """`load_module` on a checkpoint already read (and trust-checked) by read_checkpoint."""
    if "_instantiator" not in checkpoint.config:
        raise UserValueError(f"checkpoint {checkpoint.path} has no saved config (a module built in Python saves one "
                             "only when its components' classes are importable and their arguments plain values; "
                             "its construction warned why not): build the DiffusionModule yourself and call "
                             "load_state_dict(checkpoint['state_dict'])")
    if not checkpoint.state_dict:
        raise UserValueError(f"checkpoint {checkpoint.path} holds no weights (its state_dict is empty): expected a "
                             "checkpoint written by `diffusion-pl fit` or `diffusion-pl import`")
    module = lightning_compat.module_from_checkpoint(DiffusionModule, checkpoint.raw).to(map_location)
    module.codec.check_checkpoint(checkpoint.raw, checkpoint.path)  # a latent module: the VAE it was trained with
    module.saved_config = checkpoint.config  # as saved (hparams hold only what the rebuilt module saves)
    return module


def _network_mismatch(net: nn.Module, state_dict: dict[str, Tensor]) -> str | None:
    """The first parameter of `net` (as `net.<name>` in a module state dict) that the checkpoint lacks, holds in
    another shape, or holds in excess; None when all fit."""
    own = {f"net.{k}": tuple(v.shape) for k, v in net.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state_dict.items() if k.startswith("net.")}
    for key, shape in own.items():
        if key not in saved:
            return f"{key} {shape} is not in the checkpoint"
        if saved[key] != shape:
            return f"{key} is {saved[key]} in the checkpoint and {shape} in model.net"
    extra = next((k for k in saved if k not in own), None)
    return None if extra is None else f"the checkpoint's {extra} {saved[extra]} is not in model.net"
