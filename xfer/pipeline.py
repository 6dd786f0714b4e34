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

from xfer import cluster, data, estimate, grid as grids, names, packs, server, specs, stages, stopping, tracking
from xfer import training_cells, tune_adapter
from xfer.errors import XferError
from xfer.stages import RunOptions, StageSummary

STAGE_ORDER = names.GRID_STAGES


@dataclass(frozen=True)
class GridOutcome:
    summaries: list[StageSummary]
    report_dir: str | None
    seconds: float = 0.0          # the grid's wall time, from its first stage to its report
    stopped: str = ""             # why the grid stopped before its end (Ctrl-C, SIGTERM, a lost tracking server)

    @property
    def failed(self) -> list[tuple[str, str]]:
        return [f for s in self.summaries for f in s.failed]

    @property
    def work_seconds(self) -> float:
        """The cells' own work (training, making adversarial sets, scoring them), summed over this invocation's cells."""
        return sum(s.work_seconds for s in self.summaries)

    @property
    def slots(self) -> int:
        """Trials the grid could run at once (the most any of its stages had)."""
        return max((s.slots for s in self.summaries), default=0)

    @property
    def cells_run(self) -> int:
        return sum(s.ran + len(s.failed) for s in self.summaries if s.stage != names.REPORT)

    def orchestration_per_cell(self) -> float:
        """Seconds of orchestration per cell run: (wall time × trial slots − the cells' own work) / cells."""
        return max(0.0, self.seconds * max(1, self.slots) - self.work_seconds) / max(1, self.cells_run)

    def timing(self) -> str:
        """The wall time, and what of it was not the cells' own work (orchestration), per cell and as a share."""
        if not self.seconds:
            return ""
        if not any(s.ran for s in self.summaries):
            return f"grid: nothing to run, every cell is in MLflow ({self.seconds:.1f} s wall time)"
        slots = max(1, self.slots)
        share = 1 - min(1.0, self.work_seconds / (self.seconds * slots))
        return (f"grid: {self.seconds:.0f} s wall time on {slots} trial slot(s); the cells' own work (training, making "
                f"adversarial sets, scoring them; summed over cells) {self.work_seconds:.0f} s; orchestration "
                f"{self.orchestration_per_cell():.2f} s per cell over {self.cells_run} cells ({share:.0%} of the "
                "slots' time: start-up, data hand-off, MLflow, the report)")


class Prepared(NamedTuple):
    """A validated grid: each stage's cells, and the datasets they read (loaded when a stage first needs them)."""

    cells: grids.Cells
    datasets: Mapping[str, data.Dataset]
    infos: dict[str, data.Info] = {}
    missing: dict[str, str] = {}            # dataset → what is missing of it (dry-run without the data)
    stand_ins: tuple[str, ...] = ()         # --fast-dev-run: the absent datasets synthetic ones stand in for


DATASETS_CACHE = "datasets.json"   # in the runs folder: each dataset's sizes and shape, checked against its files


