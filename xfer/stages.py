"""Stage runners: a stage's cells → packs → one Ray Tune run → one MLflow run per cell, finished cells skipped.

`run_stage` is the one path from cells to Tune and back: it asks MLflow once which cells are finished, starts
Ray only when something is left, plans packs (`xfer.packs`), builds the Tuner (`tuner`, also what tuning
builds its search on) and turns Tune's results into a `StageSummary` (`summarise`). The grid's training cells
(pretrain, fine-tune, scratch) are the `TRAINING` kind, defined here; `train_cell` runs one without Ray.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from xfer import checkpoint, cluster, data, names, packs, server, specs, stopping, tracking
from xfer import train as loop
from xfer.cells import Cell, Session, live
from xfer.errors import XferError
from xfer.specs import FinetuneSpec, PretrainSpec, TrainSpec

TrainingCell = PretrainSpec | FinetuneSpec
STATUS = "xfer_status"   # the metric a trial reports last: 1.0 finished (its cells' fates are in MLflow)


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


# ---- the grid's training cells ----------------------------------------------------------------------

def tags_of(spec: TrainingCell, pretrain_run: str | None = None) -> dict[str, str]:
    """The searchable tags of a training run (source = pretraining dataset, target = dataset fine-tuned on)."""
    t = spec.train
    is_pretrain = isinstance(spec, PretrainSpec)
    tags = {
        names.TAG_SOURCE: t.dataset if is_pretrain else spec.source,
        names.TAG_TARGET: "" if is_pretrain else t.dataset,
        names.TAG_ARCH: t.arch, names.TAG_SIZE: str(t.size or "all"), names.TAG_FREEZE: str(t.freeze_depth),
        names.TAG_SEED: str(t.seed),   # the lr is the param train.lr: each value under one name
    }
    if pretrain_run:
        tags[names.TAG_PRETRAIN_RUN] = pretrain_run
    return tags


def label(spec: TrainingCell) -> str:
    """A cell by its axes, e.g. "kmnist→mnist resnet_mini n=500 freeze=20 lr=1e-3 seed=1" (its run's name too)."""
    t = spec.train
    if isinstance(spec, PretrainSpec):
        head = f"pretrain {t.dataset}"
    else:
        head = f"{spec.source}→{t.dataset}" if spec.source else f"scratch {t.dataset}"
    recipe = "".join([f" {t.optimizer}" if t.optimizer != "adamw" else "",
                      f" head×{t.head_lr_mult:g}" if t.head_lr_mult != 1 else "",
                      f" unfreeze@{t.unfreeze_epoch}" if t.unfreeze_epoch else ""])
    freeze = f" freeze={t.freeze_depth}" if isinstance(spec, FinetuneSpec) and spec.source else ""
    return f"{head} {t.arch} n={t.size or 'all'}{freeze} lr={number(t.lr)} seed={t.seed}{recipe}"


def number(value: float) -> str:
    """A learning rate the way people write it: 1e-3, 2.5e-4, 0.1."""
    if value == 0 or 1e-2 <= abs(value) < 10:
        return f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def training_cell(spec: TrainingCell, context: packs.Context) -> Cell:
    """A grid training cell: its data split by seed; a fine-tune starts from its pretrain cell's model (MLflow)."""
    t = spec.train
    pretrain_run, record = None, None
    if isinstance(spec, FinetuneSpec) and spec.pretrain is not None:
        parent = specs.key(spec.pretrain)
        record = context.finished(names.PRETRAIN, [parent]).get(parent)
        if record is None:
            raise XferError(f"{label(spec)} needs the pretrained model of {label(spec.pretrain)}, which has no "
                            "finished run in MLflow; run the pretrain stage first (sweeps/full_grid.py does).")
        pretrain_run = record.run_id

    def prepare() -> tuple[data.Splits, Any]:
        splits = data.make_splits(context.datasets[t.dataset], t.size, t.val_size, t.seed)
        pretrained = context.model(pretrain_run, record) if pretrain_run else None
        if pretrained is not None and tuple(pretrained.in_shape) != splits.in_shape:
            raise XferError(f"pretrained {t.arch} expects inputs {tuple(pretrained.in_shape)} but {t.dataset} has "
                            f"{splits.in_shape}; pretrain and fine-tune on data of one canonical shape.")
        return splits, loop.prepare_model(t, splits, pretrained)

    return Cell(spec, spec.stage, label(spec), t, tags_of(spec, pretrain_run), prepare,
                parent_run_id=context.parent_run_id)


def _training_spec(spec: TrainingCell) -> TrainSpec:
    return spec.train


def _training_stage(spec: TrainingCell) -> str:
    return spec.stage


TRAINING = packs.Kind("training", training_cell, _training_spec, _training_stage, label)


def train_cell(spec: TrainingCell, experiment: str, dataset: data.Dataset, session: Session | None = None,
               device: str | torch.device | None = None) -> loop.Result:
    """Train one grid cell and record it in MLflow, without Ray (tests, notebooks, tuning's pretrain cell)."""
    context = packs.Context(experiment, {spec.train.dataset: dataset})
    return live(training_cell(spec, context), experiment, session, device)


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


def run_stage(stage: str, cells: Sequence[Any], kind: packs.Kind, options: RunOptions,
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
    start = time.perf_counter()
    since = invocation_start(options)
    ray = cluster.connect(options.address, options.log_file)
    options = resolved(options)
    chosen, fitted = plan_packs(todo, kind, options, datasets)
    slots = cluster.slots(options.cpus_per_trial, options.gpus_per_trial or 0.0)
    options = widened(options, len(chosen))
    with stage_run(stage, options) as parent:
        # Datasets go to the object store once per stage; each trial reads its pack's from its node's store.
        refs = {name: ray.put(datasets[name]) for name in {kind.train(c).dataset for c in todo}}
        # Cells an earlier invocation left unfinished (failed, stopped, killed) continue in their runs.
        reopen = {} if options.force else tracking.unfinished_runs(options.experiment, stage, {specs.key(c) for c in todo})
        trainable = _pack_trial if options.workers_per_trial <= 1 else _distributed_pack
        ended = launch(stage, trainable, chosen, [packs.describe(p, kind) for p in chosen], options, view, len(todo),
                       kind=kind, refs=refs, since=since, parent_run_id=parent.run_id, reopen=reopen)
        summary.packs, summary.slots, summary.note = len(chosen), slots, fitted
        for _, last in ended:
            if last.get("mode"):
                summary.modes.setdefault(str(last["mode"]), str(last.get("why", "")))
        trial_error = {specs.key(c): ended[i][0] for i, p in enumerate(chosen) for c in p}
        summarise(summary, stage, {specs.key(c): kind.label(c) for c in todo}, trial_error, options, since)
        summary.seconds = time.perf_counter() - start
        parent.log_metrics(summary.metrics())
    return summary


def stage_run(stage: str, options: RunOptions) -> Any:
    """The stage's parent run in MLflow (stage names.GRID): a child of the grid invocation's run. SIGTERM is the
    grid's to handle (`xfer.stopping`): a stopping grid ends its stage runs itself."""
    return tracking.start_run(options.experiment, names.GRID, "", tags={names.TAG_GRID_STAGE: stage},
                              run_name=stage, parent_run_id=options.grid_run_id, sigterm=False)


def launch(stage: str, trainable: Callable[..., None], chosen: list[tuple[Any, ...]], names_: list[str],
           options: RunOptions, view: Any = None, cells: int = 0, **shared: Any) -> list[tuple[str, dict[str, Any]]]:
    """One Tune run of `trainable(config, packs_=chosen, options=options, **shared)`, a trial per pack; returns
    each pack's trial error ('' for a trial that ended normally) and last report. `view` shows its `cells`
    cells' progress."""
    from ray import tune

    progress = view.stage(stage, cells or sum(map(len, chosen))) if view is not None else None
    trial = tune.with_parameters(trainable, packs_=chosen, options=options, **shared)
    try:
        results = fit(stage, trial, [{"pack": i, "cells": name} for i, name in enumerate(names_)], options,
                      callbacks=[progress.callback()] if progress is not None else [])
    finally:
        if progress is not None:
            view.finish_stage(progress)
    ended: list[tuple[str, dict[str, Any]]] = [("", {})] * len(chosen)
    for result in results:
        ended[result.config["cell"]["pack"]] = (failure_reason(result), dict(result.metrics or {}))
    return ended


def run_training_stage(stage: str, cells: Sequence[TrainingCell], options: RunOptions,
                       datasets: dict[str, data.Dataset], view: Any = None,
                       snapshot: tracking.Snapshot | None = None) -> StageSummary:
    """Pretrain, fine-tune or scratch cells (see `run_stage`)."""
    return run_stage(stage, cells, TRAINING, options, datasets, view, snapshot)


def resolved(options: RunOptions) -> RunOptions:
    """`options` with the GPUs per trial settled from the cluster Ray is connected to."""
    import dataclasses

    return dataclasses.replace(options, gpus_per_trial=cluster.gpus_per_trial(options.gpus_per_trial))


def plan_packs(todo: Sequence[Any], kind: packs.Kind, options: RunOptions,
               datasets: dict[str, data.Dataset] | None = None) -> tuple[list[tuple[Any, ...]], str]:
    """The stage's packs: `options.pack_size` (or the device's default) cells each, spread over the free slots; a
    batched training pack no larger than fits one trial's memory (`cluster.trial_memory`, `plan.pack_memory`), and
    a note saying so where that cut a pack."""
    size, cpus = pack_size(options), options.cpus_per_trial * max(1, options.workers_per_trial)
    slots = cluster.slots(cpus, options.gpus_per_trial or 0.0)
    training = datasets is not None and kind is TRAINING
    budget = cluster.trial_memory(options.gpus_per_trial or 0.0, options.cpus_per_trial) if training else None
    cut: dict[str, int] = {}

    def fits(cell: Any) -> int:
        from xfer import plan as plans

        t = kind.train(cell)
        ds = datasets[t.dataset]
        most = plans.fitting_pack(t.arch, ds.in_shape, ds.num_classes, size, min(t.batch_size, len(ds.train)),
                                  t.optimizer, budget[0])
        if most < size:
            cut[t.arch] = min(most, cut.get(t.arch, most))
        return most

    chosen = packs.plan(todo, functools.partial(packs.pack_key, kind), size, slots,
                        limit=fits if budget is not None else None)
    note = "; ".join(f"packs of at most {most} {arch} cells, what fits {budget[1]} (plan.pack_memory)"
                     for arch, most in sorted(cut.items()))
    return chosen, note


def widened(options: RunOptions, packs_: int) -> RunOptions:
    """`options` with each of a stage's `packs_` trials given the cores the stage would leave idle: a stage with fewer
    packs than trial slots (a one-cell pretrain stage, the last packs of a grid) runs each on more torch threads, as
    many as one node holds. GPU and data-parallel trials keep theirs."""
    import dataclasses

    if options.gpus_per_trial or options.workers_per_trial > 1 or packs_ < 1:
        return options
    slots = cluster.slots(options.cpus_per_trial, 0.0)
    if packs_ >= slots:
        return options
    cpus = min(float(cluster.node_cpus()), options.cpus_per_trial * (slots // packs_))
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


def resources(options: RunOptions) -> dict[str, float]:
    if options.workers_per_trial > 1:
        # The trial only drives a TorchTrainer whose workers hold the CPUs/GPUs. Ray refuses an empty
        # request, so the driver asks for a little memory instead of a CPU it would keep from the workers.
        return {"cpu": 0, "memory": 256 * 2**20}
    return {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial or 0.0}


def tuner(name: str, trainable: Any, options: RunOptions, tune_config: Any, param_space: dict[str, Any] | None = None,
          callbacks: Sequence[Any] = (), stop: Any = None) -> Any:
    """The one Tuner xfer builds: a stage's grid of packs, or a tuning study's search (with its own TuneConfig).

    Tune's own tables print only with `options.verbose`: the grid's progress view (`xfer.progress`) says what
    runs, and Tune's messages go to the log file.
    """
    from ray import tune

    if not options.verbose:
        # Tune's newer console output prints every run's configuration box whatever its verbosity; its classic
        # reporter at verbosity 0 prints nothing (the grid's own progress view says what runs).
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Tune's per-trial CSV / JSON / TensorBoard result files: every result written three times by the driver (Tune's
    # scalability guide: ~500 results/s without loggers, 50-100 with), for data MLflow already holds.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if stop is not None:
        # The grid stops itself on Ctrl-C (`xfer.stopping`); Tune's own handler would end every trial mid-step.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    return tune.Tuner(
        tune.with_resources(trainable, resources(options)),
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage(options),
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            # Two kept, not one: Tune forces an experiment snapshot every `num_to_keep` checkpoints of a trial.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
            stop=stop,
            verbose=1 if options.verbose else 0,
        ),
    )


def fit(stage: str, trainable: Any, configs: list[dict[str, Any]], options: RunOptions,
        callbacks: Sequence[Any] = ()) -> Any:
    """Run `trainable` once per config (a pack, an attack group) as one Tune run; returns Tune's ResultGrid. In a
    grid that may stop (`stopping.current`), a stop ends the Tune run once its running trials saved their cells."""
    from ray import tune

    stop, stopper = stopping.current(), None
    if stop is not None:
        stopper, running = stopping.tune_hooks(stop)
        callbacks = [*callbacks, running]

    config = tune.TuneConfig(
        trial_name_creator=lambda trial: f"{stage}_{trial.trial_id}",
        trial_dirname_creator=lambda trial: f"{stage}_{trial.trial_id}",
        max_concurrent_trials=_max_concurrent(options),
        # A trial's process starts Python, imports torch, Ray and MLflow: ~4 s of a slot per pack. Reused, each slot
        # pays it once per stage, and a pack's models and data caches stay warm for the next.
        reuse_actors=True,
    )
    return tuner(f"{options.experiment}-{stage}", trainable, options, config,
                 param_space={"cell": tune.grid_search(configs)}, callbacks=callbacks, stop=stopper).fit()


def storage(options: RunOptions) -> str:
    """Ray Tune's trial storage (`cluster.trial_storage`): --storage-path, $XFER_BUCKET/ray, else <runs>/ray."""
    return cluster.trial_storage(options.storage_path, (server.runs_dir() / "ray").resolve())


def _max_concurrent(options: RunOptions) -> int | None:
    if options.workers_per_trial <= 1:
        return None
    return cluster.slots(options.workers_per_trial * options.cpus_per_trial, 0.0)


def failure_reason(result: Any) -> str:
    """Why a trial failed ('' if it did not): a crash that outlived its retries."""
    if result.error is None:
        return ""
    return f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:300]}"


