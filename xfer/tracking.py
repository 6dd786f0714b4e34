"""MLflow as the project's memory: runs with tags and lineage, look-ups by key, verified checkpoints and curves.

Every call goes through the tracking server `xfer.server` provides (the runs folder's local one, or
``$MLFLOW_TRACKING_URI``), by explicit run id on an explicit client. The checkpoint files themselves and their
sha256 are `xfer.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from xfer import checkpoint as checkpoints
from xfer import names, specs
from xfer.errors import XferError
from xfer.server import TRACKING_URI_ENV, ensure_server, read_server_file, runs_dir

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


@functools.cache
def _ml() -> SimpleNamespace:
    """MLflow's client and entities, imported on first use: importing mlflow takes seconds, which a command refused
    for bad input (or a look at the runs folder) never needs."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunStatus, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.utils import validation
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    return SimpleNamespace(MlflowClient=MlflowClient, Metric=Metric, Param=Param, RunStatus=RunStatus, RunTag=RunTag,
                           MlflowException=MlflowException, MLFLOW_PARENT_RUN_ID=MLFLOW_PARENT_RUN_ID,
                           get_artifact_repository=get_artifact_repository,
                           MAX_ENTITIES_PER_BATCH=validation.MAX_ENTITIES_PER_BATCH,
                           MAX_METRICS_PER_BATCH=validation.MAX_METRICS_PER_BATCH,
                           MAX_EXPERIMENT_TAG_VAL_LENGTH=validation.MAX_EXPERIMENT_TAG_VAL_LENGTH,
                           MAX_PARAMS_TAGS_PER_BATCH=validation.MAX_PARAMS_TAGS_PER_BATCH,
                           MAX_TAG_VAL_LENGTH=validation.MAX_TAG_VAL_LENGTH)

SEARCH_PAGE = 1000
PARENT_RUN_TAG = "mlflow.parentRunId"   # MLflow's own tag naming a run's parent (mlflow.utils.mlflow_tags)

TAG_GRID = "xfer.grid"              # experiment tag: the grid's canonical JSON (candidate for names.py)
TRAINING_STAGES = (names.PRETRAIN, names.FINETUNE, names.SCRATCH)  # their runs are finished only with a checkpoint

# Each curve row's split names the metric its error is logged under.
SPLIT_METRICS = {"train": names.TRAIN_ERROR, "val": names.VAL_ERROR, "test": names.TEST_ERROR}


EXPERIMENT_KIND = "mlflow.experimentKind"   # MLflow 3's UI: which view an experiment opens in
TRAINING_KIND = "custom_model_development"   # ... "Machine learning": the runs table (not "genai_development")


def ui_url(experiment: str | None = None) -> str:
    """Where to point a browser: the tracking server, or one experiment's runs table on it (an experiment made
    before xfer marked its kind is marked now)."""
    uri = ensure_server()
    found = _client().get_experiment_by_name(experiment) if experiment else None
    if found is None:
        return uri
    if found.tags.get(EXPERIMENT_KIND) != TRAINING_KIND:
        _client().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
    return f"{uri}/#/experiments/{found.experiment_id}/runs"


def nest_under(run: Run, parent_run_id: str, run_name: str) -> None:
    """Make `run` a child of `parent_run_id` under a new name (MLflow's UI nests runs by this tag)."""
    run.set_tags({_ml().MLFLOW_PARENT_RUN_ID: parent_run_id, "mlflow.runName": run_name})


# --- experiments and runs ---------------------------------------------------------------------------


def _client() -> MlflowClient:
    # A grid ends thousands of runs: no "View run at" lines (each costing a request) and no progress bars.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Explicit run ids on an explicit client: no fluent global active run to race on between threads.
    return _ml().MlflowClient(tracking_uri=ensure_server())


