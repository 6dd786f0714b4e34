"""The experiment grid: presets, grid files and CLI overrides → a validated `Grid` → each stage's cells.

A `Grid` is plain values; `cells(grid)` expands it into typed specs (pretrain, fine-tune, scratch,
attack settings). Everything a researcher can get wrong is checked here, before Ray or MLflow start.
Presets are the built-ins in `PRESETS` and the grid files in sweeps/presets/ (one per target recipe).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xfer import data, models, names
from xfer.errors import XferError
from xfer.estimators import ESTIMATORS
from xfer.specs import (AT_LEAST_0, COUNT, EPS, LR, MULTIPLIER, OPTIMIZERS, PRECISIONS, AttackSpec, EstimateSpec,
                        FinetuneSpec, PretrainSpec, Range, TrainSpec)

ALL = 0  # a fine-tune size of 0 means "the whole training pool" (the seed's 60,000 less the validation split)
PRESET_DIR = Path(__file__).resolve().parent.parent / "sweeps" / "presets"  # preset grid files, by file name
PRESET_SUFFIXES = (".yaml", ".yml", ".toml")
IMAGENET_ARCH = "resnet18"  # the one arch models.build can start from ImageNet weights (`Grid.weights`)


class InvalidGrid(XferError):
    """Every problem a grid has, in one paragraph, before anything starts (one refusal, not the first of several)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("the grid is not valid: " + "; ".join(self.problems) + ". Nothing was launched.")


@dataclass(frozen=True)
class Recipe:
    """How the one loop fine-tunes a pretrained body; None leaves the grid's (or TrainSpec's) setting."""

    optimizer: str | None = None        # e.g. "sgd" (momentum 0.9); None = the grid's optimizer
    head_lr_mult: float | None = None   # parameter groups: the new head at lr × this, the body at lr
    lr_mult: float | None = None        # every layer at the cell's lr × this
    unfreeze: bool | None = None        # freeze-then-unfreeze (needs a freeze depth > 0, i.e. a pretrained body)
    keep_frozen: bool | None = None     # with unfreeze: the schedule's switch at unfreeze_epoch, the body kept frozen


RECIPES: dict[str, Recipe] = {
    "plain": Recipe(),                                          # the grid's optimizer, one lr, cosine schedule
    "sgd": Recipe(optimizer="sgd"),                             # SGD at one lr: the baseline head10x_sgd is measured against
    "head10x_sgd": Recipe(optimizer="sgd", head_lr_mult=10.0),  # SGD, the new head at 10× the body's lr
    "lr10x_sgd": Recipe(optimizer="sgd", lr_mult=10.0),         # SGD, every layer at 10× lr: head10x_sgd's other control
    "unfreeze": Recipe(unfreeze=True),                          # body frozen `unfreeze_epoch` epochs, then all at lower lr
    "unfreeze_control": Recipe(unfreeze=True, keep_frozen=True),  # unfreeze's schedule, the body never unfrozen
}


