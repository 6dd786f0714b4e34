"""Typed cell specs: frozen dataclasses with a canonical JSON form, a stable key and flat dotted keys.

A spec is the whole description of one unit of work. Its ``key`` (hash of the canonical JSON)
is the MLflow tag ``xfer.key``: equal specs are the same cell, so a finished cell is never re-run.
Dicts appear only at process edges (Ray's param_space, MLflow params): ``to_flat`` / ``from_flat``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from xfer import names
from xfer.errors import XferError

S = TypeVar("S")

OPTIMIZERS = ("adamw", "adam", "sgd")
# A cell's arithmetic: "auto" is bf16 autocast on CUDA and float32 elsewhere; "fp32" float32 everywhere; "bf16" bf16
# autocast on any device (a CPU too: how a GPU cell's numerics are checked without a GPU).
PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("cosine", "plateau", "none")


@dataclass(frozen=True)
class Range:
    """The values a number may take, and how to tell a person so."""

    low: float
    high: float = math.inf
    low_open: bool = False          # (low, ... rather than [low, ...
    high_open: bool = False         # ..., high) rather than ..., high]

    def admits(self, value: float) -> bool:
        # Every comparison with NaN is False, so NaN lies in no range.
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    @property
    def span(self) -> str:
        """Interval notation, e.g. "(0, 10)"."""
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    @property
    def rule(self) -> str:
        """What a refusal says, e.g. "must lie in (0, 10)" or "must be at least 1"."""
        if self.high == math.inf:
            return f"must be {'more than' if self.low_open else 'at least'} {self.low:g}"
        return f"must lie in {self.span}"


# Every number's allowed range, in one place: the specs' checks below and xfer.grid's settings (which add an example
# or what 0 means) both read these, so changing a range here changes what both refuse.
LR = Range(0, 10, low_open=True, high_open=True)   # a learning rate: TrainSpec.lr; the grid's lrs and sgd_lrs
EPS = Range(0, 1)                                  # an L-inf budget in pixel units (images are in [0, 1]): both eps
ALPHA = Range(0, 1, low_open=True)                 # an attack's step size: AttackSpec.alpha
LABEL_SMOOTHING = Range(0, 1, high_open=True)      # TrainSpec.label_smoothing
MULTIPLIER = Range(0, low_open=True)               # an lr multiplier: the grid's unfreeze_lr_mult
# How many of something. Where grid and spec differ, it is on purpose: a spec's size, epoch_steps and estimate n are
# a COUNT or None (the whole pool, one pass), and the grid spells that None as 0, so its sizes, steps, pretrain_size
# and estimate_n are AT_LEAST_0 (as are its unfreeze_epoch, 0 = half of epochs, and prune_sources, 0 = every source).
COUNT = Range(1)                                   # epochs, batch_size, log_every, attack steps and n
AT_LEAST_0 = Range(0)                              # seeds, val_size, freeze_depth; the grid's counts above


IMAGENET = "imagenet"  # the source of cells that start from published ImageNet weights (TrainSpec.weights)


LATER = "xfer.later"   # field metadata: a field added after cells of its spec were recorded (see `later`)


def later(default: Any) -> Any:
    """A field added to a spec after cells of it were recorded: at its default it is left out of the key,
    so the cells recorded before it existed keep their keys (and are found finished in MLflow)."""
    return dataclasses.field(default=default, metadata={LATER: True})


@dataclass(frozen=True)
class TrainSpec:
    """One training run of the one loop: pretraining, fine-tuning and scratch differ only here."""

    arch: str                       # models registry name
    dataset: str                    # data registry name the model is trained on
    size: int | None = None         # training examples (stratified subset of the pool); None = whole pool
    val_size: int = 1000            # validation examples carved from the training pool, never from test
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adamw"        # adamw | adam | sgd (with momentum)
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9           # sgd only
    schedule: str = "cosine"        # cosine (per step) | plateau (ReduceLROnPlateau on val error) | none
    label_smoothing: float = 0.0
    head_lr_mult: float = 1.0       # the head's lr = lr * head_lr_mult (10 for the seed's recipe)
    freeze_depth: int = 0           # the first `freeze_depth` layers of models.layers(model) are frozen
    unfreeze_epoch: int | None = None  # freeze-then-unfreeze: at this epoch unfreeze all layers ...
    unfreeze_lr_mult: float = 0.1   # ... and continue at lr * unfreeze_lr_mult
    # False: at unfreeze_epoch only the lr drop and the schedule's restart happen, the body stays frozen (the
    # unfreeze recipe's same-schedule control: xfer.grid.RECIPES["unfreeze_control"]).
    unfreeze_body: bool = later(True)
    augment: bool = False           # random crop + flip on tensors (32x32 recipes)
    weights: str | None = None      # resnet18: start the body from ImageNet weights (a local file, or "imagenet")
    seed: int = 0
    log_every: int = 20             # train error is recorded every `log_every` steps
    # Optimiser steps per epoch; None = one pass over the training data (the last partial batch dropped). Set, each
    # epoch draws its batches from as many fresh permutations of the data as it needs, so that a cell's step budget
    # (and its number of evaluations: one an epoch) does not depend on its data's size (xfer.grid's `steps`).
    epoch_steps: int | None = later(None)
    # A smoke run of the real path: one optimiser step per epoch, and every evaluation on the first batch of val
    # and test. Its errors mean nothing; it only shows that the cell runs end to end.
    fast_dev_run: bool = later(False)
    precision: str = later("auto")  # PRECISIONS: "auto" = bf16 autocast on CUDA, float32 elsewhere

    def __post_init__(self) -> None:
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not LR.admits(self.lr):
            problems.append(f"lr {self.lr} must be in {LR.span}")
        if not all(COUNT.admits(n) for n in (self.epochs, self.batch_size, self.log_every)):
            problems.append(f"epochs, batch_size and log_every {COUNT.rule}")
        if self.epoch_steps is not None and not COUNT.admits(self.epoch_steps):
            problems.append(f"epoch_steps {self.epoch_steps} {COUNT.rule} (or None for one pass over the data)")
        if self.size is not None and not COUNT.admits(self.size):
            problems.append(f"size {self.size} {COUNT.rule} (or None for the whole pool)")
        if not (AT_LEAST_0.admits(self.val_size) and AT_LEAST_0.admits(self.freeze_depth)):
            problems.append(f"val_size and freeze_depth {AT_LEAST_0.rule}")
        if self.unfreeze_epoch is not None and not 0 < self.unfreeze_epoch < self.epochs:
            problems.append(f"unfreeze_epoch {self.unfreeze_epoch} must lie in 1..epochs-1 ({self.epochs - 1})")
        if not self.unfreeze_body and self.unfreeze_epoch is None:
            problems.append("unfreeze_body False (keep the body frozen at unfreeze_epoch) needs an unfreeze_epoch")
        if not LABEL_SMOOTHING.admits(self.label_smoothing):
            problems.append(f"label_smoothing {self.label_smoothing} must be in {LABEL_SMOOTHING.span}")
        if problems:
            raise XferError("invalid training spec: " + "; ".join(problems) + ".")


@dataclass(frozen=True)
class PretrainSpec:
    """Train `arch` on a source dataset from random initialisation."""

    train: TrainSpec

    @property
    def stage(self) -> str:
        return names.PRETRAIN


@dataclass(frozen=True)
class FinetuneSpec:
    """Train on a target dataset, starting from `pretrain`'s weights; `pretrain=None` is scratch."""

    train: TrainSpec
    pretrain: PretrainSpec | None = None

    @property
    def stage(self) -> str:
        # Starting from published ImageNet weights is fine-tuning too, with "imagenet" as the source.
        return names.FINETUNE if self.pretrain is not None or self.train.weights else names.SCRATCH

    @property
    def source(self) -> str:
        if self.pretrain is not None:
            return self.pretrain.train.dataset
        return IMAGENET if self.train.weights else ""


