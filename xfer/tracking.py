"""MLflow as the project's memory: the local server, runs with tags and lineage, verified checkpoints, look-ups by key.

With ``MLFLOW_TRACKING_URI`` unset, xfer starts (or reuses) one detached ``mlflow server`` on 127.0.0.1
over SQLite and an artifact folder under the runs folder (``$XFER_RUNS``, default ``./runs``); every
process, Ray workers included, logs through that server, never to the SQLite file. With
``MLFLOW_TRACKING_URI`` set (a cluster's head node), that server is used as is.

    python -m xfer.tracking serve [--root runs] [--port 5000] [--host 127.0.0.1]   # (re)start; prints the URL
    python -m xfer.tracking stop  [--root runs]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any


from xfer import names, specs
from xfer.errors import XferError

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
    from mlflow.utils import validation
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    return SimpleNamespace(MlflowClient=MlflowClient, Metric=Metric, Param=Param, RunStatus=RunStatus, RunTag=RunTag,
                           MlflowException=MlflowException, MLFLOW_PARENT_RUN_ID=MLFLOW_PARENT_RUN_ID,
                           MAX_METRICS_PER_BATCH=validation.MAX_METRICS_PER_BATCH,
                           MAX_EXPERIMENT_TAG_VAL_LENGTH=validation.MAX_EXPERIMENT_TAG_VAL_LENGTH,
                           MAX_PARAMS_TAGS_PER_BATCH=validation.MAX_PARAMS_TAGS_PER_BATCH,
                           MAX_TAG_VAL_LENGTH=validation.MAX_TAG_VAL_LENGTH)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
RUNS_ENV = "XFER_RUNS"
LOOPBACK = "127.0.0.1"
SERVER_FILE = "server.json"          # pid, port, url of the running local server
SERVER_LOG = "mlflow-server.log"
START_TIMEOUT_S = 120.0              # cold start: ~17 s on 2 idle cores, 50-85 s when they are shared; imports dominate
STOP_GRACE_S = 15.0
SEARCH_PAGE = 1000

TAG_GRID = "xfer.grid"              # experiment tag: the grid's canonical JSON (candidate for names.py)
TRAINING_STAGES = (names.PRETRAIN, names.FINETUNE, names.SCRATCH)  # their runs are finished only with a checkpoint

# Each curve row's split names the metric its error is logged under.
SPLIT_METRICS = {"train": names.TRAIN_ERROR, "val": names.VAL_ERROR, "test": names.TEST_ERROR}


# --- the local server -------------------------------------------------------------------------------


def runs_dir(root: str | Path | None = None) -> Path:
    """The runs folder: `root`, else ``$XFER_RUNS``, else ``./runs`` (absolute)."""
    return Path(root if root is not None else os.environ.get(RUNS_ENV, "runs")).expanduser().resolve()


def ensure_server(root: str | Path | None = None, port: int | None = None) -> str:
    """The tracking URI: ``$MLFLOW_TRACKING_URI`` if set, else the local server (started if not up).

    Sets ``MLFLOW_TRACKING_URI`` so that processes started afterwards (Ray workers) log to the same server.
    """
    uri = os.environ.get(TRACKING_URI_ENV)
    if uri:
        return uri
    url = start_server(root, port)
    os.environ[TRACKING_URI_ENV] = url
    return url


def start_server(root: str | Path | None = None, port: int | None = None, host: str = LOOPBACK) -> str:
    """Start the runs folder's MLflow server detached, or reuse it if it answers; return its URL.

    Ignores ``$MLFLOW_TRACKING_URI``: this is the command a cluster's head node runs to *be* that server.
    A server recorded with another port or host is restarted with the ones asked for.
    """
    root = runs_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / "server.lock"):  # two sweeps starting at once share one server
        info = _read_server_file(root)
        if info is not None:
            ours = _server_alive(info["pid"]) and _healthy(info["url"])  # not another server on a recycled port
            if ours and port in (None, info["port"]) and host == info["host"]:
                return info["url"]
            _kill_server(info["pid"])
        port = _pick_port(host, port, info["port"] if info else None)
        url = f"http://{LOOPBACK if host in (LOOPBACK, '0.0.0.0') else host}:{port}"
        proc = _spawn_server(root, host, port)
        _wait_healthy(proc, url, root / SERVER_LOG)
        _write_server_file(root, {"pid": proc.pid, "port": port, "host": host, "url": url, "started": time.time(),
                                  "backend": str(root / "mlflow.db"), "artifacts": str(root / "artifacts")})
        return url


def stop_server(root: str | Path | None = None) -> None:
    """Stop the runs folder's local server (its whole process group) and forget it; no-op if none."""
    root = runs_dir(root)
    with _locked(root / "server.lock") if root.is_dir() else contextlib.nullcontext():
        info = _read_server_file(root)
        if info is None:
            return
        _kill_server(info["pid"])
        (root / SERVER_FILE).unlink(missing_ok=True)
    if os.environ.get(TRACKING_URI_ENV) == info["url"]:
        del os.environ[TRACKING_URI_ENV]


