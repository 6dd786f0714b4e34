"""The whole DAG of a grid: pretrain → fine-tune / scratch → attack → report, each stage one Tune run.

Each stage reads what earlier stages produced only through MLflow, so any stage can be re-run or
resumed on its own; finished cells are found by key and skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xfer import data, grid as grids, names, specs, tracking
from xfer.errors import XferError
from xfer.stages import (RunOptions, StageSummary, failure_reason, load_datasets, pending, run_cells,
                         run_training_stage)

STAGE_ORDER = (names.PRETRAIN, names.FINETUNE, names.SCRATCH, names.ATTACK, names.REPORT)


@dataclass(frozen=True)
class GridOutcome:
    summaries: list[StageSummary]
    report_dir: str | None

    @property
    def failed(self) -> list[tuple[str, str]]:
        return [f for s in self.summaries for f in s.failed]


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


def prepare(grid: grids.Grid, options: RunOptions) -> tuple[grids.Cells, dict[str, data.Dataset]]:
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
    return grids.cells(grid, pools), datasets


def dry_run(grid: grids.Grid, options: RunOptions, echo: Callable[[str], None] = print) -> None:
    """Print each stage's cells and how many are already finished in MLflow; run nothing."""
    cells, _ = prepare(grid, options)
    for stage, group in ((names.PRETRAIN, cells.pretrain), (names.FINETUNE, cells.finetune), (names.SCRATCH, cells.scratch)):
        todo, cached = pending(options.experiment, group, options.force)
        echo(f"{stage}: {len(group)} cells, {cached} finished in MLflow, {len(todo)} to run")
        for spec in todo[:50]:
            echo(f"  {_label(spec)}  key={specs.key(spec)}")
        if len(todo) > 50:
            echo(f"  … and {len(todo) - 50} more")
    echo(f"attack: {len(cells.attacks)} attack setting(s) × the surrogates found in MLflow once training has run: "
         + ", ".join(f"{a.attack}(eps={a.eps})" for a in cells.attacks))


def run_grid(grid: grids.Grid, options: RunOptions, stages: tuple[str, ...] = STAGE_ORDER,
             echo: Callable[[str], None] = print) -> GridOutcome:
    cells, datasets = prepare(grid, options)
    summaries: list[StageSummary] = []
    tracking.log_grid(options.experiment, grids.describe(grid))
    for stage, group in ((names.PRETRAIN, cells.pretrain), (names.FINETUNE, cells.finetune), (names.SCRATCH, cells.scratch)):
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
    """One Tune trial per (surrogate, attack setting): examples generated once, every target evaluated."""
    from xfer import attack

    planned = attack.plan(options.experiment, list(attack_specs))
    todo = [c for c in planned if options.force or tracking.find_finished(options.experiment, specs.key(c.spec)) is None]
    summary = StageSummary(names.ATTACK, len(planned), cached=len(planned) - len(todo))
    if not todo:
        return summary
    start = time.perf_counter()
    by_index = dict(enumerate(todo))

    def trial(config: dict[str, Any]) -> None:
        from ray import tune

        cell = by_index[config["cell"]["index"]]
        attack.run_cell(options.experiment, cell, data_root=options.data_root)
        tune.report({"done": 1.0})

    results = run_cells(names.ATTACK, [{"index": i} for i in by_index], trial, options)
    for result in results:
        reason = failure_reason(result)
        if reason:
            cell = by_index[result.config["cell"]["index"]]
            summary.failed.append((f"attack:{cell.spec.attack.attack}/eps={cell.spec.attack.eps}/surrogate={cell.spec.surrogate_key}",
                                   reason))
            tracking.end_stale_runs(options.experiment, specs.key(cell.spec), "the attack trial crashed")
        else:
            summary.ran += 1
    summary.seconds = time.perf_counter() - start
    return summary


def _label(spec: Any) -> str:
    from xfer.stages import label

    return label(spec)