def _field(default: Any, help: str) -> Any:
    """A grid setting: its default and its help, the one place the command line's flags are made from."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Grid:
    """Every axis of the study, with the defaults of the seed experiment.

    Fine-tuning recipes are the `recipes` axis: names from `RECIPES`, or several joined with "+"
    (``head10x_sgd+unfreeze``). Each fine-tune cell (source × arch × size × freeze depth × lr × seed) is
    repeated per recipe:

    - ``plain``: the grid's `optimizer`, one lr for body and head, cosine schedule (the seed's cells).
    - ``sgd``: SGD with momentum at one lr, the single-lr baseline of ``head10x_sgd``.
    - ``head10x_sgd``: SGD with two parameter groups, the new head at 10× the body's lr.
    - ``lr10x_sgd``: SGD with every layer at 10× the lr: does head10x_sgd help because it raises the head's lr,
      or because it raises an lr (seed 004's recipe against both controls: claim 5).
    - ``unfreeze``: the first `freeze depth` tensors stay frozen for `unfreeze_epoch` epochs, then every layer
      trains at lr × `unfreeze_lr_mult`; both phases run ReduceLROnPlateau on validation error (seed 001's
      schedule). A cell with nothing frozen (depth 0) has nothing to unfreeze, so the recipe skips depth 0.
    - ``unfreeze_control``: the unfreeze recipe with the body kept frozen: the same schedule, the same lr drop at
      `unfreeze_epoch`, so against ``unfreeze`` only the unfreezing differs (claim 6).

    SGD cells (every recipe whose optimizer is SGD, and SGD scratch cells) take their learning rates from `sgd_lrs`
    when it is given: SGD and Adam want rates an order of magnitude apart, and one shared axis leaves one of them
    untrained. `steps` gives every fine-tune and scratch cell the same optimiser-step budget whatever its size:
    `epochs` epochs of steps / epochs steps each (TrainSpec.epoch_steps: an epoch draws from as many passes over the
    data as it needs), so that a study varying the size varies data, not training length, and every cell is
    evaluated `epochs` times. It is an axis: each budget makes its own cells (0 = one pass over the data an epoch),
    and `only` patterns can keep a budget to the cells that need it.

    A recipe's settings reach only its own cells, so adding a recipe never changes another cell's key, and
    ``plain`` cells keep the keys they had before recipes existed. Scratch baselines have no pretrained
    body: they take only each recipe's optimizer (one scratch cell per distinct optimizer). Numeric knobs
    (`unfreeze_epoch`, `unfreeze_lr_mult`) are scalars, the comparison between recipes is the axis.

    `weights` starts ImageNet fine-tune cells of `resnet18` (source "imagenet", every freeze depth × recipe)
    from torchvision's ImageNet weights, beside any sources; scratch resnet18 cells stay random-initialised.
    `augment` (random crop + flip on tensors) applies to every training cell of the grid.
    """

    name: str = _field("seed", "the grid's name: its MLflow experiment")
    sources: tuple[str, ...] = _field(
        ("mnist", "kmnist", "fashion_mnist", "emnist_balanced", "emnist_letters", "qmnist", "svhn", "usps"),
        "pretraining datasets (data registry names)")
    archs: tuple[str, ...] = _field(("alexnet_mini", "resnet_mini", "mlp_mixer", "mlp_mixer2"), "architectures")
    target: str = _field("mnist", "the dataset fine-tuned on (and attacked)")
    sizes: tuple[int, ...] = _field((500, 1000, 10000, 20000, ALL), "fine-tune training examples; 0 = the whole pool")
    # Freeze depths in parameter tensors, per arch ("*" = every arch); the seed's: AlexNet 8, ResNet 20/23.
    freeze: dict[str, tuple[int, ...]] = _field(
        {"alexnet_mini": (0, 8), "resnet_mini": (0, 20, 23), "mlp_mixer": (0, 2, 14), "mlp_mixer2": (0, 2, 26), "*": (0,)},
        "freeze depths in parameter tensors: `0 8` for every arch or `resnet_mini=0,20,23`")
    lrs: tuple[float, ...] = _field((TrainSpec.lr,), "learning rates")
    seeds: tuple[int, ...] = _field((0, 1, 2), "seeds (data subsets, initialisation, batch order)")
    epochs: int = _field(TrainSpec.epochs, "fine-tune and scratch epochs")
    pretrain_epochs: int = _field(TrainSpec.epochs, "pretraining epochs")
    pretrain_size: int = _field(ALL, "at most this many examples of each source are used for pretraining (a smaller "
                                       "pool is used whole); 0 = every one")
    batch_size: int = _field(TrainSpec.batch_size, "batch size of every training cell")
    val_size: int = _field(TrainSpec.val_size, "validation examples held out of each training pool")
    optimizer: str = _field(TrainSpec.optimizer, "optimizer of pretraining, scratch and recipes that set none")
    recipes: tuple[str, ...] = _field(("plain",), f"fine-tuning recipes: {', '.join(RECIPES)}, or several joined "
                                                    "with '+' (e.g. head10x_sgd+unfreeze)")
    sgd_lrs: tuple[float, ...] = _field((), "learning rates of SGD cells (SGD recipes and SGD scratch); empty = --lrs")
    steps: tuple[int, ...] = _field((0,), "optimiser-step budgets of fine-tune and scratch cells whatever their size "
                                          "(--epochs epochs of steps / epochs steps each; each budget makes its own "
                                          "cells); 0 = one pass over the data an epoch")
    unfreeze_epoch: int = _field(0, "epoch at which the unfreeze recipe unfreezes every layer (0 = half of --epochs)")
    unfreeze_lr_mult: float = _field(TrainSpec.unfreeze_lr_mult, "after unfreezing, every layer trains at lr × this")
    augment: bool = _field(False, "random crop + flip on every training cell (32×32 colour sets such as CIFAR-10)")
    precision: str = _field("auto", "arithmetic of every training cell: auto (bf16 autocast on a GPU, float32 on a "
                                    "CPU), fp32, or bf16 (on any device)")
    weights: str = _field("", "resnet18's ImageNet weights: a resnet18-f37072fd.pth file, or 'imagenet' "
                                "(torchvision's cache or download); '' = none")
    scratch: bool = _field(True, "train scratch baselines of every arch × size × lr × seed")
    # A subset of the product, where a study names its cells (a replication of published rows): fine-tune and
    # scratch cells are kept only when they match one of these patterns, e.g. `{stage: finetune, source:
    # fashion_mnist, arch: resnet_mini, size: 10000, freeze: [20, 23]}`; a key holds one value or a list, an absent
    # key matches every value (ONLY_KEYS). Pretraining stays the product (sources × archs × seeds). () = every cell.
    only: tuple[dict[str, Any], ...] = _field((), "keep only the fine-tune and scratch cells matching one of these "
                                                  "patterns (grid files only)")
    # Tuned settings per "arch/size" (size 0 = whole pool), from `sweeps/full_grid.py --tuned`: the tuned lr
    # replaces the lrs axis and the other settings (weight_decay, head_lr_mult, batch_size, label_smoothing)
    # the grid's, in that arch and size's fine-tune and scratch cells; a recipe's own settings still win.
    tuned: dict[str, dict[str, Any]] = _field({}, "tuned settings per 'arch/size' (filled by --tuned)")
    estimate_n: int = _field(10000, "target training images each pretrained model is scored on by the estimate stage "
                             "(LEEP, NCE, H-score, LogME; a stratified draw, the same for every model; 0 = the whole pool)")
    prune_sources: int = _field(0, "fine-tune only the K sources the estimate stage ranks best for each arch "
                                   "(by --prune-by; 0 = every source)")
    prune_by: str = _field("logme", "the estimator --prune-sources ranks by: leep, nce, h_score or logme")
    attacks: tuple[str, ...] = _field(("fgsm", "pgd"), "attacks (attack registry names)")
    eps: tuple[float, ...] = _field((0.3,), "attack budgets (L∞, in [0, 1] pixel units)")
    attack_n: int = _field(5000, "test examples each attack perturbs")
    attack_steps: int = _field(10, "steps of iterative attacks")
    # Whose adversarial examples are scored: pretrained and scratch models' on every target, and "self": each
    # target's own (the white-box reference). ("pretrain",) is the seed's A/B→C question alone, without the
    # attack stage's largest costs (scratch surrogates on every target, a white-box set per target).
    attack_surrogates: tuple[str, ...] = _field(("pretrain", "scratch", "self"), "whose adversarial examples are "
                                                  "scored: pretrain and scratch (on every target), self (each target "
                                                  "on itself)")
    # The two-digit adder as a stage of this grid (its target must be a digit set): its settings, e.g.
    # `{sizes: [5000], epochs: 5, batch_size: 100, digit_arch: digit_cnn}` (seeds default to the grid's; see
    # `adder_cells`); {} = no adder stage.
    adder: dict[str, Any] = _field({}, "the two-digit adder as a stage of the grid (grid files only)")
    # A rehearsal of the whole grid (`fast_dev_run(grid)` sets it, with its own experiment): every training cell one
    # optimiser step per epoch and one evaluation batch, every attack one batch; absent data stood in for.
    fast_dev_run: bool = _field(False, "rehearse every cell on one batch, into the experiment <name>-fast-dev-run")

    def freeze_depths(self, arch: str) -> tuple[int, ...]:
        return self.freeze.get(arch, self.freeze.get("*", (0,)))

    def unfreeze_at(self) -> int:
        return self.unfreeze_epoch or self.epochs // 2

    def lrs_of(self, optimizer: str) -> tuple[float, ...]:
        """The learning rates of a cell trained by `optimizer`: `sgd_lrs` for SGD when given, else `lrs`."""
        return self.sgd_lrs if optimizer == "sgd" and self.sgd_lrs else self.lrs

    def epoch_steps(self, steps: int) -> int | None:
        """A fine-tune or scratch cell's optimiser steps per epoch under a budget of `steps` (its `epochs` epochs take
        `steps` rounded up to a multiple of them); None (one pass over the data an epoch) without a budget."""
        return -(-steps // self.epochs) if steps else None


PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    # Embedded offline data, small: all stages end to end in a few minutes on a 2-core CPU.
    "smoke": dict(
        name="smoke", sources=("glyph_letters", "uci_digits"), archs=("resnet_mini",), target="mnist5k",
        # Batches of 32, so 500 digits × 6 epochs are ~90 steps: enough to learn (~85% test accuracy), not a coin toss.
        sizes=(500,), freeze={"resnet_mini": (0, 20)}, lrs=(2e-3,), seeds=(0,), epochs=6, pretrain_epochs=2,
        pretrain_size=3000, batch_size=32, val_size=300, attacks=("fgsm", "pgd"), eps=(0.3,), attack_n=300,
        attack_steps=5,
    ),
}

_HINTS = typing.get_type_hints(Grid)  # each setting's type, e.g. tuple[int, ...] for sizes


def setting_type(key: str) -> tuple[type, bool]:
    """The element type of the grid setting `key` and whether it is an axis (a tuple of them)."""
    hint = _HINTS[key]
    many = typing.get_origin(hint) is tuple
    return (typing.get_args(hint)[0] if many else hint), many
_DEFAULTS = Grid()                     # the seed's values: the examples in messages about a setting's type


def list_presets(folder: Path = PRESET_DIR) -> list[str]:
    """The built-in presets and the names of the grid files in `folder` (sweeps/presets/)."""
    files = {path.stem for path in folder.glob("*") if path.suffix in PRESET_SUFFIXES} if folder.is_dir() else set()
    return sorted(set(PRESETS) | files)


def preset_values(name: str, folder: Path = PRESET_DIR) -> dict[str, Any]:
    """A preset's settings: a built-in's, else those of the grid file `folder/NAME.yaml` (or .yml, .toml)."""
    if name in PRESETS:
        return dict(PRESETS[name])
    for suffix in PRESET_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return load_file(folder / f"{name}{suffix}")
    raise XferError(f"unknown preset {name!r}; known presets are {', '.join(list_presets(folder))} "
                    f"(the built-ins, and the grid files in {folder}).")


def from_preset(preset: str, /, **overrides: Any) -> Grid:
    return make(**{**preset_values(preset), **overrides})  # positional-only: `name` is a grid setting too


def make(**values: Any) -> Grid:
    """A Grid from plain values (a grid file's or the CLI's); unknown keys and wrong types fail with the fix.

    Lists become tuples and a single value a 1-tuple; a whole float is an int and an int a float where
    the setting wants one (so ``lrs: [1]`` and ``--lrs 1.0`` make the same cells); text that reads as a
    number is one where a number is wanted (YAML reads ``1e-3`` as text). Ranges are `validate`'s.
    """
    known = {f.name for f in dataclasses.fields(Grid)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise XferError(f"unknown grid settings {', '.join(unknown)}; known settings are {', '.join(sorted(known))}.")
    clean, problems = {}, []
    for key, value in values.items():
        try:
            clean[key] = _typed(key, value)
        except XferError as exc:
            problems.append(str(exc))
    if problems:
        raise InvalidGrid(problems)
    return Grid(**clean)


ADDER_SETTINGS = ("sizes", "seeds", "epochs", "batch_size", "digit_arch", "pretrain_epochs", "pretrain_size", "variants",
                  "val_pairs", "test_pairs", "lr", "weight_decay")


def adder_cells(grid: Grid) -> list[Any]:
    """The grid's adder cells (`Grid.adder`): every variant × size × seed on the grid's target, its digit
    classifier pretrained with the grid's validation split (so a grid's own pretrain cell can be one)."""
    if not grid.adder:
        return []
    from xfer import adder

    settings = dict(grid.adder)
    unknown = sorted(set(settings) - set(ADDER_SETTINGS))
    if unknown:
        raise InvalidGrid([f"adder settings {', '.join(unknown)} are unknown; known: {', '.join(ADDER_SETTINGS)}"])
    sizes, seeds = settings.pop("sizes", [5000]), settings.pop("seeds", grid.seeds)
    return adder.cells(sizes, seeds, dataset=grid.target, val_digits=grid.val_size, **settings)


def _attack_adder_problems(grid: Grid) -> list[str]:
    problems = []
    odd = sorted(set(grid.attack_surrogates) - {"pretrain", "scratch", "self"})
    if odd:
        problems.append(f"{_setting('attack_surrogates')} {', '.join(odd)} are not surrogates; choose among pretrain, "
                        "scratch and self (each target attacked on itself)")
    try:
        adder_cells(grid)
    except InvalidGrid as exc:
        problems += exc.problems
    except XferError as exc:   # an adder spec's own refusal
        problems.append(str(exc).rstrip("."))
    except TypeError as exc:
        problems.append(f"{_setting('adder')} {exc}")
    return problems


def flag(key: str) -> str:
    """The command-line flag of the grid setting `key` (xfer.cli.grid makes its flags with it)."""
    return {"scratch": "--no-scratch", "tuned": "--tuned"}.get(key, "--" + key.replace("_", "-"))


def _setting(key: str) -> str:
    """How a person sets the grid setting `key`, as messages name it: its flag and its grid-file key."""
    return f"{flag(key)} / {key}:"


_KIND_WORDS = {int: "a whole number", float: "a number", str: "text (a name)", bool: "true or false"}
_WRONG = object()  # what `_scalar` returns for a value that is not of the kind


def _scalar(value: Any, type_: type) -> Any:
    """`value` as `type_` (int, float, str or bool), or _WRONG."""
    if type_ is bool or isinstance(value, bool):  # YAML's yes / no are neither numbers nor names
        return value if type_ is bool and isinstance(value, bool) else _WRONG
    if type_ is int:
        whole = isinstance(value, float) and value.is_integer()
        return int(value) if whole else value if isinstance(value, int) else _WRONG
    if type_ is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _WRONG
        return float(value) if isinstance(value, (int, float)) else _WRONG
    return value if isinstance(value, str) else _WRONG


def _typed(key: str, value: Any) -> Any:
    """`value` as the type of the setting `key`, or an XferError naming the setting, the value and an example."""
    if key == "freeze":
        return parse_freeze(value)
    if key == "only":
        return _only_patterns(value)
    if key == "adder":
        if not isinstance(value, dict):
            raise XferError(f"{_setting(key)} {value!r} is not a mapping of adder settings (e.g. `adder: {{sizes: [5000], "
                            f"epochs: 5}}`); known settings: {', '.join(ADDER_SETTINGS)}")
        return dict(value)
    if key == "tuned":
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise XferError(f"{_setting(key)} {value!r} is not a mapping of 'arch/size' to settings "
                            "(e.g. `tuned: {resnet_mini/1000: {lr: 0.002}}`); it is usually filled by --tuned")
        return value
    hint = _HINTS[key]
    many = typing.get_origin(hint) is tuple
    kind = typing.get_args(hint)[0] if many else hint
    items = list(value) if many and isinstance(value, (list, tuple)) else [value]
    if key == "weights" and value is None:
        items = [""]
    typed = [_scalar(item, kind) for item in items]
    wrong = [item for item, done in zip(items, typed) if done is _WRONG]
    if wrong or (not many and isinstance(value, (list, tuple))):
        shown = ", ".join(map(repr, wrong or [value]))
        raise XferError(f"{_setting(key)} {shown} is not {_KIND_WORDS[kind]}; e.g. {_example(key)}")
    if key == "weights":  # a file's path made absolute: Ray trials run in other working directories
        path = typed[0]
        return str(Path(path).expanduser().resolve()) if path and path != "imagenet" else path
    return tuple(typed) if many else typed[0]


def _example(key: str) -> str:
    """A correct way to set `key`, on the command line and in a grid file, from the seed's values."""
    default = getattr(_DEFAULTS, key)
    if key == "weights":
        default = "resnet18-f37072fd.pth"
    if isinstance(default, tuple):
        shown = default[:2] or ("...",)
        return f"{flag(key)} {' '.join(map(str, shown))}, or `{key}: [{', '.join(map(str, shown))}]` in a grid file"
    if isinstance(default, bool):
        return f"`{key}: {str(default).lower()}` in a grid file"
    return f"{flag(key)} {default}, or `{key}: {default}` in a grid file"