def recorded(root: str | Path | None = None) -> bool:
    """Whether MLflow may hold runs already: a tracking URI is set, or the runs folder has a database. A dry
    run asks before it starts a server: with nothing recorded there is nothing to look up."""
    return bool(os.environ.get(TRACKING_URI_ENV)) or (runs_dir(root) / "mlflow.db").exists()


def worker_env() -> dict[str, str]:
    """Environment for Ray workers (``runtime_env={"env_vars": ...}``): the tracking URI, runs folder, retry settings."""
    env = {TRACKING_URI_ENV: ensure_server(), RUNS_ENV: str(runs_dir())}
    return env | {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP_REQUEST_")}


def ui_url(experiment: str | None = None) -> str:
    """Where to point a browser: the tracking server, or one experiment's page on it."""
    uri = ensure_server()
    found = _client().get_experiment_by_name(experiment) if experiment else None
    return f"{uri}/#/experiments/{found.experiment_id}" if found else uri


def _spawn_server(root: Path, host: str, port: int) -> subprocess.Popen:
    db = root / "mlflow.db"
    # WAL lets readers (UI, look-ups) proceed while a run writes; the mode persists in the file.
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
        "--workers", "1",  # one process owns the SQLite file; its threads queue on SQLite's busy timeout
        "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(root / "artifacts"),
    ]
    env = {k: v for k, v in os.environ.items() if k != TRACKING_URI_ENV}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runner: 8 fewer processes, start in half the time
    with open(root / SERVER_LOG, "ab") as log_file:
        # A new session: the server outlives this process and Ctrl-C in this terminal; stop kills the group.
        return subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(url):
            return
        if proc.poll() is not None:
            raise XferError(
                f"the MLflow server exited (code {proc.returncode}) before answering at {url}; its log "
                f"{log_path} ends: {_tail(log_path)}. Fix what the log names (mlflow missing from {sys.executable}'s "
                "environment, a port taken, a damaged mlflow.db) and run `python -m xfer.tracking serve` again."
            )
        time.sleep(0.25)
    _kill_server(proc.pid)
    raise XferError(
        f"the MLflow server did not answer at {url} within {timeout:.0f} s, so it was stopped; its log {log_path} "
        f"ends: {_tail(log_path)}. On a heavily loaded machine run `python -m xfer.tracking serve` once before the grid."
    )


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy
    try:
        with opener.open(url + "/health", timeout=2) as response:
            return response.status == 200 and response.read(2) == b"OK"
    except OSError:
        return False


def _pick_port(host: str, port: int | None, previous: int | None) -> int:
    if port is not None:
        if not _port_free(host, port):
            raise XferError(
                f"port {port} on {host} is in use by another program, so the MLflow server cannot start there. "
                f"Choose another port (--port / port=), leave it unset to pick a free one, or stop what listens "
                f"there (`ss -ltnp 'sport = :{port}'` names it)."
            )
        return port
    if previous is not None and _port_free(host, previous):
        return previous  # same URL as last time: open UI tabs keep working
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is not "in use"
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _kill_server(pgid: int) -> None:
    """SIGTERM the server's process group, SIGKILL it after a grace period."""
    if not _server_alive(pgid):
        return
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _server_alive(pgid):
                return
            time.sleep(0.1)