_EXPERIMENT_IDS: dict[tuple[str, str], str] = {}   # (tracking URI, name) → id: every run a cell starts needs it


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created if missing (safe when many processes create it at once); asked of the
    server once per process."""
    cached = _EXPERIMENT_IDS.get((ensure_server(), name))
    if cached is not None:
        return cached
    found_id = _experiment_id(name)
    _EXPERIMENT_IDS[ensure_server(), name] = found_id
    return found_id


def _experiment_id(name: str) -> str:
    client = _client()
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            # Model training, not a GenAI app: MLflow 3's UI then opens the runs table, not its traces overview.
            return client.create_experiment(name, tags={EXPERIMENT_KIND: TRAINING_KIND})
        except _ml().MlflowException:
            found = client.get_experiment_by_name(name)  # another process created it meanwhile
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise XferError(
            f"MLflow experiment {name!r} was deleted but is still in the trash, so its name cannot be reused. "
            f"Restore it (`mlflow experiments restore --experiment-id {found.experiment_id}`), purge it "
            "(`mlflow gc`), or choose another grid name."
        )
    return found.experiment_id


def experiment_exists(name: str) -> bool:
    """Whether experiment `name` exists (and is not in the trash); creates nothing."""
    found = _client().get_experiment_by_name(name)
    return found is not None and found.lifecycle_stage != "deleted"


def log_grid(experiment: str, description: str) -> None:
    """Record the grid's canonical JSON on its experiment (tag TAG_GRID), so MLflow alone can reproduce it."""
    if len(description) > _ml().MAX_EXPERIMENT_TAG_VAL_LENGTH:
        log.warning("grid description of %d characters exceeds MLflow's %d; not recorded on experiment %r",
                    len(description), _ml().MAX_EXPERIMENT_TAG_VAL_LENGTH, experiment)
        return
    _client().set_experiment_tag(experiment_id(experiment), TAG_GRID, description)


def set_experiment_tags(experiment: str, tags: Mapping[str, Any]) -> None:
    client, found = _client(), experiment_id(experiment)
    for key, value in tags.items():
        client.set_experiment_tag(found, key, _text(value))


