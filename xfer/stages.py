"""The stage runner: a stage's cells → packs → one Ray Tune run → one MLflow run per cell, finished cells skipped.

`run_stage` is the one path from cells to Tune and back: it asks MLflow once which cells are finished, starts
Ray only when something is left, plans packs (`xfer.packs`), launches a trial per pack (`xfer.tune_adapter`) and turns
the trials' results into a `StageSummary` (`summarise`). `launched` is the frame every stage with work runs in
(training here, estimates in `xfer.estimate`, attacks in `xfer.pipeline`): Ray joined, the stage's MLflow run,
its time and metrics. What a training cell is lives in `xfer.training_cells`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from xfer import cluster, data, names, packs, specs, stopping, tracking, tune_adapter
from xfer.training_cells import TRAINING, TrainingCell
from xfer.tune_adapter import STATUS


@dataclass(frozen=True)
class RunOptions:
    """How cells run: where they log, what each trial may use, how failures are retried."""

    experiment: str
    data_root: str | None = None
    download: bool = False
    skip_bad_images: bool = False        # image folders: leave unreadable files out (listed) instead of stopping
    address: str | None = None           # Ray: joined lazily, once a stage has work (None: $RAY_ADDRESS, else local)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # fractional: several packs share one GPU; None: cluster.gpus_per_trial
    workers_per_trial: int = 1           # > 1: each trial is a Ray Train TorchTrainer (gloo on CPU, nccl on GPU)
    max_failures: int = 2                # Tune retries a crashed trial, each cell resuming from its last epoch state
    storage_path: str | None = None      # Ray's storage (shared s3:// or NFS on a cluster); default <runs>/ray
    force: bool = False                  # re-run cells that already finished
    pack_size: int | None = None         # cells per trial; None: packs.PACK_SIZE for the trials' device
    checkpoint_interval_s: float = packs.CHECKPOINT_INTERVAL_S
    vectorise: str = "auto"              # a pack's cells as one batched model: auto (where faster) | always | never
    verbose: bool = False                # Tune's own tables and Ray's messages on the terminal too
    log_file: str | None = None          # where Ray's start-up and worker output go when not verbose
    grid_run_id: str | None = None       # the grid invocation's MLflow run: each stage's run is its child


@dataclass
class StageSummary:
    stage: str
    cells: int
    cached: int = 0
    ran: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)   # (cell, reason)
    seconds: float = 0.0
    packs: int = 0
    resumed: int = 0     # of the cells run: those that resumed from an epoch state after their trial crashed
    stopped: int = 0     # its grid stopped: cells saved resumable, or never started (the rerun goes on with them)
    work_seconds: float = 0.0   # the cells' own work (their runs' `seconds`: training, or making adversarial sets)
    modes: dict[str, str] = field(default_factory=dict)   # how packs trained (packed_sequential / _vectorised) → why
    note: str = ""              # what else the stage did, in words (the attack stage: sets made, scores)
    slots: int = 0              # trials it could run at once (0: it launched none)

    def metrics(self) -> dict[str, float]:
        return {"cells": float(self.cells), "cached": float(self.cached), "ran": float(self.ran),
                "failed": float(len(self.failed)), "stopped": float(self.stopped), "packs": float(self.packs),
                "seconds": self.seconds,
                "work_seconds": self.work_seconds}

    def line(self) -> str:
        modes = "; ".join(f"{mode}: {why}" if why else mode for mode, why in self.modes.items())
        packed = f" in {self.packs} pack{'s' * (self.packs != 1)}{f' ({modes})' if modes else ''}" if self.packs else ""
        resumed = f" ({self.resumed} resumed after a crash or a stop)" if self.resumed else ""
        stopped = f", {self.stopped} stopped (the rerun goes on with them)" if self.stopped else ""
        note = f"; {self.note}" if self.note else ""
        return (f"{self.stage:<9} {self.cells:>5} cells: {self.ran} run{packed}{resumed}, {self.cached} cached, "
                f"{len(self.failed)} failed{stopped}, {self.seconds:.0f} s{note}")


# ---- stages on Ray Tune -----------------------------------------------------------------------------

def pending(experiment: str, cells: Sequence[Any], force: bool = False, stage: str | None = None,
            snapshot: tracking.Snapshot | None = None) -> tuple[list[Any], int]:
    """The cells still to run, and how many are already finished in MLflow (skipped unless `force`); one search, or
    none with the invocation's `snapshot`."""
    if force:
        done: dict[str, tracking.RunRecord] = {}
    elif snapshot is not None:
        done = snapshot.finished_by_key(stage)
    else:
        done = tracking.finished_by_key(experiment, stage)
    todo = [c for c in cells if specs.key(c) not in done]
    return todo, len(cells) - len(todo)