# What an `only` pattern may name, and each value's kind; stage is "finetune" or "scratch" (names.FINETUNE/SCRATCH).
ONLY_KEYS: dict[str, type] = {"stage": str, "source": str, "arch": str, "size": int, "freeze": int, "recipe": str,
                              "optimizer": str, "steps": int}
_ONLY_EXAMPLE = "e.g. `only: [{stage: finetune, source: fashion_mnist, arch: resnet_mini, size: 10000, freeze: [20, 23]}]`"


def _only_patterns(value: Any) -> tuple[dict[str, tuple[Any, ...]], ...]:
    """`only` as a tuple of patterns, each key's values a tuple of the key's kind."""
    listed = value if isinstance(value, (list, tuple)) else [value]
    patterns = []
    for pattern in listed:
        if not isinstance(pattern, dict) or not pattern:
            raise XferError(f"{_setting('only')} {pattern!r} is not a mapping of cell settings; {_ONLY_EXAMPLE}")
        unknown = sorted(set(pattern) - set(ONLY_KEYS))
        if unknown:
            raise XferError(f"{_setting('only')} {', '.join(unknown)} cannot select cells (known: "
                            f"{', '.join(ONLY_KEYS)}); {_ONLY_EXAMPLE}")
        typed: dict[str, tuple[Any, ...]] = {}
        for key, values in pattern.items():
            items = tuple(values) if isinstance(values, (list, tuple)) else (values,)
            cast = tuple(_scalar(item, ONLY_KEYS[key]) for item in items)
            if _WRONG in cast or not cast:
                raise XferError(f"{_setting('only')} {key}: {values!r} is not {_KIND_WORDS[ONLY_KEYS[key]]} or a list "
                                f"of them; {_ONLY_EXAMPLE}")
            typed[key] = cast
        patterns.append(typed)
    return tuple(patterns)


