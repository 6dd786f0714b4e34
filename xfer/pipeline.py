"""The whole DAG of a grid: pretrain → fine-tune / scratch → attack → report, each stage one Tune run of packs.

Each stage reads what earlier stages produced only through MLflow, so any stage can be re-run or resumed on its
own; finished cells are found by key and skipped, and a stage with nothing left starts no Ray and no trial.
`prepare` refuses bad input before anything starts (no MLflow server, no Ray).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from xfer import cluster, data, grid as grids, names, packs, server, specs, stages, tracking
from xfer.errors import XferError
from xfer.stages import RunOptions, StageSummary

STAGE_ORDER = (names.PRETRAIN, names.FINETUNE, names.SCRATCH, names.ADDER, names.ATTACK, names.REPORT)


@dataclass(frozen=True)
class GridOutcome:
    summaries: list[StageSummary]
    report_dir: str | None
    seconds: float = 0.0          # the grid's wall time, from its first stage to its report

    @property
    def failed(self) -> list[tuple[str, str]]:
        return [f for s in self.summaries for f in s.failed]

    @property
    def work_seconds(self) -> float:
        """The cells' own work (training, making adversarial sets), summed over the cells this invocation ran."""
        return sum(s.work_seconds for s in self.summaries)

    def timing(self) -> str:
        """The wall time, and the share of it not spent in the cells' own work (orchestration)."""
        if not self.seconds:
            return ""
        if not any(s.ran for s in self.summaries):
            return f"grid: nothing to run, every cell is in MLflow ({self.seconds:.1f} s wall time)"
        head = (f"grid: {self.seconds:.0f} s wall time; the cells' own work (training, making adversarial sets; "
                f"summed over cells) {self.work_seconds:.0f} s")
        if self.work_seconds >= self.seconds:
            return head + ": trials ran side by side, so the share spent on orchestration cannot be read off"
        share = 1 - self.work_seconds / self.seconds
        return head + f": {share:.0%} orchestration (start-up, data hand-off, MLflow, scoring targets, the report)"


class Prepared(NamedTuple):
    """A validated grid: each stage's cells, and the datasets they read (loaded when a stage first needs them)."""

    cells: grids.Cells
    datasets: Mapping[str, data.Dataset]
    infos: dict[str, data.Info] = {}
    missing: dict[str, str] = {}            # dataset → what is missing of it (dry-run without the data)


DATASETS_CACHE = "datasets.json"   # in the runs folder: each dataset's sizes and shape, checked against its files


class Datasets(Mapping[str, data.Dataset]):
    """The grid's datasets, each loaded the first time a stage asks for it: a stage with nothing to do never
    loads one."""

    def __init__(self, wanted: set[str], options: RunOptions) -> None:
        self._wanted, self._options = sorted(wanted), options
        self._loaded: set[str] = set()

    def __getitem__(self, name: str) -> data.Dataset:
        if name not in self._wanted:
            raise KeyError(name)
        o = self._options
        self._loaded.add(name)
        return data.load(name, o.data_root, o.download, o.skip_bad_images)

    def skipped(self) -> dict[str, tuple[str, ...]]:
        """The unreadable images left out (`--skip-bad-images`) of the datasets loaded so far, by dataset."""
        return {name: self[name].skipped for name in sorted(self._loaded) if getattr(self[name], "skipped", ())}

    def __iter__(self) -> Iterator[str]:
        return iter(self._wanted)

    def __len__(self) -> int:
        return len(self._wanted)