def _server_alive(pgid: int) -> bool:
    """Whether a live mlflow process remains in the group (a recycled pid that is not mlflow is not ours)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)  # reap the leader if this process started it
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True  # no /proc (macOS): trust the recorded group id
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z" and b"mlflow" in cmdline:
            return True
    return False


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _read_server_file(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / SERVER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_server_file(root: Path, info: dict[str, Any]) -> None:
    partial = root / (SERVER_FILE + ".partial")
    partial.write_text(json.dumps(info, indent=2))
    partial.replace(root / SERVER_FILE)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no log)"


# --- experiments and runs ---------------------------------------------------------------------------


def _client() -> MlflowClient:
    # A grid ends thousands of runs: no "View run at" lines (each costing a request) and no progress bars.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Explicit run ids on an explicit client: no fluent global active run to race on between threads.
    return _ml().MlflowClient(tracking_uri=ensure_server())


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created if missing (safe when many processes create it at once)."""
    client = _client()
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
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


def log_grid(experiment: str, description: str) -> None:
    """Record the grid's canonical JSON on its experiment (tag TAG_GRID), so MLflow alone can reproduce it."""
    if len(description) > _ml().MAX_EXPERIMENT_TAG_VAL_LENGTH:
        log.warning("grid description of %d characters exceeds MLflow's %d; not recorded on experiment %r",
                    len(description), _ml().MAX_EXPERIMENT_TAG_VAL_LENGTH, experiment)
        return
    _client().set_experiment_tag(experiment_id(experiment), TAG_GRID, description)


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


class Terminated(SystemExit):
    """Raised in the main thread by the SIGTERM handler of `start_run`; unwinds the run, exits 128+signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class Run:
    """Handle on one open run, yielded by `start_run`. Every call names the run id explicitly."""

    def __init__(self, client: MlflowClient, run_id: str, experiment: str) -> None:
        self.run_id = run_id
        self.experiment = experiment
        self.ended = False
        self._client = client

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = _now_ms()
        self._log_batch([_ml().Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

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
                   step: int = 0) -> None:
        """Curve rows as metric points, and `metrics` at `step`, in one batch (a request per 1,000 values)."""
        _check_splits(rows)
        now = _now_ms()
        self._log_batch([_ml().Metric(SPLIT_METRICS[r["split"]], float(r["error"]), now, int(r["step"])) for r in rows]
                        + [_ml().Metric(k, float(v), now, step) for k, v in (metrics or {}).items()])

    def last_step(self, metric: str) -> int | None:
        """The largest step at which `metric` was logged in this run, or None (what a resumed cell has already logged)."""
        history = self._client.get_metric_history(self.run_id, metric)
        return max((m.step for m in history), default=None)

    def log_checkpoint(self, directory: Path) -> str:
        """Upload a checkpoint folder as names.CHECKPOINT_DIR and tag its sha256 (set after the upload)."""
        sha = checkpoint_sha256(directory)
        self._client.log_artifacts(self.run_id, str(directory), names.CHECKPOINT_DIR)
        self.set_tags({names.TAG_CHECKPOINT_SHA: sha})
        return sha

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file (at `artifact_path`, default the run's root) or a folder (default: under its own name)."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path if artifact_path is not None else path.name)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._log_batch(tags=[_ml().RunTag(k, _text(v)) for k, v in tags.items()])

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Flat params; a spec (dataclass) is flattened with specs.to_flat."""
        flat = specs.to_flat(params) if dataclasses.is_dataclass(params) else params
        self._log_batch(params=[_ml().Param(k, _text(v)) for k, v in flat.items()])

    def fail(self, reason: str) -> None:
        """End the run FAILED with `reason` (e.g. a NaN loss); the `start_run` block then exits quietly."""
        self._end(_ml().RunStatus.FAILED, reason)

    def _end(self, status: int, reason: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if reason:
            self._client.set_tag(self.run_id, names.TAG_FAILURE, reason[:_ml().MAX_TAG_VAL_LENGTH])
        self._client.set_terminated(self.run_id, _ml().RunStatus.to_string(status))

    def _end_quietly(self, status: int, reason: str) -> None:
        try:
            self._end(status, reason)
        except Exception as exc:  # never mask the exception that is ending the run
            log.warning("could not mark run %s %s: %s", self.run_id, _ml().RunStatus.to_string(status), exc)

    def _log_batch(self, metrics: Sequence[Any] = (), params: Sequence[Any] = (), tags: Sequence[Any] = ()) -> None:
        # One request per chunk instead of one per value: fewer SQLite write transactions under many writers.
        for chunk in _chunks(list(metrics), _ml().MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)
        for chunk in _chunks(list(params), _ml().MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk)
        for chunk in _chunks(list(tags), _ml().MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=chunk)


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
) -> Iterator[Run]:
    """One run of one cell; never left RUNNING by a process that can still act.

    Ends FINISHED when the block completes; FAILED with names.TAG_FAILURE when it raises (re-raised);
    KILLED on SIGTERM, Ctrl-C or SystemExit. In the main thread a SIGTERM handler is installed for the
    block (the previous one is restored, and called, afterwards); SIGKILL can only be cleaned up later,
    by `end_stale_runs`. `resume_run_id` reopens that run (a resumed trial) when it still exists.
    """
    client = _client()
    run_tags = {names.TAG_STAGE: stage, names.TAG_KEY: key, names.TAG_EXPERIMENT: experiment, **(tags or {})}
    if parent_run_id:
        run_tags[_ml().MLFLOW_PARENT_RUN_ID] = parent_run_id
    run_tags = {k: _text(v) for k, v in run_tags.items()}
    run_id = _reopen(client, resume_run_id, run_tags) if resume_run_id else None
    if run_id is None:
        run_id = client.create_run(experiment_id(experiment), tags=run_tags, run_name=run_name or f"{stage}-{key}").info.run_id
    run = Run(client, run_id, experiment)
    previous = _install_sigterm()
    try:
        if params is not None:
            run.log_params(params)
        yield run
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
    if names.TAG_FAILURE in previous.data.tags:
        client.delete_tag(run_id, names.TAG_FAILURE)  # the earlier attempt's failure no longer describes the run
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
            names.TAG_LR: _text(train.lr), names.TAG_SEED: _text(train.seed)}


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
    found: dict[str, RunRecord] = {}
    for record in query(experiment, stage):
        if (record.stage in TRAINING_STAGES and names.TAG_CHECKPOINT_SHA not in record.tags) or not record.key:
            continue
        if since is None or record.start_time.timestamp() >= since:
            found[record.key] = record   # oldest first: the newest run of a key wins
    return found