def start_trial(options: RunOptions) -> None:
    """What every trial does first. It owns `cpus_per_trial` cores: torch would otherwise start a thread per core
    of the node in every trial, and two trials on two cores would fight over four threads. And it refuses to train
    on the CPU while holding a GPU share (`check_gpu`)."""
    torch.set_num_threads(max(1, int(options.cpus_per_trial)))
    check_gpu()


def check_gpu(gpu_ids: Sequence[Any] | None = None) -> None:
    """Stop a trial that Ray gave GPUs (`gpu_ids`, default `ray.get_gpu_ids()`) but where torch sees no CUDA
    device: it would otherwise train on the node's CPU without a word, many times slower."""
    if gpu_ids is None:
        import ray

        gpu_ids = ray.get_gpu_ids()
    if gpu_ids and not torch.cuda.is_available():
        import platform

        raise XferError(
            f"this trial holds GPU(s) {', '.join(map(str, gpu_ids))} on {platform.node()}, but torch "
            f"{torch.__version__} sees no CUDA device there (torch.cuda.is_available() is False), so it would train on "
            "the CPU. Check the node's NVIDIA driver against the CUDA version torch was built for (nvidia-smi; "
            f"torch.version.cuda is {torch.version.cuda}), or run with --gpus-per-trial 0 to train on CPUs on purpose.")


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _pack_trial(config: dict[str, Any], packs_: list[tuple[Any, ...]], kind: packs.Kind, refs: dict[str, Any],
                options: RunOptions, since: float | None, parent_run_id: str | None,
                reopen: dict[str, tracking.RunRecord]) -> None:
    """Ray Tune's view of one pack: its datasets from the object store once, its cells' states in one checkpoint."""
    import ray
    from ray import tune

    start_trial(options)
    pack = packs_[config["cell"]["pack"]]
    with stopping.Watcher(options.grid_run_id):
        datasets = {name: ray.get(refs[name]) for name in {kind.train(c).dataset for c in pack}}
        restored = _restored(tune.get_checkpoint())
        store = packs.PackCheckpoint(restored, options.checkpoint_interval_s, _tune_report, len(pack))
        result = packs.run_pack(pack, kind, options.experiment, datasets, store, since=since, node=_node_id(),
                                parent_run_id=parent_run_id, vectorise=options.vectorise, reopen=_of(pack, reopen))
    store.flush({STATUS: 1.0, **result.metrics()})