def check_data(grid: grids.Grid, options: RunOptions, allow_missing: bool = False) -> dict[str, str]:
    """What is missing of the grid's datasets (name → the expected files and folder); refused, before anything
    starts, unless `allow_missing` (a dry run plans with the published sizes) or `--download`."""
    wanted = sorted({*grid.sources, grid.target})
    missing = {} if options.download else {n: d for n in wanted if (d := data.describe_missing(n, options.data_root))}
    if missing and not allow_missing:
        raise XferError(
            f"the grid needs dataset(s) {', '.join(missing)}, which are not under {data.data_root(options.data_root)}: "
            + "; ".join(missing.values()) + ". Run once with --download on a machine with network access, place "
            "torchvision's files there (--data-root or XFER_DATA), or run the offline preset: "
            "python sweeps/full_grid.py --preset smoke. Nothing was launched."
        )
    return missing


def prepare(grid: grids.Grid, options: RunOptions, allow_missing: bool = False) -> Prepared:
    """Validate the grid against its data and expand it into cells; nothing is started and, when the runs
    folder already knows the datasets' files (`data.info`), no image is loaded."""
    grids.validate(grid)
    missing = check_data(grid, options, allow_missing)
    wanted = {*grid.sources, grid.target}
    cache = server.runs_dir() / DATASETS_CACHE
    # The target first: a user's image folder is the likeliest to be refused, and it is refused before a source loads.
    infos = {name: data.info(name, options.data_root, cache, options.skip_bad_images, published=allow_missing,
                             download=options.download) for name in [grid.target, *sorted(wanted - {grid.target})]}
    pools = {name: i.train for name, i in infos.items()}
    grids.check_pools(grid, pools)
    target = infos[grid.target]
    odd = [f"{name} {i.in_shape}" for name, i in infos.items() if name in grid.sources and i.in_shape != target.in_shape]
    if odd:
        raise XferError(f"source(s) {', '.join(odd)} do not share the target {grid.target}'s image shape {target.in_shape}, "
                        "so their models cannot be fine-tuned on it; pick sources of the target's shape (digit and "
                        "character sets are 1×28×28, CIFAR-10 3×32×32, cifar10_gray 1×32×32). Nothing was launched.")
    return Prepared(grids.cells(grid, pools), Datasets(wanted, options), infos, missing)


def training_stages(cells: grids.Cells) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    return ((names.PRETRAIN, cells.pretrain), (names.FINETUNE, cells.finetune), (names.SCRATCH, cells.scratch))