def experiment_tags(experiment: str) -> dict[str, str]:
    """The tags of experiment `experiment` ({} when it does not exist)."""
    found = _client().get_experiment_by_name(experiment)
    return dict(found.tags) if found is not None else {}


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as later stages and reports see it."""

    run_id: str
    experiment: str
    stage: str                      # names.TAG_STAGE ("" if the run is not xfer's)
    key: str                        # names.TAG_KEY: the cell's content key
    status: str                     # FINISHED | FAILED | KILLED | RUNNING | SCHEDULED
    tags: dict[str, str]
    params: dict[str, str]          # flat dotted spec keys (specs.from_flat reads them back)
    metrics: dict[str, float]       # each metric's latest value
    start_time: datetime            # UTC
    end_time: datetime | None       # None while running
    artifact_uri: str = ""          # where its artifacts are (file:// for the runs folder's own server)


class Terminated(SystemExit):
    """Raised in the main thread by the SIGTERM handler of `start_run`; unwinds the run, exits 128+signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class Run:
    """Handle on one open run, yielded by `start_run`. Every call names the run id explicitly."""

    def __init__(self, client: MlflowClient, run_id: str, experiment: str, artifact_uri: str | None = None) -> None:
        self.run_id = run_id
        self.experiment = experiment
        self.ended = False
        self._client = client
        self._artifact_uri = artifact_uri
        self._repo: Any = None
        self._inflight: Future[None] | None = None   # points sent behind the cell's back (`log_points(behind=True)`)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = _now_ms()
        self._log_batch([_ml().Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def log_batch(self, metrics: Mapping[str, float] | None = None, params: Mapping[str, Any] | Any = None,
                  tags: Mapping[str, Any] | None = None, step: int = 0) -> None:
        """Metrics (at `step`), params (a spec is flattened) and tags in one request where MLflow's limits allow."""
        now = _now_ms()
        flat = specs.to_flat(params) if dataclasses.is_dataclass(params) else (params or {})
        self._log_batch([_ml().Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
                        [_ml().Param(k, _text(v)) for k, v in flat.items()],
                        [_ml().RunTag(k, _text(v)) for k, v in (tags or {}).items()])

    def log_curve(self, rows: list[dict[str, Any]], points: bool = True) -> None:
        """The error curve as the Parquet artifact names.CURVE_FILE and, with `points`, one metric point per row.

        Rows look like ``{"step", "epoch", "seconds", "split", "error"}``; ``split`` picks the metric
        (train -> train_error, val -> val_error, test -> test_error) and ``step`` its x-axis. A cell that
        logged its points live, epoch by epoch (`log_points`), passes ``points=False``: each point once.
        """
        _check_splits(rows)
        with tempfile.TemporaryDirectory(prefix="xfer-curve-") as tmp:
            path = Path(tmp) / names.CURVE_FILE
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), path)
            self.log_artifact(path)
        if points:
            self.log_points(rows)

    def log_points(self, rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, float] | None = None,
                   step: int = 0, tags: Mapping[str, Any] | None = None, behind: bool = False) -> None:
        """Curve rows as metric points, and `metrics` at `step` (and `tags`), in one batch (a request per 1,000 values).

        `behind`: sent from a background thread, so the caller goes on training meanwhile: a pack ending an epoch
        sends its cells' points side by side instead of one request after another while its device waits (an epoch
        of a small GPU cell lasts a few requests' time). One request is in flight per run, in order; the run's next
        write waits for it and raises what it raised, so a lost request fails the cell, one epoch later at most."""
        _check_splits(rows)
        now = _now_ms()
        points = ([_ml().Metric(SPLIT_METRICS[r["split"]], float(r["error"]), now, int(r["step"])) for r in rows]
                  + [_ml().Metric(k, float(v), now, step) for k, v in (metrics or {}).items()])
        labels = [_ml().RunTag(k, _text(v)) for k, v in (tags or {}).items()]
        if not behind:
            self._log_batch(points, tags=labels)
            return
        self.settle()
        if points or labels:
            self._inflight = _sender().submit(self._send, points, (), labels)

    def settle(self) -> None:
        """Wait for the points sent behind (`log_points(behind=True)`), raising what their request raised."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.result()

    def last_step(self, metric: str) -> int | None:
        """The largest step at which `metric` was logged in this run, or None (what a resumed cell has already logged)."""
        self.settle()
        history = self._client.get_metric_history(self.run_id, metric)
        return max((m.step for m in history), default=None)

    def log_checkpoint(self, directory: Path, tag: bool = True) -> str:
        """Upload a checkpoint folder as names.CHECKPOINT_DIR and tag its sha256 (set after the upload); with
        `tag=False` the caller sets names.TAG_CHECKPOINT_SHA itself (with its last metrics, in one request)."""
        sha = checkpoints.sha256(directory)
        self.log_artifact(directory, names.CHECKPOINT_DIR)
        if tag:
            self.set_tags({names.TAG_CHECKPOINT_SHA: sha})
        return sha

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file (at `artifact_path`, default the run's root) or a folder (default: under its own name). A store
        that cannot take it (a full disk, an unwritable folder) is an XferError naming where and what to do: the cell
        fails alone, its run stays unfinished (no sha256 tag, so nothing reads what was half written), and the rerun
        continues it in the same run."""
        path = Path(path)
        self.settle()
        try:
            if path.is_dir():
                self._artifacts().log_artifacts(str(path), artifact_path if artifact_path is not None else path.name)
            else:
                self._artifacts().log_artifact(str(path), artifact_path)
        except OSError as exc:
            where = self._artifact_uri or "the run's artifact store"
            raise XferError(
                f"could not store {path.name} in run {self.run_id}'s artifacts at {where}: {exc.strerror or exc}. "
                "Free space there (or make it writable), then run the same command again: the cell goes on in the "
                "same run, and what is already recorded is untouched."
            ) from None

    def _artifacts(self) -> Any:
        """The run's artifact store, from the URI its creation returned (MLflow's client asks the server for it again
        on each new run: a request per cell saved)."""
        if self._repo is None:
            uri = self._artifact_uri or self._client.get_run(self.run_id).info.artifact_uri
            self._repo = _ml().get_artifact_repository(uri, tracking_uri=self._client.tracking_uri)
        return self._repo

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._log_batch(tags=[_ml().RunTag(k, _text(v)) for k, v in tags.items()])

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Flat params; a spec (dataclass) is flattened with specs.to_flat."""
        flat = specs.to_flat(params) if dataclasses.is_dataclass(params) else params
        self._log_batch(params=[_ml().Param(k, _text(v)) for k, v in flat.items()])

    def fail(self, reason: str) -> None:
        """End the run FAILED with `reason` (e.g. a NaN loss); the `start_run` block then exits quietly."""
        self._end(_ml().RunStatus.FAILED, reason)

    def stop(self, reason: str, tags: Mapping[str, Any] | None = None) -> None:
        """End the run KILLED with `reason` and `tags` (its grid is stopping: names.TAG_RESUMABLE); the `start_run`
        block then exits quietly and the rerun reopens it."""
        if tags:
            self.set_tags(tags)
        self._end(_ml().RunStatus.KILLED, reason)

    def _end(self, status: int, reason: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        try:
            self.settle()   # a FINISHED run has settled already (`start_run`): this is a run failing or stopping
        except Exception as exc:  # its end is recorded whatever became of the points sent behind
            log.warning("points sent to run %s were lost: %s", self.run_id, exc)
        if reason:
            self._client.set_tag(self.run_id, names.TAG_FAILURE, reason[:_ml().MAX_TAG_VAL_LENGTH])
        self._client.set_terminated(self.run_id, _ml().RunStatus.to_string(status))

    def _end_quietly(self, status: int, reason: str) -> None:
        try:
            self._end(status, reason)
        except Exception as exc:  # never mask the exception that is ending the run
            log.warning("could not mark run %s %s: %s", self.run_id, _ml().RunStatus.to_string(status), exc)

    def _log_batch(self, metrics: Sequence[Any] = (), params: Sequence[Any] = (), tags: Sequence[Any] = ()) -> None:
        self.settle()
        self._send(metrics, params, tags)

    def _send(self, metrics: Sequence[Any] = (), params: Sequence[Any] = (), tags: Sequence[Any] = ()) -> None:
        # One request per chunk instead of one per value: fewer SQLite write transactions under many writers; and one
        # request for all three when they fit MLflow's limits for one batch.
        m = _ml()
        if not (metrics or params or tags):
            return
        if (len(metrics) <= m.MAX_METRICS_PER_BATCH and len(params) <= m.MAX_PARAMS_TAGS_PER_BATCH
                and len(tags) <= m.MAX_PARAMS_TAGS_PER_BATCH and len(metrics) + len(params) + len(tags) <= m.MAX_ENTITIES_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=list(metrics), params=list(params), tags=list(tags))
            return
        for chunk in _chunks(list(metrics), _ml().MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)
        for chunk in _chunks(list(params), _ml().MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk)
        for chunk in _chunks(list(tags), _ml().MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=chunk)


SENDER_THREADS = 8   # requests a process has in flight at once for points sent behind (a GPU pack's cells' epochs)


def _sender() -> ThreadPoolExecutor:
    """The process's threads for points sent behind (`Run.log_points`); MLflow's REST client is safe across threads."""
    return _sender_of(os.getpid())


@functools.lru_cache(maxsize=1)
def _sender_of(pid: int) -> ThreadPoolExecutor:
    # Keyed by process: a forked child inherits the parent's executor but none of its threads, and would wait forever.
    return ThreadPoolExecutor(SENDER_THREADS, thread_name_prefix="xfer-mlflow")


@contextmanager
def start_run(
    experiment: str,
    stage: str,
    key: str,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | Any | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    sigterm: bool = True,
) -> Iterator[Run]:
    """One run of one cell; never left RUNNING by a process that can still act.

    Ends FINISHED when the block completes; FAILED with names.TAG_FAILURE when it raises (re-raised);
    KILLED on SIGTERM, Ctrl-C or SystemExit. In the main thread a SIGTERM handler is installed for the
    block (the previous one is restored, and called, afterwards); SIGKILL can only be cleaned up later,
    by `end_stale_runs`. `resume_run_id` reopens that run (a resumed trial) when it still exists. `sigterm=False`
    leaves SIGTERM to the caller (a grid stopping cleanly: `xfer.stopping`).
    """
    client = _client()
    run_tags = {names.TAG_STAGE: stage, names.TAG_KEY: key, names.TAG_EXPERIMENT: experiment, **(tags or {})}
    if parent_run_id:
        run_tags[_ml().MLFLOW_PARENT_RUN_ID] = parent_run_id
    run_tags = {k: _text(v) for k, v in run_tags.items()}
    run_id = _reopen(client, resume_run_id, run_tags) if resume_run_id else None
    if run_id is None:
        created = client.create_run(experiment_id(experiment), tags=run_tags, run_name=run_name or f"{stage}-{key}")
        run_id, artifact_uri = created.info.run_id, created.info.artifact_uri
    else:
        artifact_uri = None
    run = Run(client, run_id, experiment, artifact_uri)
    previous = _install_sigterm() if sigterm else None
    try:
        if params is not None:
            run.log_params(params)
        yield run
        run.settle()   # what was sent behind has landed (or fails the run) before the run ends FINISHED
    except Terminated as exc:
        run._end_quietly(_ml().RunStatus.KILLED, f"terminated by {signal.Signals(exc.signum).name}")
        _restore_sigterm(previous)
        if callable(previous):
            previous(exc.signum, None)  # an outer run or Ray's own handler gets its turn
        raise
    except (KeyboardInterrupt, SystemExit) as exc:
        run._end_quietly(_ml().RunStatus.KILLED, f"{type(exc).__name__}: {exc}".rstrip(": "))
        raise
    except BaseException as exc:
        run._end_quietly(_ml().RunStatus.FAILED, f"{type(exc).__name__}: {exc}")
        raise
    else:
        run._end(_ml().RunStatus.FINISHED)
    finally:
        _restore_sigterm(previous)


def _reopen(client: MlflowClient, run_id: str, tags: dict[str, str]) -> str | None:
    """Mark an existing run RUNNING again (params are re-logged unchanged); None if it is gone."""
    try:
        previous = client.get_run(run_id)
    except _ml().MlflowException:
        return None
    for stale in (names.TAG_FAILURE, names.TAG_RESUMABLE):   # the earlier attempt's end no longer describes the run
        if stale in previous.data.tags:
            client.delete_tag(run_id, stale)
    client.update_run(run_id, status="RUNNING")
    client.log_batch(run_id, tags=[_ml().RunTag(k, v) for k, v in tags.items()])
    return run_id


def _install_sigterm() -> Any:
    """Our handler in place of the current one; returns the one to restore (None: nothing installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None  # signals reach only the main thread; Python refuses handlers elsewhere
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:
        return None  # a handler set outside Python cannot be restored: leave it alone
    signal.signal(signal.SIGTERM, _on_sigterm)
    return previous


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


def end_stale_runs(experiment: str, key: str, reason: str) -> list[str]:
    """End FAILED, with `reason`, the cell's runs still RUNNING after its trial ended (a killed or crashed
    worker: SIGKILL, OOM, a trial thread). Call it only when no trial of the cell is running; returns their ids."""
    client = _client()
    stale = query(experiment, status="RUNNING", tags={names.TAG_KEY: key})
    for record in stale:
        Run(client, record.run_id, experiment)._end(_ml().RunStatus.FAILED, reason)
    return [r.run_id for r in stale]


def spec_tags(spec: Any) -> dict[str, str]:
    """The searchable tags of a cell (names.TAG_SOURCE, TAG_ARCH, ...) derived from its spec."""
    if isinstance(spec, specs.AttackCellSpec):
        return {names.TAG_ATTACK: spec.attack.attack, names.TAG_EPS: _text(spec.attack.eps)}
    if isinstance(spec, specs.PretrainSpec):
        train, tags = spec.train, {names.TAG_SOURCE: spec.train.dataset}
    elif isinstance(spec, specs.FinetuneSpec):
        train, tags = spec.train, {names.TAG_SOURCE: spec.source, names.TAG_TARGET: spec.train.dataset}
    else:
        raise XferError(f"no tags are defined for {type(spec).__name__}; pass a PretrainSpec, FinetuneSpec or AttackCellSpec.")
    return {**tags, names.TAG_ARCH: train.arch, names.TAG_SIZE: _text(train.size), names.TAG_FREEZE: _text(train.freeze_depth),
            names.TAG_SEED: _text(train.seed)}


# --- look-ups ---------------------------------------------------------------------------------------


def query(
    experiment: str,
    stage: str | None = None,
    status: str | None = "FINISHED",
    tags: Mapping[str, Any] | None = None,
) -> list[RunRecord]:
    """Runs of an experiment with this stage, status (None: any) and tag values, oldest first."""
    wanted = {**({names.TAG_STAGE: stage} if stage else {}), **(tags or {})}
    clauses = [f"tags.`{k}` = {_quoted(_text(v))}" for k, v in wanted.items()]
    if status is not None:
        if status not in _statuses():
            raise XferError(f"run status {status!r} is not one of {', '.join(_statuses())} (or None for any).")
        clauses.append(f"attributes.status = '{status}'")
    client = _client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], " and ".join(clauses), max_results=SEARCH_PAGE,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return [_record(run, experiment) for run in runs]