@dataclass(frozen=True)
class EstimateSpec:
    """Score `pretrain`'s model for the target task `target` with the transferability estimators (xfer.estimate),
    before any fine-tuning: one forward pass over `n` of the target's training images (a stratified draw fixed by
    the target alone, so every model is scored on the same images; None = the whole training pool)."""

    pretrain: PretrainSpec
    target: str
    n: int | None = None

    def __post_init__(self) -> None:
        if self.n is not None and not COUNT.admits(self.n):
            raise XferError(f"an estimate scores at least one target image, not n={self.n}; None scores the whole pool.")

    @property
    def stage(self) -> str:
        return names.ESTIMATE


@dataclass(frozen=True)
class AttackSpec:
    """One attack setting: which attack, its budget, and which examples of the target task it perturbs."""

    attack: str = "pgd"             # attack registry name (xfer.attack)
    eps: float = 0.3                # L-inf budget in [0, 1] pixel units (CW ignores it)
    alpha: float | None = None      # step size; None = the attack's default for this eps
    steps: int = 10                 # iterations of iterative attacks
    targeted: bool = False          # targeted (random wrong label, seeded) or untargeted
    n: int = 5000                   # examples drawn (stratified, seeded) from the task's test split
    dataset: str = "mnist"          # the task whose test split is attacked
    seed: int = 0

    def __post_init__(self) -> None:
        if not EPS.admits(self.eps):
            raise XferError(f"attack eps {self.eps} is outside {EPS.span}; images are in [0, 1], so use e.g. 0.3 for MNIST or 8/255 for CIFAR.")
        if self.alpha is not None and not ALPHA.admits(self.alpha):
            raise XferError(f"attack alpha {self.alpha} {ALPHA.rule}.")
        if not (COUNT.admits(self.steps) and COUNT.admits(self.n)):
            raise XferError(f"attack steps and n {COUNT.rule}.")