CLOCK_SKEW_S = 2.0   # how far a cluster node's clock may lag the driver's (NTP keeps cloud nodes within milliseconds)


def invocation_start(options: RunOptions) -> float | None:
    """With --force, when this invocation's runs start: only runs started since count as finished (the earlier
    runs of the same keys are what --force runs again). None without --force: any finished run counts. Run start
    times come from the clock of the node that started the run, so this allows `CLOCK_SKEW_S` of lag."""
    return time.time() - CLOCK_SKEW_S if options.force else None


def run_stage(stage: str, cells: Sequence[Any], adapter: packs.CellAdapter, options: RunOptions,
              datasets: dict[str, data.Dataset], view: Any = None, snapshot: tracking.Snapshot | None = None) -> StageSummary:
    """A stage's cells as packs, one Tune trial each; failures are listed, never fatal to the stage.

    Nothing to do costs nothing: when MLflow has every cell, no Ray starts and no trial runs. Otherwise the
    stage gets an MLflow run (a child of the grid's) whose children are its cells' runs; `view` (a
    `progress.GridView`) shows the stage's progress.
    """
    todo, cached = pending(options.experiment, cells, options.force, stage, snapshot)
    summary = StageSummary(stage, len(cells), cached=cached)
    if not todo:
        return summary
    since = invocation_start(options)
    with launched(stage, summary, options) as stage_:
        chosen, summary.note = plan_packs(todo, adapter, stage_.options, datasets)
        options = widened(stage_.options, len(chosen))
        # Datasets go to the object store once per stage; each trial reads its pack's from its node's store.
        refs = {name: stage_.ray.put(datasets[name]) for name in {adapter.train(c).dataset for c in todo}}
        # Cells an earlier invocation left unfinished (failed, stopped, killed) continue in their runs.
        reopen = {} if options.force else tracking.unfinished_runs(options.experiment, stage, {specs.key(c) for c in todo})
        trainable = _pack_trial if options.workers_per_trial <= 1 else _distributed_pack
        ended = tune_adapter.launch(stage, trainable, chosen, [packs.describe(p, adapter) for p in chosen], options, view,
                              len(todo), adapter=adapter, refs=refs, since=since, parent_run_id=stage_.run.run_id,
                              reopen=reopen)
        summary.packs = len(chosen)
        for _, last in ended:
            if last.get("mode"):
                summary.modes.setdefault(str(last["mode"]), str(last.get("why", "")))
        trial_error = {specs.key(c): ended[i][0] for i, p in enumerate(chosen) for c in p}
        summarise(summary, stage, {specs.key(c): adapter.label(c) for c in todo}, trial_error, options, since)
    return summary


@dataclass(frozen=True)
class Launched:
    """A stage with work to do, under way: Ray joined, its options settled for the cluster, its MLflow run open."""

    ray: Any
    options: RunOptions
    run: tracking.Run
    slots: int     # trials the cluster runs at once at the options' CPUs and GPUs per trial


@contextlib.contextmanager
def launched(stage: str, summary: StageSummary, options: RunOptions) -> Iterator[Launched]:
    """The frame every stage with work runs in (training, estimates, attacks): join Ray, settle the GPUs per trial
    (`resolved`), open the stage's MLflow run (`stage_run`); on the way out, the stage's time and slots in `summary`,
    and `summary` logged as the run's metrics."""
    start = time.perf_counter()
    ray = cluster.connect(options.address, options.log_file)
    options = resolved(options)
    slots = cluster.slots(options.cpus_per_trial, options.gpus_per_trial or 0.0)
    with stage_run(stage, options) as run:
        yield Launched(ray, options, run, slots)
        summary.seconds = time.perf_counter() - start
        summary.slots = slots
        run.log_metrics(summary.metrics())


def stage_run(stage: str, options: RunOptions) -> Any:
    """The stage's parent run in MLflow (stage names.GRID): a child of the grid invocation's run. SIGTERM is the
    grid's to handle (`xfer.stopping`): a stopping grid ends its stage runs itself."""
    return tracking.start_run(options.experiment, names.GRID, "", tags={names.TAG_GRID_STAGE: stage},
                              run_name=stage, parent_run_id=options.grid_run_id, sigterm=False)