def _cell_values(spec: FinetuneSpec, recipe_name: str | None, steps: int = 0) -> dict[str, Any]:
    """What `only` patterns match against: a fine-tune or scratch cell's stage, source, arch, size, depth, recipe,
    optimizer (a scratch cell's only recipe setting) and step budget (`Grid.steps`: 0 = none)."""
    train = spec.train
    return {"stage": spec.stage, "source": spec.source, "arch": train.arch, "size": train.size or ALL,
            "freeze": train.freeze_depth, "recipe": recipe_name, "optimizer": train.optimizer, "steps": steps}


def selected(grid: Grid, spec: FinetuneSpec, recipe_name: str | None = None, steps: int = 0) -> bool:
    """Whether `only` keeps the fine-tune or scratch cell `spec`, made under the step budget `steps` (scratch cells
    have no recipe: any matches)."""
    if not grid.only:
        return True
    values = _cell_values(spec, recipe_name, steps)
    return any(all(values[key] in allowed or (key == "recipe" and recipe_name is None) for key, allowed in pattern.items())
               for pattern in grid.only)


def parse_freeze(value: Any) -> dict[str, tuple[int, ...]]:
    """`[0, 8]` (every arch), `{"alexnet_mini": [0, 8]}`, or CLI tokens `["0", "resnet_mini=0,20,23"]`."""
    if isinstance(value, dict):
        out = {}
        for arch_name, depths in value.items():
            listed = list(depths) if isinstance(depths, (list, tuple)) else [depths]
            typed = [_scalar(d, int) for d in listed]
            if _WRONG in typed:
                raise XferError(f"{_setting('freeze')} {arch_name}={depths!r} is not a list of whole numbers; e.g. "
                                "--freeze 0 resnet_mini=0,20,23, or `freeze: {resnet_mini: [0, 20, 23]}` in a grid file")
            out[str(arch_name)] = tuple(typed)
        return out
    out_lists: dict[str, list[int]] = {}
    for token in value if isinstance(value, (list, tuple)) else [value]:
        arch_name, _, depths = str(token).rpartition("=")
        try:
            out_lists.setdefault(arch_name or "*", []).extend(int(d) for d in depths.split(",") if d)
        except ValueError:
            raise XferError(f"{_setting('freeze')} {token!r} is not `DEPTH` or `ARCH=DEPTH,DEPTH`; e.g. "
                            "--freeze 0 resnet_mini=0,20,23, or `freeze: {resnet_mini: [0, 20, 23]}` in a grid file") from None
    return {k: tuple(v) for k, v in out_lists.items()}