def _of(pack: Sequence[Any], runs: dict[str, tracking.RunRecord]) -> dict[str, tracking.RunRecord]:
    """The unfinished runs of this pack's cells."""
    return {key: runs[key] for key in (specs.key(c) for c in pack) if key in runs}


def _tune_report(metrics: dict[str, Any], state_dir: Any) -> None:
    from ray import tune

    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(state_dir)) if state_dir else None)


def _restored(ckpt: Any) -> dict[str, checkpoint.TrainState]:
    if ckpt is None:
        return {}
    with ckpt.as_directory() as directory:
        return packs.PackCheckpoint.load(directory)


def _distributed_pack(config: dict[str, Any], packs_: list[tuple[Any, ...]], kind: packs.Kind, refs: dict[str, Any],
                      options: RunOptions, since: float | None, parent_run_id: str | None,
                      reopen: dict[str, tracking.RunRecord]) -> None:
    """A pack whose every cell trains data-parallel over `workers_per_trial` Ray Train workers."""
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    pack = packs_[config["cell"]["pack"]]
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"pack": pack, "kind": kind, "refs": refs, "options": options, "since": since,
                           "parent_run_id": parent_run_id, "reopen": _of(pack, reopen)},
        scaling_config=ScalingConfig(num_workers=options.workers_per_trial, use_gpu=bool(options.gpus_per_trial),
                                     resources_per_worker={"CPU": options.cpus_per_trial}),
        run_config=RunConfig(name=f"{options.experiment}-{specs.key(pack[0])}", storage_path=storage(options),
                             callbacks=[TuneReportCallback()]),
        resume_from_checkpoint=tune.get_checkpoint(),
    )
    trainer.fit()


