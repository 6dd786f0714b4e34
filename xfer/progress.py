"""What the grid's user sees: one live progress view, and everything else in a log file in the runs folder.

`GridView` is the terminal: the plan, a progress line per stage (done / running / failed / total cells, cells
per minute, ETA) with each running pack named by its running cell's axes, failures with their reason, the end
summary. It is built on rich: on a terminal the view updates in place; in a log (no tty) it prints a line per
change. It hears Ray Tune through a Tune `Callback` (`StageProgress.callback`), which works whatever Tune's
own output mode is; Tune's tables stay off unless `--verbose`.

`quiet_logs` sends Ray's start-up banner, Ray's and MLflow's loggers and Tune's messages to
``<runs>/logs/<name>-<time>.log`` (`-v/--verbose` keeps them on the terminal too).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from xfer import names, server

NOISY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.data", "mlflow", "alembic", "optuna", "urllib3", "filelock")
LOG = logging.getLogger("xfer.progress")   # what the terminal shows, and each running cell's epochs, in the log file
EPOCH_LINE_EVERY_S = 30.0   # a running cell's progress line at most this often where output is not a terminal


def log_path(name: str) -> Path:
    """Where this invocation's log goes: ``<runs>/logs/<name>-<time>.log``."""
    folder = server.runs_dir() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


@contextlib.contextmanager
def quiet_logs(path: Path, enabled: bool = True) -> Iterator[None]:
    """For the block, Ray's, MLflow's and Optuna's loggers write to `path` and not to the terminal (a no-op
    when not `enabled`: --verbose)."""
    if not enabled:
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = {}
    for name in (*NOISY_LOGGERS, LOG.name):
        logger = logging.getLogger(name)
        saved[name] = (logger.level, logger.propagate, list(logger.handlers))
        logger.handlers = [handler]   # Ray's own console handler too: its messages belong in the log
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield
    finally:
        for name, (level, propagate, handlers) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        handler.close()