def find_finished(experiment: str, key: str) -> RunRecord | None:
    """The newest FINISHED run of the cell `key`, or None; a training run counts only with its checkpoint."""
    done = [r for r in query(experiment, tags={names.TAG_KEY: key})
            if r.stage not in TRAINING_STAGES or names.TAG_CHECKPOINT_SHA in r.tags]
    return done[-1] if done else None


def finished_by_key(experiment: str, stage: str | None = None, since: float | None = None) -> dict[str, RunRecord]:
    """Every finished cell of `stage` (all stages: None) by key, newest run per key, in one search.

    What a stage asks before it launches (which cells are done) and a pack before each cell: one request per
    1,000 runs instead of one per cell. `since` (seconds since the epoch) keeps only runs started at or after it.
    A training run counts only with its checkpoint, as in `find_finished`.
    """
    return _newest_by_key(query(experiment, stage), since)


def _newest_by_key(records: Sequence[RunRecord], since: float | None) -> dict[str, RunRecord]:
    found: dict[str, RunRecord] = {}
    for record in records:
        if (record.stage in TRAINING_STAGES and names.TAG_CHECKPOINT_SHA not in record.tags) or not record.key:
            continue
        if since is None or record.start_time.timestamp() >= since:
            found[record.key] = record   # oldest first: the newest run of a key wins
    return found