class Datasets(Mapping[str, data.Dataset]):
    """The grid's datasets, each loaded the first time a stage asks for it: a stage with nothing to do never
    loads one."""

    def __init__(self, wanted: set[str], options: RunOptions, stand_ins: tuple[str, ...] = ()) -> None:
        self._wanted, self._options, self._stand_ins = sorted(wanted), options, stand_ins
        self._loaded: set[str] = set()

    def __getitem__(self, name: str) -> data.Dataset:
        if name not in self._wanted:
            raise KeyError(name)
        if name in self._stand_ins:
            return data.stand_in(name)
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
    folder already knows the datasets' files (`data.info`), no image is loaded. A rehearsal (`Grid.fast_dev_run`)
    runs on synthetic stand-ins of the torchvision sets whose files are absent."""
    grids.validate(grid)
    missing = check_data(grid, options, allow_missing or grid.fast_dev_run)
    stand_ins = tuple(sorted(missing)) if grid.fast_dev_run else ()
    unknown = [name for name in stand_ins if name not in data.PUBLISHED]
    if unknown:
        raise XferError(f"--fast-dev-run stands in for absent torchvision sets only, and {', '.join(unknown)} "
                        f"{'is' if len(unknown) == 1 else 'are'} not one: {'; '.join(missing[n] for n in unknown)}. Place "
                        "the files, or rehearse without it. Nothing was launched.")
    wanted = {*grid.sources, grid.target}
    cache = server.runs_dir() / DATASETS_CACHE
    # The target first: a user's image folder is the likeliest to be refused, and it is refused before a source loads.
    infos = {name: data.info(name, options.data_root, cache, options.skip_bad_images, published=allow_missing,
                             download=options.download, stand_in=name in stand_ins)
             for name in [grid.target, *sorted(wanted - {grid.target})]}
    pools = {name: i.train for name, i in infos.items()}
    grids.check_pools(grid, pools)
    target = infos[grid.target]
    odd = [f"{name} {i.in_shape}" for name, i in infos.items() if name in grid.sources and i.in_shape != target.in_shape]
    if odd:
        raise XferError(f"source(s) {', '.join(odd)} do not share the target {grid.target}'s image shape {target.in_shape}, "
                        "so their models cannot be fine-tuned on it; pick sources of the target's shape (digit and "
                        "character sets are 1×28×28, CIFAR-10 3×32×32, cifar10_gray 1×32×32). Nothing was launched.")
    return Prepared(grids.cells(grid, pools), Datasets(wanted, options, stand_ins), infos,
                    {} if stand_ins else missing, stand_ins)


def stand_in_note(prepared: Prepared) -> str:
    """What a rehearsal on synthetic data says on the terminal and in its report ('' when every set is real)."""
    if not prepared.stand_ins:
        return ""
    return (f"synthetic stand-ins for {', '.join(prepared.stand_ins)} (their files are absent): random images of the "
            "published sizes, shapes and classes. This rehearsal proves the path and measures its cost; its accuracies "
            "and verdicts mean nothing.")


def training_stages(cells: grids.Cells) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    return ((names.PRETRAIN, cells.pretrain), (names.FINETUNE, cells.finetune), (names.SCRATCH, cells.scratch))


def snapshot(options: RunOptions) -> tracking.Snapshot | None:
    """The experiment's runs, listed once for the questions an invocation asks before anything runs (None when
    MLflow holds nothing yet, or everything runs again: --force)."""
    if not server.recorded() or options.force or not tracking.experiment_exists(options.experiment):
        return None
    return tracking.Snapshot.take(options.experiment)


def planned(prepared: Prepared, grid: grids.Grid, options: RunOptions, gpus: int = 0,
            echo: Callable[[str], None] | None = None, listed: tracking.Snapshot | None = None,
            only: tuple[str, ...] = STAGE_ORDER) -> Any:
    """The grid's `plan.Plan`: per stage its cells, what MLflow holds, packs and estimated wall time on this
    machine (and on `gpus` GPUs); the stages not in `only` (--stages) marked skipped, out of the totals. Starts no
    Ray; reads MLflow only where it may hold runs, once (`snapshot`, or `listed` when the caller has one)."""
    import os

    from xfer import plan

    listed = listed or snapshot(options)
    finished = (lambda stage: set(listed.finished_by_key(stage))) if listed else (lambda stage: set())
    gpu_share = options.gpus_per_trial or cluster.GPU_SHARE
    slots = max(1, int((os.cpu_count() or 1) // max(options.cpus_per_trial, 1e-3)))
    size = (lambda on_gpu: options.pack_size or packs.PACK_SIZE["cuda" if on_gpu else "cpu"])
    cells, note = estimate.planned(grid, prepared.cells, listed.query(names.ESTIMATE) if listed else None)
    return plan.plan(grid, cells, prepared.infos, finished, prepared.missing, size, slots,
                     options.cpus_per_trial, gpus, gpu_share, echo,
                     attack_cells=(lambda: _attack_counts(cells, grid, options, listed)) if listed else None,
                     report_made=bool(listed) and _report_made(options.experiment, listed), only=only,
                     notes={names.FINETUNE: note} if note else {})


def _attack_counts(cells: grids.Cells, grid: grids.Grid, options: RunOptions,
                   listed: tracking.Snapshot | None = None) -> tuple[int, int]:
    """The attack stage's cells and those still to run, from MLflow (once every training cell is there)."""
    _, state = _attack_state(cells.attacks, options, _training_keys(cells), grid.attack_surrogates, listed=listed)
    return len(state.cells), len(state.unfinished)


