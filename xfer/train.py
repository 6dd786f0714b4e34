"""The one training loop: pretraining, fine-tuning and scratch training differ only by their TrainSpec.

Knows nothing of Ray or MLflow: it reports through a callable it is handed and returns its metrics. Its pieces
(device and precision, steps and seeds of an epoch, the phase's optimiser and schedule, the step, what a cell writes)
are public: xfer.vectorised trains a pack of cells with the same ones, and xfer.plan times `train_step`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from xfer import models, names
from xfer.checkpoint import TrainState
from xfer.data import Split, Splits, channel_stats
from xfer.specs import TrainSpec

Report = Callable[[dict[str, Any]], None]
"""Receives one record per event: ``{"kind": "train" | "epoch", "step", "epoch", "seconds", <metric>: value}``."""

EVAL_BATCH = 1024


def noop(record: dict[str, Any]) -> None:
    """The default report: discard."""


@dataclass(frozen=True)
class Result:
    """What a training run produced: status, final metrics and the error curve (long rows)."""

    status: str                          # "ok" | "failed"
    reason: str                          # why it failed ("" when ok)
    metrics: dict[str, float]
    curve: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def prepare_model(spec: TrainSpec, data: Splits, pretrained: models.XferModel | None = None) -> models.XferModel:
    """A fresh model for `spec` (seeded), or `pretrained` with a new, freshly initialised head.

    Fine-tuning always gets a new head (the "new head" that `head_lr_mult` speeds up), even when
    source and target share a label set; the pretrained model keeps its own input normalisation,
    since its features were learned on that scale.
    """
    torch.manual_seed(spec.seed)
    if pretrained is None:
        mean, std = channel_stats(data.train)
        return models.build(spec.arch, data.in_shape, data.num_classes, mean=mean, std=std, weights=spec.weights)
    models.replace_head(pretrained, data.num_classes)
    return pretrained


def train(
    spec: TrainSpec,
    data: Splits,
    model: models.XferModel,
    report: Report = noop,
    device: torch.device | str | None = None,
    resume: TrainState | None = None,
    on_epoch_end: Callable[[TrainState], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Result:
    """Train `model` on `data` as `spec` says; return final metrics and the error curve.

    `on_epoch_end` receives the full training state after every epoch (the Ray adapter checkpoints it);
    `resume` continues from such a state instead of epoch 0. `stop`, asked before every optimiser step, ends
    training early with a "stopped" result (the grid is stopping: the cell resumes from its last epoch state).
    """
    device = torch.device(device) if device is not None else default_device()
    cuda = device.type == "cuda"
    low = bf16(spec.precision, device)
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)  # NHWC convs are faster under bf16 on tensor cores
    train_x, train_y = _to_device(data.train, device)
    evaluated = evaluation_splits(spec, data)
    eval_sets = {"val": _to_device(evaluated.val, device), "test": _to_device(evaluated.test, device)}

    rank, world = dist_world()
    shard = len(data.train) // world
    phase = Phase.build(spec, model, start_epoch=resume.epoch if resume else 0,
                        steps_per_epoch=steps_per_epoch(shard, spec))
    curve: list[dict[str, Any]] = list(resume.curve) if resume else []
    step, seconds_before = (resume.step, resume.seconds) if resume else (0, 0.0)
    if resume:
        restore(model, phase, resume)
    start = time.perf_counter()

    def now() -> float:
        return seconds_before + time.perf_counter() - start

    errors: dict[str, float] | None = None
    for epoch in range(resume.epoch if resume else 0, spec.epochs):
        if spec.unfreeze_epoch is not None and epoch == spec.unfreeze_epoch:
            phase = Phase.build(spec, model, start_epoch=epoch, steps_per_epoch=phase.steps_per_epoch)
        model.train()
        torch.manual_seed(epoch_seed(spec, epoch))  # dropout and augmentation draws
        batch = min(spec.batch_size, shard)
        order = epoch_order(len(train_y), spec, epoch, phase.steps_per_epoch * batch * world)
        # Data-parallel ranks take disjoint shards of one order.
        order = order[rank::world][:max(shard, phase.steps_per_epoch * batch)].to(device)
        correct = torch.zeros((), device=device)
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for begin in range(0, phase.steps_per_epoch * batch, batch):  # the last partial batch is dropped
            if stop is not None and stop():
                return stopped(spec, step, epoch, curve, now())
            idx = order[begin:begin + batch]
            x = as_float(train_x[idx], channels_last=cuda)
            if spec.augment:
                x = augment_batch(x)
            y = train_y[idx]
            logits, loss = train_step(model, phase.optimizer, x, y, spec.label_smoothing, low, world)
            phase.after_step()
            step += 1
            # Accumulate on the device; read back (one sync) only every `log_every` steps.
            correct += (logits.argmax(1) == y).sum()
            loss_sum += loss.detach() * len(y)
            seen += len(y)
            if step % spec.log_every == 0:
                total_loss, right, examples = window(loss_sum, correct, seen, world)
                if not math.isfinite(total_loss):
                    return failed(spec, step, epoch, curve, now())
                row = curve_row(step, epoch + (begin + len(idx)) / len(order), now(), "train", 1 - right / examples)
                curve.append(row)
                report(train_record(row, total_loss / examples))
                correct.zero_()
                loss_sum.zero_()
                seen = 0
        if seen:
            total_loss, right, examples = window(loss_sum, correct, seen, world)
            if not math.isfinite(total_loss):
                return failed(spec, step, epoch, curve, now())
            if epoch == spec.epochs - 1:
                # The steps since the last full `log_every` window: a cell always ends with a train error, even one
                # with fewer steps than `log_every`.
                row = curve_row(step, epoch + 1, now(), "train", 1 - right / examples)
                curve.append(row)
                report(train_record(row, total_loss / examples))
        errors = {split: error(model, *tensors, cuda=cuda, low=low) for split, tensors in eval_sets.items()}
        phase.after_evaluation(errors["val"])
        for split, err in errors.items():
            curve.append(curve_row(step, epoch + 1, now(), split, err))
        report(epoch_record(step, epoch + 1, now(), errors))
        if on_epoch_end is not None:
            on_epoch_end(snapshot(epoch + 1, step, now(), model, copy.deepcopy(phase.optimizer.state_dict()),
                                  phase.scheduler, curve))
    # Evaluation is deterministic and nothing changes the model after the last epoch's: its errors are the final ones
    # (a cell resumed from its last epoch's state evaluates once here).
    final = errors if errors is not None else {split: error(model, *tensors, cuda=cuda, low=low)
                                               for split, tensors in eval_sets.items()}
    return finished(spec, step, final, curve, now())


# ---- a cell's set-up: device, precision, steps, seeds, data order, optimiser and schedule ------------

def default_device() -> torch.device:
    """Where a cell trains when its caller names no device: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16(precision: str, device: torch.device | str) -> bool:
    """Whether a cell of `precision` (TrainSpec.precision) runs its forward passes under bf16 autocast on `device`."""
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def steps_per_epoch(n: int, spec: TrainSpec) -> int:
    """Optimiser steps per epoch over `n` training examples: one under fast_dev_run, `epoch_steps` when set, else one
    pass (the last partial batch dropped)."""
    if spec.fast_dev_run:
        return 1
    if spec.epoch_steps is not None:
        return spec.epoch_steps
    return max(1, n // min(spec.batch_size, n))


def epoch_seed(spec: TrainSpec, epoch: int) -> int:
    """The seed of epoch `epoch` of `spec`'s cell, for its batch order (`epoch_order`) and its dropout and
    augmentation draws: a function of the cell's seed and the epoch only, so epoch e draws the same with or without a
    resume, and alone or in a vectorised pack. Fixed: a kept epoch state resumes on the draws it was made with."""
    # 100_003 exceeds any epoch count, so each (seed, epoch) gets a seed of its own (that it is prime plays no part).
    return spec.seed * 100_003 + epoch


def epoch_order(n: int, spec: TrainSpec, epoch: int, needed: int = 0) -> torch.Tensor:
    """The order in which epoch `epoch` draws `n` training examples: a permutation seeded by the cell's seed and the
    epoch (the same with or without a resume), followed by further permutations of the same generator until it holds
    `needed` indices (an `epoch_steps` epoch longer than one pass over the data)."""
    generator = torch.Generator().manual_seed(epoch_seed(spec, epoch))
    orders = [torch.randperm(n, generator=generator)]
    while len(orders) * n < needed:
        orders.append(torch.randperm(n, generator=generator))
    return orders[0] if len(orders) == 1 else torch.cat(orders)


def evaluation_splits(spec: TrainSpec, data: Splits) -> Splits:
    """`data` with val and test cut to what every evaluation of `spec` runs on: their first batch
    (min(batch_size, len) examples) under `fast_dev_run`, else all of them."""
    if not spec.fast_dev_run:
        return data

    def first_batch(split: Split) -> Split:
        return Split(split.images[:spec.batch_size], split.labels[:spec.batch_size])

    return dataclasses.replace(data, val=first_batch(data.val), test=first_batch(data.test))


@dataclass
class Phase:
    """Optimiser and schedule for one phase (before / after unfreezing)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int
    schedule: str                        # TrainSpec.schedule: when `scheduler` moves
    first_epoch: int                     # where the phase begins: 0, or TrainSpec.unfreeze_epoch once unfrozen

    @staticmethod
    def build(spec: TrainSpec, model: models.XferModel, start_epoch: int, steps_per_epoch: int) -> Phase:
        """The phase `start_epoch` lies in: `model` frozen to `spec.freeze_depth` (but in the unfrozen phase of a
        cell that unfreezes its body), its trainable backbone and head as torch.optim param groups (the head's lr
        times `head_lr_mult`), and the schedule (a cosine one spans the phase's steps)."""
        unfrozen = spec.unfreeze_epoch is not None and start_epoch >= spec.unfreeze_epoch
        models.unfreeze(model)
        if not (unfrozen and spec.unfreeze_body):   # the control keeps its body frozen through the second phase
            models.freeze(model, spec.freeze_depth)
        lr = spec.lr * (spec.unfreeze_lr_mult if unfrozen else 1.0)
        head = [p for p in models.head_parameters(model) if p.requires_grad]
        backbone = [p for p in models.backbone_parameters(model) if p.requires_grad]
        groups = [g for g in ({"params": backbone, "lr": lr}, {"params": head, "lr": lr * spec.head_lr_mult}) if g["params"]]
        optimizer = build_optimizer(spec, groups)
        phase_end = spec.unfreeze_epoch if (spec.unfreeze_epoch is not None and not unfrozen) else spec.epochs
        phase_start = spec.unfreeze_epoch if unfrozen else 0
        if spec.schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, (phase_end - phase_start) * steps_per_epoch))
        elif spec.schedule == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
        else:
            scheduler = None
        return Phase(optimizer, scheduler, steps_per_epoch, spec.schedule, phase_start)

    def after_step(self) -> None:
        """After every optimiser step: the cosine schedule moves per step."""
        if self.scheduler is not None and self.schedule == "cosine":
            self.scheduler.step()

    def after_evaluation(self, val_error: float) -> None:
        """After every epoch's evaluation: the plateau schedule reads the validation error."""
        if self.scheduler is not None and self.schedule == "plateau":
            self.scheduler.step(val_error)