def _statuses() -> tuple[str, ...]:
    return tuple(_ml().RunStatus.to_string(s) for s in _ml().RunStatus.all_status())


def _record(run: Any, experiment: str) -> RunRecord:
    tags = dict(run.data.tags)
    return RunRecord(
        run_id=run.info.run_id, experiment=experiment, stage=tags.get(names.TAG_STAGE, ""),
        key=tags.get(names.TAG_KEY, ""), status=run.info.status, tags=tags, params=dict(run.data.params),
        metrics=dict(run.data.metrics), start_time=_utc(run.info.start_time),
        end_time=_utc(run.info.end_time) if run.info.end_time else None,
    )


# --- artifacts --------------------------------------------------------------------------------------


def checkpoint_sha256(directory: Path) -> str:
    """sha256 over a folder's files: each relative name, size and bytes, in sorted name order."""
    directory = Path(directory)
    files = sorted((p.relative_to(directory).as_posix(), p) for p in directory.rglob("*") if p.is_file())
    if not files:
        raise XferError(f"no checkpoint files in {directory}; write the checkpoint (xfer.checkpoint.save) before logging it.")
    digest = hashlib.sha256()
    for name, path in files:
        for field in (name.encode(), str(path.stat().st_size).encode()):
            digest.update(len(field).to_bytes(8, "big") + field)  # length-prefixed: no two folders hash alike
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def download_checkpoint(run_id: str, dst: Path | None = None) -> Path:
    """The run's checkpoint folder, verified against its sha256 tag.

    `dst` (default ``<runs>/downloads/<run_id>``) becomes the checkpoint folder; a copy already there
    that verifies is reused. A mismatch anywhere is an XferError, never a silently loaded model.
    """
    client = _client()
    expected = _recorded_sha(client, run_id)
    cache = dst is None
    dst = runs_dir() / "downloads" / run_id if cache else Path(dst)
    if dst.is_dir() and any(dst.iterdir()):
        if checkpoint_sha256(dst) == expected:
            return dst
        if not cache:
            raise XferError(f"{dst} already holds files that are not run {run_id}'s checkpoint; pass an empty or new folder.")
        shutil.rmtree(dst)  # a damaged cached copy: fetch it again
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".download-") as staging:
        fetched = _fetch(client, run_id, names.CHECKPOINT_DIR, Path(staging))
        actual = checkpoint_sha256(fetched) if fetched.is_dir() and any(fetched.iterdir()) else "nothing"
        if actual != expected:
            where = f"{_artifact_uri(client, run_id)}/{names.CHECKPOINT_DIR}"
            raise XferError(
                f"the checkpoint {where} (of run {run_id}) does not match its recorded sha256 (recorded "
                f"{expected[:12]}..., its files now hash to {actual[:12]}...): a file there was changed or damaged after "
                "it was logged, so the checkpoint is refused. Re-run the cell that produced it (xfer re-runs a cell "
                "when you pass --force), or restore the file from a backup."
            )
        with contextlib.suppress(OSError):  # atomic: a concurrent reader never sees half a checkpoint
            os.replace(fetched, dst)
    if not (dst.is_dir() and checkpoint_sha256(dst) == expected):
        raise XferError(f"could not place run {run_id}'s checkpoint at {dst}; check that the folder is writable.")
    return dst


