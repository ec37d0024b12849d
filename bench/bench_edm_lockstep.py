"""NVlabs/edm's training step and this project's, in lockstep, on the small DDPM++ of bench/bench_order.py.

Needs a checkout of NVlabs/edm (https://github.com/NVlabs/edm), passed as ``--edm PATH``: its
``training/networks.py`` (EDMPrecond, SongUNet) and ``training/loss.py`` (EDMLoss) are imported from there;
nothing else of it is used. The script is not imported by the tests.

Both sides start from the same weights: EDM's ``EDMPrecond(SongUNet)`` is built (model_channels 16,
channel_mult [1, 2, 2], 2 blocks, DDPM++ options of EDM's train.py:117-118) and its state dict is mapped
onto ``unet_ddpmpp_cifar10(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2)``. The project's
side is the real one: ``DiffusionModule.training_step`` under a Lightning ``Trainer``, its Adam and its
linear warm-up (``lr_warmup_steps=200``), CIFAR-10 batches from ``ShardDataModule``. A callback runs EDM's
step on the same batch, with the global generator seeded as the module seeds its step, so that sigma,
noise and dropout draws are the same: EDMLoss (training/loss.py:72-80), ``loss.sum().mul(1 / batch)``,
the lr set from the images seen *before* the step (training_loop.py:132-140), Adam(betas 0.9/0.999,
eps 1e-8; train.py:101). The project's loss is the mean over the pixels, so its gradient is EDM's / 3,072
and its Adam eps 1e-8 / 3,072 makes the two updates the same. Per step the script records both losses,
the relative difference of the gradients (EDM's divided by 3,072) and of the weights after the step.

usage:
  git clone https://github.com/NVlabs/edm /tmp/edm
  diffusion-pl prepare folder cifar10-jpeg.tar.gz --split train --out /tmp/cifar
  python bench/bench_edm_lockstep.py --edm /tmp/edm --shards /tmp/cifar --steps 200 --out lockstep.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from unittest import mock

import lightning as L
import torch

from diffusion_pl.data.datamodule import ShardDataModule
from diffusion_pl.losses import DenoisingLoss, LogNormalNoise, OutputMSE
from diffusion_pl.networks.unet_presets import unet_ddpmpp_cifar10
from diffusion_pl.prediction import EDMPreconditioning
from diffusion_pl.processes.exploding import EDM
from diffusion_pl.training.module import DiffusionModule
from diffusion_pl.utils.seeding import mix_seed

BATCH, LR, RAMP_STEPS = 32, 1e-3, 200
SMALL = dict(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2)


def edm_network(edm: str, dropout: float) -> torch.nn.Module:
    sys.path.insert(0, edm)
    from training.networks import EDMPrecond  # noqa: PLC0415 (from the EDM checkout)
    return EDMPrecond(img_resolution=32, img_channels=3, label_dim=0, use_fp16=False, sigma_data=0.5,
                      model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                      decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
                      model_channels=SMALL["model_channels"], channel_mult=list(SMALL["channel_mult"]),
                      num_blocks=SMALL["num_res_blocks"], dropout=dropout)


def edm_to_project(state: dict, levels: int, resolution: int = 32) -> dict:
    """EDM SongUNet state dict (keys of ``EDMPrecond.model``) -> this project's UNet keys."""
    level = {resolution >> i: i for i in range(levels)}  # encoder level of a resolution; the decoder's is reversed
    out = {}
    for key, value in state.items():
        if key.endswith("resample_filter"):
            continue  # a fixed buffer in EDM; the project's resampling has no such tensor
        name, leaf = key.rsplit(".", 1)
        parts = name.split(".")
        m = re.fullmatch(r"(\d+)x\d+_(\w+?)(\d*)", parts[1]) if parts[0] in ("enc", "dec") else None
        if parts[0] == "map_layer0":
            new = "map_emb.0"
        elif parts[0] == "map_layer1":
            new = "map_emb.2"
        elif m is None:
            raise ValueError(f"unmapped EDM key {key}")
        else:
            res, kind, idx = int(m[1]), m[2], m[3]
            enc, dec = level[res], levels - 1 - level[res]
            new = {("enc", "conv"): "conv_in", ("enc", "down"): f"downsample.{enc - 1}",
                   ("enc", "block"): f"enc.{enc}.{idx}", ("dec", "in"): f"mid.{idx}",
                   ("dec", "up"): f"upsample.{dec - 1}", ("dec", "block"): f"dec.{dec}.{idx}",
                   ("dec", "aux_norm"): "norm_out", ("dec", "aux_conv"): "conv_out"}[(parts[0], kind)]
            sub = {"affine": "affine.1", "norm2": "attn.norm", "qkv": "attn.attn.qkv", "proj": "attn.attn.proj"}
            if len(parts) > 2:
                new += "." + sub.get(parts[2], parts[2])
        if new.endswith(("attn.qkv", "attn.proj")):
            value = value.reshape(value.shape[0], *value.shape[1:2])  # 1x1 conv -> linear
        if new.endswith("attn.qkv"):
            # EDM (one head) reads its qkv channels as (C, 3): row 3c + j (networks.py:182); timm's rows are
            # [q; k; v]: row jC + c
            c = value.shape[0] // 3
            value = value.reshape(c, 3, *value.shape[1:]).transpose(0, 1).reshape(value.shape)
        out[f"{new}.{leaf}"] = value
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def flat_pair(theirs: torch.nn.Module, ours: torch.nn.Module, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM's parameters (or gradients) mapped to the project's names, and the project's, flattened in one order."""
    pick = (lambda p: p.grad) if grad else (lambda p: p.detach())
    mapped = edm_to_project({k: pick(p) for k, p in theirs.named_parameters()}, len(SMALL["channel_mult"]))
    names = [k for k, _ in ours.named_parameters()]
    return (torch.cat([mapped[k].reshape(-1) for k in names]),
            torch.cat([pick(p).reshape(-1) for _, p in ours.named_parameters()]))


def run(edm: str, shards: str, seed: int, steps: int, dropout: float) -> dict:
    torch.set_num_threads(1)
    sys.path.insert(0, edm)
    from training.loss import EDMLoss  # noqa: PLC0415 (from the EDM checkout)

    torch.manual_seed(seed)
    theirs = edm_network(edm, dropout).train()
    ours = unet_ddpmpp_cifar10(**SMALL, dropout=dropout)
    ours.load_state_dict(edm_to_project(theirs.model.state_dict(), len(SMALL["channel_mult"])), strict=True)
    pixels = 3 * 32 * 32

    # Same function at the start: the bare networks in eval mode (no dropout) on one input, four noise labels.
    probe = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    c_noise = torch.tensor([-1.5, -0.3, 0.2, 1.1])
    with torch.no_grad():
        start = {"network_rel_diff": rel(ours.eval()(probe, c_noise, None), theirs.model.eval()(probe, c_noise, None))}
    theirs.train(), ours.train()
    module = DiffusionModule(
        ours, EDM(sigma_min=0.002, sigma_max=80.0), EDMPreconditioning(sigma_data=0.5),
        DenoisingLoss(proposal=LogNormalNoise(p_mean=-1.2, p_std=1.2), weighting=OutputMSE()),
        optimizer=lambda params: torch.optim.Adam(params, lr=LR, eps=1e-8 / pixels),
        lr_warmup_steps=RAMP_STEPS, ema_half_life_images=10_000, seed=seed)

    loss_fn = EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    opt = torch.optim.Adam(theirs.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    record = {"loss_ours": [], "loss_edm": [], "grad_rel_diff": [], "weight_rel_diff": [], "lr_ours": [],
              "lr_edm": []}
    state = {"nimg": 0}

    class EDMStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            images = batch[0]
            torch.manual_seed(mix_seed(seed, 0, trainer.global_step, 0))  # as DiffusionModule._reseed
            # The module draws its N(0, 1) numbers in float64 (losses.py `draw`), first the log-sigma normal (B,),
            # then the noise; EDMLoss's torch.randn / torch.randn_like (training/loss.py:73, 77) get the same
            # numbers, in float32, and the generator is left where the module leaves it (for dropout's draws).
            draws = iter([torch.randn(images.shape[0], dtype=torch.float64).float().view(-1, 1, 1, 1),
                          torch.randn(images.shape, dtype=torch.float64).float()])
            opt.zero_grad(set_to_none=True)  # training_loop.py:124-132
            with mock.patch.object(torch, "randn", lambda *a, **k: next(draws)), \
                    mock.patch.object(torch, "randn_like", lambda *a, **k: next(draws)):
                loss = loss_fn(net=theirs, images=images, labels=None, augment_pipe=None)
            record["loss_edm"].append(float(loss.detach().mean()))
            loss.sum().mul(1 / images.shape[0]).backward()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            g_theirs, g_ours = flat_pair(theirs.model, pl_module.net, grad=True)
            record["grad_rel_diff"].append(rel(g_theirs / pixels, g_ours))
            record["lr_ours"].append(optimizer.param_groups[0]["lr"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            record["loss_ours"].append(float(outputs["loss"]))
            for g in opt.param_groups:  # training_loop.py:135-140, lr_rampup_kimg = RAMP_STEPS * BATCH / 1000
                g["lr"] = LR * min(state["nimg"] / (RAMP_STEPS * BATCH), 1)
            record["lr_edm"].append(opt.param_groups[0]["lr"])
            for p in theirs.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt.step()
            state["nimg"] += batch[0].shape[0]
            record["weight_rel_diff"].append(rel(*flat_pair(theirs.model, pl_module.net, grad=False)))

    data = ShardDataModule(shards, batch_size=BATCH, num_workers=0, seed=seed)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[EDMStep()])
    trainer.fit(module, datamodule=data)
    return {"seed": seed, "dropout": dropout, **start, **record}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edm", required=True, help="path of an NVlabs/edm checkout")
    p.add_argument("--shards", required=True, help="prepared CIFAR-10 train shards (a folder with manifest.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dropout", type=float, default=0.13)
    p.add_argument("--out", required=True, help="JSON file for the per-step records")
    args = p.parse_args()
    result = run(args.edm, args.shards, args.seed, args.steps, args.dropout)
    with open(args.out, "w") as f:
        json.dump(result, f)
    for i in sorted({0, 1, 2, 9, 49, 99, 149, args.steps - 1} & set(range(len(result["loss_ours"])))):
        print(f"step {i + 1:4d}: loss ours {result['loss_ours'][i]:.6f} edm {result['loss_edm'][i]:.6f}  "
              f"grad rel diff {result['grad_rel_diff'][i]:.2e}  weight rel diff {result['weight_rel_diff'][i]:.2e}  "
              f"lr {result['lr_ours'][i]:.2e} / {result['lr_edm'][i]:.2e}")
    for lo, hi in ((1, 49), (50, 99), (100, 199), (200, 250)):
        if hi <= len(result["loss_ours"]):
            mean = [sum(result[k][lo - 1:hi]) / (hi - lo + 1) for k in ("loss_ours", "loss_edm")]
            print(f"steps {lo}-{hi}: mean loss ours {mean[0]:.4f} edm {mean[1]:.4f}")
    print("network rel diff at the start:", result["network_rel_diff"], "max |loss diff|:",
          max(math.fabs(a - b) for a, b in zip(result["loss_ours"], result["loss_edm"])))


if __name__ == "__main__":
    main()