def build_optimizer(spec: TrainSpec, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The torch.optim optimiser `spec.optimizer` names, over `groups` (each may set its own lr)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    cls = torch.optim.AdamW if spec.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=spec.lr, weight_decay=spec.weight_decay)


def restore(model: models.XferModel, phase: Phase, state: TrainState) -> None:
    """Load an epoch's `state` (from `snapshot`) into `model` and the `phase` freshly built for that epoch.

    A state saved at the end of the epoch before `phase` begins (the last frozen epoch of a freeze-then-unfreeze
    cell) holds the previous phase's optimiser and schedule, which an uninterrupted run drops there for fresh ones:
    only its weights load, and `phase` stays as built."""
    model.load_state_dict(state.model)
    if state.epoch == phase.first_epoch:
        return
    phase.optimizer.load_state_dict(state.optimizer)
    if state.scheduler is not None and phase.scheduler is not None:
        phase.scheduler.load_state_dict(state.scheduler)


# ---- one optimiser step ------------------------------------------------------------------------------

def _to_device(split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # The whole split moves once, as uint8 (4x smaller than float); batches are index slices on the device.
    return split.images.to(device, non_blocking=True), split.labels.to(device, non_blocking=True)


def as_float(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 images as the float [0, 1] batch a model takes, in channels_last layout where asked (CUDA's NHWC convs)."""
    x = images.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def augment_batch(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero padding `pad`) and horizontal flip of a float batch, as tensor arithmetic.

    The draws come from `generator` (the global one when None): a vectorised pack gives each cell its own.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # n,1,h,1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # n,1,1,w
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    cropped = padded[batch, chans, rows, cols]
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The training loss, in float32 whatever precision the logits came in (bf16 under autocast): a bf16 log-softmax
    would round the loss and its gradient."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               label_smoothing: float, low: bool, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step of `model` on the batch (`x`, `y`); returns the batch's logits and loss.

    The forward runs under bf16 autocast when `low` (`bf16`); with several data-parallel ranks (`world`), the
    gradients are averaged over them before the step."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low):
        logits = model(x)
        loss = cross_entropy(logits, y, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:
        _average_gradients(model)
    optimizer.step()
    return logits, loss


def dist_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed (Ray Train's workers), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _average_gradients(model: torch.nn.Module) -> None:
    # One flat all-reduce per step instead of one per tensor; works across freeze/unfreeze phases,
    # which DistributedDataParallel (fixed at wrap time) would not.
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def window(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, world: int) -> tuple[float, float, int]:
    """A logging window's summed loss, correct predictions and examples, over every data-parallel rank (one
    all-reduce when there are several), so that all ranks see one loss and decide alike whether it is finite: a rank
    that stopped on a NaN alone would leave the others blocked in their next gradient all-reduce."""
    totals = torch.stack([loss_sum.float(), correct.float(), torch.full((), float(seen), device=loss_sum.device)])
    if world > 1:
        torch.distributed.all_reduce(totals)
    total_loss, right, examples = totals.tolist()
    return total_loss, right, int(examples)


# ---- evaluation --------------------------------------------------------------------------------------

@torch.no_grad()
def error(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cuda: bool = False,
          low: bool | None = None) -> float:
    """Classification error of `model` on uint8 `images` (already on the model's device); under bf16 autocast when
    `low` (default: on CUDA, the "auto" precision)."""
    low = cuda if low is None else low
    if len(labels) == 0:
        return math.nan
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), device=labels.device)
    for begin in range(0, len(labels), EVAL_BATCH):
        x = as_float(images[begin:begin + EVAL_BATCH], channels_last=cuda)
        with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=low):
            wrong += (model(x).argmax(1) != labels[begin:begin + EVAL_BATCH]).sum()
    model.train(was_training)
    return wrong.item() / len(labels)


# ---- what a cell writes: curve rows, report records, epoch states, results ---------------------------

def curve_row(step: int, epoch: float, seconds: float, split: str, err: float) -> dict[str, Any]:
    """One row of a cell's error curve (Result.curve): `split`'s error at `step`, `epoch` (fractional mid-epoch)."""
    return {"step": step, "epoch": float(epoch), "seconds": float(seconds), "split": split, "error": float(err)}


def train_record(row: dict[str, Any], loss: float) -> dict[str, Any]:
    """The report record of a train-error `row` (`curve_row`) and the mean loss of its logging window."""
    return {"kind": "train", "step": row["step"], names.EPOCH: row["epoch"], names.SECONDS: row["seconds"],
            names.TRAIN_ERROR: row["error"], names.TRAIN_LOSS: loss}


def epoch_record(step: int, epoch: int, seconds: float, errors: dict[str, float]) -> dict[str, Any]:
    """The report record of an epoch's end: `errors` holds its "val" and "test" errors."""
    return {
        "kind": "epoch", "step": step, names.EPOCH: epoch, names.SECONDS: seconds,
        names.VAL_ERROR: errors["val"], names.TEST_ERROR: errors["test"],
    }


def snapshot(epoch: int, step: int, seconds: float, model: models.XferModel, optimizer: dict[str, Any],
             scheduler: Any, curve: list[dict[str, Any]]) -> TrainState:
    """A cell's state after `epoch` epochs, for `on_epoch_end`; `optimizer` is a state dict the caller already copied.

    A snapshot, not live references: training goes on mutating the model and optimiser tensors. Copies stay on the
    model's device, as the optimiser's do: a copy there needs no wait for the device, where one to the CPU would stop
    every cell of a GPU pack each epoch. `checkpoint.save_state` moves them to the CPU when a checkpoint is due
    (`packs.CHECKPOINT_INTERVAL_S`), and `plan.pack_memory` counts them."""
    return TrainState(
        epoch=epoch, step=step, seconds=seconds,
        model={k: v.detach().clone() for k, v in model.state_dict().items()},
        optimizer=optimizer,
        scheduler=copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
        curve=list(curve),
    )


def finished(spec: TrainSpec, step: int, errors: dict[str, float], curve: list[dict[str, Any]],
             seconds: float) -> Result:
    """The result of a cell that trained all its epochs: `errors` are its final val and test errors, its train error
    the curve's last."""
    last_train = [r["error"] for r in curve if r["split"] == "train"]
    metrics = {
        names.TEST_ERROR: errors["test"], names.TEST_ACC: 1 - errors["test"],
        names.VAL_ERROR: errors["val"], names.VAL_ACC: 1 - errors["val"],
        names.TRAIN_ERROR: last_train[-1] if last_train else math.nan,
        names.EPOCH: float(spec.epochs), names.SECONDS: seconds, "steps": float(step),
    }
    return Result("ok", "", metrics, curve)


def failed(spec: TrainSpec, step: int, epoch: int, curve: list[dict[str, Any]], seconds: float) -> Result:
    """The result of a cell whose loss went non-finite in epoch `epoch` (0-based)."""
    reason = (
        f"non-finite loss at step {step} (epoch {epoch + 1}) with lr {spec.lr} and optimizer {spec.optimizer}; "
        "lower the learning rate or check the data"
    )
    return Result("failed", reason, {names.SECONDS: seconds, "steps": float(step)}, curve)


def stopped(spec: TrainSpec, step: int, epoch: int, curve: list[dict[str, Any]], seconds: float) -> Result:
    """The result of a cell stopped mid-training (its grid is stopping): it resumes from its last epoch state."""
    return Result("stopped", f"stopped at step {step} (epoch {epoch + 1}) because the grid is stopping; the rerun "
                  "resumes it from its last epoch state", {names.SECONDS: seconds, "steps": float(step)}, curve)
