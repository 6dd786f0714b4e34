"""The whole DAG of a grid: pretrain → fine-tune / scratch → attack → report, each stage one Tune run of packs.

Each stage reads what earlier stages produced only through MLflow, so any stage can be re-run or resumed on its
own; finished cells are found by key and skipped, and a stage with nothing left starts no Ray and no trial.
`prepare` refuses bad input before anything starts (no MLflow server, no Ray).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from xfer import cluster, data, grid as grids, names, packs, specs, stages, tracking
from xfer.errors import XferError
from xfer.stages import RunOptions, StageSummary, load_datasets, pending, run_training_stage

STAGE_ORDER = (names.PRETRAIN, names.FINETUNE, names.SCRATCH, names.ATTACK, names.REPORT)


@dataclass(frozen=True)
class GridOutcome:
    summaries: list[StageSummary]
    report_dir: str | None

    @property
    def failed(self) -> list[tuple[str, str]]:
        return [f for s in self.summaries for f in s.failed]


class Prepared(NamedTuple):
    """A validated grid: each stage's cells, and the datasets they read."""

    cells: grids.Cells
    datasets: dict[str, data.Dataset]


def check_data(grid: grids.Grid, options: RunOptions) -> dict[str, data.Dataset]:
    """Load every dataset the grid needs, or stop before launch naming all missing ones and the remedies."""
    wanted = {*grid.sources, grid.target}
    missing = [] if options.download else data.missing(sorted(wanted), options.data_root)
    if missing:
        raise XferError(
            f"the grid needs dataset(s) {', '.join(missing)}, which are not under {data.data_root(options.data_root)}. "
            "Run once with --download on a machine with network access, place torchvision's files there "
            "(--data-root or XFER_DATA), or run the offline preset: python sweeps/full_grid.py --preset smoke. "
            "Nothing was launched."
        )
    return load_datasets(wanted, options)


def prepare(grid: grids.Grid, options: RunOptions) -> Prepared:
    """Validate the grid against its data and expand it into cells; nothing is started."""
    grids.validate(grid)
    datasets = check_data(grid, options)
    pools = {name: len(ds.train) for name, ds in datasets.items()}
    grids.validate(grid, pools)
    target = datasets[grid.target]
    odd = [f"{name} {ds.in_shape}" for name, ds in datasets.items() if name in grid.sources and ds.in_shape != target.in_shape]
    if odd:
        raise XferError(f"source(s) {', '.join(odd)} do not share the target {grid.target}'s image shape {target.in_shape}, "
                        "so their models cannot be fine-tuned on it; pick sources of the target's shape (digit and "
                        "character sets are 1×28×28, CIFAR-10 3×32×32, cifar10_gray 1×32×32). Nothing was launched.")
    return Prepared(grids.cells(grid, pools), datasets)


def training_stages(cells: grids.Cells) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    return ((names.PRETRAIN, cells.pretrain), (names.FINETUNE, cells.finetune), (names.SCRATCH, cells.scratch))


def dry_run(grid: grids.Grid, options: RunOptions, echo: Callable[[str], None] = print,
            prepared: Prepared | None = None) -> None:
    """Print each stage's cells and how many are already finished in MLflow; run nothing."""
    cells = (prepared or prepare(grid, options)).cells
    for stage, group in training_stages(cells):
        todo, cached = pending(options.experiment, group, options.force, stage)
        echo(f"{stage}: {len(group)} cells, {cached} finished in MLflow, {len(todo)} to run")
        for spec in todo[:50]:
            echo(f"  {stages.label(spec)}  key={specs.key(spec)}")
        if len(todo) > 50:
            echo(f"  … and {len(todo) - 50} more")
    echo(f"attack: {len(cells.attacks)} attack setting(s) × the surrogates found in MLflow once training has run: "
         + ", ".join(f"{a.attack}(eps={a.eps})" for a in cells.attacks))


def run_grid(grid: grids.Grid, options: RunOptions, stages: tuple[str, ...] = STAGE_ORDER,
             echo: Callable[[str], None] = print, prepared: Prepared | None = None) -> GridOutcome:
    prepared = prepared or prepare(grid, options)
    cells, datasets = prepared.cells, prepared.datasets
    summaries: list[StageSummary] = []
    tracking.log_grid(options.experiment, grids.describe(grid))
    for stage, group in training_stages(cells):
        if stage in stages and group:
            echo(f"== {stage}: {len(group)} cells")
            summaries.append(run_training_stage(stage, group, options, datasets))
            echo(summaries[-1].line())
    if names.ATTACK in stages and cells.attacks:
        echo(f"== {names.ATTACK}")
        summaries.append(run_attack_stage(cells.attacks, options))
        echo(summaries[-1].line())
    report_dir = None
    if names.REPORT in stages:
        from reports import build_report

        start = time.perf_counter()
        result = build_report(options.experiment)
        report_dir = str(result.out)
        summaries.append(StageSummary(names.REPORT, 1, ran=1, seconds=time.perf_counter() - start))
        echo(summaries[-1].line() + f" → {report_dir}/index.html")
    return GridOutcome(summaries, report_dir)


def run_attack_stage(attack_specs: tuple[Any, ...], options: RunOptions) -> StageSummary:
    """Attack cells in packs, one Tune trial each: a pack's surrogates and targets are loaded once in its process,
    each adversarial set is generated once and scored on every target."""

    from xfer import attack

    planned = attack.plan(options.experiment, list(attack_specs))
    todo = attack.unfinished(options.experiment, planned)
    summary = StageSummary(names.ATTACK, len(planned), cached=len(planned) - len(todo))
    if not todo:
        return summary
    start = time.perf_counter()
    cluster.connect(options.address)
    options = stages.resolved(options)
    # One surrogate's cells side by side: a pack loads each surrogate once.
    todo = sorted(todo, key=lambda c: c.surrogate_run_ids)
    chosen = packs.plan(todo, lambda c: (), stages.pack_size(options), cluster.slots(options.cpus_per_trial,
                                                                                    options.gpus_per_trial or 0.0))
    errors = stages.launch(names.ATTACK, _attack_trial, chosen, [f"attack ×{len(p)}" for p in chosen], options)
    summary.packs = len(chosen)
    left = {c.key for c in attack.unfinished(options.experiment, todo)}
    reasons = {r.key: r.tags.get(names.TAG_FAILURE, "") for r in tracking.query(options.experiment, names.ATTACK, status="FAILED")}
    for index, pack in enumerate(chosen):
        for cell in pack:
            if cell.key not in left:
                summary.ran += 1
                continue
            reason = errors[index] or reasons.get(cell.key) or "not every target was scored"
            summary.failed.append((attack.label(cell), reason))
            tracking.end_stale_runs(options.experiment, cell.key, reason)
    summary.seconds = time.perf_counter() - start
    return summary


def _attack_trial(config: dict[str, Any], packs_: list[tuple[Any, ...]], options: RunOptions) -> None:
    from ray import tune

    from xfer import attack

    stages.set_threads(options)
    failed = attack.run_pack(options.experiment, packs_[config["cell"]["pack"]], data_root=options.data_root)
    tune.report({stages.STATUS: 1.0, "cells_failed": float(len(failed))})
