"""Stage runners: a stage's cells → one Ray Tune run → one MLflow run per cell, finished cells skipped.

`train_cell` is the whole life of one training cell (data, model, lineage, the loop, checkpoint,
MLflow) and needs no Ray; the Tune trainables here are thin adapters over it, and the caller
(`sweeps/*.py`) owns `ray.init`.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from xfer import checkpoint, data, names, specs, tracking
from xfer import train as loop
from xfer.errors import XferError
from xfer.specs import FinetuneSpec, PretrainSpec

TrainingCell = PretrainSpec | FinetuneSpec
STATUS = "xfer_status"   # metric the trainables report last: 1.0 finished, 0.0 failed (reason in the MLflow run)


@dataclass(frozen=True)
class RunOptions:
    """How cells run: where they log, what each trial may use, how failures are retried."""

    experiment: str
    data_root: str | None = None
    download: bool = False
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0      # fractional: several small trials share one GPU
    workers_per_trial: int = 1       # > 1: each trial is a Ray Train TorchTrainer (gloo on CPU, nccl on GPU)
    max_failures: int = 2            # Tune retries a crashed trial, resuming from its last epoch checkpoint
    storage_path: str | None = None  # Ray's storage (shared s3:// or NFS on a cluster); default <runs>/ray
    force: bool = False              # re-run cells that already finished


@dataclass
class StageSummary:
    stage: str
    cells: int
    cached: int = 0
    ran: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)   # (cell, reason)
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.stage:<9} {self.cells:>5} cells: {self.ran} run, {self.cached} cached, "
                f"{len(self.failed)} failed, {self.seconds:.0f} s")


# ---- one training cell, no Ray -------------------------------------------------------------------

class Session(Protocol):
    """Where a cell reports progress and finds the state to resume from (Tune, Ray Train, or nothing)."""

    def report(self, metrics: dict[str, float], state_dir: Path | None = None) -> None: ...
    def restore(self) -> loop.TrainState | None: ...


class NoSession:
    """Plain-Python session: nothing to resume, progress discarded (tests and `--workers-per-trial 1` outside Ray)."""

    def report(self, metrics: dict[str, float], state_dir: Path | None = None) -> None:
        pass

    def restore(self) -> loop.TrainState | None:
        return None


def tags_of(spec: TrainingCell, pretrain_run: str | None = None) -> dict[str, str]:
    """The searchable tags of a training run (source = pretraining dataset, target = dataset fine-tuned on)."""
    t = spec.train
    is_pretrain = isinstance(spec, PretrainSpec)
    tags = {
        names.TAG_SOURCE: t.dataset if is_pretrain else spec.source,
        names.TAG_TARGET: "" if is_pretrain else t.dataset,
        names.TAG_ARCH: t.arch, names.TAG_SIZE: str(t.size or "all"), names.TAG_FREEZE: str(t.freeze_depth),
        names.TAG_LR: str(t.lr), names.TAG_SEED: str(t.seed),
    }
    if pretrain_run:
        tags[names.TAG_PRETRAIN_RUN] = pretrain_run
    return tags


def label(spec: TrainingCell) -> str:
    t = spec.train
    src = f"{spec.source}→" if isinstance(spec, FinetuneSpec) and spec.source else ""
    recipe = "".join([f"/{t.optimizer}" if t.optimizer != "adamw" else "",
                      f"/head×{t.head_lr_mult:g}" if t.head_lr_mult != 1 else "",
                      f"/unfreeze@{t.unfreeze_epoch}" if t.unfreeze_epoch else ""])
    return (f"{spec.stage}:{src}{t.dataset}/{t.arch}/n={t.size or 'all'}/freeze={t.freeze_depth}/lr={t.lr}"
            f"{recipe}/seed={t.seed}")


def train_cell(spec: TrainingCell, experiment: str, dataset: data.Dataset, session: Session | None = None,
               device: str | torch.device | None = None, is_chief: bool = True) -> loop.Result:
    """Train one cell and record it in MLflow: params, tags, lineage, curve, metrics, checkpoint.

    A fine-tune cell finds its pretrained model through MLflow by the pretrain cell's key. Resuming
    (after a crash) continues the same MLflow run from the last epoch state the session kept.
    """
    session = session or NoSession()
    t = spec.train
    splits = data.make_splits(dataset, t.size, t.val_size, t.seed)
    pretrain_run, pretrained = None, None
    if isinstance(spec, FinetuneSpec) and spec.pretrain is not None:
        record = tracking.find_finished(experiment, specs.key(spec.pretrain))
        if record is None:
            raise XferError(f"{label(spec)} needs the pretrained model of {label(spec.pretrain)}, which has no "
                            "finished run in MLflow; run the pretrain stage first (sweeps/full_grid.py does).")
        pretrain_run = record.run_id
        pretrained, meta = tracking.load_model(pretrain_run)
        if tuple(meta["in_shape"]) != splits.in_shape:
            raise XferError(f"pretrained {t.arch} expects inputs {tuple(meta['in_shape'])} but {t.dataset} has "
                            f"{splits.in_shape}; pretrain and fine-tune on data of one canonical shape.")
    resume = session.restore()
    model = loop.prepare_model(t, splits, pretrained)
    run_ctx = tracking.start_run(
        experiment, spec.stage, specs.key(spec), tags=tags_of(spec, pretrain_run), params=specs.to_flat(spec),
        run_name=label(spec), resume_run_id=resume.extra.get("mlflow_run_id") if resume else None,
    ) if is_chief else _no_run()
    with run_ctx as run:
        if run is not None:
            # Where and how the cell ran: the node (Ray's id, "" outside Ray), the data-parallel world size,
            # and, after a crash, the epoch it resumed from.
            run.set_tags({"xfer.node": _node_id(), "xfer.workers": str(loop.dist_world()[1]),
                          **({"xfer.resumed_from_epoch": str(resume.epoch)} if resume is not None else {})})

        def on_epoch_end(state: loop.TrainState) -> None:
            errors = {r["split"]: r["error"] for r in state.curve if r["epoch"] == state.epoch}
            metrics = {names.EPOCH: float(state.epoch), names.VAL_ERROR: errors.get("val", math.nan),
                       names.TEST_ERROR: errors.get("test", math.nan)}
            if run is not None:
                run.log_metrics({names.VAL_ERROR: metrics[names.VAL_ERROR]}, step=state.step)
            with tempfile.TemporaryDirectory() as tmp:
                state.extra["mlflow_run_id"] = run.run_id if run is not None else ""
                checkpoint.save_state(Path(tmp), state)
                session.report(metrics, Path(tmp))

        result = loop.train(t, splits, model, device=device, resume=resume, on_epoch_end=on_epoch_end)
        if run is None:
            # Ray Train's report is a barrier across ranks: every rank makes the chief's last call too.
            session.report(_final(result))
            return result
        run.log_curve(result.curve)
        if not result.ok:
            run.fail(result.reason)
            session.report(_final(result))
            return result
        run.log_metrics(result.metrics, step=int(result.metrics["steps"]))  # at the last step: MLflow's "latest"
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save(Path(tmp), model.cpu(), {
                "class_names": list(splits.class_names), "spec": specs.to_dict(spec), "stage": spec.stage,
                "metrics": result.metrics, "key": specs.key(spec),
            })
            run.log_checkpoint(Path(tmp))
    session.report(_final(result))
    return result


def _final(result: loop.Result) -> dict[str, float]:
    """The last report of a cell: its status and, if it finished, its final metrics."""
    if not result.ok:
        return {STATUS: 0.0}
    return {STATUS: 1.0, **{k: v for k, v in result.metrics.items() if k != names.EPOCH}}


class _no_run:
    """Stands in for the MLflow run on non-chief data-parallel workers (rank 0 records the cell)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # outside a Ray worker the runtime context may be unavailable
        return ""