def run_training_stage(stage: str, cells: Sequence[TrainingCell], options: RunOptions,
                       datasets: dict[str, data.Dataset], view: Any = None,
                       snapshot: tracking.Snapshot | None = None) -> StageSummary:
    """Pretrain, fine-tune or scratch cells (see `run_stage`)."""
    return run_stage(stage, cells, TRAINING, options, datasets, view, snapshot)


def resolved(options: RunOptions) -> RunOptions:
    """`options` with the GPUs per trial settled from the cluster Ray is connected to."""
    import dataclasses

    return dataclasses.replace(options, gpus_per_trial=cluster.gpus_per_trial(options.gpus_per_trial))


def plan_packs(todo: Sequence[Any], adapter: packs.CellAdapter, options: RunOptions,
               datasets: dict[str, data.Dataset] | None = None) -> tuple[list[tuple[Any, ...]], str]:
    """The stage's packs: `options.pack_size` (or the device's default) cells each, spread over the free slots; a
    batched training pack no larger than fits one trial's memory (`cluster.trial_memory`, `plan.pack_memory`), and
    a note saying so where that cut a pack."""
    size, cpus = pack_size(options), options.cpus_per_trial * max(1, options.workers_per_trial)
    slots = cluster.slots(cpus, options.gpus_per_trial or 0.0)
    training = datasets is not None and adapter is TRAINING
    budget = cluster.trial_memory(options.gpus_per_trial or 0.0, options.cpus_per_trial) if training else None
    cut: dict[str, int] = {}

    def fits(cell: Any) -> int:
        from xfer import plan as plans

        t = adapter.train(cell)
        ds = datasets[t.dataset]
        most = plans.fitting_pack(t.arch, ds.in_shape, ds.num_classes, size, min(t.batch_size, len(ds.train)),
                                  t.optimizer, budget[0])
        if most < size:
            cut[t.arch] = min(most, cut.get(t.arch, most))
        return most

    chosen = packs.plan(todo, functools.partial(packs.pack_key, adapter), size, slots,
                        limit=fits if budget is not None else None)
    note = "; ".join(f"packs of at most {most} {arch} cells, what fits {budget[1]} (plan.pack_memory)"
                     for arch, most in sorted(cut.items()))
    return chosen, note


