"""Optuna search over fine-tune hyperparameters as Ray Tune trials: the study, its storage, its best configuration.

A study is one default fine-tune cell (source → target, arch, size, epochs) whose hyperparameters
Optuna's TPE searches (seeded), with the default itself as the first trial; trials are Ray Tune trials
that ASHA stops early by validation error. The study lives in Optuna's RDB storage, so running the
same command again continues it. Trials never see the test split: it is removed before the data
reaches Ray, and the best and the default models meet it once, at the end. MLflow holds one parent run
per study (stage names.TUNE) with a child run per trial; reports.studies writes the study's files and
xfer.tuned hands the grid the best settings.

`OptunaSearch` refuses `tune.grid_search`, so this is its own entry point (sweeps/tune_finetune.py)
over the same loop the grid runs (xfer.train.train).
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import warnings
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from xfer import checkpoint, cluster, data, models, names, server, specs, stages, tracking, training_cells, tune_adapter
from xfer import train as loop
from xfer.cells import Cell, live
from xfer.errors import XferError
from xfer.specs import FinetuneSpec

DEFAULT_EXPERIMENT = "tune"        # MLflow experiment of all studies: a grid's experiment holds only its own cells
STUDY_DB = "optuna.db"             # default Optuna storage: SQLite in the runs folder (server.runs_dir())
SEARCHED = ("lr", "weight_decay", "head_lr_mult", "freeze_depth", "unfreeze_epoch", "batch_size", "label_smoothing")
LR_RANGE = (1e-4, 3e-2)            # AdamW; above ~3e-2 the small nets diverge on MNIST-scale data
WEIGHT_DECAY_RANGE = (1e-6, 1e-1)
HEAD_LR_MULT_RANGE = (1.0, 30.0)   # the new head may learn faster than the pretrained body (the seed used 10)
LABEL_SMOOTHING_RANGE = (0.0, 0.2)
BATCH_SIZES = (32, 64, 128, 256)
ASHA_REDUCTION = 3                 # at each rung (epochs 1, 3, 9, …) ASHA lets the best third go on
FAILED_VAL_ERROR = 1.0             # a diverged trial scores the worst error, so TPE learns to avoid its region
IMPORTANCE_RUNG = 1                # importances compare trials at epoch 1, the budget every trial reaches under ASHA
IMPORTANCE_SEED = 0                # fANOVA's random forest: the same study gives the same importances

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# ---- the study: its cell, its space, its trials' cells ------------------------------------------------

@dataclass(frozen=True)
class StudySpec:
    """One Optuna study: the default fine-tune cell whose hyperparameters are searched (and its first trial)."""

    default: FinetuneSpec
    sampler_seed: int = 0

    def __post_init__(self) -> None:
        if self.default.pretrain is None:
            raise XferError("a tuning study fine-tunes a pretrained model; give the default cell a pretrain spec.")

    @property
    def key(self) -> str:
        return specs.key(self)

    @property
    def name(self) -> str:
        """The Optuna study name: readable, and unique per study spec."""
        t = self.default.train
        return f"{self.default.source}-{t.dataset}-{t.arch}-n{t.size or 'all'}-{self.key}"


@dataclass(frozen=True)
class TrialSpec:
    """A trial's identity (its MLflow key): the cell it trains, within one study."""

    study: str
    cell: FinetuneSpec


def search_space(study: StudySpec, in_shape: tuple[int, int, int] = (1, 28, 28)) -> dict[str, BaseDistribution]:
    """Optuna distributions of the SEARCHED fields; each range is widened to hold the default's value.

    Freeze depth runs over 0..the arch's body tensor count (models.max_freeze_depth) for inputs of `in_shape`.
    """
    t = study.default.train
    depth = models.max_freeze_depth(models.build(t.arch, in_shape, 10))

    def log_range(bounds: tuple[float, float], value: float) -> FloatDistribution:
        return FloatDistribution(min(bounds[0], value), max(bounds[1], value), log=True)

    return {
        "lr": log_range(LR_RANGE, t.lr),
        "weight_decay": log_range(WEIGHT_DECAY_RANGE, t.weight_decay),
        "head_lr_mult": log_range(HEAD_LR_MULT_RANGE, t.head_lr_mult),
        "freeze_depth": IntDistribution(0, depth),
        "unfreeze_epoch": IntDistribution(0, t.epochs - 1),   # 0: never unfreeze
        "batch_size": CategoricalDistribution(tuple(sorted({*BATCH_SIZES, t.batch_size}))),
        "label_smoothing": FloatDistribution(min(LABEL_SMOOTHING_RANGE[0], t.label_smoothing),
                                             max(LABEL_SMOOTHING_RANGE[1], t.label_smoothing)),
    }


