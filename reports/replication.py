"""The replication table: each number the seeds published, beside xfer's mean and 95% interval over seeds.

`SEED_ROWS` holds the seeds' published accuracies as facts (seed 000's pretrain, fine-tune, scratch and frozen
fine-tune tables; seed 002's adder), each naming where it stands in its document. `replication` matches every row
with the grid's finished runs of the same stage, data, arch, size and freeze depth (fine-tunes at one lr, never
unfrozen; where a grid ran several optimizers, its default's), averages the runs of each seed,
and compares the seed's value with the mean over seeds and its Student's t interval (as the claims do): within the
interval, above it, or below it. A row the grid has no runs for is kept, as not run, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports.schema import SCHEMAS
from reports.tables import Tables, size_text
from reports.verdicts import MIN_SEEDS, t_interval
from xfer import names, specs

# The seeds' "AlexNet" and "Resnet" for 28×28 digits are xfer's alexnet_mini and resnet_mini (same layer counts, so
# the seed's freeze depths 8 / 20 / 23 name the same tensors: `xfer archs alexnet_mini`).
ALEXNET, RESNET = "alexnet_mini", "resnet_mini"
ALL = 0                  # size: the whole training set (xfer holds its validation split out of it)
CLASSIFIER = "adder_classifier"   # a row's stage: the adder's digit classifier (the pretrain run its transfer arm used)
WITHIN, ABOVE, BELOW = "within the interval", "above", "below"
NOT_RUN, TOO_FEW, UNSTATED = "not run", "too few seeds", "no seed value"
PLAIN_OPTIMIZER = specs.TrainSpec.optimizer   # where a grid ran several optimizers, rows read its default's cells


@dataclass(frozen=True)
class SeedRow:
    """One published number: what was trained (stage, data, arch, size, freeze), what was measured, and where."""

    seed: str            # the seed document, 000-004
    row: str             # a stable name, unique in SEED_ROWS
    where: str           # where the number stands in the seed document
    stage: str           # pretrain, finetune, scratch, adder (an arm: `variant`) or adder_classifier
    dataset: str         # what the model was trained on (pretrain: the source; finetune and scratch: the target)
    arch: str = ""       # xfer's arch ('' for the adder, whose arms are fixed by the variant)
    size: int | None = ALL     # training examples (0 = the whole set; None = not stated: the grid's largest)
    freeze: int = 0      # leading parameter tensors frozen while fine-tuning
    metric: str = "test_acc"   # test_acc or val_acc, a fraction
    value: float = math.nan    # the seed's number as a fraction; nan where the seed states none
    source: str = ""     # the pretraining source of a fine-tune row
    variant: str = ""    # the adder's arm: transfer or scratch


_T1, _T2 = "000 四 1) table (test accuracy)", "000 四 2) table 'fine with 60000MNIST' (test accuracy)"
_S, _F = "000 四 2) 补充实验 (test acc)", "000 四 2) table 'fine with MNIST' (frozen; test accuracy)"
_F2 = "000 四 2) line below the frozen table (test acc)"
SEED_ROWS: tuple[SeedRow, ...] = (
    # Seed 000, section 四 1): pretrained models on their own test sets.
    SeedRow("000", "pretrain kmnist alexnet", f"{_T1}, KMNIST预训练alexnet", "pretrain", "kmnist", ALEXNET, value=0.9200),
    SeedRow("000", "pretrain fashion_mnist alexnet", f"{_T1}, FMNIST预训练alexnet", "pretrain", "fashion_mnist", ALEXNET,
            value=0.9027),
    SeedRow("000", "pretrain kmnist resnet", f"{_T1}, KMNIST预训练Resnet", "pretrain", "kmnist", RESNET, value=0.9483),
    SeedRow("000", "pretrain fashion_mnist resnet", f"{_T1}, FMNIST预训练Resnet", "pretrain", "fashion_mnist", RESNET,
            value=0.9230),
    SeedRow("000", "pretrain svhn resnet", f"{_T1}, SVHN预训练Resnet", "pretrain", "svhn", RESNET, value=0.9368),
    SeedRow("000", "pretrain mnist resnet", f"{_T1}, MNIST 预训练resnet", "pretrain", "mnist", RESNET, value=0.9898),
    SeedRow("000", "pretrain mnist alexnet", f"{_T1}, MNIST 预训练alexnet", "pretrain", "mnist", ALEXNET, value=0.9821),
    SeedRow("000", "pretrain usps resnet", f"{_T1}, USPS预训练resnet", "pretrain", "usps", RESNET, value=0.9746),
    SeedRow("000", "pretrain usps alexnet", f"{_T1}, USPS预训练alexnet", "pretrain", "usps", ALEXNET, value=0.9721),
    # Section 四 2): fine-tuned on 60,000 MNIST (nothing frozen is said; full fine-tuning).
    SeedRow("000", "finetune fashion_mnist alexnet all", f"{_T2}, FMNIST预训练alexnet", "finetune", "mnist", ALEXNET,
            value=0.9233, source="fashion_mnist"),
    SeedRow("000", "finetune kmnist alexnet all", f"{_T2}, KMNIST预训练alexnet", "finetune", "mnist", ALEXNET,
            value=0.9745, source="kmnist"),
    SeedRow("000", "finetune kmnist resnet all", f"{_T2}, KMNIST预训练Resnet", "finetune", "mnist", RESNET,
            value=0.9798, source="kmnist"),
    SeedRow("000", "finetune fashion_mnist resnet all", f"{_T2}, FMNIST预训练Resnet", "finetune", "mnist", RESNET,
            value=0.9440, source="fashion_mnist"),
    # Scratch on 10,000 and 20,000 MNIST.
    SeedRow("000", "scratch resnet 10000", f"{_S} 1, 10000张 MNIST 训练Resnet", "scratch", "mnist", RESNET, 10000,
            value=0.9678),
    SeedRow("000", "scratch resnet 20000", f"{_S} 1, 20000张 MNIST 训练Resnet", "scratch", "mnist", RESNET, 20000,
            value=0.9804),
    SeedRow("000", "scratch alexnet 10000", f"{_S} 2, 10000张 MNIST 训练alexnet", "scratch", "mnist", ALEXNET, 10000,
            value=0.9713),
    SeedRow("000", "scratch alexnet 20000", f"{_S} 3, 20000张 MNIST 训练alexnet", "scratch", "mnist", ALEXNET, 20000,
            value=0.9779),
    # Frozen fine-tunes.
    SeedRow("000", "finetune fashion_mnist alexnet 20000 freeze 8", f"{_F}, FMNIST预训练alexnet 20000MNIST-冻结8层",
            "finetune", "mnist", ALEXNET, 20000, 8, value=0.9342, source="fashion_mnist"),
    SeedRow("000", "finetune kmnist alexnet 10000 freeze 8", f"{_F}, KMNIST预训练alexnet 10000MNIST-冻结8层",
            "finetune", "mnist", ALEXNET, 10000, 8, value=0.9636, source="kmnist"),
    SeedRow("000", "finetune kmnist resnet 10000 freeze 23", f"{_F}, KMNIST预训练Resnet 10000MNIST-冻结23层",
            "finetune", "mnist", RESNET, 10000, 23, value=0.9734, source="kmnist"),
    SeedRow("000", "finetune fashion_mnist resnet 20000 freeze 20", f"{_F}, FMNIST预训练Resnet 20000MNIST-冻结20层",
            "finetune", "mnist", RESNET, 20000, 20, value=0.9570, source="fashion_mnist"),
    SeedRow("000", "finetune fashion_mnist resnet 10000 freeze 23", f"{_F2}, FMNIST预训练Resnet 10000MNIS微调-冻结23层",
            "finetune", "mnist", RESNET, 10000, 23, value=0.9342, source="fashion_mnist"),
    SeedRow("000", "finetune fashion_mnist resnet 10000 freeze 20", f"{_F2}, FMNIST预训练Resnet 10000MNIS微调-冻结20层",
            "finetune", "mnist", RESNET, 10000, 20, value=0.9424, source="fashion_mnist"),
    # Seed 002: the adder's validation accuracy (transfer: "converges at 95%, at most 96%"; scratch: "converges at
    # 94%"), and its digit classifier, whose accuracy the seed does not state (it is "the last experiment's" CNN).
    SeedRow("002", "adder transfer", "002 迁移模型 results: 验证精度在到达95%时开始收敛,最高有96%", names.ADDER, "mnist",
            size=None, metric="val_acc", value=0.95, variant=names.VARIANT_TRANSFER),
    SeedRow("002", "adder scratch", "002 非迁移模型 results: 验证精度在到达94%时开始收敛", names.ADDER, "mnist",
            size=None, metric="val_acc", value=0.94, variant=names.VARIANT_SCRATCH),
    SeedRow("002", "adder digit classifier", "002 模型处理流程: cnn.pth from the previous experiment (accuracy not "
            "stated)", CLASSIFIER, "mnist"),
)


def replication(found: Tables, rows: tuple[SeedRow, ...] = SEED_ROWS) -> pd.DataFrame:
    """One row per seed row, in `rows` order: the seed's value, xfer's per-seed values, their mean and 95% t
    interval, the difference and the word (the `replication` table of SCHEMA.md)."""
    out = []
    for row in rows:
        runs, why = matching(found, row)
        out.append(compare(row, runs, why))
    return pd.DataFrame(out, columns=[c.name for c in SCHEMAS["replication"]])


def matching(found: Tables, row: SeedRow) -> tuple[pd.DataFrame, str]:
    """The finished runs that measure `row` (columns seed and value), or none and why."""
    runs = found.runs[found.runs["status"] == "FINISHED"]
    if row.stage == CLASSIFIER:
        return _classifier(runs, row)
    stage = row.stage
    checks: list[tuple[str, pd.Series]] = [("stage", runs["stage"] == stage)]
    # A pretrain run's data is its source; a fine-tune, scratch or adder run's is its target (the adder's digit set).
    data_column = "source" if stage == names.PRETRAIN else "target"
    checks.append((f"{data_column} {row.dataset}", runs[data_column] == row.dataset))
    if row.source:
        checks.append((f"source {row.source}", runs["source"] == row.source))
    if row.variant:
        checks.append((f"arm {row.variant}", runs["variant"] == row.variant))
    if row.arch:
        checks.append((f"arch {row.arch}", runs["arch"] == row.arch))
    if row.size is not None:
        checks.append((f"size {size_text(row.size)}", runs["size"].fillna(ALL).astype(int) == row.size))
    if stage == names.FINETUNE:
        one_lr = runs["head_lr_mult"].fillna(1.0).eq(1.0) & runs["unfreeze_epoch"].isna()
        checks.append((f"freeze depth {row.freeze} (one lr, never unfrozen)", one_lr & (runs["freeze_depth"] == row.freeze)))
    chosen = pd.Series(True, index=runs.index)
    for done, (_, mask) in enumerate(checks, start=1):
        narrowed = chosen & mask
        if not narrowed.any():
            said = ", ".join(what for what, _ in checks[1:done])
            return _empty(), f"no finished {row.stage} run{' with ' + said if said else ''} in this grid"
        chosen = narrowed
    picked = runs[chosen]
    if row.size is None:   # the seed states no size: the grid's largest
        picked = picked[picked["size"].fillna(ALL) == picked["size"].fillna(ALL).max()]
    if picked["optimizer"].nunique() > 1:   # a grid of recipes: the plain recipe's optimizer, not an average of them
        picked = picked[picked["optimizer"] == PLAIN_OPTIMIZER]
    return _values(picked, row.metric)


def _classifier(runs: pd.DataFrame, row: SeedRow) -> tuple[pd.DataFrame, str]:
    """The adder's digit classifier: the pretrain runs the adder's transfer arm started from (lineage, not names)."""
    arms = runs[(runs["stage"] == names.ADDER) & (runs["variant"] == names.VARIANT_TRANSFER)
                & (runs["target"] == row.dataset)]
    if arms.empty:
        return _empty(), f"no finished adder transfer run on {row.dataset} in this grid"
    classifiers = runs[runs["run_id"].isin(set(arms["pretrain_run_id"].dropna()))]
    if classifiers.empty:
        return _empty(), "the adder's digit classifier runs are not in this experiment"
    return _values(classifiers, row.metric)


def _values(runs: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, str]:
    values = runs[["seed", metric]].dropna().rename(columns={metric: "value"})
    return values, "" if len(values) else f"the matching runs have no {metric}"


def _empty() -> pd.DataFrame:
    return pd.DataFrame({"seed": pd.Series(dtype="int64"), "value": pd.Series(dtype="float64")})


def compare(row: SeedRow, runs: pd.DataFrame, why: str) -> dict:
    """The seed's value against the mean over seeds (runs of one seed averaged first) and its t interval."""
    per_seed = runs.groupby("seed")["value"].mean().sort_index()
    base = dict(seed_doc=row.seed, row=row.row, where=row.where, stage=row.stage, source=row.source or None,
                dataset=row.dataset, arch=row.arch or None, size=row.size, freeze_depth=row.freeze,
                variant=row.variant or None, metric=row.metric, seed_value=row.value, n_seeds=len(per_seed),
                mean=np.nan, ci_low=np.nan, ci_high=np.nan, difference=np.nan,
                seeds=[int(s) for s in per_seed.index], seed_values=[float(v) for v in per_seed])
    if per_seed.empty:
        return base | dict(word=NOT_RUN, why=why)
    mean = float(per_seed.mean())
    base |= dict(mean=mean, difference=mean - row.value if not math.isnan(row.value) else np.nan)
    if len(per_seed) < MIN_SEEDS:
        return base | dict(word=TOO_FEW, why=f"{len(per_seed)} seed(s), {MIN_SEEDS} needed for an interval")
    _, low, high = t_interval(per_seed.to_numpy(dtype=float))
    base |= dict(ci_low=low, ci_high=high)
    if math.isnan(row.value):
        return base | dict(word=UNSTATED, why="the seed states no value; xfer's is shown")
    word = BELOW if high < row.value else ABOVE if low > row.value else WITHIN
    return base | dict(word=word, why=None)


def lines(table: pd.DataFrame) -> list[str]:
    """Each row as one sentence, e.g. for a terminal."""
    out = []
    for r in table.itertuples():
        seed = "" if math.isnan(r.seed_value) else f"seed {100 * r.seed_value:.2f}%"
        if r.word == NOT_RUN:
            out.append(f"{r.row}: {seed}; not run ({r.why}).")
            continue
        interval = "" if math.isnan(r.ci_low) else f", 95% CI [{100 * r.ci_low:.2f}, {100 * r.ci_high:.2f}]"
        diff = "" if math.isnan(r.difference) else f", {100 * r.difference:+.2f} pp"
        out.append(f"{r.row}: {seed}{'; ' if seed else ''}xfer {100 * r.mean:.2f}%{interval} over {r.n_seeds} "
                   f"seed(s){diff}: {r.word}.")
    return out


__all__ = ["SeedRow", "SEED_ROWS", "replication", "matching", "compare", "lines"]