@dataclass(frozen=True)
class AttackCellSpec:
    """Generate adversarial examples once for one (surrogate run, attack setting); key = the cell's identity."""

    surrogate_key: str              # xfer.key of the surrogate's run ("+"-joined, sorted, for an ensemble)
    attack: AttackSpec


def to_dict(spec: Any) -> dict[str, Any]:
    """Nested plain dict of a spec (dataclasses become dicts, tuples lists)."""
    return dataclasses.asdict(spec)


def canonical_json(spec: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, the spec's class name included; `later` fields at their default left out."""
    return json.dumps({"type": type(spec).__name__, "spec": _keyed(spec)}, sort_keys=True, separators=(",", ":"))


def _keyed(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _keyed(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get(LATER) and getattr(value, f.name) == f.default)}
    if isinstance(value, (list, tuple)):
        return [_keyed(v) for v in value]
    return value


def key(spec: Any) -> str:
    """Stable content key of a spec: first 16 hex digits of sha256 of its canonical JSON."""
    # Remembered by the spec's repr (a dataclass repr tells 1 from 1.0, as canonical JSON does): a 4,000-cell grid
    # asks for each cell's key in its plan, in every stage and in the attack stage.
    shown = repr(spec)
    if shown not in _KEYS:
        if len(_KEYS) >= 1 << 16:
            _KEYS.clear()
        _KEYS[shown] = hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]
    return _KEYS[shown]


_KEYS: dict[str, str] = {}


def to_flat(spec: Any, prefix: str = "") -> dict[str, Any]:
    """Flat dotted keys, e.g. ``{"train.lr": 0.001, "pretrain.train.dataset": "kmnist"}``.

    A nested spec that is None is written as ``{"pretrain": None}``.
    """
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            flat.update(to_flat(value, prefix + f.name + "."))
        else:
            flat[prefix + f.name] = value
    return flat


def from_flat(cls: type[S], flat: dict[str, Any]) -> S:
    """Inverse of `to_flat`. Unknown or missing keys fail loudly with the list of expected ones."""
    expected = _flat_fields(cls)
    unknown = sorted(k for k in flat if k not in expected)
    if unknown:
        raise XferError(
            f"unknown keys for {cls.__name__}: {', '.join(unknown)}; expected keys are "
            f"{', '.join(sorted(expected))}."
        )
    return _build(cls, flat, "")


def _flat_fields(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = _dataclass_in(hints[f.name])
        if sub is not None:
            out.append(prefix + f.name)  # allows the `{"pretrain": None}` form
            out.extend(_flat_fields(sub, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def _build(cls: type[S], flat: dict[str, Any], prefix: str) -> S:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        sub = _dataclass_in(hints[f.name])
        if sub is not None:
            if name in flat and flat[name] is None:
                kwargs[f.name] = None
            elif any(k.startswith(name + ".") for k in flat):
                kwargs[f.name] = _build(sub, flat, name + ".")
        elif name in flat:
            kwargs[f.name] = _coerce(flat[name], hints[f.name], name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise XferError(f"incomplete {cls.__name__}: {exc}.") from None


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass inside a hint like `PretrainSpec` or `PretrainSpec | None`."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Values from MLflow params or CLI strings back to the field's type."""
    if value is None or value == "None":
        return None
    types_ = [t for t in (typing.get_args(hint) if _is_union(hint) else (hint,)) if t is not type(None)]
    target = types_[0] if types_ else str
    try:
        if target is bool:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if target is int:
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if target in (float, str):
            return target(value)
    except (TypeError, ValueError):
        raise XferError(f"{name}={value!r} is not a valid {target.__name__}.") from None
    return value


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def replace(spec: S, **changes: Any) -> S:
    """A copy of a spec with some fields changed (re-validated)."""
    return dataclasses.replace(spec, **changes)


__all__ = [
    "TrainSpec", "PretrainSpec", "FinetuneSpec", "AttackSpec", "AttackCellSpec", "key", "canonical_json", "to_dict", "to_flat", "later",
    "from_flat", "replace",
]
