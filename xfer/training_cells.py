"""The grid's training cells (pretrain, fine-tune, scratch) as recorded cells: their MLflow tags and labels, how
one is built into a `Cell` (its data split by seed; a fine-tune starts from its pretrain cell's model), and the
`TRAINING` cell adapter the stage runner (`xfer.stages`) and packs (`xfer.packs`) take. `train_cell` runs one without
Ray (tests, notebooks, tuning's pretrain cell).
"""

from __future__ import annotations

from typing import Any

import torch

from xfer import data, models, names, packs
from xfer import train as loop
from xfer.cells import Cell, Session, live
from xfer.specs import FinetuneSpec, PretrainSpec, TrainSpec

TrainingCell = PretrainSpec | FinetuneSpec


def axis_tags(source: str, target: str, arch: str, size: int | None, seed: int,
              pretrain_run: str | None = None) -> dict[str, str]:
    """The tags every recorded cell with a lineage carries, so runs are searched by the same names whatever made
    them (grid training cells, adder cells, tuning studies): source = the pretraining dataset, target = the dataset
    trained on last, size None = the whole pool ("all"), and the run its model started from."""
    tags = {names.TAG_SOURCE: source, names.TAG_TARGET: target, names.TAG_ARCH: arch,
            names.TAG_SIZE: str(size or "all"), names.TAG_SEED: str(seed)}
    if pretrain_run:
        tags[names.TAG_PRETRAIN_RUN] = pretrain_run
    return tags


def tags_of(spec: TrainingCell, pretrain_run: str | None = None) -> dict[str, str]:
    """The searchable tags of a training run (`axis_tags` and its freeze depth; the lr is the param train.lr: each
    value under one name)."""
    t = spec.train
    if isinstance(spec, PretrainSpec):
        source, target = t.dataset, ""
    else:
        source, target = spec.source, t.dataset
    return {**axis_tags(source, target, t.arch, t.size, t.seed, pretrain_run), names.TAG_FREEZE: str(t.freeze_depth)}


def label(spec: TrainingCell) -> str:
    """A cell by its axes, e.g. "kmnist→mnist resnet_mini n=500 freeze=20 lr=1e-3 seed=1" (its run's name too)."""
    t = spec.train
    if isinstance(spec, PretrainSpec):
        head = f"pretrain {t.dataset}"
    else:
        head = f"{spec.source}→{t.dataset}" if spec.source else f"scratch {t.dataset}"
    recipe = "".join([f" {t.optimizer}" if t.optimizer != "adamw" else "",
                      f" head×{t.head_lr_mult:g}" if t.head_lr_mult != 1 else "",
                      f" unfreeze@{t.unfreeze_epoch}" if t.unfreeze_epoch else ""])
    freeze = f" freeze={t.freeze_depth}" if isinstance(spec, FinetuneSpec) and spec.source else ""
    return f"{head} {t.arch} n={t.size or 'all'}{freeze} lr={lr_text(t.lr)} seed={t.seed}{recipe}"


def lr_text(value: float) -> str:
    """A learning rate the way people write it: 1e-3, 2.5e-4, 0.1."""
    if value == 0 or 1e-2 <= abs(value) < 10:
        return f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def training_cell(spec: TrainingCell, context: packs.PackContext) -> Cell:
    """A grid training cell: its data split by seed; a fine-tune starts from its pretrain cell's model (MLflow)."""
    t = spec.train
    pretrain_run, record = None, None
    if isinstance(spec, FinetuneSpec) and spec.pretrain is not None:
        record = context.pretrained(spec.pretrain, f"{label(spec)} needs the pretrained model of {label(spec.pretrain)}, "
                                    "which has no finished run in MLflow; run the pretrain stage first "
                                    "(sweeps/full_grid.py does).")
        pretrain_run = record.run_id

    def prepare() -> tuple[data.Splits, Any]:
        splits = data.make_splits(context.datasets[t.dataset], t.size, t.val_size, t.seed)
        pretrained = context.model(pretrain_run, record) if pretrain_run else None
        if pretrained is not None:
            models.check_input_shape(pretrained, splits.in_shape, t.dataset,
                                     "pretrain and fine-tune on data of one canonical shape")
        return splits, loop.prepare_model(t, splits, pretrained)

    return Cell(spec, spec.stage, label(spec), t, tags_of(spec, pretrain_run), prepare,
                parent_run_id=context.parent_run_id)


def _training_spec(spec: TrainingCell) -> TrainSpec:
    return spec.train


def _training_stage(spec: TrainingCell) -> str:
    return spec.stage


TRAINING = packs.CellAdapter("training", training_cell, _training_spec, _training_stage, label)


def train_cell(spec: TrainingCell, experiment: str, dataset: data.Dataset, session: Session | None = None,
               device: str | torch.device | None = None) -> loop.Result:
    """Train one grid cell and record it in MLflow, without Ray (tests, notebooks, tuning's pretrain cell)."""
    context = packs.PackContext(experiment, {spec.train.dataset: dataset})
    return live(training_cell(spec, context), experiment, session, device)


__all__ = ["TrainingCell", "TRAINING", "axis_tags", "tags_of", "label", "lr_text", "training_cell", "train_cell"]