def planned(prepared: Prepared, grid: grids.Grid, options: RunOptions, gpus: int = 0,
            echo: Callable[[str], None] | None = None) -> Any:
    """The grid's `plan.Plan`: per stage its cells, what MLflow holds, packs and estimated wall time on this
    machine (and on `gpus` GPUs). Starts no Ray; looks MLflow up only where it may hold runs."""
    import os

    from xfer import plan

    recorded = server.recorded() and not options.force
    finished = (lambda stage: set(tracking.finished_by_key(options.experiment, stage))) if recorded \
        else (lambda stage: set())
    gpu_share = options.gpus_per_trial or cluster.GPU_SHARE
    slots = max(1, int((os.cpu_count() or 1) // max(options.cpus_per_trial, 1e-3)))
    size = (lambda on_gpu: options.pack_size or packs.PACK_SIZE["cuda" if on_gpu else "cpu"])
    return plan.plan(grid, prepared.cells, prepared.infos, finished, prepared.missing, size, slots,
                     options.cpus_per_trial, gpus, gpu_share, echo,
                     attack_cells=(lambda: _attack_counts(prepared.cells, grid, options)) if recorded else None,
                     report_made=recorded and _report_made(options.experiment))


def _attack_counts(cells: grids.Cells, grid: grids.Grid, options: RunOptions) -> tuple[int, int]:
    """The attack stage's cells and those still to run, from MLflow (once every training cell is there)."""
    planned, todo = _attack_cells(cells.attacks, options, _training_keys(cells), grid.attack_surrogates)
    return len(planned), len(todo)


def _training_keys(cells: grids.Cells) -> set[str]:
    """The keys of the grid's training cells: the models its attack stage attacks."""
    return {specs.key(c) for _, group in training_stages(cells) for c in group}


def _attack_cells(attack_specs: tuple[Any, ...], options: RunOptions, keys: set[str] | None,
                  surrogate_stages: tuple[str, ...]) -> tuple[list[Any], list[Any]]:
    """The attack stage's cells as MLflow's training runs make them, and those with work left."""
    from xfer import attack

    planned = attack.plan(options.experiment, list(attack_specs), keys=keys, surrogate_stages=surrogate_stages)
    return planned, attack.unfinished(options.experiment, planned)


def _report_made(experiment: str) -> bool:
    from reports.build import is_made

    return tracking.experiment_exists(experiment) and is_made(experiment)


def dry_run(grid: grids.Grid, options: RunOptions, echo: Callable[[str], None] = print,
            prepared: Prepared | None = None, gpus: int = 0) -> None:
    """The plan and its cost, and the cells still to run; runs nothing (no Ray, no trial; the data may be absent)."""
    prepared = prepared or prepare(grid, options, allow_missing=True)
    echo(f"plan for grid {options.experiment!r} (nothing runs: --dry-run)")
    for line in planned(prepared, grid, options, gpus, echo).lines():
        echo(line)
    for stage, group in training_stages(prepared.cells):
        todo, _ = stages.pending(options.experiment, group, options.force, stage) if server.recorded() else (list(group), 0)
        for spec in todo[:10]:
            echo(f"  {stage}: {stages.label(spec)}  key={specs.key(spec)}")
        if len(todo) > 10:
            echo(f"  {stage}: … and {len(todo) - 10} more")


def run_grid(grid: grids.Grid, options: RunOptions, only: tuple[str, ...] = STAGE_ORDER,
             echo: Callable[[str], None] = print, prepared: Prepared | None = None, view: Any = None) -> GridOutcome:
    """Every stage (of `only`) in order, under one MLflow run of this invocation (its stages' runs are its children)."""
    prepared = prepared or prepare(grid, options)
    cells, datasets = prepared.cells, prepared.datasets
    summaries: list[StageSummary] = []
    started = time.perf_counter()
    tracking.log_grid(options.experiment, grids.describe(grid))
    with tracking.start_run(options.experiment, names.GRID, "", run_name=f"grid {time.strftime('%Y-%m-%d %H:%M:%S')}",
                            tags={names.TAG_GRID_STAGE: "all"}) as grid_run:
        options = dataclasses.replace(options, grid_run_id=grid_run.run_id)
        for stage, group in training_stages(cells):
            if stage in only and group:
                summaries.append(stages.run_training_stage(stage, group, options, datasets, view))
                echo(summaries[-1].line())
        adder_cells = grids.adder_cells(grid)
        if names.ADDER in only and adder_cells:
            from xfer import adder

            for summary in adder.run_stage(adder_cells, options, datasets, view):
                summaries.append(summary)
                echo(summary.line())
        if names.ATTACK in only and cells.attacks:
            summaries.append(run_attack_stage(cells.attacks, options, view, _training_keys(cells), grid.attack_surrogates))
            echo(summaries[-1].line())
        report_dir = None
        if names.REPORT in only:
            from reports import build_report

            start = time.perf_counter()
            result = build_report(options.experiment, parent_run_id=grid_run.run_id, reuse=not options.force)
            report_dir = str(result.out)
            summaries.append(StageSummary(names.REPORT, 1, ran=int(not result.cached), cached=int(result.cached),
                                          seconds=time.perf_counter() - start))
            grid_run.set_tags({"xfer.report_dir": report_dir})
            echo(summaries[-1].line() + f" → {report_dir}/index.html")
        skipped = datasets.skipped() if isinstance(datasets, Datasets) else {}
        if skipped:
            _record_skipped(grid_run, skipped, echo)
        outcome = GridOutcome(summaries, report_dir, time.perf_counter() - started)
        grid_run.log_metrics({"seconds": outcome.seconds, "work_seconds": outcome.work_seconds,
                              "failed": float(len(outcome.failed))})
    return outcome


def _record_skipped(run: tracking.Run, skipped: dict[str, tuple[str, ...]], echo: Callable[[str], None]) -> None:
    """Unreadable images left out by --skip-bad-images: named on the terminal and kept in the grid's run."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="xfer-skipped-") as tmp:
        path = Path(tmp) / "skipped_images.txt"
        path.write_text("".join(f"{name}\t{file}\n" for name, files in skipped.items() for file in files))
        run.log_artifact(path)
    run.set_tags({"xfer.skipped_images": str(sum(map(len, skipped.values())))})
    for name, files in skipped.items():
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        echo(f"skipped {len(files)} unreadable image(s) of {name} (--skip-bad-images): {shown}; the full list is "
             f"skipped_images.txt in the grid's MLflow run {run.run_id}")


def run_attack_stage(attack_specs: tuple[Any, ...], options: RunOptions, view: Any = None,
                     keys: set[str] | None = None,
                     surrogate_stages: tuple[str, ...] = (names.PRETRAIN, names.SCRATCH, "self")) -> StageSummary:
    """Attack cells in packs, one Tune trial each: a pack's surrogates and targets are loaded once in its process,
    each adversarial set is generated once and scored on every target. `keys`: the grid's training cells (the
    models attacked); `surrogate_stages`: whose examples are scored on every target (`Grid.attack_surrogates`)."""
    from xfer import attack

    planned, todo = _attack_cells(attack_specs, options, keys, surrogate_stages)
    summary = StageSummary(names.ATTACK, len(planned), cached=len(planned) - len(todo))
    if not todo:
        return summary
    start = time.perf_counter()
    cluster.connect(options.address, options.log_file)
    options = stages.resolved(options)
    # One surrogate's cells side by side: a pack loads each surrogate once.
    todo = sorted(todo, key=lambda c: c.surrogate_run_ids)
    slots = cluster.slots(options.cpus_per_trial, options.gpus_per_trial or 0.0)
    chosen = packs.plan(todo, lambda c: (), stages.pack_size(options), slots)
    with stages.stage_run(names.ATTACK, options) as parent:
        ended = stages.launch(names.ATTACK, _attack_trial, chosen, [f"attack ×{len(p)}" for p in chosen], options, view,
                              parent_run_id=parent.run_id)
        summary.packs = len(chosen)
        after = attack.Context(options.experiment)   # one search of the attack runs, as they stand now
        finished, left = after.done, {c.key for c in attack.unfinished(options.experiment, todo, after)}
        reasons = {r.key: r.tags.get(names.TAG_FAILURE, "")
                   for r in tracking.query(options.experiment, names.ATTACK, status="FAILED")}
        for index, pack in enumerate(chosen):
            for cell in pack:
                if cell.key not in left:
                    summary.ran += 1
                    summary.work_seconds += finished[cell.key].metrics.get(names.SECONDS, 0.0) if cell.key in finished else 0.0
                    continue
                reason = ended[index][0] or reasons.get(cell.key) or "not every target was scored"
                summary.failed.append((attack.label(cell), reason))
                tracking.end_stale_runs(options.experiment, cell.key, reason)
        summary.seconds = time.perf_counter() - start
        parent.log_metrics(summary.metrics())
    return summary


def _attack_trial(config: dict[str, Any], packs_: list[tuple[Any, ...]], options: RunOptions,
                  parent_run_id: str | None) -> None:
    from ray import tune

    from xfer import attack

    stages.set_threads(options)
    failed = attack.run_pack(options.experiment, packs_[config["cell"]["pack"]], data_root=options.data_root,
                             parent_run_id=parent_run_id, progress=lambda metrics: tune.report(metrics))
    tune.report({stages.STATUS: 1.0, "cells_failed": float(len(failed))})