def widened(options: RunOptions, n_packs: int) -> RunOptions:
    """`options` with each of a stage's `n_packs` trials given the cores the stage would leave idle: a stage with fewer
    packs than trial slots (a one-cell pretrain stage, the last packs of a grid) runs each on more torch threads, as
    many as one node holds. GPU and data-parallel trials keep theirs."""
    import dataclasses

    if options.gpus_per_trial or options.workers_per_trial > 1 or n_packs < 1:
        return options
    slots = cluster.slots(options.cpus_per_trial, 0.0)
    if n_packs >= slots:
        return options
    cpus = min(float(cluster.node_cpus()), options.cpus_per_trial * (slots // n_packs))
    return dataclasses.replace(options, cpus_per_trial=max(options.cpus_per_trial, cpus))


def pack_size(options: RunOptions) -> int:
    """Cells per pack: the option, else the default for the device the trials train on."""
    return options.pack_size or packs.PACK_SIZE["cuda" if options.gpus_per_trial else "cpu"]


def summarise(summary: StageSummary, stage: str, todo: dict[str, str], trial_error: dict[str, str],
              options: RunOptions, since: float | None) -> None:
    """Fill `summary` from MLflow: each launched cell finished, or failed with its run's reason (else its trial's).

    Runs a crashed trial left RUNNING are ended FAILED with that reason.
    """
    done = tracking.finished_by_key(options.experiment, stage, since)
    reasons = {r.key: r.tags.get(names.TAG_FAILURE, "") for r in tracking.query(options.experiment, stage, status="FAILED")}
    stopped = {r.key for r in tracking.query(options.experiment, stage, status="KILLED") if names.TAG_RESUMABLE in r.tags}
    failed = {}
    for key, name in todo.items():
        if key in done:
            summary.ran += 1
            summary.resumed += names.TAG_RESUMED in done[key].tags
            summary.work_seconds += done[key].metrics.get(names.SECONDS, 0.0)
            continue
        if key in stopped or (stopping.grid_stopping() and key not in reasons):
            summary.stopped += 1   # saved resumable, or never started: the rerun goes on with it
            continue
        reason = trial_error.get(key) or reasons.get(key) or "the cell did not finish"
        failed[key] = reason
        summary.failed.append((name, reason))
    for record in tracking.query(options.experiment, stage, status="RUNNING"):
        if record.key in failed:
            tracking.end_stale_runs(options.experiment, record.key, failed[record.key])


# ---- the trainables: a pack of cells in one Tune trial ---------------------------------------------------

def _pack_trial(config: dict[str, Any], stage_packs: list[tuple[Any, ...]], adapter: packs.CellAdapter, refs: dict[str, Any],
                options: RunOptions, since: float | None, parent_run_id: str | None,
                reopen: dict[str, tracking.RunRecord]) -> None:
    """Ray Tune's view of one pack: its datasets from the object store once, its cells' states in one checkpoint."""
    import ray
    from ray import tune

    with tune_adapter.pack_trial(config, stage_packs, options) as pack:
        datasets = {name: ray.get(refs[name]) for name in {adapter.train(c).dataset for c in pack}}
        restored = tune_adapter.restored(tune.get_checkpoint(), packs.PackCheckpoint.load) or {}
        store = packs.PackCheckpoint(restored, options.checkpoint_interval_s, tune_adapter.report, len(pack))
        result = packs.run_pack(pack, adapter, options.experiment, datasets, store, since=since, node=tune_adapter.node_id(),
                                parent_run_id=parent_run_id, vectorise=options.vectorise, reopen=_of(pack, reopen))
    store.flush({STATUS: 1.0, **result.metrics()})


def _of(pack: Sequence[Any], runs: dict[str, tracking.RunRecord]) -> dict[str, tracking.RunRecord]:
    """The unfinished runs of this pack's cells."""
    return {key: runs[key] for key in (specs.key(c) for c in pack) if key in runs}


def _distributed_pack(config: dict[str, Any], stage_packs: list[tuple[Any, ...]], adapter: packs.CellAdapter, refs: dict[str, Any],
                      options: RunOptions, since: float | None, parent_run_id: str | None,
                      reopen: dict[str, tracking.RunRecord]) -> None:
    """A pack whose every cell trains data-parallel over `workers_per_trial` Ray Train workers."""
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    pack = stage_packs[config["cell"]["pack"]]
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"pack": pack, "adapter": adapter, "refs": refs, "options": options, "since": since,
                           "parent_run_id": parent_run_id, "reopen": _of(pack, reopen)},
        scaling_config=ScalingConfig(num_workers=options.workers_per_trial, use_gpu=bool(options.gpus_per_trial),
                                     resources_per_worker={"CPU": options.cpus_per_trial}),
        run_config=RunConfig(name=f"{options.experiment}-{specs.key(pack[0])}", storage_path=tune_adapter.storage(options),
                             callbacks=[TuneReportCallback()]),
        resume_from_checkpoint=tune.get_checkpoint(),
    )
    trainer.fit()


def _worker_loop(config: dict[str, Any]) -> None:
    """One data-parallel rank of a pack: every rank trains and reports (a barrier); rank 0 records and checkpoints."""
    import ray
    import ray.train
    import ray.train.torch

    pack, adapter, options = config["pack"], config["adapter"], config["options"]
    tune_adapter.start_trial(options)
    chief = ray.train.get_context().get_world_rank() == 0
    datasets = {name: ray.get(config["refs"][name]) for name in {adapter.train(c).dataset for c in pack}}

    def report(metrics: dict[str, Any], state_dir: Any) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(state_dir)) if state_dir is not None and chief else None
        ray.train.report(metrics, checkpoint=ckpt)

    # Every rank must report equally often: checkpoints and progress go out per event on all ranks (0 s), not per clock.
    restored = tune_adapter.restored(ray.train.get_checkpoint(), packs.PackCheckpoint.load) or {}
    store = packs.PackCheckpoint(restored, 0.0, report, len(pack), report_interval_s=0.0)
    result = packs.run_pack(pack, adapter, options.experiment, datasets, store, device=ray.train.torch.get_device(),
                            since=config["since"], is_chief=chief, node=tune_adapter.node_id(),
                            parent_run_id=config["parent_run_id"], reopen=config["reopen"] if chief else None)
    store.flush({STATUS: 1.0, **result.metrics()})


def load_datasets(wanted: set[str], options: RunOptions) -> dict[str, data.Dataset]:
    return {name: data.load(name, options.data_root, options.download, options.skip_bad_images) for name in sorted(wanted)}


__all__ = ["RunOptions", "StageSummary", "Launched", "run_stage", "run_training_stage", "launched", "pending",
           "plan_packs", "summarise", "load_datasets"]