def _training_keys(cells: grids.Cells) -> set[str]:
    """The keys of the grid's training cells: the models its attack stage attacks."""
    return {specs.key(c) for _, group in training_stages(cells) for c in group}


def _attack_state(attack_specs: tuple[Any, ...], options: RunOptions, keys: set[str] | None,
                  surrogate_stages: tuple[str, ...], since: float | None = None,
                  listed: tracking.Snapshot | None = None) -> tuple[dict[str, Any], Any]:
    """The experiment's training runs, and the attack stage's cells as MLflow's training runs make them with what
    each still needs (`scores.Pending`); from `listed` when given."""
    from xfer import attack_sets, scores

    runs = attack_sets.training_runs(options.experiment, listed)
    planned = attack_sets.plan(options.experiment, list(attack_specs), keys=keys, surrogate_stages=surrogate_stages, runs=runs)
    records = listed.query(names.ATTACK) if listed is not None else None
    return runs, scores.pending(options.experiment, planned, since, records)


def _report_made(experiment: str, listed: tracking.Snapshot) -> bool:
    from reports.build import is_made
    from reports.tables import inputs

    return is_made(experiment, records=inputs(experiment, listed))


def dry_run(grid: grids.Grid, options: RunOptions, echo: Callable[[str], None] = print,
            prepared: Prepared | None = None, gpus: int = 0, only: tuple[str, ...] = STAGE_ORDER) -> None:
    """The plan and its cost (of the stages in `only`), and the cells still to run; runs nothing (no Ray, no trial;
    the data may be absent)."""
    prepared = prepared or prepare(grid, options, allow_missing=True)
    echo(f"plan for grid {options.experiment!r} (nothing runs: --dry-run)")
    if stand_in_note(prepared):
        echo(stand_in_note(prepared))
    listed = snapshot(options)
    for line in planned(prepared, grid, options, gpus, echo, listed, only).lines():
        echo(line)
    cells, _ = estimate.planned(grid, prepared.cells, listed.query(names.ESTIMATE) if listed else None)
    for stage, group in training_stages(cells):
        if stage not in only:
            continue
        todo, _ = stages.pending(options.experiment, group, options.force, stage, listed) if listed else (list(group), 0)
        for spec in todo[:10]:
            echo(f"  {stage}: {training_cells.label(spec)}  key={specs.key(spec)}")
        if len(todo) > 10:
            echo(f"  {stage}: … and {len(todo) - 10} more")