def load_file(path: str | Path) -> dict[str, Any]:
    """Grid settings from a YAML or TOML file (validated by `make`)."""
    path = Path(path)
    if not path.is_file():
        raise XferError(f"grid file {path} does not exist; pass a YAML or TOML file of grid settings.")
    text = path.read_text()
    try:
        loaded = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise XferError(f"grid file {path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {exc}") from None
    if not isinstance(loaded, dict):
        raise XferError(f"grid file {path} must hold a mapping of settings (e.g. `sizes: [500, 1000]`).")
    return loaded


def validate(grid: Grid) -> None:
    """Refuse everything that would fail later and needs no data, each problem named by its flag and grid key,
    all at once: types, ranges, duplicates, names, and freeze depths (each arch is built once on the CPU to
    count its tensors). `check_pools` adds what the datasets' sizes decide."""
    problems = _type_problems(grid)
    if not problems:  # the checks below compare numbers and look names up; wrong types would break them
        problems = [*_range_problems(grid), *_name_problems(grid)]
        if grid.precision not in PRECISIONS:
            problems.append(f"{_setting('precision')} {grid.precision!r} is not one of {', '.join(PRECISIONS)}")
        if grid.prune_by not in ESTIMATORS:
            problems.append(f"{_setting('prune_by')} {grid.prune_by!r} is not an estimator; use one of {', '.join(ESTIMATORS)}")
        if grid.optimizer not in OPTIMIZERS:
            problems.append(f"{_setting('optimizer')} the optimizer {grid.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not grid.sources and not grid.scratch and not _fine_tuned_archs(grid):
            problems.append("the grid has no training cells: give sources, ImageNet weights for resnet18, "
                            "or keep the scratch baselines")
        problems += _recipe_problems(grid) + _weights_problems(grid) + _tuned_problems(grid) + _attack_adder_problems(grid)
        problems += _only_problems(grid) if not problems else []
    if problems:
        raise InvalidGrid(problems)


def check_pools(grid: Grid, pool_sizes: dict[str, int]) -> None:
    """Refuse fine-tune and validation sizes the datasets' training pools (train split sizes) cannot give; call
    it after `validate`."""
    problems = _pool_problems(grid, pool_sizes)
    if problems:
        raise InvalidGrid(problems)


def _type_problems(grid: Grid) -> list[str]:
    """What `make` would refuse, for a Grid built some other way (e.g. dataclasses.replace)."""
    problems = []
    for f in dataclasses.fields(Grid):
        try:
            _typed(f.name, getattr(grid, f.name))
        except XferError as exc:
            problems.append(str(exc))
    return problems


# The numbers a person sets, each with its range from xfer.specs (shared with the specs' own checks) and what the
# grid adds to the refusal: an example, or what 0 means where the grid's 0 stands for a spec's None.
_RANGES: dict[str, tuple[Range, str]] = {
    "sizes": (AT_LEAST_0, " (fine-tune examples per cell; 0 = the whole pool)"),
    "seeds": (AT_LEAST_0, ""),
    "lrs": (LR, ", e.g. 0.001"),
    "eps": (EPS, " (images are in [0, 1]: e.g. 0.3 for MNIST, 0.031 = 8/255 for CIFAR-10)"),
    "epochs": (COUNT, ""),
    "pretrain_epochs": (COUNT, ""),
    "batch_size": (COUNT, ""),
    "attack_n": (COUNT, " (test examples each attack perturbs)"),
    "attack_steps": (COUNT, ""),
    "val_size": (AT_LEAST_0, " (validation examples held out of each training pool)"),
    "pretrain_size": (AT_LEAST_0, " (0 = each source's whole pool)"),
    "unfreeze_epoch": (AT_LEAST_0, " (0 = half of epochs)"),
    "unfreeze_lr_mult": (MULTIPLIER, " (every layer's lr after unfreezing = lr × this)"),
    "sgd_lrs": (LR, ", e.g. 0.05"),
    "steps": (AT_LEAST_0, " (optimiser steps per cell; 0 = one pass over the data an epoch)"),
    "estimate_n": (AT_LEAST_0, " (target images each pretrained model is scored on; 0 = the whole pool)"),
    "prune_sources": (AT_LEAST_0, " (sources kept for fine-tuning per arch; 0 = every source)"),
}
_AXES = ("sources", "archs", "sizes", "steps", "lrs", "sgd_lrs", "seeds", "recipes", "attacks", "eps")  # each value makes its own cells


def _range_problems(grid: Grid) -> list[str]:
    problems = []
    for key, (allowed, hint) in _RANGES.items():
        value = getattr(grid, key)
        bad = [v for v in (value if isinstance(value, tuple) else (value,)) if not allowed.admits(v)]
        if bad:
            problems.append(f"{_setting(key)} {', '.join(map(str, bad))} {allowed.rule}{hint}")
    for key in _AXES:
        values = getattr(grid, key)
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            problems.append(f"{_setting(key)} {', '.join(twice)} given more than once; each value makes its own cells, "
                            "so list it once")
    for key in ("archs", "seeds", "sizes", "lrs"):
        if not getattr(grid, key):
            problems.append(f"{_setting(key)} is empty; give at least one, e.g. {_example(key)}")
    if grid.attacks and not grid.eps:
        problems.append(f"{_setting('eps')} is empty but attacks {', '.join(grid.attacks)} need a budget; "
                        f"e.g. {_example('eps')}")
    if not grid.name.strip():
        problems.append(f"{_setting('name')} is empty; it names the MLflow experiment, e.g. {_example('name')}")
    for arch_name, depths in grid.freeze.items():
        if any(d < 0 for d in depths) or len(set(depths)) < len(depths):
            problems.append(f"{_setting('freeze')} {arch_name}={','.join(map(str, depths))} must be distinct depths of "
                            "at least 0 (0 = nothing frozen)")
    return problems


def _name_problems(grid: Grid) -> list[str]:
    """Unknown datasets, archs and attacks, and freeze depths beyond an arch's tensors."""
    problems: list[str] = []
    known_data, known_archs = set(data.list_datasets()), set(models.list_archs())
    for key, wanted in (("sources", grid.sources), ("target", (grid.target,))):
        for name in wanted:
            if name not in known_data and not name.startswith(data.IMAGEFOLDER):
                problems.append(f"{_setting(key)} unknown dataset {name!r} (known: {', '.join(sorted(known_data))}, "
                                f"or {data.IMAGEFOLDER}PATH for a folder of class subfolders)")
    for name in grid.archs:
        if name not in known_archs:
            problems.append(f"{_setting('archs')} unknown arch {name!r} (known: {', '.join(sorted(known_archs))})")
    from xfer import attack as attacks  # the attack registry imports torchattacks; only needed here

    for name in grid.attacks:
        if name not in attacks.list_attacks():
            problems.append(f"{_setting('attacks')} unknown attack {name!r} (known: {', '.join(attacks.list_attacks())})")
    for arch_name in grid.freeze:
        if arch_name != "*" and arch_name not in grid.archs:
            problems.append(f"{_setting('freeze')} depths given for {arch_name!r}, which is not among the archs "
                            f"{', '.join(grid.archs)}")
    for arch_name in (a for a in grid.archs if a in known_archs):
        limit = models.max_freeze_depth(models.build(arch_name, (1, 28, 28), 10))
        bad = [d for d in grid.freeze_depths(arch_name) if d > limit]
        if bad:
            problems.append(f"{_setting('freeze')} freeze depth {bad} beyond {arch_name}'s {limit} body tensors "
                            f"(use 0..{limit})")
    return problems


def _pool_problems(grid: Grid, pool_sizes: dict[str, int] | None) -> list[str]:
    problems = []
    if pool_sizes and grid.target in pool_sizes:
        pool = pool_sizes[grid.target] - grid.val_size
        too_big = [s for s in grid.sizes if s > pool]
        if too_big:
            problems.append(f"{_setting('sizes')} fine-tune size(s) {too_big} exceed {grid.target}'s training pool of "
                            f"{pool} (its train split less {grid.val_size} validation examples); use 0 for the whole pool")
    for name, size in (pool_sizes or {}).items():
        if (name in grid.sources or name == grid.target) and size - grid.val_size < 1:
            problems.append(f"{_setting('val_size')} {grid.val_size} leaves none of {name}'s {size} training examples "
                            "for training; lower it")
    return problems


def recipe(name: str) -> Recipe:
    """The recipe `name`: one of RECIPES, or several joined with "+"; a setting given twice must agree."""
    merged: dict[str, Any] = {}
    for part in name.split("+"):
        if part not in RECIPES:
            where = f" in {name!r}" if part != name else ""
            raise XferError(f"unknown recipe {part!r}{where}; known recipes are {', '.join(RECIPES)}, alone or joined "
                            "with '+' (e.g. head10x_sgd+unfreeze).")
        for f in dataclasses.fields(Recipe):
            value = getattr(RECIPES[part], f.name)
            if value is not None and merged.setdefault(f.name, value) != value:
                raise XferError(f"recipe {name!r} sets {f.name} to both {merged[f.name]!r} and {value!r}; keep one of them.")
    return Recipe(**merged)


def recipe_settings(grid: Grid, name: str, freeze_depth: int, lr: float | None = None) -> dict[str, Any] | None:
    """The TrainSpec settings recipe `name` gives a fine-tune cell with `freeze_depth` (and its lr, when the cell's
    `lr` is given); None if the recipe does not apply to the cell."""
    chosen = recipe(name)
    settings: dict[str, Any] = {"optimizer": chosen.optimizer or grid.optimizer}
    if chosen.head_lr_mult is not None:
        settings["head_lr_mult"] = chosen.head_lr_mult
    if lr is not None:
        settings["lr"] = lr * (chosen.lr_mult or 1.0)
    if chosen.unfreeze:
        if not freeze_depth:
            return None  # nothing frozen, nothing to unfreeze: the cell would repeat another recipe's
        settings.update(unfreeze_epoch=grid.unfreeze_at(), unfreeze_lr_mult=grid.unfreeze_lr_mult, schedule="plateau")
        if chosen.keep_frozen:
            settings["unfreeze_body"] = False
    elif chosen.keep_frozen:
        raise XferError(f"recipe {name!r} keeps the body frozen at the unfreeze epoch, which only means something "
                        "with unfreeze (e.g. unfreeze_control).")
    return settings


def _fine_tuned_archs(grid: Grid) -> tuple[str, ...]:
    """The archs that get fine-tune cells: all of them with sources, else resnet18 when ImageNet weights are given."""
    if grid.sources:
        return grid.archs
    return (IMAGENET_ARCH,) if grid.weights and IMAGENET_ARCH in grid.archs else ()


def _recipe_problems(grid: Grid) -> list[str]:
    if not grid.recipes:
        return ["recipes must name at least one recipe (e.g. plain)"]
    problems: list[str] = []
    resolved: dict[str, dict[str, Any]] = {}
    for name in grid.recipes:
        try:
            settings = recipe_settings(grid, name, freeze_depth=1, lr=1.0)  # at a depth > 0 every recipe applies
        except XferError as exc:
            problems.append(str(exc).rstrip("."))
            continue
        twin = next((other for other, seen in resolved.items() if seen == settings), None)
        if twin is not None:
            problems.append(f"recipes {twin!r} and {name!r} give the same cells ({settings}); keep one")
        resolved[name] = settings
    unfreezing = [name for name in resolved if recipe(name).unfreeze]
    if unfreezing and not 0 < grid.unfreeze_at() < grid.epochs:
        problems.append(f"recipe {unfreezing[0]!r} unfreezes at epoch {grid.unfreeze_at()}, which must lie in "
                        f"1..{grid.epochs - 1}; set unfreeze_epoch (0 = half of epochs) and at least 2 epochs")
    if unfreezing and not any(d for arch in _fine_tuned_archs(grid) for d in grid.freeze_depths(arch)):
        problems.append(f"recipe {unfreezing[0]!r} unfreezes a frozen pretrained body, but no fine-tune cell has a freeze "
                        "depth > 0 (it needs sources or ImageNet weights, and e.g. --freeze resnet_mini=0,20)")
    return problems


TUNABLE = ("lr", "weight_decay", "head_lr_mult", "batch_size", "label_smoothing")  # what `Grid.tuned` may set


def _tuned_problems(grid: Grid) -> list[str]:
    problems = []
    for where, settings in grid.tuned.items():
        arch_name, _, size = where.partition("/")
        if arch_name not in grid.archs or not size.isdigit() or int(size) not in grid.sizes:
            problems.append(f"tuned settings for {where!r}, which is not an arch/size of this grid "
                            f"({', '.join(grid.archs)} × {', '.join(map(str, grid.sizes))})")
        unknown = sorted(set(settings) - set(TUNABLE))
        if unknown:
            problems.append(f"tuned settings {', '.join(unknown)} for {where!r} are not tunable ({', '.join(TUNABLE)})")
        wrong = sorted(k for k, v in settings.items() if k in TUNABLE and (isinstance(v, bool) or not isinstance(v, (int, float))))
        if wrong:
            problems.append(f"{_setting('tuned')} {', '.join(f'{k}={settings[k]!r}' for k in wrong)} for {where!r} "
                            "must be numbers")
    return problems


def _only_problems(grid: Grid) -> list[str]:
    """`only` patterns that name what cannot exist (a stage other than fine-tune or scratch, an unknown dataset, arch
    or recipe: a typo would keep nothing), or that together keep no cell. A pattern that matches nothing because the
    command line narrowed an axis (`--archs resnet_mini` on a preset that names alexnet_mini's cells) is fine."""
    problems = []
    known = {"stage": {names.FINETUNE, names.SCRATCH}, "source": set(data.list_datasets()),
             "arch": set(models.list_archs())}
    for pattern in grid.only:
        for key, allowed in known.items():
            odd = sorted(str(v) for v in pattern.get(key, ()) if v not in allowed and not str(v).startswith(data.IMAGEFOLDER))
            if odd:
                hint = ("fine-tune or scratch (pretraining is every source × arch × seed)" if key == "stage"
                        else f"{'an' if key == 'arch' else 'a'} {key} xfer knows")
                problems.append(f"{_setting('only')} {key} {', '.join(odd)} is not {hint}")
        for name in pattern.get("recipe", ()):
            try:
                recipe(name)
            except XferError as exc:
                problems.append(f"{_setting('only')} {str(exc).rstrip('.')}")
    if problems or not grid.only:
        return problems
    kept = cells(grid)
    if not kept.finetune and not kept.scratch:
        shown = "; ".join("{" + ", ".join(f"{key}: {list(values) if len(values) > 1 else values[0]}"
                                          for key, values in pattern.items()) + "}" for pattern in grid.only)
        problems.append(f"{_setting('only')} the patterns {shown} keep no fine-tune or scratch cell of the grid; check "
                        "their values against the grid's sources, archs, sizes, freeze depths and recipes")
    return problems


def _weights_problems(grid: Grid) -> list[str]:
    if not grid.weights:
        return []
    if IMAGENET_ARCH not in grid.archs:
        return [f"weights {grid.weights!r} are ImageNet weights for {IMAGENET_ARCH}, which is not among the archs "
                f"{', '.join(grid.archs)}"]
    problems = []
    try:  # loads the file now, so a missing or damaged one is named before launch
        models.build(IMAGENET_ARCH, (3, data.COLOUR_GRID, data.COLOUR_GRID), 2, weights=grid.weights)
    except XferError as exc:
        problems.append(str(exc).rstrip("."))
    return problems


@dataclass(frozen=True)
class Cells:
    pretrain: tuple[PretrainSpec, ...]
    finetune: tuple[FinetuneSpec, ...]
    scratch: tuple[FinetuneSpec, ...]
    attacks: tuple[AttackSpec, ...]
    estimates: tuple[EstimateSpec, ...] = ()   # each pretrained model scored for the target (xfer.estimate)


def cells(grid: Grid, pool_sizes: dict[str, int] | None = None) -> Cells:
    """Expand the grid. Pretraining runs once per source × arch × seed; fine-tunes reference it by spec.

    `pool_sizes` (train split sizes by dataset) caps each source's pretraining size at its pool less the
    validation split, so one `pretrain_size` serves sources of different sizes.

    Fine-tune cells: (source, or ImageNet weights) × freeze depth × recipe for every arch × size × lr × seed;
    scratch cells: one per distinct recipe optimizer (see `Grid`).
    """
    pretrain = {
        (source, arch_name, seed): PretrainSpec(TrainSpec(
            arch=arch_name, dataset=source, size=_pretrain_size(grid, source, pool_sizes), val_size=grid.val_size,
            epochs=grid.pretrain_epochs, batch_size=grid.batch_size, optimizer=grid.optimizer, augment=grid.augment,
            seed=seed, fast_dev_run=grid.fast_dev_run, precision=grid.precision,
        ))
        for source, arch_name, seed in itertools.product(grid.sources, grid.archs, grid.seeds)
    }
    finetune, scratch = [], []
    made: set[FinetuneSpec] = set()   # two budgets that round to the same epoch_steps make one cell, not two
    optimizers = {name: recipe(name).optimizer or grid.optimizer for name in grid.recipes}
    for arch_name, size in itertools.product(grid.archs, grid.sizes):
        tuned = dict(grid.tuned.get(f"{arch_name}/{size}", {}))
        tuned_lr = tuned.pop("lr", None)

        def lrs_of(optimizer: str) -> tuple[float, ...]:
            # A tuned lr replaces the lrs axis; SGD cells keep sgd_lrs where given (a tuning of another optimizer's).
            return (tuned_lr,) if tuned_lr is not None and not (optimizer == "sgd" and grid.sgd_lrs) else grid.lrs_of(optimizer)

        # Every lr of any cell, in the axis' order: a grid without sgd_lrs keeps the cell order it always had.
        all_lrs = tuple(dict.fromkeys(lr for optimizer in [grid.optimizer, *optimizers.values()] for lr in lrs_of(optimizer)))
        for steps, lr, seed in itertools.product(grid.steps, all_lrs, grid.seeds):
            base = dict(arch=arch_name, dataset=grid.target, size=size or None, val_size=grid.val_size,
                        epochs=grid.epochs, epoch_steps=grid.epoch_steps(steps), batch_size=grid.batch_size, lr=lr,
                        augment=grid.augment, seed=seed, fast_dev_run=grid.fast_dev_run, precision=grid.precision)
            base.update(tuned)
            starts: list[tuple[PretrainSpec | None, dict[str, Any]]] = [
                (pretrain[(source, arch_name, seed)], {}) for source in grid.sources]
            if grid.weights and arch_name == IMAGENET_ARCH:
                starts.append((None, {"weights": grid.weights}))
            for (parent, init), depth, name in itertools.product(starts, grid.freeze_depths(arch_name), grid.recipes):
                if lr not in lrs_of(optimizers[name]):
                    continue
                settings = recipe_settings(grid, name, depth, lr=lr)
                if settings is not None:
                    spec = FinetuneSpec(TrainSpec(**{**base, **init, "freeze_depth": depth, **settings}), parent)
                    if selected(grid, spec, name, steps) and spec not in made:
                        finetune.append(spec)
                        made.add(spec)
            if grid.scratch:
                for optimizer in dict.fromkeys(optimizers.values()):
                    if lr not in lrs_of(optimizer):
                        continue
                    spec = FinetuneSpec(TrainSpec(**{**base, "optimizer": optimizer}))
                    if selected(grid, spec, steps=steps) and spec not in made:
                        scratch.append(spec)
                        made.add(spec)
    attacks = tuple(
        AttackSpec(attack=name, eps=eps, steps=grid.attack_steps, n=grid.attack_n, dataset=grid.target)
        for name, eps in itertools.product(grid.attacks, grid.eps)
    )
    # A rehearsal scores one batch of target images; a grid estimate_n of them, or the whole pool (None) when that
    # is no more (so a pool's key does not depend on how far estimate_n exceeds it).
    scored = grid.batch_size if grid.fast_dev_run else (grid.estimate_n or None)
    pool = (pool_sizes or {}).get(grid.target)
    if scored is not None and pool is not None and scored >= pool:
        scored = None
    estimates = tuple(EstimateSpec(p, grid.target, scored) for p in pretrain.values())
    return Cells(tuple(pretrain.values()), tuple(finetune), tuple(scratch), attacks, estimates)


def _pretrain_size(grid: Grid, source: str, pool_sizes: dict[str, int] | None) -> int | None:
    pool = (pool_sizes or {}).get(source)
    if not grid.pretrain_size or (pool is not None and grid.pretrain_size >= pool - grid.val_size):
        return None  # the whole pool
    return grid.pretrain_size


FAST_DEV_RUN = "-fast-dev-run"   # the rehearsal's experiment: <grid name>-fast-dev-run, never the grid's own
# A rehearsal's adversarial sets: this many test images each. The seed grid scores ~430,000 (set, target) pairs, so
# every image per set is ~430,000 forward passes of pure compute that proves nothing more about the path.
FAST_DEV_RUN_ATTACK_N = 2


def fast_dev_run(grid: Grid) -> Grid:
    """The rehearsal of `grid` (PyTorch Lightning's name): the same cells — every source, arch, size, freeze depth,
    lr, recipe, seed and attack setting — each trained one batch per epoch (one epoch; two where a recipe
    unfreezes) and evaluated on one batch, every adversarial set made of FAST_DEV_RUN_ATTACK_N images and scored on
    every target, recorded in its own experiment."""
    unfreezing = any(_unfreezes(name) for name in grid.recipes)
    adder = dict(grid.adder)
    if adder:   # the adder's cells, one batch of pairs each
        batch = int(adder.get("batch_size", 200))
        adder.update(sizes=[batch], epochs=1, pretrain_epochs=1, pretrain_size=batch, val_pairs=batch, test_pairs=batch)
    return dataclasses.replace(
        grid, name=grid.name if grid.name.endswith(FAST_DEV_RUN) else grid.name + FAST_DEV_RUN, fast_dev_run=True, epochs=2 if unfreezing else 1, pretrain_epochs=1,
        unfreeze_epoch=1 if unfreezing else grid.unfreeze_epoch, attack_n=min(grid.attack_n, FAST_DEV_RUN_ATTACK_N),
        adder=adder)


def _unfreezes(name: str) -> bool:
    try:
        return bool(recipe(name).unfreeze)
    except XferError:
        return False   # an unknown recipe is `validate`'s to name


def describe(grid: Grid) -> str:
    """The grid as canonical JSON (logged with every stage so a grid can be reproduced from MLflow)."""
    return json.dumps(dataclasses.asdict(grid), sort_keys=True, default=list)
