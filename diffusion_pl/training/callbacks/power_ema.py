"""PowerEMA: power-function EMAs tracked during training, with snapshots for post-hoc EMA (EDM2, Sec. 3).

The callback keeps one average of the network's parameters per sigma_rel (EDM2 default 0.05 and 0.10),
beside the module's own classic EMA (`DiffusionModule.ema`, untouched), and every
`snapshot_every_n_steps` optimizer steps writes each average to

    <run folder>/phema/phema-<step, 9 digits>-<sigma_rel>.pt

a torch.save file of plain tensors and numbers (loadable with weights_only=True): `state_dict` (the
network's state_dict keys; parameters averaged, buffers copied from the network), `averaged` (the
averaged keys), `step`, `nimg` (t, training images seen), `sigma_rel`, `gamma`, `format`. Each file is
written atomically (`fileio.atomic_path`), so a crash leaves only a hidden temporary file, which readers
skip. `diffusion-pl reconstruct-ema` turns the snapshots into a checkpoint of any other sigma_rel.

Why not the `ema-pytorch` package (0.8.3, PostHocEMA / KarrasEMA): its beta (1 - 1/(step + 1))^(gamma + 1)
is one step behind EDM2's Eq. 127 (after k updates it holds EDM2's average at t = k + 1 with the first
weights counted twice, while its synthesis takes t = k), its default update_every=100 applies one step's
beta per 100 steps, the solved coefficients are not normalised to sum 1, snapshots are written in place
(a crash leaves a truncated file) and carry no step / sigma_rel, time is counted in steps rather than
images, and it has no Lightning state for exact resume. The math here follows edm2 training/phema.py.

Time: t and each step's t_delta come from the module's images-seen counter (`DiffusionModule.averaging`,
diffusion_pl/training/ema.py), the one the classic EMA's ramp-up reads; the callback counts no batches.

Timing: the update runs once per optimizer step, after it (`on_optimizer_step_end` of
callbacks/optimizer_step.py: the end of the batch whose global_step moved, never a micro-batch of gradient
accumulation). Lightning runs callbacks' batch-end hooks in list order, so a checkpoint callback listed
before this one could save the step before its update; `state_dict` therefore applies a pending update
first, and every checkpoint holds the averages of exactly the step it records.

Under DDP every rank holds identical weights after the optimizer step (gradients are all-reduced), so each rank
updates its own copy and no communication is needed; rank 0 writes the snapshots, and checkpoints hold rank 0's
averages. Under Lightning's FSDPStrategy (sharded, `use_orig_params=True`, its default) a rank holds a flat slice
of each parameter, and each average is kept as the same slice: the update is the same foreach lerp on the
rank's slices, still with no communication. Snapshots and checkpoint state are gathered whole
(training/sharding.py `FlatShards`, one collective each, every rank calls it) so they are the files and entries
a DDP run writes: `reconstruct-ema` reads them unchanged, and a checkpoint resumes under either strategy. On
resume each rank cuts its slices out of the whole averages. The checkpoint holds whole averages, not each rank's
slices, because Lightning writes the callbacks' state from rank 0 alone (with `state_dict_type: full` and in the
metadata file of `sharded`): other ranks' slices would be lost. DeepSpeed and model-parallel strategies are
refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from diffusion_pl.training.callbacks.run_dir import run_dir
from diffusion_pl.utils.errors import UserValueError, one_line
from diffusion_pl.training.callbacks.optimizer_step import OptimizerStepCallback
from diffusion_pl.training.ema import EMA
from diffusion_pl.training.sharding import FlatShards, is_sharded, unwrapped_name
from diffusion_pl.training.phema import (SNAPSHOT_FOLDER, SNAPSHOT_FORMAT, PowerFunctionEMA, check_sigma_rel,
                                         list_snapshot_files, save_snapshot, snapshot_name)

__all__ = ["PowerEMA"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PowerEMA(OptimizerStepCallback):
    """Track power-function EMAs of `pl_module.net` and snapshot them for post-hoc reconstruction.

    Args:
        sigma_rels: EMA lengths relative to training time, each in (0, 0.2887]; EDM2 tracks 0.05 and 0.10
            and reconstructs any length between (and somewhat beyond) from them.
        snapshot_every_n_steps: write snapshots every this many optimizer steps. The reconstruction
            needs several per run (EDM2 writes one per 8M images); each costs one network copy per
            sigma_rel on disk.
        at_train_end: also snapshot the final step when it is not a multiple of snapshot_every_n_steps.
        dirpath: snapshot folder; default `<run folder>/phema` (beside `checkpoints/`).
        snapshot_dtype: dtype of the snapshot weights: float32 (exact), or float16 / bfloat16 (half the
            disk, as EDM2's float16 snapshots; the reconstruction then carries their rounding).
    """

    def __init__(self, sigma_rels: Sequence[float] = (0.05, 0.10), snapshot_every_n_steps: int = 1000,
                 at_train_end: bool = True, dirpath: str | None = None,
                 snapshot_dtype: Literal["float32", "float16", "bfloat16"] = "float32") -> None:
        super().__init__()
        try:
            self.sigma_rels = tuple(check_sigma_rel(s) for s in sigma_rels)
        except (TypeError, ValueError) as err:
            raise UserValueError(f"PowerEMA: {one_line(err)}") from err
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise UserValueError(f"PowerEMA: sigma_rels is {list(sigma_rels)}: expected at least one value, no repeats")
        if isinstance(snapshot_every_n_steps, bool) or not isinstance(snapshot_every_n_steps, int) \
                or snapshot_every_n_steps < 1:
            raise UserValueError(f"PowerEMA: snapshot_every_n_steps is {snapshot_every_n_steps}: expected an integer "
                                 ">= 1")
        if snapshot_dtype not in _DTYPES:
            raise UserValueError(f"PowerEMA: snapshot_dtype is {snapshot_dtype!r}: expected one of "
                                 f"{', '.join(_DTYPES)}")
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.at_train_end = at_train_end
        self.dirpath = dirpath
        self.snapshot_dtype = snapshot_dtype
        self.folder: Path | None = None
        self.ema: PowerFunctionEMA | None = None
        self._loaded: dict | None = None  # state from a checkpoint, applied once the network is on its device
        self._trainer: L.Trainer | None = None
        self._step_done = -1  # global step the averages correspond to
        self._no_history = False  # started mid-run without averages in the checkpoint
        self._last_snapshot = -1
        self._full: dict | None = None  # sharded runs: the network's names, shapes and state_dict keys, unwrapped
        self._shards: FlatShards | None = None

    # -- lifecycle --------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(getattr(pl_module, "net", None), torch.nn.Module) \
                or not isinstance(getattr(pl_module, "averaging", None), EMA):
            raise UserValueError(f"PowerEMA averages `pl_module.net` over the images counted by `pl_module.averaging`, "
                                 f"which {type(pl_module).__name__} lacks: expected a DiffusionModule")
        self._full = None
        if is_sharded(trainer.strategy):
            strategy = trainer.strategy
            if not isinstance(strategy, FSDPStrategy) or not strategy.kwargs.get("use_orig_params", True):
                raise UserValueError(f"PowerEMA keeps its averages sharded like the weights under FSDPStrategy, but "
                                     f"the strategy is {type(strategy).__name__}"
                                     f"{' with use_orig_params=False' if isinstance(strategy, FSDPStrategy) else ''}"
                                     ": expected single-device, DDP or FSDPStrategy (use_orig_params=True) training")
            self._full = _layout(pl_module.net)  # before the strategy wraps it: the full shapes
        self._trainer = trainer

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir is a collective: every rank evaluates it here (as SampleGrid does)
        self.folder = self._folder(trainer)

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath is not None else run_dir(trainer) / SNAPSHOT_FOLDER

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        named = list(pl_module.net.named_parameters())
        names = [unwrapped_name(n) for n, _ in named]
        self.ema = PowerFunctionEMA([p for _, p in named], names, self.sigma_rels)
        self._shards = None
        if self._full is not None:  # FSDP: the averages are this rank's slices; collective
            if names != self._full["names"]:
                raise UserValueError(f"PowerEMA: the sharded network's parameters {names[:3]}... are not the network's "
                                     f"{self._full['names'][:3]}...: expected FSDPStrategy to wrap it unchanged")
            try:
                self._shards = FlatShards([p for _, p in named], self._full["shapes"],
                                          getattr(trainer.strategy.model, "process_group", None),
                                          trainer.strategy.root_device)
            except ValueError as err:
                raise UserValueError(f"PowerEMA: {one_line(err)}") from err
        step = trainer.global_step
        if self._loaded is not None:
            try:
                self.ema.load_state_dict(self._local_state(self._loaded))
            except ValueError as err:
                raise UserValueError(f"PowerEMA: {one_line(err)}") from err
            self._loaded = None
            if self.ema.step != step:
                rank_zero_warn(f"PowerEMA: the checkpoint's averages are at step {self.ema.step} but training resumes "
                               f"at step {step}; continuing from them")
        elif step > 0:
            rank_zero_warn(f"PowerEMA: resuming at step {step} from a checkpoint without PowerEMA averages: the "
                           "averages start from the current weights, as if they had been the weights of all earlier "
                           "steps")
            self._no_history = True
            self.ema.step = step
        self._step_done = step
        if trainer.is_global_zero:
            self._remove_abandoned(step)

    def _local_state(self, state: dict) -> dict:
        """A checkpoint's state (whole averages) with this rank's slices of them, under FSDP; as is otherwise."""
        if self._shards is None:
            return state
        names, shapes = self._full["names"], self._full["shapes"]
        local = []
        for stored in state["averages"]:
            if list(stored) != names:  # PowerFunctionEMA.load_state_dict names the difference
                return state
            for name, shape in zip(names, shapes):
                if stored[name].shape != shape:
                    raise ValueError(f"the checkpoint's average of {name} has shape {tuple(stored[name].shape)}, the "
                                     f"network's {tuple(shape)}: expected the network it was trained with")
            local.append(dict(zip(names, self._shards.local([stored[n] for n in names]))))
        return {**state, "averages": local}

    def _remove_abandoned(self, step: int) -> None:
        """Snapshots past the step training (re)starts from belong to an abandoned continuation: remove them."""
        stale = [path for s, path in list_snapshot_files(self.folder) if s > step]
        for path in stale:
            path.unlink()
        if stale:
            rank_zero_info(f"PowerEMA: removed {len(stale)} snapshots past step {step} in {self.folder} (written by a "
                           "run that continued beyond the checkpoint this one starts from)")

    # -- averaging --------------------------------------------------------------------------------------
    def on_optimizer_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._catch_up()
        if trainer.global_step % self.snapshot_every_n_steps == 0:
            self.write_snapshots(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._catch_up()
        if self.at_train_end and trainer.global_step > 0 and trainer.global_step != self._last_snapshot:
            self.write_snapshots(trainer, pl_module)

    def _catch_up(self) -> None:
        """Apply the update of an optimizer step that completed since the last one (at most one is pending).

        The module's EMA has already counted that step's images (DiffusionModule.optimizer_step runs before
        any batch-end hook), so its counter is t after the step."""
        trainer = self._trainer
        if self.ema is None or trainer is None or trainer.global_step == self._step_done:
            return
        counter: EMA = trainer.lightning_module.averaging
        if self._no_history:  # the averages stand for every step before this one
            self.ema.nimg = counter.images_seen - counter.step_images
            self._no_history = False
        t_delta = counter.images_seen - self.ema.nimg
        if t_delta <= 0:
            raise RuntimeError(f"PowerEMA: optimizer step {trainer.global_step} at {counter.images_seen} images seen, "
                               f"but the averages are already at {self.ema.nimg}")
        self.ema.update(list(trainer.lightning_module.net.parameters()), t_delta)
        self.ema.step = trainer.global_step
        self._step_done = trainer.global_step

    # -- snapshots --------------------------------------------------------------------------------------
    @torch.no_grad()
    def snapshot(self, pl_module: L.LightningModule, index: int) -> dict | None:
        """The snapshot of profile `index`: the net's state_dict with its parameters replaced by their average.

        Under FSDP a collective (every rank calls it) that returns the snapshot on rank 0 and None elsewhere."""
        ema = self.ema
        dtype = _DTYPES[self.snapshot_dtype]
        if self._shards is not None:
            whole = self._shards.gather(ema.averages[index])
            if whole is None:
                return None
            buffers = {unwrapped_name(n): b for n, b in pl_module.net.named_buffers()}  # FSDP replicates buffers
            pairs = [(key, whole[i] if i is not None else buffers[key], i is not None) for key, i in self._full["keys"]]
        else:
            position = {id(p): i for i, p in enumerate(pl_module.net.parameters())}
            pairs = [(key, ema.averages[index][position[id(v)]] if id(v) in position else v, id(v) in position)
                     for key, v in pl_module.net.state_dict(keep_vars=True).items()]
        state, averaged = {}, []
        for key, value, is_average in pairs:
            if is_average:
                averaged.append(key)
                value = value.to(dtype) if value.is_floating_point() else value
            state[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"format": SNAPSHOT_FORMAT, "state_dict": state, "averaged": averaged, "step": int(ema.step),
                "nimg": int(ema.nimg), "sigma_rel": float(ema.sigma_rels[index]), "gamma": float(ema.gammas[index])}

    def write_snapshots(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Write one snapshot per sigma_rel at the current step (rank 0; under FSDP the shard group of rank 0
        gathers them first, other ranks return at once)."""
        self._last_snapshot = trainer.global_step
        if self.ema is None or not (trainer.is_global_zero or (self._shards and self._shards.includes_global_zero)):
            return []
        paths = []
        for index, sigma_rel in enumerate(self.ema.sigma_rels):
            snapshot = self.snapshot(pl_module, index)
            if trainer.is_global_zero:
                path = (self.folder or self._folder(trainer)) / snapshot_name(trainer.global_step, sigma_rel)
                save_snapshot(path, snapshot)
                paths.append(path)
        return paths

    # -- checkpoint state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The averages (whole: under FSDP gathered to rank 0, a collective; other ranks get no averages)."""
        self._catch_up()  # a checkpoint callback listed before this one saves after the step's update
        if self.ema is None:
            return {} if self._loaded is None else self._loaded
        state = self.ema.state_dict()
        if self._shards is not None:
            names = self._full["names"]
            whole = [self._shards.gather(averages) for averages in self.ema.averages]
            state["averages"] = None if whole[0] is None else [dict(zip(names, w)) for w in whole]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._loaded = state_dict


def _layout(net: torch.nn.Module) -> dict:
    """Names and full shapes of `net`'s parameters, and its state_dict keys with the index of the parameter each
    holds (None for a buffer): read before FSDP wraps the network, since afterwards a rank sees slices."""
    names, shapes, position = [], [], {}
    for name, p in net.named_parameters():
        position[id(p)] = len(names)
        names.append(name)
        shapes.append(p.shape)
    keys = [(key, position.get(id(value))) for key, value in net.state_dict(keep_vars=True).items()]
    return {"names": names, "shapes": shapes, "keys": keys}