@contextlib.contextmanager
def redirected(path: Path | None) -> Iterator[None]:
    """The process's stdout and stderr file descriptors go to `path` for the block (output written by C++ code,
    such as Ray's start-up banner, included); a no-op for None."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


@dataclass
class _Running:
    pack: str                      # what the pack's cells share
    cell: str = ""                 # the cell it trains now (its axes)
    epoch: float = 0.0
    epochs: float = 0.0
    shown: float = 0.0             # when its last epoch line was printed (monotonic)


@dataclass
class StageProgress:
    """One stage's counts, fed by its Tune callback; `render` draws its lines."""

    name: str
    total: int                      # cells this invocation runs (finished ones are not counted)
    view: GridView
    done: int = 0
    failed: int = 0
    stopped: int = 0
    started: float = field(default_factory=time.monotonic)
    running: dict[str, _Running] = field(default_factory=dict)

    def partly_done(self) -> float:
        """The running cells' share of their epochs: work done that no finished cell counts yet (a cell at its last
        epoch has finished, or is about to, and is counted by `done`)."""
        return sum(run.epoch / run.epochs for run in self.running.values() if 0 < run.epoch < run.epochs)

    def rate(self) -> float:
        """Cells per minute so far, counting the running cells' finished epochs."""
        minutes = (time.monotonic() - self.started) / 60
        return (self.done + self.partly_done()) / minutes if minutes > 0 else 0.0

    def eta(self) -> str:
        left, rate = self.total - self.done - self.failed - self.partly_done(), self.rate()
        if left <= 0:
            return "0 s"
        return _duration(left / rate * 60) if rate else "…"

    def headline(self) -> str:
        # The done count padded to the total's width: the columns after it stay put as it grows (9/13, then 10/13).
        width = len(str(self.total))
        return (f"{self.name:<9} {self.done:>{width}}/{self.total} cells done, {len(self.running)} running, "
                f"{self.failed} failed, {self.rate():.1f} cells/min, ETA {self.eta()}")

    def render(self) -> Group:
        lines = [Text(self.headline(), style="bold")]
        for run in self.running.values():
            where = f"{run.cell or run.pack}"
            if run.epochs:
                where += f"  epoch {run.epoch:g}/{run.epochs:g}" if run.epoch == int(run.epoch) else \
                    f"  epoch {run.epoch:.1f}/{run.epochs:g}"
            lines.append(Text(f"  ▸ {where}", style="dim" if not run.cell else ""))
        return Group(*lines)

    def callback(self) -> Any:
        """The Tune callback that feeds this stage's counts."""
        return _TuneCallback(self)

    # --- events ---------------------------------------------------------------------------------------
    def started_pack(self, trial_id: str, pack: str) -> None:
        self.running[trial_id] = _Running(pack)
        self.view.changed(f"{self.name}: started {pack}")

    def result(self, trial_id: str, result: dict[str, Any]) -> None:
        """A trial's report: the cell it runs now (and its epoch), and the cells that ended since its last report
        (`Throttled`'s "ended", or one cell's "cell_finished")."""
        run = self.running.setdefault(trial_id, _Running(str(result.get("pack", ""))))
        cell = str(result.get("cell", "") or run.cell)
        if cell != run.cell and cell:
            self.view.changed(f"{self.name}: training {cell}", quiet=True)
        epoch = float(result.get("epoch", 0) or 0)
        newer = cell == run.cell and epoch > run.epoch or cell != run.cell and epoch > 0
        run.cell, run.epoch, run.epochs = cell, epoch, float(result.get("epochs", 0) or 0)
        if newer and run.epochs and epoch < run.epochs and time.monotonic() - run.shown >= EPOCH_LINE_EVERY_S:
            # Life inside a long cell where output goes to a file (a terminal shows it in the live block): an
            # epoch's end with its validation error, or, within a long epoch, how far it is with its train error.
            run.shown = time.monotonic()
            ended_epoch = epoch == int(epoch)
            key = names.VAL_ERROR if ended_epoch else names.TRAIN_ERROR
            err = result.get(key)
            where = f"{epoch:g}" if ended_epoch else f"{epoch:.2f}"
            self.view.progress(f"{self.name}: {cell} epoch {where}/{run.epochs:g}"
                               + (f", {key} {float(err):.4f}" if err is not None and err == err else ""))
        ended = json.loads(result.get(ENDED, "") or "[]")
        if "cell_finished" in result:
            ended.append([cell, "" if result["cell_finished"] else str(result.get("reason", "") or "failed")])
        for label, reason, *how in ended:
            if how == ["stopped"]:   # its grid is stopping: saved resumable, neither done nor failed
                self.stopped += 1
                self.view.changed(f"{self.name}: stopped {label} (resumable)")
                continue
            self.done += not reason
            self.failed += bool(reason)
            self.view.changed(f"{self.name}: {'FAILED' if reason else 'finished'} {label}{f': {reason}' if reason else ''}")
        if not ended:
            self.view.refresh()

    def ended_pack(self, trial_id: str, error: str = "") -> None:
        run = self.running.pop(trial_id, None)
        if error and run is not None:
            self.view.changed(f"{self.name}: pack {run.pack} crashed: {error}")
        self.view.refresh()


ENDED = "ended_json"   # a trial report's cells that ended since its last one: JSON [[label, reason ("" if ok)
                       # (, "stopped")], ...]
REPORT_INTERVAL_S = 2.0   # a trial hands Tune its progress at most this often (each report waits for Tune's driver)


