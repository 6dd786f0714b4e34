"""The two-digit adder: two digit images in, their sum (0..18) out; transfer from a digit classifier vs scratch.

A pair is a 2-channel image (channel 0 the first digit, channel 1 the second) labelled a + b, so the one
training loop (`xfer.train.train`) trains it unchanged. Every architecture applies one shared module to each
channel. Three arms:
- ``transfer`` (the seed's): the pretrained digit classifier's 10 + 10 logits → Linear(20, 19) → ReLU → 19;
- ``transfer_features``: the classifier's penultimate features (its body, e.g. resnet_mini's 64) per digit →
  Linear(2F, 128) → ReLU → 19, the scratch arm's head on pretrained features: the pair that tests transfer
  rather than one head design;
- ``scratch``: a small CNN per digit (conv 32-64, fc 128) → Linear(256, 128) → ReLU → 19.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xfer import data, models, names, packs, specs, stages, training_cells
from xfer import train as loop
from xfer.cells import Cell, Session, live
from xfer.errors import XferError
from xfer.specs import PretrainSpec, TrainSpec

DIGITS = 10                      # classes of the digit classifier
SUMS = 2 * DIGITS - 1            # classes of the adder: sums 0..18
SUM_NAMES = tuple(str(s) for s in range(SUMS))
TRANSFER, FEATURES, SCRATCH = names.VARIANT_TRANSFER, names.VARIANT_TRANSFER_FEATURES, names.VARIANT_SCRATCH
VARIANTS = (TRANSFER, FEATURES, SCRATCH)
ARCHS = {TRANSFER: "adder_transfer", FEATURES: "adder_features", SCRATCH: "adder_scratch"}
ARMS = {TRANSFER: "logits", FEATURES: "features"}   # how a transfer cell uses its classifier (AdderSpec.arm)
# The seed's recipes: AdamW at a constant rate (the recipe names one lr, no schedule), batch 200, 10 epochs. The
# features arm trains the scratch arm's head, so it takes the scratch recipe: the two differ only in where the
# per-digit features come from.
RECIPES = {TRANSFER: {"lr": 3e-3, "weight_decay": 2e-3}, FEATURES: {"lr": 2e-3, "weight_decay": 3e-3},
           SCRATCH: {"lr": 2e-3, "weight_decay": 3e-3}}
TEST_PAIR_SEED = 0               # one fixed set of test pairs: every cell (variant, size, seed) is scored on it
CURVE_POINTS_PER_EPOCH = 4       # training-error points per epoch, whatever the training-set size


# ---- the cell ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdderSpec:
    """One adder cell: `size` training pairs, trained from scratch or from `pretrain`'s digit classifier."""

    size: int                        # training pairs
    lr: float                        # AdamW learning rate (RECIPES holds each variant's)
    weight_decay: float
    seed: int = 0                    # training pairs, validation split, initialisation and batch order
    dataset: str = "mnist5k"         # digit dataset the pairs are drawn from (and the classifier pretrained on)
    epochs: int = 10
    batch_size: int = 200
    val_pairs: int = 1000            # drawn from `val_digits` digits held out of the train pool
    test_pairs: int = 5000           # drawn from the test split only, with TEST_PAIR_SEED
    val_digits: int = 1000           # the grid's val_size, so a grid's pretrain cell of the same seed is reused
    pretrain: PretrainSpec | None = None   # transfer from this digit classifier; None = scratch
    arm: str = specs.later("logits")       # transfer: from its logits (the seed's head) or its features (ARMS)

    def __post_init__(self) -> None:
        problems = []
        if min(self.size, self.val_pairs, self.test_pairs, self.val_digits) < 1:
            problems.append("size, val_pairs, test_pairs and val_digits must be positive")
        if self.seed < 0:
            problems.append(f"seed {self.seed} must be >= 0")
        if self.arm not in ARMS.values():
            problems.append(f"arm {self.arm!r} is not one of {', '.join(ARMS.values())}")
        p = self.pretrain.train if self.pretrain is not None else None
        if p is not None and (p.dataset, p.val_size, p.seed) != (self.dataset, self.val_digits, self.seed):
            # Same dataset, held-out digits and seed: the classifier never saw a validation pair's digits.
            problems.append(f"the digit classifier must be pretrained on {self.dataset!r} with val_size={self.val_digits} "
                            f"and seed={self.seed} (got {p.dataset!r}, {p.val_size}, {p.seed})")
        if problems:
            raise XferError("invalid adder spec: " + "; ".join(problems) + ".")
        self.train_spec()  # TrainSpec validates the optimisation settings

    @property
    def variant(self) -> str:
        if self.pretrain is None:
            return SCRATCH
        return FEATURES if self.arm == ARMS[FEATURES] else TRANSFER

    def train_spec(self) -> TrainSpec:
        """What the one loop trains: pairs as a 2-channel dataset, `size` of them, `val_pairs` held out."""
        steps_per_epoch = max(1, self.size // min(self.batch_size, self.size))
        return TrainSpec(
            arch=ARCHS[self.variant], dataset=self.dataset, size=self.size, val_size=self.val_pairs,
            epochs=self.epochs, batch_size=self.batch_size, optimizer="adamw", lr=self.lr,
            weight_decay=self.weight_decay, schedule="none", seed=self.seed,
            log_every=max(1, steps_per_epoch // CURVE_POINTS_PER_EPOCH),
        )


def digit_pretrain(dataset: str, arch: str, seed: int, val_digits: int, epochs: int = 10,
                   size: int | None = None) -> PretrainSpec:
    """The digit classifier's pretrain cell: the grid's defaults, so a grid's matching cell is found by key."""
    return PretrainSpec(TrainSpec(arch=arch, dataset=dataset, size=size, val_size=val_digits, epochs=epochs, seed=seed))


def cells(sizes: Sequence[int], seeds: Sequence[int], dataset: str = "mnist5k", digit_arch: str = "resnet_mini",
          pretrain_epochs: int = 10, pretrain_size: int | None = None, val_digits: int = 1000,
          variants: Sequence[str] = VARIANTS, **settings: Any) -> list[AdderSpec]:
    """Cells of every variant (arm) for every size × seed with the variants' recipes; `settings` go to every spec."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise XferError(f"adder variants {', '.join(unknown) or '(none)'}: choose among {', '.join(VARIANTS)}.")
    out = []
    for size in sizes:
        for seed in seeds:
            pretrain = digit_pretrain(dataset, digit_arch, seed, val_digits, pretrain_epochs, pretrain_size)
            for variant in variants:
                start = {"pretrain": pretrain, "arm": ARMS[variant]} if variant in ARMS else {}
                out.append(AdderSpec(size=size, seed=seed, dataset=dataset, val_digits=val_digits, **start,
                                     **{**RECIPES[variant], **settings}))
    return out


def label(spec: AdderSpec) -> str:
    via = f" from {spec.pretrain.train.arch}" if spec.pretrain is not None else ""
    return f"{names.ADDER} {spec.variant}{via} {spec.dataset} n={spec.size} seed={spec.seed}"


# ---- pairs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pairs:
    """Which digits make each pair: k×2 rows of (first, second) indices into the source's splits.

    `train` and `val` index `dataset.train` (disjoint digits: `val` uses only held-out ones); `test`
    indexes `dataset.test`, so no test digit can reach training.
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def check(adder_cells: Sequence[AdderSpec], dataset: data.Dataset) -> None:
    """Fail before anything runs when `dataset` cannot give the cells their digits: wrong kind, too few."""
    if dataset.in_shape[0] != 1 or dataset.num_classes != DIGITS:
        raise XferError(f"the adder needs a single-channel set of {DIGITS} digit classes; {dataset.name!r} has "
                        f"{dataset.in_shape[0]} channel(s) and {dataset.num_classes} classes (use mnist or mnist5k).")
    pool = len(dataset.train)
    for spec in adder_cells:
        left = pool - spec.val_digits
        pretrain_size = (spec.pretrain.train.size or 0) if spec.pretrain is not None else 0
        if left < 1:
            raise XferError(f"val_digits={spec.val_digits} leaves no training digits in {dataset.name!r}'s train pool "
                            f"of {pool}; choose val_digits < {pool}.")
        if pretrain_size > left:
            raise XferError(f"a pretrain size of {pretrain_size} digits is more than the {left} that {dataset.name!r}'s "
                            f"train pool of {pool} keeps after val_digits={spec.val_digits} are held out; choose a "
                            f"pretrain size <= {left} (or none, for all of them) or fewer val_digits.")


def sample_pairs(dataset: data.Dataset, spec: AdderSpec) -> Pairs:
    """Seeded pairs, uniform with replacement within each digit pool.

    The held-out digits are exactly the validation split `data.make_splits` carves with the same seed
    and size, which is what the pretrain cell held out, so validation pairs are new to the classifier too.
    """
    check([spec], dataset)
    pool = len(dataset.train)
    held_out = data.stratified_indices(dataset.train.labels, spec.val_digits, spec.seed)
    kept = torch.ones(pool, dtype=torch.bool)
    kept[held_out] = False
    train_digits = kept.nonzero().squeeze(1)
    rng = torch.Generator().manual_seed(spec.seed)
    # Validation pairs are drawn first, so they stay the same for every training-set size.
    val = held_out[torch.randint(len(held_out), (spec.val_pairs, 2), generator=rng)]
    train = train_digits[torch.randint(len(train_digits), (spec.size, 2), generator=rng)]
    test_rng = torch.Generator().manual_seed(TEST_PAIR_SEED)
    test = torch.randint(len(dataset.test), (spec.test_pairs, 2), generator=test_rng)
    return Pairs(train, val, test)


def pair_splits(dataset: data.Dataset, pairs: Pairs) -> data.Splits:
    """The pairs (from `sample_pairs` on the same dataset) as 2-channel images labelled by their digits' sum."""
    return data.Splits(_paired(dataset.train, pairs.train), _paired(dataset.train, pairs.val),
                       _paired(dataset.test, pairs.test), SUM_NAMES)


def _paired(split: data.Split, index: torch.Tensor) -> data.Split:
    # images[index] is k×2×1×H×W: dropping the digit's own channel axis makes the pair's two channels.
    return data.Split(split.images[index].flatten(1, 2), split.labels[index].sum(1))


# ---- architectures -------------------------------------------------------------------------------

class PerDigit(nn.Module):
    """One module applied to each channel of a pair, outputs concatenated: k×2×H×W → k×(2·F)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, c, h, w = x.shape
        # Both digits go through as one batch of 2k single-channel images: one call, not one per channel.
        return self.net(x.reshape(k * c, 1, h, w)).reshape(k, -1)


def _pair_shape(name: str, in_shape: models.Shape) -> tuple[int, int]:
    if in_shape[0] != 2:
        raise XferError(f"{name} takes a pair of digits as a 2-channel image, not input shape {tuple(in_shape)}.")
    return in_shape[1], in_shape[2]


@models.arch(ARCHS[TRANSFER])
def _adder_transfer(in_shape: models.Shape, digit_arch: str = "resnet_mini",
                    digit_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, int]:
    """A digit classifier on each digit → 20 logits → Linear(20, 19) → ReLU; the head is Linear(19, 19).

    The classifier is built from its arch name and kwargs (so a checkpoint rebuilds it); `transfer_model`
    copies pretrained weights in. The ReLU (the issue names only the two linear layers) keeps them from
    collapsing into one linear map of the logits, which must then encode the sum as a quadratic score and
    learns it slowly: on a fixed classifier's logits, 1000 AdamW steps of the recipe reach 47% test error
    with the ReLU and 76% without (5000 pairs of mnist5k, 2026-11-23).
    """
    h, w = _pair_shape(ARCHS[TRANSFER], in_shape)
    classifier = models.build(digit_arch, (1, h, w), DIGITS, **(digit_kwargs or {}))
    return nn.Sequential(PerDigit(classifier), nn.Linear(2 * DIGITS, SUMS), nn.ReLU(inplace=True)), SUMS


class Normalised(nn.Module):
    """A digit classifier's body behind its own input normalisation: its penultimate features."""

    def __init__(self, classifier: models.XferModel) -> None:
        super().__init__()
        self.register_buffer("mean", classifier.mean.clone())
        self.register_buffer("std", classifier.std.clone())
        self.body = classifier.body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)


ADDER_HIDDEN = 128   # the width of the adder head's hidden layer, in the features and scratch arms alike


@models.arch(ARCHS[FEATURES])
def _adder_features(in_shape: models.Shape, digit_arch: str = "resnet_mini",
                    digit_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, int]:
    """A digit classifier's penultimate features on each digit → Linear(2F, 128) → ReLU; the head is 128 → 19.

    The classifier's own head is dropped: the features it computed from are what transfers.
    """
    h, w = _pair_shape(ARCHS[FEATURES], in_shape)
    classifier = models.build(digit_arch, (1, h, w), DIGITS, **(digit_kwargs or {}))
    features = Normalised(classifier)
    with torch.no_grad():
        width = features(torch.zeros(1, 1, h, w)).shape[1]
    return nn.Sequential(PerDigit(features), nn.Linear(2 * width, ADDER_HIDDEN), nn.ReLU(inplace=True)), ADDER_HIDDEN


@models.arch(ARCHS[SCRATCH])
def _adder_scratch(in_shape: models.Shape) -> tuple[nn.Module, int]:
    """A small CNN (conv 32-64, fc 128) on each digit → 256 → fc 128; the head maps 128 → 19."""
    h, w = _pair_shape(ARCHS[SCRATCH], in_shape)
    return nn.Sequential(PerDigit(models.digit_body(1, h, w)), nn.Linear(2 * 128, ADDER_HIDDEN), nn.ReLU(inplace=True)), ADDER_HIDDEN


def transfer_model(pretrained: models.XferModel, variant: str = TRANSFER) -> models.XferModel:
    """An adder model of a transfer `variant` whose digit classifier (or its body) holds `pretrained`'s weights.

    The outer normalisation stays the identity: the classifier inside normalises with the statistics of its
    own pretraining data, on which its weights were learned.
    """
    if pretrained.in_shape[0] != 1 or pretrained.num_classes != DIGITS:
        raise XferError(f"the adder transfers from a single-channel {DIGITS}-class digit classifier; this {pretrained.arch} "
                        f"takes {pretrained.in_shape} and has {pretrained.num_classes} classes.")
    model = models.build(ARCHS[variant], (2, *pretrained.in_shape[1:]), SUMS, digit_arch=pretrained.arch,
                         digit_kwargs=dict(pretrained.arch_kwargs))
    inner = digit_classifier(model)
    wanted = inner.state_dict()
    inner.load_state_dict({k: v for k, v in pretrained.state_dict().items() if k in wanted})
    return model


def digit_classifier(model: models.XferModel) -> nn.Module:
    """The digit classifier inside an "adder_transfer" model (its normalised body in an "adder_features" one)."""
    return model.body[0].net


# ---- one cell ------------------------------------------------------------------------------------

def tags_of(spec: AdderSpec, pretrain_run: str | None) -> dict[str, str]:
    source = spec.pretrain.train.dataset if spec.pretrain is not None else ""
    return {**training_cells.axis_tags(source, spec.dataset, ARCHS[spec.variant], spec.size, spec.seed, pretrain_run),
            names.TAG_VARIANT: spec.variant}


def adder_cell(spec: AdderSpec, context: packs.PackContext) -> Cell:
    """An adder cell (stage names.ADDER): pairs by seed; a transfer cell finds its digit classifier in MLflow by key."""
    pretrain_run = None
    if spec.pretrain is not None:
        pretrain_run = context.pretrained(spec.pretrain, (
            f"{label(spec)} needs the digit classifier of {training_cells.label(spec.pretrain)}, which has no finished "
            f"run in MLflow experiment {context.experiment!r} (if it failed above, its reason is there); run the same "
            "command again (sweeps/adder.py, or the grid with an `adder:` section), which trains it first.")).run_id

    def prepare() -> tuple[data.Splits, models.XferModel]:
        dataset = context.datasets[spec.dataset]
        splits = pair_splits(dataset, sample_pairs(dataset, spec))
        if pretrain_run is None:
            return splits, loop.prepare_model(spec.train_spec(), splits)
        pretrained = context.model(pretrain_run)
        torch.manual_seed(spec.seed)  # the new layers' initialisation
        return splits, transfer_model(pretrained, spec.variant)

    return Cell(spec, names.ADDER, label(spec), spec.train_spec(), tags_of(spec, pretrain_run), prepare,
                parent_run_id=context.parent_run_id)


def _train_spec(spec: AdderSpec) -> TrainSpec:
    return spec.train_spec()


def _stage(spec: AdderSpec) -> str:
    return names.ADDER


ADDER = packs.CellAdapter(names.ADDER, adder_cell, _train_spec, _stage, label)


def run_cell(spec: AdderSpec, experiment: str, dataset: data.Dataset, session: Session | None = None,
             device: str | torch.device | None = None) -> loop.Result:
    """Train one adder cell and record it in MLflow, without Ray."""
    return live(adder_cell(spec, packs.PackContext(experiment, {dataset.name: dataset})), experiment, session, device)


# ---- the stage on Ray Tune -----------------------------------------------------------------------

def run_stage(adder_cells: Sequence[AdderSpec], options: stages.RunOptions,
              datasets: Mapping[str, data.Dataset], view: Any = None) -> list[stages.StageSummary]:
    """The digit pretrain cells the transfer cells need (if not finished), then the adder cells, as packs.

    `datasets` holds the digit set by name; it is read (and the cells checked against it) only when something
    is left to run."""
    pretrain = list(dict.fromkeys(c.pretrain for c in adder_cells if c.pretrain is not None))
    left = (stages.pending(options.experiment, adder_cells, options.force, names.ADDER)[0]
            or stages.pending(options.experiment, pretrain, options.force, names.PRETRAIN)[0])
    if left:
        check(adder_cells, datasets[adder_cells[0].dataset])
    summaries = []
    if pretrain:
        summaries.append(stages.run_stage(names.PRETRAIN, pretrain, training_cells.TRAINING, options, datasets, view))
    summaries.append(stages.run_stage(names.ADDER, adder_cells, ADDER, options, datasets, view))
    return summaries


__all__ = ["AdderSpec", "ADDER", "Pairs", "PerDigit", "RECIPES", "adder_cell", "cells", "check", "digit_pretrain",
           "digit_classifier", "label", "pair_splits", "run_cell", "run_stage", "sample_pairs", "transfer_model", "VARIANTS"]