def default_params(study: StudySpec) -> dict[str, Any]:
    """The default cell as a point of the search space."""
    t = study.default.train
    return {name: (getattr(t, name) or 0) if name == "unfreeze_epoch" else getattr(t, name) for name in SEARCHED}


def cell_of(study: StudySpec, params: Mapping[str, Any]) -> FinetuneSpec:
    """The fine-tune cell a trial trains: the default with the searched fields replaced.

    Unfreezing needs something frozen: with freeze depth 0 (or unfreeze epoch 0) there is no unfreeze epoch.
    """
    unknown = sorted(set(params) - set(SEARCHED))
    if unknown:
        raise XferError(f"unknown tuning parameters {', '.join(unknown)}; searched are {', '.join(SEARCHED)}.")
    values = {**default_params(study), **params}
    frozen = int(values["freeze_depth"]) > 0
    values["unfreeze_epoch"] = (int(values["unfreeze_epoch"]) or None) if frozen else None
    train = specs.replace(study.default.train, **{k: _typed(k, v) for k, v in values.items()})
    return specs.replace(study.default, train=train)


def trial_key(study: StudySpec, params: Mapping[str, Any]) -> str:
    return specs.key(TrialSpec(study.key, cell_of(study, params)))


def _typed(name: str, value: Any) -> Any:
    # Optuna returns numpy scalars for categorical choices; specs hold plain Python numbers.
    if value is None:
        return None
    return int(value) if name in ("freeze_depth", "unfreeze_epoch", "batch_size") else float(value)


def withhold_test(ds: data.Dataset) -> data.Dataset:
    """`ds` with an empty test split: what trials get, so no trial can look at the test set."""
    return data.Dataset(ds.name, ds.train, data.Split(ds.test.images[:0], ds.test.labels[:0]), ds.class_names)


# ---- one trial, no Ray ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialContext:
    """What every trial of a study shares besides the data: where it logs and its lineage."""

    study: StudySpec
    experiment: str
    pretrain_run: str
    parent_run_id: str | None = None


class TrialSession(Protocol):
    """How a trial meets Ray Tune: reports (an epoch's with the state to resume from) and its restored state."""

    def report(self, metrics: dict[str, float], state_dir: Path | None = None) -> None: ...
    def restore(self) -> checkpoint.TrainState | None: ...


class TuneSession:
    """Reports to Ray Tune; resumes from Tune's last checkpoint of this trial (`xfer.tune_adapter`)."""

    def report(self, metrics: dict[str, float], state_dir: Path | None = None) -> None:
        tune_adapter.report(metrics, state_dir)

    def restore(self) -> checkpoint.TrainState | None:
        return tune_adapter.restored(tune.get_checkpoint(), checkpoint.load_state)


class _AshaSession:
    """A trial's cell session: every epoch but the last reported with its state (ASHA may stop the trial at any
    report), the last only once the MLflow run is complete."""

    def __init__(self, trial: TrialSession, epochs: int) -> None:
        self.trial, self.epochs = trial, epochs

    def restore(self) -> checkpoint.TrainState | None:
        return self.trial.restore()

    def epoch_end(self, state: checkpoint.TrainState, metrics: dict[str, float]) -> None:
        if state.epoch < self.epochs:
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint.save_state(Path(tmp), state)
                _report_epoch(self.trial, state.epoch, self.epochs, metrics[names.VAL_ERROR], Path(tmp))

    def done(self, result: loop.Result) -> None:
        val = result.metrics[names.VAL_ERROR] if result.ok else FAILED_VAL_ERROR
        self.trial.report({names.VAL_ERROR: val, names.EPOCH: result.metrics.get(names.EPOCH, math.nan),
                           tune_adapter.STATUS: float(result.ok)})


