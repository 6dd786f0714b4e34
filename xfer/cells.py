"""The life of one recorded training cell, written once: data → restore → MLflow run → epoch states → train →
curve → final checkpoint → summary.

Grid cells (pretrain, fine-tune, scratch), tuning trials and adder cells differ only in *what* the cell is —
a `Cell` their adapters build (`xfer.stages`, `xfer.tuning`, `xfer.adder`). How a cell lives is here, whether
it trains alone or beside its pack-mates (`xfer.packs`). A `Session` is where the cell keeps its epoch states
and reports progress: a pack's Tune checkpoint, a tuning trial, a Ray Train worker, or nothing (`NoSession`).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from xfer import checkpoint, names, specs, stopping, tracking
from xfer import train as loop
from xfer.checkpoint import TrainState
from xfer.data import Splits
from xfer.models import XferModel
from xfer.specs import TrainSpec

RUN_ID = "mlflow_run_id"   # TrainState.extra: the MLflow run a resumed cell continues
# Summary metrics logged once at the last step; the errors themselves are curve points, logged epoch by epoch.
SUMMARY_METRICS = (names.TEST_ACC, names.VAL_ACC, names.EPOCH, names.SECONDS, "steps")


@dataclass(frozen=True)
class Cell:
    """What one recorded cell is; `Life` knows how every cell lives."""

    spec: Any                                   # identity: specs.key(spec) is its run's xfer.key, to_flat(spec) its params
    stage: str                                  # names.TAG_STAGE of its run
    label: str                                  # run name, and the cell's name in summaries and progress
    train: TrainSpec                            # what the one loop trains
    tags: Mapping[str, str]
    prepare: Callable[[], tuple[Splits, XferModel]]   # its data and the model to train (seeded, or pretrained)
    meta: Mapping[str, Any] = field(default_factory=dict)   # extra checkpoint metadata
    params: Any = None                          # its run's params (a spec or a flat dict); None: the spec
    parent_run_id: str | None = None            # an MLflow parent run (a tuning study's)
    log_test: bool = True                       # tuning trials never see the test split: no test points

    @property
    def key(self) -> str:
        return specs.key(self.spec)


class Session(Protocol):
    """Where a cell keeps its epoch states and reports progress (and, optionally, `reopen() -> str | None`: an
    unfinished run of the cell from an earlier invocation, to continue)."""

    def restore(self) -> TrainState | None: ...
    def epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None: ...
    def done(self, result: loop.Result) -> None: ...


class NoSession:
    """Plain Python: nothing to resume from, progress discarded (tests, and cells run outside Ray)."""

    def restore(self) -> TrainState | None:
        return None

    def reopen(self) -> str | None:
        return None

    def epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        pass

    def done(self, result: loop.Result) -> None:
        pass


class Life:
    """One cell's MLflow run and epoch states around its training.

        with Life(cell, experiment, session) as life:
            life.finish(loop.train(life.cell.train, life.splits, life.model, resume=life.resume,
                                   on_epoch_end=life.epoch_end))

    Entering opens (or, after a crash, reopens) the run and prepares data and model inside it, so a cell that
    cannot start (a damaged checkpoint, say) leaves a FAILED run naming why. Each epoch's curve points go to
    MLflow in one batch, then its state to the session (which may stop the trial there: ASHA). Every point is
    logged once: a resumed cell skips the steps its earlier attempt already logged (on a CPU the re-trained
    steps give the same values). `finish` writes the curve artifact, the summary metrics and the final
    checkpoint; the session hears `done` once the run has ended.
    Non-chief data-parallel workers (`is_chief=False`) keep no run and only report.
    """

    def __init__(self, cell: Cell, experiment: str, session: Session | None = None, is_chief: bool = True,
                 node: str = "") -> None:
        self.cell, self.experiment, self.session = cell, experiment, session or NoSession()
        self.is_chief, self.node = is_chief, node
        self.resume: TrainState | None = None
        self.splits: Splits
        self.model: XferModel
        self.run: tracking.Run | None = None
        self.result: loop.Result | None = None
        self._stack = contextlib.ExitStack()
        self._through = -1   # the last step whose curve points are logged
        self._last_state: TrainState | None = None   # the last epoch's state: what a stopped cell resumes from
        self._reopened = False
        self._exited = False

    def __enter__(self) -> Life:
        self.resume = self.session.restore()
        params = self.cell.params if self.cell.params is not None else self.cell.spec
        if self.is_chief:
            # The run to continue: the state's (a retried trial, a stopped grid's rerun), else an unfinished run of
            # the cell left by an earlier invocation (failed, stopped, or killed): each cell keeps one run.
            # (A session that keeps no earlier runs, a tuning trial's, need not say: `reopen` is optional.)
            reopen = getattr(self.session, "reopen", None)
            resumed = (self.resume.extra.get(RUN_ID) if self.resume else None) or (reopen() if reopen else None)
            self._reopened = resumed is not None
            self._last_state = self.resume
            self.run = self._stack.enter_context(tracking.start_run(
                self.experiment, self.cell.stage, self.cell.key, tags=self.cell.tags, run_name=self.cell.label,
                parent_run_id=self.cell.parent_run_id, resume_run_id=resumed))
        try:
            self.splits, self.model = self.cell.prepare()
            if self.run is not None:
                self.run.log_batch(params=params, tags=self._where_tags())   # one request: params and where it ran
                self._catch_up()
        except BaseException:
            if self.run is not None:
                with contextlib.suppress(Exception):   # a failed cell keeps its params; never mask why it failed
                    self.run.log_params(params)
            if not self._stack.__exit__(*sys.exc_info()):   # the run ends FAILED, naming the error
                raise
        return self

    def __exit__(self, *exc: Any) -> bool:
        """End the run (FAILED with the error, if one is raised); once: a pack may end a cell before its stack does."""
        if self._exited:
            return False
        self._exited = True
        suppressed = self._stack.__exit__(*exc)
        if exc[0] is None and self.result is not None:
            self.session.done(self.result)
        return suppressed

    def epoch_end(self, state: TrainState) -> None:
        """The loop's per-epoch hook: the epoch's points to MLflow, then the state to the session (to resume from)."""
        state.extra[RUN_ID] = self.run.run_id if self.run is not None else ""
        self._last_state = state
        errors = {r["split"]: r["error"] for r in state.curve if r["epoch"] == state.epoch}
        metrics = {names.EPOCH: float(state.epoch), names.VAL_ERROR: errors.get("val", math.nan),
                   "epochs": float(self.cell.train.epochs), "cell": self.cell.label}
        if self.cell.log_test:
            metrics[names.TEST_ERROR] = errors.get("test", math.nan)
        self._log_rows(state.curve, behind=True)   # the next epoch trains while they go
        self.session.epoch_end(state, metrics)

    def finish(self, result: loop.Result) -> loop.Result:
        """Record the trained cell: curve artifact, summary metrics, checkpoint; or the failure and its reason."""
        self.result = result
        if self.run is None:
            return result
        if result.status == "stopped":
            self._stopped(result)
            return result
        curve = self._shown(result.curve)
        self.run.log_curve(curve, points=False)
        if not result.ok:
            self._log_rows(result.curve)   # the points of the epoch it failed in
            self.run.fail(result.reason)
            return result
        steps = int(result.metrics["steps"])
        summary = {k: result.metrics[k] for k in SUMMARY_METRICS if k in result.metrics and math.isfinite(result.metrics[k])}
        with tempfile.TemporaryDirectory(prefix="xfer-ckpt-") as tmp:
            checkpoint.save(Path(tmp), self.model.cpu(), {
                "class_names": list(self.splits.class_names), "spec": specs.to_dict(self.cell.spec),
                "stage": self.cell.stage, "metrics": result.metrics, "key": self.cell.key, **self.cell.meta,
            })
            sha = self.run.log_checkpoint(Path(tmp), tag=False)
        # The last points, the summary and the checkpoint's sha256 (after its upload: a run with the tag has its
        # files) in one request.
        self._log_rows(result.curve, summary, steps, {names.TAG_CHECKPOINT_SHA: sha})
        return result

    def train(self, device: str | torch.device | None = None) -> loop.Result:
        """Train alone with the one loop (ending early if the grid stops), then `finish`."""
        return self.finish(loop.train(self.cell.train, self.splits, self.model, device=device, resume=self.resume,
                                      on_epoch_end=self.epoch_end, stop=stopping.requested, report=self.within_epoch))

    def within_epoch(self, record: dict[str, Any]) -> None:
        """The loop's report of a train window (every `log_every` steps): where the epoch is, for the progress view
        (a session without `step` discards it)."""
        step = getattr(self.session, "step", None)
        if step is not None and record.get("kind") == "train":
            step({names.EPOCH: float(record[names.EPOCH]), "epochs": float(self.cell.train.epochs),
                  "cell": self.cell.label, names.TRAIN_ERROR: float(record[names.TRAIN_ERROR])})

    def _stopped(self, result: loop.Result) -> None:
        """The grid is stopping: keep the last epoch's state on the run (names.RESUME_DIR) and end it KILLED and
        resumable (names.TAG_RESUMABLE = that epoch), so the rerun continues it there, in this run."""
        epoch = self._last_state.epoch if self._last_state is not None else 0
        if self._last_state is not None:
            self._last_state.extra[RUN_ID] = self.run.run_id
            with tempfile.TemporaryDirectory(prefix="xfer-resume-") as tmp:
                checkpoint.save_state(Path(tmp) / names.RESUME_DIR, self._last_state)
                self.run.log_artifact(Path(tmp) / names.RESUME_DIR)
        self.run.stop(result.reason, {names.TAG_RESUMABLE: str(epoch)})

    def _where_tags(self) -> dict[str, str]:
        shape = "x".join(str(d) for d in self.splits.in_shape)
        tags = {names.TAG_NODE: self.node, names.TAG_WORKERS: str(loop.dist_world()[1]), names.TAG_IN_SHAPE: shape,
                names.TAG_CLASSES: json.dumps(list(self.splits.class_names))}
        if self.resume is not None:
            tags[names.TAG_RESUMED] = str(self.resume.epoch)
        return tags

    def _shown(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return rows if self.cell.log_test else [r for r in rows if r["split"] != "test"]

    def _log_rows(self, curve: list[dict[str, Any]], metrics: dict[str, float] | None = None, step: int = 0,
                  tags: dict[str, str] | None = None, behind: bool = False) -> None:
        """The curve's points past the last logged step (and `metrics` at `step`, and `tags`), in one batch; `behind`:
        without waiting for the server (`tracking.Run.log_points`)."""
        if self.run is None:
            return
        rows = [r for r in self._shown(curve) if r["step"] > self._through]
        self.run.log_points(rows, metrics, step, tags, behind=behind)
        self._through = max([self._through, *(r["step"] for r in rows)])

    def _catch_up(self) -> None:
        """A reopened run: what its earlier attempt logged stays (points at the steps it logged are not logged
        again); the points its state holds but never logged go now."""
        if not self._reopened:
            return
        logged = self.run.last_step(names.VAL_ERROR)
        self._through = -1 if logged is None else logged
        if self.resume is not None:
            self._log_rows(self.resume.curve)


def live(cell: Cell, experiment: str, session: Session | None = None, device: str | torch.device | None = None,
         is_chief: bool = True, node: str = "") -> loop.Result:
    """One cell, trained alone and recorded: the whole life in one call."""
    with Life(cell, experiment, session, is_chief, node) as life:
        return life.train(device)


__all__ = ["Cell", "Session", "NoSession", "Life", "live", "RUN_ID"]
