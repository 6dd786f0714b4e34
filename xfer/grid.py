"""The experiment grid: presets, grid files and CLI overrides → a validated `Grid` → each stage's cells.

A `Grid` is plain values; `cells(grid)` expands it into typed specs (pretrain, fine-tune, scratch,
attack settings). Everything a researcher can get wrong is checked here, before Ray or MLflow start.
Presets are the built-ins in `PRESETS` and the grid files in sweeps/presets/ (one per target recipe).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xfer import data, models
from xfer.errors import XferError
from xfer.specs import OPTIMIZERS, AttackSpec, FinetuneSpec, PretrainSpec, TrainSpec

ALL = 0  # a fine-tune size of 0 means "the whole training pool" (the seed's 60,000 less the validation split)
PRESET_DIR = Path(__file__).resolve().parent.parent / "sweeps" / "presets"  # preset grid files, by file name
PRESET_SUFFIXES = (".yaml", ".yml", ".toml")
IMAGENET_ARCH = "resnet18"  # the one arch models.build can start from ImageNet weights (`Grid.weights`)


@dataclass(frozen=True)
class Recipe:
    """How the one loop fine-tunes a pretrained body; None leaves the grid's (or TrainSpec's) setting."""

    optimizer: str | None = None        # e.g. "sgd" (momentum 0.9); None = the grid's optimizer
    head_lr_mult: float | None = None   # parameter groups: the new head at lr × this, the body at lr
    unfreeze: bool | None = None        # freeze-then-unfreeze (needs a freeze depth > 0, i.e. a pretrained body)


RECIPES: dict[str, Recipe] = {
    "plain": Recipe(),                                          # the grid's optimizer, one lr, cosine schedule
    "sgd": Recipe(optimizer="sgd"),                             # SGD at one lr: the baseline head10x_sgd is measured against
    "head10x_sgd": Recipe(optimizer="sgd", head_lr_mult=10.0),  # SGD, the new head at 10× the body's lr
    "unfreeze": Recipe(unfreeze=True),                          # body frozen `unfreeze_epoch` epochs, then all at lower lr
}


@dataclass(frozen=True)
class Grid:
    """Every axis of the study, with the defaults of the seed experiment.

    Fine-tuning recipes are the `recipes` axis: names from `RECIPES`, or several joined with "+"
    (``head10x_sgd+unfreeze``). Each fine-tune cell (source × arch × size × freeze depth × lr × seed) is
    repeated per recipe:

    - ``plain``: the grid's `optimizer`, one lr for body and head, cosine schedule (the seed's cells).
    - ``sgd``: SGD with momentum at one lr, the single-lr baseline of ``head10x_sgd``.
    - ``head10x_sgd``: SGD with two parameter groups, the new head at 10× the body's lr.
    - ``unfreeze``: the first `freeze depth` tensors stay frozen for `unfreeze_epoch` epochs, then every layer
      trains at lr × `unfreeze_lr_mult` under ReduceLROnPlateau on validation error. A cell with nothing
      frozen (depth 0) has nothing to unfreeze, so the recipe skips depth 0.

    A recipe's settings reach only its own cells, so adding a recipe never changes another cell's key, and
    ``plain`` cells keep the keys they had before recipes existed. Scratch baselines have no pretrained
    body: they take only each recipe's optimizer (one scratch cell per distinct optimizer). Numeric knobs
    (`unfreeze_epoch`, `unfreeze_lr_mult`) are scalars, the comparison between recipes is the axis.

    `weights` starts ImageNet fine-tune cells of `resnet18` (source "imagenet", every freeze depth × recipe)
    from torchvision's ImageNet weights, beside any sources; scratch resnet18 cells stay random-initialised.
    `augment` (random crop + flip on tensors) applies to every training cell of the grid.
    """

    name: str = "seed"                                   # MLflow experiment name
    sources: tuple[str, ...] = ("mnist", "kmnist", "fashion_mnist", "emnist_balanced", "emnist_letters",
                                "qmnist", "svhn", "usps")
    archs: tuple[str, ...] = ("alexnet_mini", "resnet_mini", "mlp_mixer", "mlp_mixer2")
    target: str = "mnist"
    sizes: tuple[int, ...] = (500, 1000, 10000, 20000, ALL)
    # Freeze depths in parameter tensors, per arch ("*" = every arch); the seed's: AlexNet 8, ResNet 20/23.
    freeze: dict[str, tuple[int, ...]] = field(default_factory=lambda: {
        "alexnet_mini": (0, 8), "resnet_mini": (0, 20, 23), "mlp_mixer": (0, 2, 14), "mlp_mixer2": (0, 2, 26),
        "*": (0,),
    })
    lrs: tuple[float, ...] = (1e-3,)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 10                                     # fine-tune and scratch epochs
    pretrain_epochs: int = 10
    pretrain_size: int = ALL                             # at most this many examples of each source are used for
                                                         # pretraining (a smaller pool is used whole); ALL = every one
    batch_size: int = 128
    val_size: int = 1000
    optimizer: str = "adamw"                             # pretraining, scratch, and recipes that set none
    recipes: tuple[str, ...] = ("plain",)                # fine-tuning recipes (see above and RECIPES)
    unfreeze_epoch: int = 0                              # the unfreeze recipe's epoch; 0 = half of `epochs`
    unfreeze_lr_mult: float = 0.1                        # after unfreezing, every layer trains at lr × this
    augment: bool = False                                # random crop + flip (for 32×32 colour sets such as CIFAR-10)
    weights: str = ""                                    # resnet18's ImageNet weights: a resnet18-f37072fd.pth file,
                                                         # or "imagenet" (torchvision's cache, else download); "" = none
    scratch: bool = True                                 # train scratch baselines of every arch × size × lr × seed
    # Tuned settings per "arch/size" (size 0 = whole pool), from `sweeps/full_grid.py --tuned`: the tuned lr
    # replaces the lrs axis and the other settings (weight_decay, head_lr_mult, batch_size, label_smoothing)
    # the grid's, in that arch and size's fine-tune and scratch cells; a recipe's own settings still win.
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)
    attacks: tuple[str, ...] = ("fgsm", "pgd")
    eps: tuple[float, ...] = (0.3,)
    attack_n: int = 5000
    attack_steps: int = 10

    def freeze_depths(self, arch: str) -> tuple[int, ...]:
        return self.freeze.get(arch, self.freeze.get("*", (0,)))

    def unfreeze_at(self) -> int:
        return self.unfreeze_epoch or self.epochs // 2


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

_TUPLE_FIELDS = {f.name for f in dataclasses.fields(Grid) if str(f.type).startswith("tuple")}


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


def from_preset(name: str, **overrides: Any) -> Grid:
    return make(**{**preset_values(name), **overrides})


def make(**values: Any) -> Grid:
    """A Grid from plain values (a grid file's or the CLI's); unknown keys fail with the known ones."""
    known = {f.name for f in dataclasses.fields(Grid)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise XferError(f"unknown grid settings {', '.join(unknown)}; known settings are {', '.join(sorted(known))}.")
    clean = {}
    for key, value in values.items():
        if key == "freeze":
            value = parse_freeze(value)
        elif key == "weights":  # a file's path made absolute: Ray trials run in other working directories
            value = str(Path(value).expanduser().resolve()) if value and value != "imagenet" else (value or "")
        elif key in _TUPLE_FIELDS:
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        clean[key] = value
    return Grid(**clean)


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


def parse_freeze(value: Any) -> dict[str, tuple[int, ...]]:
    """`[0, 8]` (every arch), `{"alexnet_mini": [0, 8]}`, or CLI tokens `["0", "resnet_mini=0,20,23"]`."""
    if isinstance(value, dict):
        return {str(k): tuple(int(v) for v in (vs if isinstance(vs, (list, tuple)) else [vs])) for k, vs in value.items()}
    out: dict[str, list[int]] = {}
    for token in value if isinstance(value, (list, tuple)) else [value]:
        arch_name, _, depths = str(token).rpartition("=")
        try:
            out.setdefault(arch_name or "*", []).extend(int(d) for d in depths.split(",") if d)
        except ValueError:
            raise XferError(f"freeze setting {token!r} is not `DEPTH` or `ARCH=DEPTH,DEPTH`; e.g. `--freeze 0 resnet_mini=0,20,23`.") from None
    return {k: tuple(v) for k, v in out.items()}


def validate(grid: Grid, pool_sizes: dict[str, int] | None = None) -> None:
    """Refuse everything that would fail later: unknown names, impossible depths and sizes, bad budgets."""
    problems: list[str] = []
    known_data, known_archs = set(data.list_datasets()), set(models.list_archs())
    for name in (*grid.sources, grid.target):
        if name not in known_data and not name.startswith("imagefolder:"):
            problems.append(f"unknown dataset {name!r} (known: {', '.join(sorted(known_data))})")
    for name in grid.archs:
        if name not in known_archs:
            problems.append(f"unknown arch {name!r} (known: {', '.join(sorted(known_archs))})")
    from xfer import attack as attacks  # the attack registry imports torchattacks; only needed here

    for name in grid.attacks:
        if name not in attacks.list_attacks():
            problems.append(f"unknown attack {name!r} (known: {', '.join(attacks.list_attacks())})")
    for arch_name in grid.freeze:
        if arch_name != "*" and arch_name not in grid.archs:
            problems.append(f"freeze depths given for {arch_name!r}, which is not among the archs {', '.join(grid.archs)}")
    for arch_name in (a for a in grid.archs if a in known_archs):
        limit = models.max_freeze_depth(models.build(arch_name, (1, 28, 28), 10))
        bad = [d for d in grid.freeze_depths(arch_name) if not 0 <= d <= limit]
        if bad:
            problems.append(f"freeze depth {bad} beyond {arch_name}'s {limit} body tensors (use 0..{limit})")
    if pool_sizes and grid.target in pool_sizes:
        pool = pool_sizes[grid.target] - grid.val_size
        too_big = [s for s in grid.sizes if s > pool]
        if too_big:
            problems.append(f"fine-tune size(s) {too_big} exceed {grid.target}'s training pool of {pool} "
                            f"(its train split less {grid.val_size} validation examples); use 0 for the whole pool")
    for name, size in (pool_sizes or {}).items():
        if name in grid.sources and size - grid.val_size < 1:
            problems.append(f"source {name} has {size} training examples, none left after {grid.val_size} for validation")
    if any(not 0 <= e <= 1 for e in grid.eps):
        problems.append(f"attack eps {grid.eps} must lie in [0, 1] (images are in [0, 1])")
    if min(grid.epochs, grid.pretrain_epochs, grid.batch_size, grid.attack_n) < 1 or not grid.seeds or not grid.lrs:
        problems.append("epochs, pretrain_epochs, batch_size, attack_n must be positive and seeds/lrs non-empty")
    if grid.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer {grid.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if not grid.sources and not grid.scratch and not _fine_tuned_archs(grid):
        problems.append("the grid has no training cells: give sources, ImageNet weights for resnet18, "
                        "or keep the scratch baselines")
    problems += _recipe_problems(grid) + _weights_problems(grid) + _tuned_problems(grid)
    if problems:
        raise XferError("the grid is not valid: " + "; ".join(problems) + ". Nothing was launched.")


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


def recipe_settings(grid: Grid, name: str, freeze_depth: int) -> dict[str, Any] | None:
    """The TrainSpec settings recipe `name` gives a fine-tune cell with `freeze_depth`; None if it does not apply."""
    chosen = recipe(name)
    settings: dict[str, Any] = {"optimizer": chosen.optimizer or grid.optimizer}
    if chosen.head_lr_mult is not None:
        settings["head_lr_mult"] = chosen.head_lr_mult
    if chosen.unfreeze:
        if not freeze_depth:
            return None  # nothing frozen, nothing to unfreeze: the cell would repeat another recipe's
        settings.update(unfreeze_epoch=grid.unfreeze_at(), unfreeze_lr_mult=grid.unfreeze_lr_mult, schedule="plateau")
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
            settings = recipe_settings(grid, name, freeze_depth=1)  # at a depth > 0 every recipe applies
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
            seed=seed,
        ))
        for source, arch_name, seed in itertools.product(grid.sources, grid.archs, grid.seeds)
    }
    finetune, scratch = [], []
    for arch_name, size in itertools.product(grid.archs, grid.sizes):
        tuned = dict(grid.tuned.get(f"{arch_name}/{size}", {}))
        lrs = (tuned.pop("lr"),) if "lr" in tuned else grid.lrs
        for lr, seed in itertools.product(lrs, grid.seeds):
            base = dict(arch=arch_name, dataset=grid.target, size=size or None, val_size=grid.val_size,
                        epochs=grid.epochs, batch_size=grid.batch_size, lr=lr, augment=grid.augment, seed=seed)
            base.update(tuned)
            starts: list[tuple[PretrainSpec | None, dict[str, Any]]] = [
                (pretrain[(source, arch_name, seed)], {}) for source in grid.sources]
            if grid.weights and arch_name == IMAGENET_ARCH:
                starts.append((None, {"weights": grid.weights}))
            for (parent, init), depth, name in itertools.product(starts, grid.freeze_depths(arch_name), grid.recipes):
                settings = recipe_settings(grid, name, depth)
                if settings is not None:
                    finetune.append(FinetuneSpec(TrainSpec(**{**base, **init, "freeze_depth": depth, **settings}), parent))
            if grid.scratch:
                for optimizer in dict.fromkeys(recipe(name).optimizer or grid.optimizer for name in grid.recipes):
                    scratch.append(FinetuneSpec(TrainSpec(**{**base, "optimizer": optimizer})))
    attacks = tuple(
        AttackSpec(attack=name, eps=eps, steps=grid.attack_steps, n=grid.attack_n, dataset=grid.target)
        for name, eps in itertools.product(grid.attacks, grid.eps)
    )
    return Cells(tuple(pretrain.values()), tuple(finetune), tuple(scratch), attacks)


def _pretrain_size(grid: Grid, source: str, pool_sizes: dict[str, int] | None) -> int | None:
    pool = (pool_sizes or {}).get(source)
    if not grid.pretrain_size or (pool is not None and grid.pretrain_size >= pool - grid.val_size):
        return None  # the whole pool
    return grid.pretrain_size


def describe(grid: Grid) -> str:
    """The grid as canonical JSON (logged with every stage so a grid can be reproduced from MLflow)."""
    return json.dumps(dataclasses.asdict(grid), sort_keys=True, default=list)