class Throttled:
    """A trial's side of the progress view: what its cells do, handed to Tune at most every `interval_s` seconds.

    Each `tune.report` of a function trainable waits until Tune's driver has taken the result: a report per cell
    and epoch cost a round trip each (~0.1 s of a slot per cell on the 2-core machine with thousands of cells).
    Events between reports are kept: the latest running cell, and every cell that ended (none is lost).
    `send(metrics, state_dir)` is the trial's report; a checkpoint (`state_dir`) is always sent at once, with what
    is pending. `interval_s=0` sends every event (data-parallel ranks must report equally often)."""

    def __init__(self, send: Callable[[dict[str, Any], Path | None], None], interval_s: float = REPORT_INTERVAL_S) -> None:
        self._send, self.interval_s = send, interval_s
        self._latest: dict[str, Any] = {}
        self._ended: list[list[str]] = []
        self._last = time.monotonic()

    def progress(self, metrics: dict[str, Any], state_dir: Path | None = None) -> None:
        """The running cell's progress (its label as "cell", "epoch", "epochs", counts); sent when due."""
        self._latest = dict(metrics)
        self._maybe(state_dir)

    def ended(self, label: str, reason: str = "", counts: dict[str, Any] | None = None, stopped: bool = False) -> None:
        """A cell ended (failed with `reason`, if any; or `stopped`: its grid is stopping); sent when due."""
        self._ended.append([label, reason, "stopped"] if stopped else [label, reason])
        self._latest = {**self._latest, "cell": label, **(counts or {})}
        self._maybe(None)

    def flush(self, metrics: dict[str, Any] | None = None) -> None:
        """Send what is pending now, with `metrics` (the trial's last report)."""
        self._emit({**self._latest, **(metrics or {})}, None)

    def _maybe(self, state_dir: Path | None) -> None:
        if state_dir is not None or time.monotonic() - self._last >= self.interval_s:
            self._emit(self._latest, state_dir)

    def _emit(self, metrics: dict[str, Any], state_dir: Path | None) -> None:
        metrics = {k: v for k, v in metrics.items() if k not in ("cell_finished", "reason")}
        self._send({**metrics, ENDED: json.dumps(self._ended)}, state_dir)
        self._ended = []
        self._last = time.monotonic()


class _TuneCallback:
    """A ray.tune.Callback (built lazily, so importing this module does not import Ray)."""

    def __new__(cls, stage: StageProgress) -> Any:
        from ray import tune

        class Feed(tune.Callback):
            def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                stage.started_pack(trial.trial_id, str(trial.config.get("cell", {}).get("cells", "")))

            def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
                stage.result(trial.trial_id, result)

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                stage.ended_pack(trial.trial_id)

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                stage.ended_pack(trial.trial_id, str(getattr(trial, "error_msg", "") or "see the log").splitlines()[-1][:200])

            def __reduce__(self) -> tuple[Any, tuple[()]]:
                # Tune pickles its run config (callbacks included) into the experiment folder; that copy is a
                # silent callback, since a terminal cannot be pickled. The live Tuner keeps this object.
                return tune.Callback, ()

        return Feed()


class GridView:
    """The terminal of one grid invocation: lines (plan, summaries) and a live block of the stages in flight."""

    def __init__(self, console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.live_mode = self.console.is_terminal if live is None else live
        self.stages: list[StageProgress] = []
        self._live: Live | None = None

    def __enter__(self) -> GridView:
        if self.live_mode:
            self._live = Live(Group(), console=self.console, refresh_per_second=4, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def line(self, text: str) -> None:
        """A line that stays (above the live block on a terminal); in the log file too."""
        self.console.print(text, markup=False, highlight=False)
        LOG.info(text)

    def progress(self, text: str) -> None:
        """A running cell's progress: a line where output is not a terminal (the live block shows it there), and
        in the log file either way."""
        if self._live is None:
            self.line(text)
        else:
            LOG.info(text)

    def stage(self, name: str, total: int) -> StageProgress:
        progress = StageProgress(name, total, self)
        self.stages.append(progress)
        self.refresh()
        return progress

    def finish_stage(self, progress: StageProgress) -> None:
        if progress in self.stages:
            self.stages.remove(progress)
        self.refresh()

    def changed(self, event: str, quiet: bool = False) -> None:
        """Something happened: in a log, a line with the stage's counts; on a terminal, a redraw."""
        if self._live is None:
            if not quiet:
                stage = next((s for s in self.stages if event.startswith(s.name + ":")), None)
                self.line(f"{event}" + (f"  [{stage.headline()}]" if stage else ""))
            return
        if event and not quiet and ("FAILED" in event or "crashed" in event):
            self.line(event)   # failures stay on screen
        self.refresh()

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(Group(*(s.render() for s in self.stages)))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


__all__ = ["GridView", "StageProgress", "Throttled", "quiet_logs", "redirected", "log_path", "REPORT_INTERVAL_S"]