def download_artifact(run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
    """One artifact (file or folder) of a run, downloaded into `dst` (default: a new temporary folder)."""
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="xfer-artifact-"))
    dst.mkdir(parents=True, exist_ok=True)
    return _fetch(_client(), run_id, artifact_path, dst)


def read_curve(run_id: str) -> list[dict[str, Any]]:
    """The error curve a run logged with `Run.log_curve`, as its rows."""
    with tempfile.TemporaryDirectory(prefix="xfer-curve-") as tmp:
        import pyarrow.parquet as pq

        return pq.read_table(download_artifact(run_id, names.CURVE_FILE, Path(tmp))).to_pylist()


def load_model(run_id: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model a run published, with its checkpoint metadata (downloaded and verified)."""
    from xfer import checkpoint  # imports torch and the model registry, which the rest of tracking never needs

    return checkpoint.load(download_checkpoint(run_id))


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
    info = _read_server_file(runs_dir())
    prefix = "mlflow-artifacts:/"
    if info is not None and uri.startswith(prefix) and os.environ.get(TRACKING_URI_ENV) == info["url"]:
        return str(Path(info["artifacts"]) / uri[len(prefix):])
    return uri


def _recorded_sha(client: MlflowClient, run_id: str) -> str:
    try:
        run = client.get_run(run_id)
    except _ml().MlflowException as exc:
        raise XferError(f"no MLflow run {run_id} at {client.tracking_uri} ({exc.error_code}); check the run id "
                        "and that MLFLOW_TRACKING_URI points at the server that recorded it.") from None
    sha = run.data.tags.get(names.TAG_CHECKPOINT_SHA)
    if not sha:
        raise XferError(f"run {run_id} ({run.info.status}) logged no checkpoint (no {names.TAG_CHECKPOINT_SHA} tag); "
                        "use a finished training run (find_finished) or re-run its cell.")
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


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xfer.tracking", description="The local MLflow tracking server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="(re)start the runs folder's MLflow server and print its URL")
    serve.add_argument("--root", help="runs folder (default: $XFER_RUNS, else ./runs)")
    serve.add_argument("--port", type=int, help="default: the last port used, else a free one")
    serve.add_argument("--host", default=LOOPBACK, help="bind address; 0.0.0.0 on a cluster head so workers reach it")
    stop = commands.add_parser("stop", help="stop the runs folder's MLflow server")
    stop.add_argument("--root", help="runs folder (default: $XFER_RUNS, else ./runs)")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            print(start_server(args.root, args.port, args.host))
        else:
            stop_server(args.root)
    except XferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