def run_grid(grid: grids.Grid, options: RunOptions, only: tuple[str, ...] = STAGE_ORDER,
             echo: Callable[[str], None] = print, prepared: Prepared | None = None, view: Any = None,
             listed: tracking.Snapshot | None = None) -> GridOutcome:
    """Every stage (of `only`) in order, under one MLflow run of this invocation (its stages' runs are its children).

    `listed` (`snapshot`, taken before the invocation's first stage) answers what is finished until a stage runs
    something; from then on each stage asks MLflow."""
    prepared = prepared or prepare(grid, options)
    cells, datasets = prepared.cells, prepared.datasets
    summaries: list[StageSummary] = []
    started = time.perf_counter()
    tracking.log_grid(options.experiment, grids.describe(grid))
    tracking.set_experiment_tags(options.experiment, {names.TAG_STAND_INS: ",".join(prepared.stand_ins)})
    stop = stopping.current()   # the invocation's, when its command stops cleanly on Ctrl-C / SIGTERM
    with tracking.start_run(options.experiment, names.GRID, "", run_name=f"grid {time.strftime('%Y-%m-%d %H:%M:%S')}",
                            tags={names.TAG_GRID_STAGE: "all"}, sigterm=stop is None) as grid_run:
        options = dataclasses.replace(options, grid_run_id=grid_run.run_id)
        if stop is not None:
            stop.grid_run_id = grid_run.run_id   # trials find the stop flag by this grid run's id
        def fresh() -> tracking.Snapshot | None:   # the listing, while nothing has run since it was taken
            return None if any(s.ran or s.failed or s.stopped for s in summaries) else listed

        stopped = stopping.grid_stopping   # a stopping grid runs no further stage (and no report)

        for stage, group in training_stages(cells):
            if stage == names.FINETUNE:   # between pretraining and fine-tuning: the estimates, and what they prune
                if names.ESTIMATE in only and cells.estimates and not stopped():
                    summaries.append(estimate.run_stage(cells.estimates, options, datasets, view, fresh()))
                    echo(summaries[-1].line())
                if names.FINETUNE in only and not stopped():
                    cells = pruned(grid, cells, options.experiment, echo)
                    group = cells.finetune
            if stage in only and group and not stopped():
                summaries.append(stages.run_training_stage(stage, group, options, datasets, view, fresh()))
                echo(summaries[-1].line())
        adder_cells = grids.adder_cells(grid)
        if names.ADDER in only and adder_cells and not stopped():
            from xfer import adder

            for summary in adder.run_stage(adder_cells, options, datasets, view):
                summaries.append(summary)
                echo(summary.line())
        if names.ATTACK in only and cells.attacks and not stopped():
            summaries.append(run_attack_stage(cells.attacks, options, view, _training_keys(cells), grid.attack_surrogates,
                                              datasets, fresh()))
            echo(summaries[-1].line())
        report_dir = None
        if names.REPORT in only and not stopped():
            from reports import build_report
            from reports.tables import inputs

            start = time.perf_counter()
            result = build_report(options.experiment, parent_run_id=grid_run.run_id, reuse=not options.force,
                                  records=inputs(options.experiment, fresh()) if fresh() else None)
            report_dir = str(result.out)
            summaries.append(StageSummary(names.REPORT, 1, ran=int(not result.cached), cached=int(result.cached),
                                          seconds=time.perf_counter() - start))
            grid_run.set_tags({names.TAG_REPORT_DIR: report_dir})
            echo(summaries[-1].line() + f" → {report_dir}/index.html")
        skipped = datasets.skipped() if isinstance(datasets, Datasets) else {}
        if skipped:
            _record_skipped(grid_run, skipped, echo)
        outcome = GridOutcome(summaries, report_dir, time.perf_counter() - started, stop.reason if stopped() else "")
        grid_run.log_metrics({"seconds": outcome.seconds, "work_seconds": outcome.work_seconds,
                              "failed": float(len(outcome.failed))})
        if stopped():
            grid_run.stop(f"stopped: {stop.reason}")
        elif not any(s.ran or s.failed for s in summaries):
            _nest_a_rerun_that_did_nothing(grid_run, options.experiment, listed)
    return outcome


def pruned(grid: grids.Grid, cells: grids.Cells, experiment: str, echo: Callable[[str], None] = print) -> grids.Cells:
    """The cells the fine-tune stage runs under --prune-sources (`estimate.rank`, from the estimate runs in MLflow),
    said on the terminal and kept as the experiment tag names.TAG_PRUNED for the report ("" when nothing is pruned)."""
    previous = tracking.experiment_tags(experiment).get(names.TAG_PRUNED, "")
    if not estimate.applies(grid):
        if previous:
            tracking.set_experiment_tags(experiment, {names.TAG_PRUNED: ""})
        return cells
    pruning = estimate.rank(grid, cells, tracking.query(experiment, names.ESTIMATE))
    if pruning.tag() != previous:
        tracking.set_experiment_tags(experiment, {names.TAG_PRUNED: pruning.tag()})
    for line in pruning.lines():
        echo(line)
    return estimate.prune(cells, pruning)