def run_trial(context: TrialContext, params: Mapping[str, Any], dataset: data.Dataset,
              pretrained: models.XferModel, session: TrialSession) -> loop.Result:
    """Fine-tune one configuration, reporting validation error after every epoch; record it as a child run.

    The last epoch is reported only after the MLflow run is complete, because ASHA may stop a trial at any
    report (it ends there, its run KILLED with the reason). `dataset` must come without its test split.
    """
    if len(dataset.test):
        raise XferError(f"a tuning trial was handed {dataset.name}'s test split; pass withhold_test(dataset), "
                        "since the test split is for the final evaluation only.")
    cell = cell_of(context.study, params)
    t = cell.train

    def prepare() -> tuple[data.Splits, models.XferModel]:
        splits = data.make_splits(dataset, t.size, t.val_size, t.seed)
        return splits, loop.prepare_model(t, splits, copy.deepcopy(pretrained))

    tags = {**training_cells.tags_of(cell, context.pretrain_run), names.TAG_STUDY: context.study.key,
            names.TAG_TUNE_ROLE: names.TUNE_ROLE_TRIAL}
    trial = Cell(TrialSpec(context.study.key, cell), names.TUNE, f"trial:{training_cells.label(cell)}", t, tags, prepare,
                 params=cell, parent_run_id=context.parent_run_id, log_test=False)
    return live(trial, context.experiment, _AshaSession(session, t.epochs))


def _report_epoch(session: TrialSession, epoch: int, epochs: int, val_error: float, state_dir: Path) -> None:
    """Report an epoch (with its state, to resume from); a trial the scheduler stops here raises StoppedEarly."""
    try:
        session.report({names.VAL_ERROR: val_error, names.EPOCH: float(epoch)}, state_dir)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
        raise StoppedEarly(f"stopped early by ASHA after epoch {epoch} of {epochs} (val_error {val_error:.4f})") from None


class StoppedEarly(SystemExit):
    """Ray Tune ends a trial its scheduler stopped with SystemExit(0) from `tune.report`; this one says why.

    Still exit code 0, so Ray ends the trial quietly; the MLflow run ends KILLED with the reason as its failure tag.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(0)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def _tune_trial(config: dict[str, Any], context: TrialContext, dataset: data.Dataset,
                pretrained: models.XferModel) -> None:
    """Ray Tune's view of `run_trial`: the config is the trial's point of the search space.

    Bad input (`XferError`: a damaged checkpoint, say) is permanent: the trial reports the failure score once
    instead of crashing, so Tune does not retry it; its run already ended FAILED with the reason.
    """
    tune_adapter.check_gpu()
    session = TuneSession()
    try:
        run_trial(context, config, dataset, pretrained, session)
    except XferError:
        session.report({names.VAL_ERROR: FAILED_VAL_ERROR, tune_adapter.STATUS: 0.0})


class SparingASHA(ASHAScheduler):
    """ASHA that never stops the default configuration: it is the baseline every tuned result is measured against.

    Its results still enter ASHA's rungs, so the others are judged against it as usual.
    """

    def __init__(self, spared: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._spared = dict(spared)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if same_params(trial.config, self._spared) else decision


def asha(study: StudySpec) -> SparingASHA:
    """The study's scheduler: rungs at epochs 1, 3, 9, … up to the study's epochs; Tune sets its metric (val_error)."""
    return SparingASHA(default_params(study), max_t=study.default.train.epochs, grace_period=1,
                       reduction_factor=ASHA_REDUCTION)


def same_params(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return set(a) == set(b) and all(
        math.isclose(float(a[k]), float(b[k]), rel_tol=1e-12, abs_tol=0.0) for k in a
    )


# ---- the study on Ray Tune ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Evaluated:
    """One trial's configuration and its errors; test error measured once, after the search."""

    number: int                      # Optuna trial number
    params: dict[str, Any]
    val_error: float
    test_error: float
    run_id: str                      # its MLflow trial run


@dataclass(frozen=True)
class StudyOutcome:
    name: str
    storage: str                     # the Optuna storage URL (password hidden)
    trials: int                      # finished trials in the study (all invocations)
    ran: int                         # trials this invocation ran
    stopped_early: int               # ... of which ASHA stopped
    best: Evaluated
    default: Evaluated | None
    importance: dict[str, float]
    parent_run_id: str
    out_dir: Path
    notes: list[str] = field(default_factory=list)
    full_length: frozenset[int] = frozenset()   # trials that ran every epoch (the rest ASHA stopped, or failed)