def _worker_loop(config: dict[str, Any]) -> None:
    """One data-parallel rank of a pack: every rank trains and reports (a barrier); rank 0 records and checkpoints."""
    import ray
    import ray.train
    import ray.train.torch

    pack, kind, options = config["pack"], config["kind"], config["options"]
    start_trial(options)
    chief = ray.train.get_context().get_world_rank() == 0
    datasets = {name: ray.get(config["refs"][name]) for name in {kind.train(c).dataset for c in pack}}

    def report(metrics: dict[str, Any], state_dir: Any) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(state_dir)) if state_dir is not None and chief else None
        ray.train.report(metrics, checkpoint=ckpt)

    # Every rank must report equally often: checkpoints and progress go out per event on all ranks (0 s), not per clock.
    store = packs.PackCheckpoint(_restored(ray.train.get_checkpoint()), 0.0, report, len(pack), report_interval_s=0.0)
    result = packs.run_pack(pack, kind, options.experiment, datasets, store, device=ray.train.torch.get_device(),
                            since=config["since"], is_chief=chief, node=_node_id(), parent_run_id=config["parent_run_id"],
                            reopen=config["reopen"] if chief else None)
    store.flush({STATUS: 1.0, **result.metrics()})


def load_datasets(names_: set[str], options: RunOptions) -> dict[str, data.Dataset]:
    return {name: data.load(name, options.data_root, options.download, options.skip_bad_images) for name in sorted(names_)}


__all__ = ["RunOptions", "StageSummary", "TRAINING", "training_cell", "train_cell", "run_stage", "run_training_stage",
           "pending", "plan_packs", "summarise", "tuner", "fit", "load_datasets", "label", "tags_of", "failure_reason",
           "STATUS"]
