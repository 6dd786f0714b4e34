"""The local MLflow server: one detached `mlflow server` per runs folder, on 127.0.0.1, over SQLite.

With ``MLFLOW_TRACKING_URI`` unset, xfer starts (or reuses) the runs folder's server (``$XFER_RUNS``, default
``./runs``); every process, Ray workers included, logs through it, never to the SQLite file. With
``MLFLOW_TRACKING_URI`` set (a cluster's head node), that server is used as is. `xfer serve` / `xfer stop`
(xfer.cli) start and stop it by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xfer import jsonfile
from xfer.errors import XferError

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
RUNS_ENV = "XFER_RUNS"
LOOPBACK = "127.0.0.1"
SERVER_FILE = "server.json"          # pid, port, url of the running local server
SERVER_LOG = "mlflow-server.log"
START_TIMEOUT_S = 120.0              # cold start: ~17 s on 2 idle cores, 50-85 s when they are shared; imports dominate
STOP_GRACE_S = 15.0
WATCH_EVERY_S = 5.0                  # a running grid checks its tracking server this often (`Watch`)
SAY_EVERY_S = 20.0                   # ... and says so at least this often while the server does not answer
HUNG_S = 60.0                        # our own server alive but not answering this long: restarted (a busy server is slow, not dead)
PATIENCE_S = 300.0                   # a server xfer did not start, unreachable this long: the grid stops (--mlflow-patience)


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


def start_server(root: str | Path | None = None, port: int | None = None, host: str = LOOPBACK,
                 echo: Callable[[str], None] | None = None) -> str:
    """Start the runs folder's MLflow server detached, or reuse it if it answers; return its URL.

    Ignores ``$MLFLOW_TRACKING_URI``: this is the command a cluster's head node runs to *be* that server.
    A server recorded with another port or host is restarted with the ones asked for. `echo` hears how a slow
    start goes, every SAY_EVERY_S.
    """
    root = runs_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / "server.lock"):  # two sweeps starting at once share one server
        info = read_server_file(root)
        if info is not None:
            ours = _server_alive(info["pid"]) and _healthy(info["url"])  # not another server on a recycled port
            if ours and port in (None, info["port"]) and host == info["host"]:
                return info["url"]
            _kill_server(info["pid"])
        port = _pick_port(host, port, info["port"] if info else None)
        url = f"http://{LOOPBACK if host in (LOOPBACK, '0.0.0.0') else host}:{port}"
        proc = _spawn_server(root, host, port)
        _wait_healthy(proc, url, root / SERVER_LOG, echo=echo)
        # "pid" is the process group's leader (the `mlflow server` wrapper): stopping and health checks act on the whole
        # group, so a wrapper that died while its worker serves is still this server; "serving" names the worker(s).
        _write_server_file(root, {"pid": proc.pid, "serving": _members(proc.pid), "port": port, "host": host,
                                  "url": url, "started": time.time(), "backend": str(root / "mlflow.db"),
                                  "artifacts": str(root / "artifacts")})
        return url


def stop_server(root: str | Path | None = None) -> None:
    """Stop the runs folder's local server (its whole process group) and forget it; no-op if none."""
    root = runs_dir(root)
    with _locked(root / "server.lock") if root.is_dir() else contextlib.nullcontext():
        info = read_server_file(root)
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


# Ray (2.60, as installed here; ray-project/ray#54868) leaves CUDA_VISIBLE_DEVICES as the node has it for a task or actor that asks for no GPU, so a
# `--gpus-per-trial 0` trial on a GPU node would see every GPU, and torch would put it on cuda:0, beside the trials
# the scheduler gave that GPU. With this set, Ray hides them (CUDA_VISIBLE_DEVICES="") as it did before.
HIDE_UNASSIGNED_GPUS = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}