# ---- Ray Tune adapters --------------------------------------------------------------------------

class TuneSession:
    """Reports to Ray Tune; resumes from Tune's last checkpoint of this trial."""

    def report(self, metrics: dict[str, float], state_dir: Path | None = None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(state_dir)) if state_dir else None)

    def restore(self) -> loop.TrainState | None:
        from ray import tune

        return _restore(tune.get_checkpoint())


class TrainWorkerSession:
    """Inside a Ray Train worker: every rank reports (Train requires it); rank 0 carries the checkpoint."""

    def report(self, metrics: dict[str, float], state_dir: Path | None = None) -> None:
        import ray.train

        chief = ray.train.get_context().get_world_rank() == 0
        ckpt = ray.train.Checkpoint.from_directory(str(state_dir)) if state_dir and chief else None
        ray.train.report(metrics, checkpoint=ckpt)

    def restore(self) -> loop.TrainState | None:
        import ray.train

        return _restore(ray.train.get_checkpoint())


def _restore(ckpt: Any) -> loop.TrainState | None:
    if ckpt is None:
        return None
    with ckpt.as_directory() as directory:
        return checkpoint.load_state(Path(directory))


def _training_trial(config: dict[str, Any], dataset_refs: dict[str, Any], options: RunOptions) -> None:
    import ray

    if options.workers_per_trial > 1:
        _distributed_trial(config["cell"], dataset_refs, options)
        return
    spec = _spec_from_config(config["cell"])
    dataset = ray.get(dataset_refs[spec.train.dataset])  # from this node's object store, once per trial
    train_cell(spec, options.experiment, dataset, TuneSession())


def _distributed_trial(config: dict[str, Any], dataset_refs: dict[str, Any], options: RunOptions) -> None:
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cell": config, "refs": dataset_refs, "experiment": options.experiment},
        scaling_config=ScalingConfig(num_workers=options.workers_per_trial, use_gpu=options.gpus_per_trial > 0,
                                     resources_per_worker={"CPU": options.cpus_per_trial}),
        run_config=RunConfig(name=f"{options.experiment}-{specs.key(_spec_from_config(config))}",
                             storage_path=_storage(options), callbacks=[TuneReportCallback()]),
        resume_from_checkpoint=tune.get_checkpoint(),
    )
    trainer.fit()