def _nest_a_rerun_that_did_nothing(grid_run: tracking.Run, experiment: str, listed: tracking.Snapshot | None) -> None:
    """An invocation that ran nothing is recorded as a child of the grid's last top-level run, so that reruns of a
    finished grid do not add an empty top-level run each to the MLflow UI."""
    runs = listed.query(names.GRID, status=None) if listed else tracking.query(experiment, names.GRID, status=None)
    earlier = [r for r in runs if r.run_id != grid_run.run_id and r.tags.get(names.TAG_GRID_STAGE) == "all"
               and "mlflow.parentRunId" not in r.tags]
    if earlier:
        tracking.nest_under(grid_run, earlier[-1].run_id, f"grid {time.strftime('%Y-%m-%d %H:%M:%S')} (nothing to do)")


def _record_skipped(run: tracking.Run, skipped: dict[str, tuple[str, ...]], echo: Callable[[str], None]) -> None:
    """Unreadable images left out by --skip-bad-images: named on the terminal and kept in the grid's run."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="xfer-skipped-") as tmp:
        path = Path(tmp) / "skipped_images.txt"
        path.write_text("".join(f"{name}\t{file}\n" for name, files in skipped.items() for file in files))
        run.log_artifact(path)
    run.set_tags({names.TAG_SKIPPED_IMAGES: str(sum(map(len, skipped.values())))})
    for name, files in skipped.items():
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        echo(f"skipped {len(files)} unreadable image(s) of {name} (--skip-bad-images): {shown}; the full list is "
             f"skipped_images.txt in the grid's MLflow run {run.run_id}")


def run_attack_stage(attack_specs: tuple[Any, ...], options: RunOptions, view: Any = None,
                     keys: set[str] | None = None,
                     surrogate_stages: tuple[str, ...] = (names.PRETRAIN, names.SCRATCH, "self"),
                     datasets: Mapping[str, data.Dataset] | None = None,
                     listed: tracking.Snapshot | None = None) -> StageSummary:
    """The attack stage on Ray Tune (`scores.run`'s flow): the missing adversarial sets first, in packs of one
    surrogate's cells (each surrogate loaded once per pack), then the scoring, in packs of targets of one arch (each
    target loaded once, every set streamed through it), each pack's rows one Parquet part on the stage's run.
    `keys`: the grid's training cells (the models attacked); `surrogate_stages`: whose examples are scored on every
    target (`Grid.attack_surrogates`); `datasets`: the attacked task's data, handed to the packs through Ray's object
    store (loaded here when not given); `listed`: the experiment's runs when nothing has run since they were listed."""
    from xfer import attack_sets, scores

    since = stages.invocation_start(options)   # forced: only sets made by this invocation count
    runs, state = _attack_state(attack_specs, options, keys, surrogate_stages, since, listed)
    planned = state.cells
    summary = StageSummary(names.ATTACK, len(planned), cached=len(planned) - len(state.unfinished))
    if not state.unfinished:
        if state.untagged and state.table is not None:   # scored, but a stopped stage never said so on the set runs
            scores.summarise(state, state.table)
        return summary
    with stages.launched(names.ATTACK, summary, options) as stage_:
        options, slots = stage_.options, stage_.slots
        per_pack = ATTACK_PACK_FACTOR * stages.pack_size(options)

        def make(todo: list[Any]) -> dict[str, str]:
            wanted = {c.spec.attack.dataset for c in todo}
            loaded = datasets if datasets is not None else stages.load_datasets(wanted, options)
            refs = {name: stage_.ray.put(loaded[name]) for name in wanted}
            # One surrogate's cells side by side: a pack loads each surrogate once.
            chosen = packs.plan(sorted(todo, key=lambda c: c.surrogate_run_ids), lambda c: (), per_pack, slots)
            summary.packs += len(chosen)
            ended = tune_adapter.launch(names.ATTACK, _sets_trial, chosen, [f"adversarial sets ×{len(p)}" for p in chosen],
                                  stages.widened(options, len(chosen)), view, refs=refs, runs=runs,
                                  parent_run_id=stage_.run.run_id)
            return tune_adapter.member_failures(chosen, ended, key=lambda c: c.key)

        def score(work: list[Any], facts: dict[str, Any]) -> list[Any]:
            chosen = packs.plan(work, lambda j: (j.arch, j.target.in_shape), per_pack, slots)
            summary.packs += len(chosen)
            ended = tune_adapter.launch("scoring", _score_trial, chosen,
                                  [f"scoring {p[0].arch} ×{len(p)} targets" for p in chosen],
                                  stages.widened(options, len(chosen)), view, sets=facts,
                                  parent_run_id=stage_.run.run_id)
            failed = tune_adapter.member_failures(chosen, ended, key=lambda j: j.target.run_id)
            return [scores.Scored(int(last.get("pairs", 0)), float(last.get("work_seconds", 0.0)),
                                  str(last.get("mode", "")), str(last.get("why", "")),
                                  {j.target.run_id: failed[j.target.run_id] for j in pack if j.target.run_id in failed})
                    for pack, (_, last) in zip(chosen, ended)]

        result = scores.run(options.experiment, planned, runs, make, score, since, state,
                            stopping=stopping.grid_stopping)
        summary.work_seconds = result.work_seconds
        summary.stopped = len(result.stopped)
        summary.modes = {f"scoring {mode}": why for mode, why in result.modes.items()}
        summary.note = (f"{result.made} set(s) made, {result.pairs:,} (set, target) score(s) on {result.targets} "
                        "target(s) in one table")
        labels = {c.key: attack_sets.label(c) for c in planned}
        for key, reason in result.failed.items():
            summary.failed.append((labels.get(key, key), reason))
            tracking.end_stale_runs(options.experiment, key, reason)
        summary.ran = len(state.unfinished) - len(result.failed) - len(result.stopped)
        stage_.run.log_metrics({"pairs_scored": float(result.pairs)})
    return summary