@dataclass(frozen=True)
class Snapshot:
    """Every run of an experiment, listed once: what a grid invocation asks before it runs anything (its plan, each
    stage's finished cells, the attack stage's sets, the report's inputs), from one search instead of one per
    question. Valid until something runs: a stage that launched trials asks MLflow again."""

    experiment: str
    records: tuple[RunRecord, ...]

    @staticmethod
    def take(experiment: str) -> Snapshot:
        return Snapshot(experiment, tuple(query(experiment, status=None)))

    def query(self, stage: str | None = None, status: str | None = "FINISHED") -> list[RunRecord]:
        """As `query` (oldest first), from the listing."""
        return [r for r in self.records if (stage is None or r.stage == stage) and (status is None or r.status == status)]

    def finished_by_key(self, stage: str | None = None, since: float | None = None) -> dict[str, RunRecord]:
        """As `finished_by_key`, from the listing."""
        return _newest_by_key(self.query(stage), since)


def unfinished_runs(experiment: str, stage: str, keys: Collection[str]) -> dict[str, RunRecord]:
    """The newest run of each of these cells that ended without finishing (FAILED, KILLED: a stopped grid's, or
    RUNNING: a killed process's), by key: what the cell's next attempt continues instead of starting a second run.
    Three small searches (a grid with nothing unfinished gets empty pages)."""
    found: dict[str, RunRecord] = {}
    for status in ("FAILED", "KILLED", "RUNNING"):
        for record in query(experiment, stage, status=status):
            if record.key in keys and (record.key not in found or record.start_time > found[record.key].start_time):
                found[record.key] = record
    return found


