"""A finished study's best settings applied to a grid: the best configuration per (arch, size), `apply_best`."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from xfer import names, specs, tracking
from xfer import grid as grids
from xfer.specs import FinetuneSpec
from xfer.tuning import DEFAULT_EXPERIMENT, SEARCHED, _short

GRID_SETTINGS = grids.TUNABLE  # what a study hands the grid; freeze depth stays a grid axis


@dataclass(frozen=True)
class Found:
    """The best configuration a finished study recorded for one (arch, size)."""

    arch: str
    size: int
    source: str
    settings: dict[str, Any]           # GRID_SETTINGS → values
    freeze_depth: int
    val_error: float
    default_val_error: float
    trials: int
    run_id: str


def best_settings(grid: grids.Grid, experiment: str = DEFAULT_EXPERIMENT) -> dict[tuple[str, int], Found]:
    """(arch, size) → the best configuration among finished studies of the grid's target, archs, sizes and sources.

    Each study's newest parent run counts; with several sources for one (arch, size), the lowest best
    validation error wins (the grid has one setting per arch and size, whatever the source).
    """
    sizes = {str(size or "all"): size for size in grid.sizes}
    newest: dict[str, tracking.RunRecord] = {}
    studies = {names.TAG_TUNE_ROLE: names.TUNE_ROLE_STUDY, names.TAG_TARGET: grid.target}
    for record in tracking.query(experiment, stage=names.TUNE, tags=studies):
        if record.tags.get(names.TAG_ARCH) in grid.archs and record.tags.get(names.TAG_SIZE) in sizes \
                and record.tags.get(names.TAG_SOURCE) in grid.sources and names.TAG_BEST_PREFIX + "lr" in record.tags:
            newest[record.key] = record
    found: dict[tuple[str, int], Found] = {}
    for record in newest.values():
        cell = _best_cell(record)
        item = Found(
            arch=cell.train.arch, size=sizes[record.tags[names.TAG_SIZE]], source=cell.source,
            settings={k: getattr(cell.train, k) for k in GRID_SETTINGS}, freeze_depth=cell.train.freeze_depth,
            val_error=record.metrics.get(names.BEST_VAL_ERROR, math.nan),
            default_val_error=record.metrics.get(names.DEFAULT_VAL_ERROR, math.nan),
            trials=int(record.tags.get(names.TAG_TRIALS, 0)), run_id=record.run_id,
        )
        slot = (item.arch, item.size)
        if slot not in found or item.val_error < found[slot].val_error:
            found[slot] = item
    return found


def _best_cell(record: tracking.RunRecord) -> FinetuneSpec:
    """The best cell of a study's parent run: its params (the default cell) with the xfer.best.* tags applied."""
    best = {f"train.{k}": record.tags[names.TAG_BEST_PREFIX + k] for k in SEARCHED}
    return specs.from_flat(FinetuneSpec, {**record.params, **best})


def apply_best(grid: grids.Grid, echo: Callable[[str], None] = print, experiment: str = DEFAULT_EXPERIMENT) -> grids.Grid:
    """The grid with each (arch, size)'s tuned settings where a finished study exists; echoes one line per (arch, size).

    Studies are looked up in MLflow experiment `experiment` (default "tune"). The settings travel in the
    field ``Grid.tuned: dict[str, dict[str, Any]]`` keyed ``"arch/size"`` (size 0 = the whole pool), each
    value the GRID_SETTINGS of that arch and size; `grid.cells` uses the tuned lr instead of the lrs axis
    and the other settings in place of the grid's, for that arch and size's fine-tune and scratch cells.
    Freeze depth stays the grid's axis: the study's best depth is reported, not imposed.
    """
    found = best_settings(grid, experiment)
    for line in choice_lines(grid, found, experiment):
        echo(line)
    tuned = {f"{arch}/{size}": item.settings for (arch, size), item in found.items()}
    return dataclasses.replace(grid, tuned={**grid.tuned, **tuned})


def choice_lines(grid: grids.Grid, found: Mapping[tuple[str, int], Found], experiment: str) -> list[str]:
    """What --tuned uses, one line per (arch, size) of the grid: a study's best settings, or the grid's lrs."""
    lines = []
    for arch, size in itertools.product(grid.archs, grid.sizes):
        where, item = f"{arch} n={size or 'all'}", found.get((arch, size))
        if item is None:
            lines.append(f"{where}: no finished tune study for target {grid.target} in MLflow experiment "
                         f"{experiment!r}; using the grid's lrs {', '.join(map(str, grid.lrs))}")
            continue
        lines.append(f"{where}: tuned " + " ".join(f"{k}={_short(v)}" for k, v in item.settings.items())
                     + f" from study {item.source}→{grid.target} ({item.trials} trials, val_error {item.val_error:.4f}"
                     f" vs default {item.default_val_error:.4f}; its best freeze depth {item.freeze_depth} is not "
                     f"imposed; run {item.run_id})")
    return lines


__all__ = ["Found", "GRID_SETTINGS", "best_settings", "choice_lines", "apply_best"]