def default_storage() -> str:
    return f"sqlite:///{server.runs_dir() / STUDY_DB}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url`; SQLite waits for a lock instead of failing when studies run side by side."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError, ImportError) as exc:
        raise XferError(f"cannot open the Optuna storage {_shown(url)} ({type(exc).__name__}: {exc}); pass a "
                        "SQLAlchemy URL such as sqlite:///runs/optuna.db or postgresql://user@host/db.") from None


def open_study(study: StudySpec, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """The study, created or loaded; trials left RUNNING by an interrupted invocation are marked FAIL.

    One invocation per study at a time: a second one running concurrently would see the first's trials as stale.
    """
    ot_study = optuna.create_study(storage=storage, study_name=study.name, direction="minimize", load_if_exists=True)
    study_id = storage.get_study_id_from_name(study.name)
    for stale in ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, stale.number)
        storage.set_trial_user_attr(trial_id, names.TAG_FAILURE, "interrupted: its invocation ended while it ran")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    return ot_study


def finished(ot_study: optuna.Study) -> list[FrozenTrial]:
    return ot_study.get_trials(deepcopy=False, states=_FINISHED)


def run_study(study: StudySpec, trials: int, options: stages.RunOptions, storage: str | None = None,
              pretrain_experiment: str | None = None, echo: Callable[[str], None] = print) -> StudyOutcome:
    """Bring `study` to `trials` finished trials (continuing what storage holds), then evaluate and record it.

    Ray starts (`xfer.cluster.connect`) only when trials are left to run. The test split is read only by
    `_evaluate`, after the search.
    """
    url = storage or default_storage()
    ot_storage = open_storage(url)
    ot_study = open_study(study, ot_storage)
    done = len(finished(ot_study))
    todo = max(0, trials - done)
    target = data.load(study.default.train.dataset, options.data_root, options.download)
    pretrain_run = ensure_pretrained(study, pretrain_experiment or options.experiment, options, echo)
    pretrained, _ = tracking.load_model(pretrain_run)
    models.check_input_shape(pretrained, target.in_shape, target.name, "tune on data of one canonical shape")
    echo(f"study {study.name} in {_shown(url)}: {done} finished trial(s), running {todo} more (target {trials})")
    with study_run(study, options.experiment, url) as run:
        context = TrialContext(study, options.experiment, pretrain_run, run.run_id)
        stopped = _search(context, ot_study, ot_storage, withhold_test(target), pretrained, todo, options, echo) if todo else 0
        ot_study = optuna.load_study(study_name=study.name, storage=ot_storage)
        outcome = _evaluate(context, ot_study, target, url, todo, stopped)
        record(run, study, ot_study, outcome)
    return outcome


def ensure_pretrained(study: StudySpec, experiment: str, options: stages.RunOptions,
                      echo: Callable[[str], None] = print) -> str:
    """The run id of the study's finished pretrain cell in `experiment`, training it first if MLflow has none."""
    spec = study.default.pretrain
    record = tracking.find_finished(experiment, specs.key(spec))
    if record is None:
        echo(f"pretraining {training_cells.label(spec)} first: no finished run in MLflow experiment {experiment!r}")
        source = data.load(spec.train.dataset, options.data_root, options.download)
        result = training_cells.train_cell(spec, experiment, source)
        record = tracking.find_finished(experiment, specs.key(spec))
        if not result.ok or record is None:
            raise XferError(f"pretraining {training_cells.label(spec)} failed ({result.reason or 'no checkpoint recorded'}); "
                            "fix it (e.g. a lower --pretrain-lr) before tuning.")
    return record.run_id


def study_run(study: StudySpec, experiment: str, url: str) -> AbstractContextManager[tracking.Run]:
    """The study's parent MLflow run, opened new or, for a continued study, reopened."""
    return tracking.start_run(experiment, names.TUNE, study.key, tags=_study_tags(study, url),
                              params=specs.to_flat(study.default), run_name=f"study:{study.name}",
                              resume_run_id=_parent_run(experiment, study))


def _parent_run(experiment: str, study: StudySpec) -> str | None:
    """The study's earlier parent run (any status): a continued study keeps logging into it."""
    runs = tracking.query(experiment, stage=names.TUNE, status=None,
                          tags={names.TAG_KEY: study.key, names.TAG_TUNE_ROLE: names.TUNE_ROLE_STUDY})
    return runs[-1].run_id if runs else None