ATTACK_PACK_FACTOR = 8   # an attack pack holds 8× a training pack's cells: a set or a target is cheap beside training


def _sets_trial(config: dict[str, Any], stage_packs: list[tuple[Any, ...]], options: RunOptions, refs: dict[str, Any],
                runs: dict[str, Any], parent_run_id: str | None) -> None:
    """One pack of adversarial sets: the attacked data from the object store, each surrogate loaded once."""
    import ray

    from xfer import attack_sets

    progress = tune_adapter.progress()
    with tune_adapter.pack_trial(config, stage_packs, options) as pack:
        context = attack_sets.AttackContext(options.experiment, {name: ray.get(ref) for name, ref in refs.items()},
                                 parent_run_id=parent_run_id, runs=runs)
        failed = attack_sets.make_sets(options.experiment, pack, context=context,
                                  progress=lambda m: progress.ended(m["cell"], m["reason"], m))
    progress.flush(tune_adapter.last_report(failed))


def _score_trial(config: dict[str, Any], stage_packs: list[tuple[Any, ...]], options: RunOptions, sets: dict[str, Any],
                 parent_run_id: str | None) -> None:
    """One pack of targets scored on their sets; its rows go to the stage run as Parquet parts."""
    from xfer import scores

    progress = tune_adapter.progress()
    with tune_adapter.pack_trial(config, stage_packs, options) as pack:
        done = scores.score_pack(pack, sets, parent_run_id, block=stages.pack_size(options),
                                 progress=lambda m: progress.ended(m["cell"], m["reason"], m))
    progress.flush(tune_adapter.last_report(done.failed, pairs=float(done.pairs), work_seconds=done.seconds, mode=done.mode,
                                      why=done.why))