def worker_env() -> dict[str, str]:
    """Environment for Ray workers (``runtime_env={"env_vars": ...}``): the tracking URI, runs folder, retry settings,
    and no GPU visible to a worker Ray gave none (`HIDE_UNASSIGNED_GPUS`)."""
    env = {TRACKING_URI_ENV: ensure_server(), RUNS_ENV: str(runs_dir()), **HIDE_UNASSIGNED_GPUS}
    return env | {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP_REQUEST_")}


class Watch:
    """The tracking server, watched while a grid runs (a daemon thread; `with Watch(echo, on_lost=...)`).

    The runs folder's own server (the one xfer started) is restarted on the same store and port when its process has
    died, or after HUNG_S without an answer: the cells' requests, which MLflow's client retries for minutes, then go
    through to the same URL and nothing they logged is lost. A server xfer did not start (`MLFLOW_TRACKING_URI`) is
    waited for, a line every SAY_EVERY_S, up to `patience_s`; then `on_lost(reason)` (the grid stops cleanly). While
    the server does not answer, the terminal hears about it at least every SAY_EVERY_S.
    """

    def __init__(self, echo: Callable[[str], None], on_lost: Callable[[str], None] | None = None,
                 patience_s: float = PATIENCE_S, every_s: float = WATCH_EVERY_S, root: str | Path | None = None,
                 url: str | None = None) -> None:
        self.echo, self.on_lost, self.patience_s, self.every_s = echo, on_lost, patience_s, every_s
        self.root = runs_dir(root)
        self.url = url or os.environ.get(TRACKING_URI_ENV, "")   # the server the grid's processes log to
        self.restarts = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="xfer-mlflow-watch")

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join(timeout=self.every_s + 5)

    def _watch(self) -> None:
        url = self.url
        down_since: float | None = None
        said = 0.0
        while not self._done.wait(self.every_s):
            if _healthy(url):
                if down_since is not None:
                    self.echo(f"MLflow at {url} answers again after {time.monotonic() - down_since:.0f} s; the cells go on.")
                down_since = None
                continue
            now = time.monotonic()
            down_since = down_since or now
            info = read_server_file(self.root)
            ours = info is not None and info.get("url") == url
            if ours and (not _server_alive(info["pid"]) or now - down_since >= HUNG_S):
                url = self._restart(info, now - down_since) or url
                down_since = None
                continue
            if now - said >= SAY_EVERY_S:
                said = now
                waited = now - down_since
                if ours:
                    self.echo(f"MLflow server at {url} has not answered for {waited:.0f} s (its process is alive: busy, "
                              f"or hung; restarted if it stays silent {HUNG_S:.0f} s).")
                else:
                    self.echo(f"MLflow at {url} unreachable for {waited:.0f} s, retry in {self.every_s:.0f} s (the grid "
                              f"stops after {self.patience_s:.0f} s: --mlflow-patience).")
            if not ours and now - down_since >= self.patience_s:
                if self.on_lost is not None:
                    self.on_lost(f"the MLflow tracking server at {url} did not answer for {self.patience_s:.0f} s")
                return

    def _restart(self, info: dict[str, Any], waited: float) -> str | None:
        """Start the runs folder's server again on its store and port; its URL, or None if it could not be done."""
        dead = not _server_alive(info["pid"])
        self.echo(f"MLflow server at {info['url']} {'has exited' if dead else f'has not answered for {waited:.0f} s'}; "
                  f"restarting it on the same runs folder ({self.root}) …")
        began = time.monotonic()
        try:
            url = start_server(self.root, port=info["port"], host=info.get("host", LOOPBACK), echo=self.echo)
        except XferError as exc:
            self.echo(f"could not restart the MLflow server: {exc}")
            if self.on_lost is not None:
                self.on_lost(f"the MLflow tracking server at {info['url']} died and could not be restarted ({exc})")
            self._done.set()
            return None
        self.restarts += 1
        self.echo(f"MLflow server restarted at {url} in {time.monotonic() - began:.0f} s; the cells go on "
                  "(their requests are retried).")
        return url


def _spawn_server(root: Path, host: str, port: int) -> subprocess.Popen:
    db = root / "mlflow.db"
    # WAL lets readers (UI, look-ups) proceed while a run writes; the mode persists in the file.
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    artifacts = root / "artifacts"
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
        "--workers", "1",  # one process owns the SQLite file; its threads queue on SQLite's busy timeout
        "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts),
    ]
    if host == LOOPBACK:
        # New experiments keep their artifacts in the runs folder as plain files: a loopback server and every process
        # that logs to it run on this machine, so checkpoints, curves, adversarial sets and score tables are written
        # and read there directly instead of through the server (three uploads a cell, and the server's CPU on two
        # cores). A server for other hosts (`xfer serve --host 0.0.0.0`) proxies them; experiments recorded before
        # (mlflow-artifacts:/ locations) are served from the same folder either way.
        cmd += ["--default-artifact-root", artifacts.as_uri()]
    env = {k: v for k, v in os.environ.items() if k != TRACKING_URI_ENV}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runner: 8 fewer processes, start in half the time
    with open(root / SERVER_LOG, "ab") as log_file:
        # A new session: the server outlives this process and Ctrl-C in this terminal; stop kills the group.
        return subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = START_TIMEOUT_S,
                  echo: Callable[[str], None] | None = None) -> None:
    began = time.monotonic()
    deadline, said = began + timeout, began
    while time.monotonic() < deadline:
        if _healthy(url):
            return
        if echo is not None and time.monotonic() - said >= SAY_EVERY_S:
            said = time.monotonic()
            echo(f"MLflow server at {url} still starting ({said - began:.0f} s; a cold start takes up to ~85 s on two "
                 "busy cores)")
        if proc.poll() is not None:
            raise XferError(
                f"the MLflow server exited (code {proc.returncode}) before answering at {url}; its log "
                f"{log_path} ends: {_tail(log_path)}. Fix what the log names (mlflow missing from {sys.executable}'s "
                "environment, a port taken, a damaged mlflow.db) and run `xfer serve` again."
            )
        time.sleep(0.25)
    _kill_server(proc.pid)
    raise XferError(
        f"the MLflow server did not answer at {url} within {timeout:.0f} s, so it was stopped; its log {log_path} "
        f"ends: {_tail(log_path)}. On a heavily loaded machine run `xfer serve` once before the grid."
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
    if not Path("/proc").is_dir():
        return True  # no /proc (macOS): trust the recorded group id
    return bool(_members(pgid))


def _members(pgid: int) -> list[int]:
    """The live mlflow processes of the group: the wrapper and the worker(s) that serve ([] without /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        # An empty command line: the process is exiting (its memory already released), not yet gone.
        if int(pgrp) == pgid and state != "Z" and (b"mlflow" in cmdline or not cmdline):
            found.append(int(stat.parent.name))
    return sorted(found)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def read_server_file(root: Path) -> dict[str, Any] | None:
    return jsonfile.read(root / SERVER_FILE)


def _write_server_file(root: Path, info: dict[str, Any]) -> None:
    jsonfile.write(root / SERVER_FILE, info)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no log)"