def query_keys(experiment: str, keys: Sequence[str], stage: str | None = None) -> list[RunRecord]:
    """The finished runs of these cells (oldest first): a search per key, a few requests for a pack's cells where a
    search of the whole stage returns every run it has (thousands in a large grid), once per pack."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:   # latency-bound requests
        found = [r for runs in pool.map(lambda key: query(experiment, stage, tags={names.TAG_KEY: key}), dict.fromkeys(keys))
                 for r in runs]
    return sorted(found, key=lambda r: r.start_time)


def finished_for(experiment: str, keys: Sequence[str], stage: str | None = None,
                 since: float | None = None) -> dict[str, RunRecord]:
    """As `finished_by_key`, for just these cells (`query_keys`)."""
    return _newest_by_key(query_keys(experiment, keys, stage), since)


def _statuses() -> tuple[str, ...]:
    return tuple(_ml().RunStatus.to_string(s) for s in _ml().RunStatus.all_status())


def _record(run: Any, experiment: str) -> RunRecord:
    tags = dict(run.data.tags)
    return RunRecord(
        run_id=run.info.run_id, experiment=experiment, stage=tags.get(names.TAG_STAGE, ""),
        key=tags.get(names.TAG_KEY, ""), status=run.info.status, tags=tags, params=dict(run.data.params),
        metrics=dict(run.data.metrics), start_time=_utc(run.info.start_time),
        end_time=_utc(run.info.end_time) if run.info.end_time else None, artifact_uri=run.info.artifact_uri or "",
    )


# --- artifacts --------------------------------------------------------------------------------------


def download_checkpoint(run_id: str, dst: Path | None = None, record: RunRecord | None = None) -> Path:
    """The run's checkpoint folder, verified against its sha256 tag (see `download_verified`; `record`: the run as
    a search returned it, so nothing is asked of the server for its sha256 and location)."""
    known = (record.tags.get(names.TAG_CHECKPOINT_SHA), record.artifact_uri or None) if record is not None else (None, None)
    return download_verified(run_id, names.CHECKPOINT_DIR, names.TAG_CHECKPOINT_SHA, dst, *known)


_WHAT = {names.CHECKPOINT_DIR: "checkpoint", names.ADVERSARIAL_DIR: "adversarial set"}   # in messages


def download_verified(run_id: str, artifact_dir: str, sha_tag: str, dst: Path | None = None,
                      expected: str | None = None, artifact_uri: str | None = None) -> Path:
    """A run's artifact folder `artifact_dir` (a checkpoint, an adversarial set), verified against the sha256 its
    run recorded under `sha_tag` (`checkpoint.sha256`).

    Artifacts in a local folder (the runs folder's own server keeps them there) are verified where they are and
    never copied. Others are downloaded into `dst` (default ``<runs>/downloads/<run_id>/<artifact_dir>``, so each
    node downloads a run's files once); a copy already there that verifies is reused. A mismatch anywhere is an
    XferError naming the files, never a silently loaded file. `expected` (the recorded sha256) and `artifact_uri`
    (the run's artifact location): when the caller has them from a search, no request is made for them.
    """
    client = _client()
    if expected is None or artifact_uri is None:
        run = _get_run(client, run_id)
        expected = expected or _recorded_sha(run, sha_tag)
        artifact_uri = artifact_uri or run.info.artifact_uri
    local = _local(artifact_uri)
    if local is not None and dst is None:
        folder = local / artifact_dir
        _verify(folder, expected, run_id, artifact_dir, str(folder))
        return folder
    cache = dst is None
    dst = runs_dir() / "downloads" / run_id / artifact_dir if cache else Path(dst)
    if dst.is_dir() and any(dst.iterdir()):
        if checkpoints.sha256(dst) == expected:
            return dst
        if not cache:
            raise XferError(f"{dst} already holds files that are not run {run_id}'s {artifact_dir}; pass an empty or new folder.")
        shutil.rmtree(dst)  # a damaged cached copy: fetch it again
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".download-") as staging:
        fetched = _fetch(client, run_id, artifact_dir, Path(staging))
        _verify(fetched, expected, run_id, artifact_dir, f"{_artifact_uri(client, run_id)}/{artifact_dir}")
        with contextlib.suppress(OSError):  # atomic: a concurrent reader never sees half a folder
            os.replace(fetched, dst)
    if not (dst.is_dir() and checkpoints.sha256(dst) == expected):
        raise XferError(f"could not place run {run_id}'s {artifact_dir} at {dst}; check that the folder is writable.")
    return dst


def _verify(folder: Path, expected: str, run_id: str, artifact_dir: str, where: str) -> None:
    actual = checkpoints.sha256(folder) if folder.is_dir() and any(folder.iterdir()) else "nothing"
    if actual != expected:
        raise XferError(
            f"the {_WHAT.get(artifact_dir, artifact_dir)} {where} (of run {run_id}) does not match its recorded "
            f"sha256 (recorded {expected[:12]}..., its files now hash to {actual[:12]}...): a file there was changed "
            "or damaged after it was logged, so it is refused. Re-run the cell that produced it (xfer re-runs a "
            "cell when you pass --force), or restore the file from a backup."
        )


def _local(artifact_uri: str | None) -> Path | None:
    """A run's artifact folder when it is a plain local folder (a file:// location), else None."""
    if not artifact_uri or not artifact_uri.startswith("file:"):
        return None
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    return Path(url2pathname(urlparse(artifact_uri).path))


def log_artifact_to(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """Add a file to a run's artifacts, whatever the run's status (the attack stage's score parts)."""
    _client().log_artifact(run_id, str(path), artifact_path)


def list_artifacts(run_id: str, artifact_path: str | None = None) -> list[str]:
    """The paths of a run's artifacts directly under `artifact_path` ([] when there are none)."""
    try:
        return [f.path for f in _client().list_artifacts(run_id, artifact_path)]
    except (_ml().MlflowException, OSError) as exc:
        raise XferError(f"could not list the artifacts of run {run_id} ({exc}); check that the tracking server is the "
                        "one that recorded it.") from None


def update_run(run_id: str, metrics: Mapping[str, float] | None = None, tags: Mapping[str, Any] | None = None) -> None:
    """Metrics (at step 0) and tags on an existing run, whatever its status, in one request."""
    now = _now_ms()
    _client().log_batch(run_id, metrics=[_ml().Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
                        tags=[_ml().RunTag(k, _text(v)) for k, v in (tags or {}).items()])


def download_artifact(run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
    """One artifact (file or folder) of a run, downloaded into `dst` (default: a new temporary folder)."""
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="xfer-artifact-"))
    dst.mkdir(parents=True, exist_ok=True)
    return _fetch(_client(), run_id, artifact_path, dst)


def artifact_here(run_id: str, artifact_path: str, artifact_uri: str | None, dst: Path) -> Path | None:
    """A run's artifact (file or folder) as a local path: where it is, when the run's artifacts are a local folder
    (`artifact_uri`), else downloaded into `dst`; None when the run has no such artifact."""
    local = _local(artifact_uri)
    if local is not None:
        found = local / artifact_path
        return found if found.exists() else None
    parent, _, name = artifact_path.rpartition("/")
    if name not in {Path(p).name for p in list_artifacts(run_id, parent or None)}:
        return None
    return download_artifact(run_id, artifact_path, dst)


def read_curve(run_id: str, artifact_uri: str | None = None) -> list[dict[str, Any]]:
    """The error curve a run logged with `Run.log_curve`, as its rows (read in place when the run's artifacts are a
    local folder: `artifact_uri`, from the run's record)."""
    import pyarrow.parquet as pq

    local = _local(artifact_uri)
    if local is not None:
        try:
            return pq.read_table(local / names.CURVE_FILE).to_pylist()
        except OSError:
            raise XferError(f"run {run_id} has no {names.CURVE_FILE} in {local}.") from None
    with tempfile.TemporaryDirectory(prefix="xfer-curve-") as tmp:
        return pq.read_table(download_artifact(run_id, names.CURVE_FILE, Path(tmp))).to_pylist()


def load_model(run_id: str, record: RunRecord | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model a run published, with its checkpoint metadata (verified; `record`: see `download_checkpoint`)."""
    from xfer import checkpoint  # imports torch and the model registry, which the rest of tracking never needs

    return checkpoint.load(download_checkpoint(run_id, record=record))


class LoadedModels:
    """The models runs published, each downloaded, verified and loaded once per process, onto `device` (None: where
    the checkpoint loads them): a pack's pretrained models, an attack pack's surrogates."""

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self._loaded: dict[str, torch.nn.Module] = {}

    def get(self, run_id: str, record: RunRecord | None = None) -> torch.nn.Module:
        """Run `run_id`'s model, shared: a caller that changes it copies it first."""
        if run_id not in self._loaded:
            model = load_model(run_id, record)[0]
            self._loaded[run_id] = model.to(self.device) if self.device is not None else model
        return self._loaded[run_id]


def _fetch(client: MlflowClient, run_id: str, artifact_path: str, dst: Path) -> Path:
    try:
        return Path(client.download_artifacts(run_id, artifact_path, str(dst)))
    except (_ml().MlflowException, OSError) as exc:
        raise XferError(
            f"artifact {artifact_path!r} of run {run_id} could not be downloaded ({exc}). Check that the run "
            "logged it (the MLflow UI lists a run's artifacts) and that the tracking server is the one that ran it."
        ) from None


def _artifact_uri(client: MlflowClient, run_id: str) -> str:
    """Where a run's artifacts live, as a path when the server proxies a local folder (mlflow-artifacts:/...)."""
    uri = client.get_run(run_id).info.artifact_uri
    info = read_server_file(runs_dir())
    prefix = "mlflow-artifacts:/"
    if info is not None and uri.startswith(prefix) and os.environ.get(TRACKING_URI_ENV) == info["url"]:
        return str(Path(info["artifacts"]) / uri[len(prefix):])
    return uri


def _get_run(client: MlflowClient, run_id: str) -> Any:
    try:
        return client.get_run(run_id)
    except _ml().MlflowException as exc:
        raise XferError(f"no MLflow run {run_id} at {client.tracking_uri} ({exc.error_code}); check the run id "
                        "and that MLFLOW_TRACKING_URI points at the server that recorded it.") from None


def _recorded_sha(run: Any, sha_tag: str = names.TAG_CHECKPOINT_SHA) -> str:
    sha = run.data.tags.get(sha_tag)
    if not sha:
        what = "checkpoint" if sha_tag == names.TAG_CHECKPOINT_SHA else f"verified files ({sha_tag})"
        raise XferError(f"run {run.info.run_id} ({run.info.status}) logged no {what} (no {sha_tag} tag); "
                        "use a finished run of the cell (find_finished) or re-run its cell.")
    return sha


# --- small helpers ----------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """MLflow tag and param values are strings; booleans are spelled "true"/"false"."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _quoted(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise XferError(f"cannot search for tag value {value!r}: it holds both quote characters.")


def _check_splits(rows: Sequence[Mapping[str, Any]]) -> None:
    unknown = sorted({str(row["split"]) for row in rows} - set(SPLIT_METRICS))
    if unknown:
        raise XferError(f"curve rows with split {', '.join(unknown)}: a split is one of {', '.join(SPLIT_METRICS)}.")


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