def _study_tags(study: StudySpec, url: str) -> dict[str, str]:
    t = study.default.train
    return {**training_cells.axis_tags(study.default.source, t.dataset, t.arch, t.size, t.seed),
            names.TAG_STUDY: study.key, names.TAG_TUNE_ROLE: names.TUNE_ROLE_STUDY, names.TAG_OPTUNA_STUDY: study.name,
            names.TAG_OPTUNA_STORAGE: _shown(url)}


def free_slots(options: stages.RunOptions) -> int:
    """How many trials fit in what the cluster has unused now (at least one): another job's share is not ours."""
    import ray

    free = ray.available_resources()
    slots = int(free.get("CPU", 0) // max(options.cpus_per_trial, 1e-3))
    if options.gpus_per_trial:
        slots = min(slots, int(free.get("GPU", 0) // options.gpus_per_trial))
    return max(1, slots)


def _search(context: TrialContext, ot_study: optuna.Study, ot_storage: optuna.storages.BaseStorage,
            dataset: data.Dataset, pretrained: models.XferModel, todo: int, options: stages.RunOptions,
            echo: Callable[[str], None] = print) -> int:
    """Run `todo` trials on Ray Tune, a line per trial event on `echo` (`TrialLines`); end the MLflow runs of trials
    ASHA stopped. Returns how many it stopped."""
    cluster.connect(options.address, options.log_file)
    options = stages.resolved(options)
    study = context.study
    defaults = default_params(study)
    has_default = any(same_params(t.params, defaults) for t in ot_study.get_trials(deepcopy=False)
                      if t.state in (TrialState.COMPLETE, TrialState.WAITING))
    searcher = OptunaSearch(
        search_space(study, dataset.in_shape), metric=names.VAL_ERROR, mode="min",
        points_to_evaluate=None if has_default else [defaults],
        # Offset by the trials already made: a continued study draws new points, reproducibly.
        sampler=optuna.samplers.TPESampler(seed=study.sampler_seed + len(ot_study.trials)),
        study_name=study.name, storage=ot_storage,
    )
    epochs = study.default.train.epochs
    tuner = tune_adapter.tuner(
        study.name, tune.with_parameters(_tune_trial, context=context, dataset=dataset, pretrained=pretrained), options,
        tune.TuneConfig(
            metric=names.VAL_ERROR, mode="min", num_samples=todo,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=min(free_slots(options), todo)),
            scheduler=asha(study),
            trial_name_creator=lambda trial: f"{names.TUNE}_{trial.trial_id}",
            trial_dirname_creator=lambda trial: f"{names.TUNE}_{trial.trial_id}",
            reuse_actors=True,  # short trials: a fresh worker per trial would spend longer importing torch than training
        ),
        callbacks=[TrialLines(echo, todo, epochs)],
    )
    stopped = 0
    for result in tuner.fit():
        metrics = result.metrics or {}
        if result.error is None and tune_adapter.STATUS in metrics:
            continue  # finished, and its run says so
        early = result.error is None
        stopped += early
        reason = (f"stopped early by ASHA after epoch {metrics.get(names.EPOCH, math.nan):.0f} of {epochs} "
                  f"(val_error {metrics.get(names.VAL_ERROR, math.nan):.4f})" if early
                  else f"the trial crashed: {tune_adapter.failure_reason(result)}")
        tracking.end_stale_runs(context.experiment, trial_key(study, result.config), reason)
    return stopped


class TrialLines(tune.Callback):
    """The study's view on the terminal: a line when a trial starts (its point of the space), after each epoch but
    the last (its validation error) and when it ends (finished, stopped early by ASHA, failed or crashed). Tune's
    own trial table prints only with --verbose (`tune_adapter.tuner`)."""

    def __init__(self, echo: Callable[[str], None], trials: int, epochs: int) -> None:
        self.echo, self.trials, self.epochs = echo, trials, epochs
        self._numbers: dict[str, int] = {}

    def _name(self, trial: Any) -> str:
        number = self._numbers.setdefault(trial.trial_id, len(self._numbers) + 1)
        return f"trial {number}/{self.trials}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self._numbers:   # a retry after a crash (on_trial_recover said why)
            self.echo(f"  {self._name(trial)} started again, from its last epoch")
            return
        point = " ".join(f"{k}={_short(v)}" for k, v in sorted(trial.config.items()))
        self.echo(f"  {self._name(trial)} started: {point}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if tune_adapter.STATUS not in result and names.EPOCH in result:
            self.echo(f"  {self._name(trial)} epoch {result[names.EPOCH]:.0f}/{self.epochs}: "
                      f"val_error {result[names.VAL_ERROR]:.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        val_error, epoch = last.get(names.VAL_ERROR, math.nan), last.get(names.EPOCH, math.nan)
        if tune_adapter.STATUS not in last:
            ended = f"stopped early by ASHA after epoch {epoch:.0f} of {self.epochs} (val_error {val_error:.4f})"
        elif last[tune_adapter.STATUS]:
            ended = f"finished: val_error {val_error:.4f} after {epoch:.0f} epoch(s)"
        else:
            ended = "failed (its MLflow run's xfer.failure tag says why)"
        self.echo(f"  {self._name(trial)} {ended}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.echo(f"  {self._name(trial)} crashed ({_error(trial)}); retrying")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.echo(f"  {self._name(trial)} crashed: {_error(trial)}")

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # Tune pickles its run config (callbacks included) into the experiment folder: that copy is silent, since a
        # terminal cannot be pickled. The live Tuner keeps this object.
        return tune.Callback, ()


def _error(trial: Any) -> str:
    """A crashed trial's error in one line (the traceback is in the log)."""
    return tune_adapter.last_line(str(getattr(trial, "error_msg", "") or "")) or "see the log"


# ---- after the search: best vs default, test error once, importances, artifacts -------------------------

def best_trial(ot_study: optuna.Study, full_length: Collection[int]) -> FrozenTrial:
    """The lowest validation error among the trials (numbers) that ran every epoch; ties: the earliest (the default).

    A trial ASHA stopped has its early error as its value, so it competes only when no trial ran every epoch.
    """
    done = [t for t in ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    if not done:
        raise XferError(f"study {ot_study.study_name} has no completed trial to take a best configuration from; "
                        "run more trials (--trials) and check the trial runs' xfer.failure tags in MLflow.")
    full = [t for t in done if t.number in full_length] or done
    return min(full, key=lambda t: (t.value, t.number))


def full_length_trials(context: TrialContext, ot_study: optuna.Study) -> set[int]:
    """The trials whose MLflow run finished: they ran every epoch and kept their model.

    Optuna alone cannot tell: Ray hands OptunaSearch the result that ended a trial (ASHA's stop or the last
    epoch) as its value, not as an intermediate value, so a full-length trial and one stopped an epoch short
    carry the same intermediate values.
    """
    finished_keys = {r.key for r in tracking.query(context.experiment, stage=names.TUNE, tags={
        names.TAG_STUDY: context.study.key, names.TAG_TUNE_ROLE: names.TUNE_ROLE_TRIAL})}
    return {t.number for t in ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if trial_key(context.study, t.params) in finished_keys}


def default_trial(ot_study: optuna.Study, study: StudySpec) -> FrozenTrial | None:
    defaults = default_params(study)
    return next((t for t in ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if same_params(t.params, defaults)), None)


def _evaluate(context: TrialContext, ot_study: optuna.Study, target: data.Dataset, url: str, ran: int,
              stopped: int) -> StudyOutcome:
    """Best and default configurations, each trial's final model evaluated once on the test split."""
    study = context.study
    full = full_length_trials(context, ot_study)
    best = best_trial(ot_study, full)
    default = default_trial(ot_study, study)
    notes = [] if default is not None else ["the default configuration has no completed trial in this study"]
    chosen = [best] + ([default] if default is not None and default.number != best.number else [])
    evaluated = {t.number: evaluate_on_test(context, t, target) for t in chosen}
    importance, note = param_importances(ot_study)
    notes += [note] if note else []
    return StudyOutcome(
        name=study.name, storage=_shown(url), trials=len(finished(ot_study)), ran=ran, stopped_early=stopped,
        best=evaluated[best.number], default=evaluated[default.number] if default else None, importance=importance,
        parent_run_id=context.parent_run_id or "", out_dir=server.runs_dir() / "studies" / study.name, notes=notes,
        full_length=frozenset(full),
    )


def evaluate_on_test(context: TrialContext, trial: FrozenTrial, target: data.Dataset) -> Evaluated:
    """The trial's final model (its MLflow checkpoint) on the test split; NaN if the run kept no model."""
    key = trial_key(context.study, trial.params)
    runs = [r for r in tracking.query(context.experiment, stage=names.TUNE, tags={names.TAG_KEY: key})
            if names.TAG_CHECKPOINT_SHA in r.tags]
    test_error = math.nan
    if runs:
        model, _ = tracking.load_model(runs[-1].run_id)
        test_error = loop.error(model, target.test.images, target.test.labels)
    return Evaluated(trial.number, dict(trial.params), float(trial.value), test_error, runs[-1].run_id if runs else "")


def param_importances(ot_study: optuna.Study) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importance of each searched parameter (seeded), or ({}, why not).

    The target is each trial's validation error after epoch IMPORTANCE_RUNG, not its last value: ASHA ends
    weak trials there, and Ray records a stopped trial as complete with that early error, so last values mix
    1-epoch and full-length errors. A trial that ended at the rung (stopped there, or failed before it) has
    no intermediate value for it; its value is its error there (or the failure score).
    """
    def at_rung(trial: FrozenTrial) -> float:
        return trial.intermediate_values.get(IMPORTANCE_RUNG, trial.value)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importance = dict(optuna.importance.get_param_importances(
                ot_study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED), target=at_rung))
        except (ValueError, RuntimeError) as exc:
            return {}, f"no parameter importances yet: {exc}"
    # With few trials Optuna warns (e.g. every importance equal); the warning travels with the numbers.
    return importance, "; ".join(f"importance: {w.message}" for w in caught)


def record(run: tracking.Run, study: StudySpec, ot_study: optuna.Study, outcome: StudyOutcome) -> None:
    """Tags, metrics and artifacts of the parent run; the same files under runs/studies/<study name>/."""
    out = outcome.out_dir
    out.mkdir(parents=True, exist_ok=True)
    best_cell = cell_of(study, outcome.best.params)
    config = {
        "study": outcome.name, "storage": outcome.storage, "trials": outcome.trials,
        "best": {**_as_dict(outcome.best), "cell": specs.to_flat(best_cell)},
        "default": _as_dict(outcome.default) if outcome.default else None,
        "importance": outcome.importance, "notes": outcome.notes,
    }
    (out / names.BEST_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=float))
    # Imported here: the report package (pandas, pyarrow, matplotlib) is for the end of a study, not for every
    # Ray worker that imports this module to run a trial.
    from reports import studies

    studies.write(out, ot_study, outcome)
    for path in sorted(out.iterdir()):
        run.log_artifact(path)
    run.set_tags({names.TAG_BEST_PREFIX + k: getattr(best_cell.train, k) for k in SEARCHED}
                 | {names.TAG_BEST_TRIAL: outcome.best.number, names.TAG_TRIALS: outcome.trials})
    metrics = {names.BEST_VAL_ERROR: outcome.best.val_error, names.BEST_TEST_ERROR: outcome.best.test_error}
    if outcome.default:
        metrics |= {names.DEFAULT_VAL_ERROR: outcome.default.val_error, names.DEFAULT_TEST_ERROR: outcome.default.test_error}
    run.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=outcome.trials)


def _as_dict(evaluated: Evaluated) -> dict[str, Any]:
    return {"trial": evaluated.number, "params": evaluated.params, names.VAL_ERROR: evaluated.val_error,
            names.TEST_ERROR: evaluated.test_error, "mlflow_run_id": evaluated.run_id}


def _shown(url: str) -> str:
    """A storage URL fit for logs and tags: any password hidden."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def _short(value: Any) -> str:
    """A hyperparameter's value as a line shows it: a trial's point (`TrialLines`), a tuned grid's (xfer.tuned)."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


__all__ = [
    "StudySpec", "TrialContext", "StudyOutcome", "Evaluated", "search_space", "default_params", "cell_of",
    "withhold_test", "run_trial", "run_study", "ensure_pretrained", "best_trial", "evaluate_on_test",
    "param_importances", "asha", "free_slots", "study_run", "record", "DEFAULT_EXPERIMENT",
]
