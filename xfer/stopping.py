"""Stopping a grid cleanly: the first Ctrl-C (or SIGTERM, what a cluster's job stop sends) stops launching, lets the
running cells save their last epoch state and marks their runs so the rerun resumes them; a second stops at once.

The driver holds a `Stop` for the invocation (its signal handlers, and the reason it stopped). Once stopping, it
publishes the fact as a named Ray actor that every trial of the grid polls (`Watcher`, in the trial's process); a
trial's cells see `requested()` between optimiser steps, end their runs KILLED and resumable (`names.TAG_RESUMABLE`)
with their last epoch state as an artifact, and the trial ends. Tune's own Ctrl-C handling is off (it would end
every trial at once, mid-step, and the grid would go on to its next stage); `TuneStop` ends a stage's Tune run
once its running trials have saved (or after `GRACE_S`), launching nothing more meanwhile.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

GRACE_S = 30.0          # how long running trials get to save their cells' states before Tune stops them
POLL_S = 1.0            # how often a trial asks whether its grid is stopping
NAMESPACE = "xfer"      # the Ray namespace of the stop flags (trials run in their job's own namespace)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}   # the shell's convention: 128 + the signal's number

_requested = threading.Event()   # in a trial's process: its grid is stopping (set by `Watcher`)
_current: list[Stop] = []        # in the driver: the invocation's Stop, while it is entered


def current() -> Stop | None:
    """The driver's active `Stop` (None outside a grid invocation, and in trials)."""
    return _current[-1] if _current else None


def requested() -> bool:
    """Whether this process's grid is stopping: cells check it between optimiser steps and end resumable."""
    return _requested.is_set()


def grid_stopping() -> bool:
    """The driver's side of `requested`: whether this invocation's grid (`current()`) has been asked to stop."""
    stop = current()
    return stop is not None and stop.requested


def flag_name(grid_run_id: str) -> str:
    return f"xfer-stop-{grid_run_id}"


class Stop:
    """The driver's side: signal handlers for one grid invocation and why (if at all) it stopped.

        with Stop(echo) as stop:
            ... run stages, each checking stop.requested between stages ...
        return stop.exit_code

    The first SIGINT / SIGTERM (or `trigger`, e.g. a tracking server lost for good) sets `reason`; a second signal
    raises KeyboardInterrupt at once. Handlers are installed only in the main thread, and restored on exit.
    """

    def __init__(self, echo: Callable[[str], None] = print) -> None:
        self.echo = echo
        self.reason = ""
        self.signum: int | None = None
        self.since = 0.0
        self.grid_run_id: str | None = None
        self._previous: dict[int, Any] = {}
        self._flag: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
        _current.append(self)
        return self

    def claim_signals(self) -> None:
        """Put this grid's handlers back on SIGINT and SIGTERM (from the main thread, while entered): `ray.init`
        installs Ray's C++ failure handler on SIGTERM over them, which prints a stack and kills the driver."""
        if self._previous and threading.current_thread() is threading.main_thread():
            for sig in self._previous:
                signal.signal(sig, self._on_signal)

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self in _current:
            _current.remove(self)

    @property
    def requested(self) -> bool:
        return bool(self.reason)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1) if self.requested else 0

    def trigger(self, reason: str, signum: int | None = None) -> None:
        """Stop launching; running cells save their state. Safe from any thread, and more than once."""
        with self._lock:
            if self.reason:
                return
            self.reason, self.signum, self.since = reason, signum, time.monotonic()
        self.echo(f"stopping: {reason}. Running cells save their last epoch state (up to {GRACE_S:.0f} s) and end "
                  "resumable; nothing more is launched, no later stage and no report run. Press Ctrl-C again to stop "
                  "at once.")
        self.publish()

    def publish(self) -> None:
        """Make the stop visible to this grid's trials (a named Ray actor), when Ray is up and the grid has a run."""
        if not self.reason or self._flag is not None or self.grid_run_id is None:
            return
        try:
            import ray
        except ImportError:
            return
        if not ray.is_initialized():
            return
        self._flag = _flag_class().options(name=flag_name(self.grid_run_id), namespace=NAMESPACE,
                                           lifetime=None, num_cpus=0).remote()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.reason:
            raise KeyboardInterrupt   # the second signal: stop at once
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.trigger(f"{name} received", signum)


@functools.cache
def _flag_class() -> Any:
    """The stop flag's actor class, made on first use (`ray.remote` needs Ray imported)."""
    import ray

    @ray.remote(num_cpus=0)
    class StopFlag:
        """Exists once its grid is stopping: trials look it up by name (`Watcher`)."""

        def ping(self) -> bool:
            return True

    return StopFlag


class Watcher:
    """A trial's side: a daemon thread that sets `requested()` once the trial's grid publishes its stop."""

    def __init__(self, grid_run_id: str | None) -> None:
        self.name = flag_name(grid_run_id) if grid_run_id else None
        _requested.clear()   # a reused trial process starts every pack anew
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="xfer-stop-watcher")

    def __enter__(self) -> Watcher:
        if self.name is not None:
            self._poll_once()
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()

    def _poll(self) -> None:
        while not self._done.wait(POLL_S):
            if self._poll_once():
                return

    def _poll_once(self) -> bool:
        import ray

        try:
            ray.get_actor(self.name, namespace=NAMESPACE)
        except ValueError:
            return False
        _requested.set()
        return True


def tune_hooks(stop: Stop) -> tuple[Any, Any]:
    """A Tune Stopper and Callback for one stage of a grid that may stop: once `stop` is requested, the Stopper ends
    the Tune run when no trial is running any more (each saved its cells and returned) or GRACE_S after the stop,
    whichever comes first; meanwhile the trials Tune still starts see the stop at once and return without
    training. The Callback counts the running trials."""
    from ray import tune
    from ray.tune.stopper import NoopStopper

    running: set[str] = set()

    class Running(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            running.add(trial.trial_id)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            running.discard(trial.trial_id)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            running.discard(trial.trial_id)

        def __reduce__(self) -> tuple[Any, tuple[()]]:
            return tune.Callback, ()   # Tune pickles its run config; the live Tuner keeps this object

    class Stopper(tune.Stopper):
        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return False

        def stop_all(self) -> bool:
            if not stop.requested:
                return False
            stop.publish()   # Ray may have started after the signal came
            return not running or time.monotonic() - stop.since > GRACE_S

        def __reduce__(self) -> tuple[Any, tuple[()]]:
            return NoopStopper, ()

    return Stopper(), Running()


__all__ = ["Stop", "Watcher", "current", "requested", "grid_stopping", "tune_hooks", "flag_name", "GRACE_S", "EXIT_CODES"]