def _worker_loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    spec = _spec_from_config(config["cell"])
    dataset = ray.get(config["refs"][spec.train.dataset])
    chief = ray.train.get_context().get_world_rank() == 0
    train_cell(spec, config["experiment"], dataset, TrainWorkerSession(), device=ray.train.torch.get_device(),
               is_chief=chief)


def _spec_from_config(config: dict[str, Any]) -> TrainingCell:
    cls = PretrainSpec if config["stage"] == names.PRETRAIN else FinetuneSpec
    return specs.from_flat(cls, {k: v for k, v in config.items() if k != "stage"})


def _config_of(spec: TrainingCell) -> dict[str, Any]:
    return {"stage": names.PRETRAIN if isinstance(spec, PretrainSpec) else "train", **specs.to_flat(spec)}


def _storage(options: RunOptions) -> str:
    return options.storage_path or str((tracking.runs_dir() / "ray").resolve())


# ---- stages ---------------------------------------------------------------------------------------

def pending(experiment: str, cells: Sequence[Any], force: bool = False) -> tuple[list[Any], int]:
    """The cells still to run, and how many are already finished in MLflow (skipped unless `force`)."""
    todo = [c for c in cells if force or tracking.find_finished(experiment, specs.key(c)) is None]
    return todo, len(cells) - len(todo)


def run_training_stage(stage: str, cells: Sequence[TrainingCell], options: RunOptions,
                       datasets: dict[str, data.Dataset]) -> StageSummary:
    """Pretrain, fine-tune or scratch cells as one Tune run; failures are listed, never fatal to the stage."""
    import ray
    from ray import tune

    todo, cached = pending(options.experiment, cells, options.force)
    summary = StageSummary(stage, len(cells), cached=cached)
    if not todo:
        return summary
    start = time.perf_counter()
    refs = {name: ray.put(datasets[name]) for name in {c.train.dataset for c in todo}}
    trainable = tune.with_parameters(_training_trial, dataset_refs=refs, options=options)
    by_key = {specs.key(c): c for c in todo}
    results = _fit(stage, trainable, [_config_of(c) for c in todo], options)
    for result in results:
        spec = _spec_from_config(result.config["cell"])
        key = specs.key(spec)
        reason = failure_reason(result)
        if reason:
            summary.failed.append((label(by_key[key]), reason))
            tracking.end_stale_runs(options.experiment, key, reason)
        else:
            summary.ran += 1
    summary.seconds = time.perf_counter() - start
    return summary


def run_cells(stage: str, cell_configs: list[dict[str, Any]], trial: Callable[[dict[str, Any]], None],
              options: RunOptions) -> Any:
    """Run arbitrary cells (attack, adder, …) as one Tune run of `trial(config)`; returns Tune's ResultGrid."""
    return _fit(stage, trial, cell_configs, options)


def _fit(stage: str, trainable: Any, configs: list[dict[str, Any]], options: RunOptions) -> Any:
    from ray import tune

    if options.workers_per_trial > 1:
        # The trial only drives a TorchTrainer whose workers hold the CPUs/GPUs. Ray refuses an empty
        # request, so the driver asks for a little memory instead of a CPU it would keep from the workers.
        resources = {"cpu": 0, "memory": 256 * 2**20}
    else:
        resources = {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"cell": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(
            trial_name_creator=lambda trial: f"{stage}_{trial.trial_id}",
            trial_dirname_creator=lambda trial: f"{stage}_{trial.trial_id}",
            max_concurrent_trials=_max_concurrent(options),
        ),
        run_config=tune.RunConfig(
            name=f"{options.experiment}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=_storage(options),
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        ),
    )
    return tuner.fit()


def _max_concurrent(options: RunOptions) -> int | None:
    if options.workers_per_trial <= 1:
        return None
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus // (options.workers_per_trial * max(options.cpus_per_trial, 1e-3))))


def failure_reason(result: Any) -> str:
    """Why a trial failed ('' if it did not): a crash (after retries) or a failed status (e.g. NaN loss)."""
    if result.error is not None:
        return f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:300]}"
    metrics = result.metrics or {}
    if metrics.get(STATUS, 1.0) == 0.0:
        return "the cell reported a failure (see its MLflow run's xfer.failure tag)"
    return ""


def load_datasets(names_: set[str], options: RunOptions) -> dict[str, data.Dataset]:
    return {name: data.load(name, options.data_root, options.download) for name in sorted(names_)}


__all__ = ["RunOptions", "StageSummary", "train_cell", "run_training_stage", "run_cells", "pending", "load_datasets",
           "label", "tags_of", "failure_reason"]
