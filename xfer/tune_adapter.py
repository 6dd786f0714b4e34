"""Ray Tune's side of xfer, written once: the one Tuner (`tuner`), a stage's Tune run of a trial per pack (`fit`,
`launch`), what every trial does first (`start_trial`, `pack_trial`), how a trial reports and resumes (`report`,
`restored`), and how a failure is put in words (`failure_reason`, `member_failures`).

The grid's stages (`xfer.stages`, `xfer.pipeline`, `xfer.estimate`) and tuning's search (`xfer.tuning`) meet Tune
only here, so how a trial resumes, reports or fails is changed in one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from xfer import cluster, server, stopping
from xfer.errors import XferError

if TYPE_CHECKING:
    from xfer.progress import Throttled
    from xfer.stages import RunOptions

STATUS = "xfer_status"   # the metric a trial reports last: 1.0 finished (its cells' fates are in MLflow)
FAILED_JSON = "failed_json"   # a pack trial's last report: its members' failure reasons, as JSON
REASON_CHARS = 300            # a failure reason keeps this much of its error's last line (the traceback is in the log)

T = TypeVar("T")


# ---- the driver's side: one Tune run ------------------------------------------------------------------------

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


def launch(stage: str, trainable: Callable[..., None], chosen: list[tuple[Any, ...]], labels: list[str],
           options: RunOptions, view: Any = None, cells: int = 0, **shared: Any) -> list[tuple[str, dict[str, Any]]]:
    """One Tune run of `trainable(config, stage_packs=chosen, options=options, **shared)`, a trial per pack; returns
    each pack's trial error ('' for a trial that ended normally) and last report. `view` shows its `cells`
    cells' progress."""
    from ray import tune

    progress = view.stage(stage, cells or sum(map(len, chosen))) if view is not None else None
    trial = tune.with_parameters(trainable, stage_packs=chosen, options=options, **shared)
    try:
        results = fit(stage, trial, [{"pack": i, "cells": name} for i, name in enumerate(labels)], options,
                      callbacks=[progress.callback()] if progress is not None else [])
    finally:
        if progress is not None:
            view.finish_stage(progress)
    ended: list[tuple[str, dict[str, Any]]] = [("", {})] * len(chosen)
    for result in results:
        ended[result.config["cell"]["pack"]] = (failure_reason(result), dict(result.metrics or {}))
    return ended


def member_failures(chosen: Sequence[Sequence[Any]], ended: Sequence[tuple[str, dict[str, Any]]],
                    key: Callable[[Any], str]) -> dict[str, str]:
    """Each pack member's failure: the reason its trial reported for it (`last_report`), else its trial's crash."""
    out: dict[str, str] = {}
    for pack, (error, last) in zip(chosen, ended):
        reported = json.loads(last.get(FAILED_JSON, "{}") or "{}")
        for member in pack:
            reason = reported.get(key(member)) or error
            if reason:
                out[key(member)] = reason
    return out


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
    return f"{type(result.error).__name__}: {last_line(str(result.error))}"


def last_line(error: str) -> str:
    """An error's last line, where Python puts what went wrong, cut to `REASON_CHARS` ('' for no text)."""
    lines = error.strip().splitlines()
    return lines[-1][:REASON_CHARS] if lines else ""


# ---- the trial's side -----------------------------------------------------------------------------------------

def start_trial(options: RunOptions) -> None:
    """What every trial does first. It owns `cpus_per_trial` cores: torch would otherwise start a thread per core
    of the node in every trial, and two trials on two cores would fight over four threads. And it refuses to train
    on the CPU while holding a GPU share (`check_gpu`)."""
    torch.set_num_threads(max(1, int(options.cpus_per_trial)))
    check_gpu()


@contextlib.contextmanager
def pack_trial(config: dict[str, Any], stage_packs: Sequence[tuple[Any, ...]], options: RunOptions) -> Iterator[tuple[Any, ...]]:
    """A pack trial's frame: started (`start_trial`), its pack picked from the stage's packs by its config, and the
    grid's stop watched while its work runs (`stopping.Watcher`)."""
    start_trial(options)
    with stopping.Watcher(options.grid_run_id):
        yield stage_packs[config["cell"]["pack"]]


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


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def report(metrics: dict[str, Any], state_dir: Path | str | None = None) -> None:
    """Report to Tune, with the state in `state_dir` as the trial's checkpoint (what a retry resumes from)."""
    from ray import tune

    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(state_dir)) if state_dir else None)


def restored(ckpt: Any, load: Callable[[Path], T]) -> T | None:
    """What `load` reads from a trial's checkpoint (`tune.get_checkpoint()`, `ray.train.get_checkpoint()`); None
    for a trial starting fresh."""
    if ckpt is None:
        return None
    with ckpt.as_directory() as directory:
        return load(Path(directory))


def progress() -> Throttled:
    """A pack trial's progress to Tune, throttled (`xfer.progress.Throttled`)."""
    from xfer.progress import Throttled

    return Throttled(report)


def last_report(failed: dict[str, str], **metrics: Any) -> dict[str, Any]:
    """A pack trial's last report: finished (`STATUS`), its members' failures for `member_failures`, and `metrics`."""
    return {STATUS: 1.0, "cells_failed": float(len(failed)), FAILED_JSON: json.dumps(failed), **metrics}


__all__ = ["STATUS", "tuner", "fit", "launch", "member_failures", "storage", "failure_reason", "last_line",
           "start_trial", "pack_trial", "check_gpu", "node_id", "report", "restored", "progress", "last_report"]
