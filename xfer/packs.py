"""Packs: one Ray Tune trial trains many compatible cells in one warm process, each cell keeping its own life.

The rule. A stage's cells are grouped by `pack_key` — same kind of cell, arch, dataset (hence input shape) and
training length (training examples, batch size, epochs) — then cut into packs of at most `pack_size` cells, and
into at least as many packs as trials can run at once, so no slot idles. Cells of one pack may differ in source
checkpoint, freeze depth, lr, weight decay, recipe, seed and subset.

A pack trains its cells in one process, one after another (`packed_sequential`): the imports, the dataset
hand-off, the MLflow look-ups and each pretrained model are paid once per pack instead of once per cell; or,
where `xfer.vectorised` can and it pays, all together as one batched model (`packed_vectorised`). Each cell
keeps its own MLflow run, key, curve, checkpoint and failure; a crashed pack resumes each cell from its last
epoch state (`PackCheckpoint`), and cells that finished in MLflow are skipped.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xfer import checkpoint, data, names, specs, stopping, tracking
from xfer import train as loop
from xfer.cells import Cell, Life, Session, live
from xfer.checkpoint import TrainState
from xfer.errors import XferError
from xfer.models import XferModel
from xfer.specs import TrainSpec

# Default cells per pack (`--pack-size`), by the device a trial trains on. Measured 2026-12-02 with
# `xfer bench --pack` (README, Results): on a CPU a pack's cost is its cells' training once a trial's
# start-up (~4 s) is spread over a few cells, and larger packs only cost parallelism, which `plan` restores by
# splitting packs across the free slots; on a GPU a pack is one batched model, and more cells per step fill it.
PACK_SIZE = {"cpu": 8, "cuda": 32}
CHECKPOINT_INTERVAL_S = 10.0   # a killed pack loses at most this much of each running cell's training


@dataclass(frozen=True)
class CellAdapter:
    """How one kind of spec becomes a recorded cell: the small adapter each stage's cells have
    (training_cells.TRAINING, adder.ADDER); packs and the stage runner take any."""

    name: str
    cell: Callable[[Any, PackContext], Cell]  # the recorded cell of a spec, in its pack's context
    train: Callable[[Any], TrainSpec]         # what the one loop trains (the pack key reads it)
    stage: Callable[[Any], str]               # the stage of the spec's MLflow run
    label: Callable[[Any], str]               # the spec in words, for summaries and progress


def pack_key(adapter: CellAdapter, spec: Any) -> tuple[Any, ...]:
    """Cells with equal keys may share a pack: same kind, arch, dataset and training length (a rehearsal's cells all
    train one batch an epoch, whatever their size)."""
    t = adapter.train(spec)
    size = None if t.fast_dev_run else t.size
    return (adapter.name, adapter.stage(spec), t.arch, t.dataset, size, t.batch_size, t.epochs, t.epoch_steps, t.augment,
            t.precision)


def plan(cells: Sequence[Any], key: Callable[[Any], Hashable], pack_size: int, slots: int = 1,
         limit: Callable[[Any], int] | None = None) -> list[tuple[Any, ...]]:
    """Packs: cells of equal `key` (for training cells, `pack_key`) cut into packs of ≤ `pack_size` (and ≤
    `limit(cell)` of the group's first cell: what fits a trial's memory), then the largest packs halved until there
    are `slots` packs (or every pack is one cell). Cells keep their order, so neighbours (fine-tunes of one
    pretrained model, attacks from one surrogate) tend to share a pack and what it loads once."""
    if pack_size < 1:
        raise XferError(f"--pack-size {pack_size}: a pack holds at least one cell (1 = one cell per trial).")
    groups: dict[Hashable, list[Any]] = {}
    for cell in cells:
        groups.setdefault(key(cell), []).append(cell)
    sizes = {k: min(pack_size, max(1, limit(group[0]))) if limit is not None else pack_size for k, group in groups.items()}
    chosen = [piece for k, group in groups.items() for piece in _split(group, math.ceil(len(group) / sizes[k]))]
    while len(chosen) < slots and max(map(len, chosen), default=1) > 1:
        largest = max(chosen, key=len)
        chosen.remove(largest)
        chosen += _split(largest, 2)
    return [tuple(p) for p in chosen]


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    """`parts` contiguous pieces of near-equal length."""
    size, extra = divmod(len(items), parts)
    out, begin = [], 0
    for i in range(parts):
        end = begin + size + (i < extra)
        out.append(items[begin:end])
        begin = end
    return out


def describe(pack: Sequence[Any], adapter: CellAdapter) -> str:
    """A pack in words: what its cells share, and how many there are."""
    t = adapter.train(pack[0])
    n = f"n={t.size or 'all'}"
    return f"{adapter.stage(pack[0])} {t.dataset} {t.arch} {n} ×{len(pack)}"


# ---- one pack, no Ray -------------------------------------------------------------------------------

class PackContext:
    """What the cells of one pack share in their process: datasets, MLflow look-ups made once, models loaded once."""

    def __init__(self, experiment: str, datasets: dict[str, data.Dataset], parent_run_id: str | None = None) -> None:
        self.experiment = experiment
        self.datasets = datasets
        self.parent_run_id = parent_run_id   # the stage's run in MLflow: every cell's run is its child
        self._finished: dict[tuple[str, float | None, str], tracking.RunRecord | None] = {}
        self._models = tracking.LoadedModels()

    def finished(self, stage: str, keys: Sequence[str], since: float | None = None) -> dict[str, tracking.RunRecord]:
        """The finished runs of these cells of `stage` by key (asked of MLflow once per key and process)."""
        wanted = [k for k in keys if (stage, since, k) not in self._finished]
        if wanted:
            found = tracking.finished_for(self.experiment, wanted, stage, since)
            self._finished.update({(stage, since, k): found.get(k) for k in wanted})
        return {k: record for k in keys if (record := self._finished[stage, since, k]) is not None}

    def pretrained(self, pretrain: Any, missing: str) -> tracking.RunRecord:
        """The finished run of the pretrain cell `pretrain` a cell starts from, else an XferError saying `missing`
        (which model the cell needs, and how to get it)."""
        key = specs.key(pretrain)
        record = self.finished(names.PRETRAIN, [key]).get(key)
        if record is None:
            raise XferError(missing)
        return record

    def model(self, run_id: str, record: tracking.RunRecord | None = None) -> XferModel:
        """A fresh copy of the model run `run_id` published (verified and loaded once per process; `record`: the run
        as a search returned it)."""
        import copy

        return copy.deepcopy(self._models.get(run_id, record))   # fine-tuning changes it


@dataclass
class PackResult:
    """What became of a pack's cells, by key."""

    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)      # key → reason
    skipped: list[str] = field(default_factory=list)          # finished in MLflow before the pack got to them
    stopped: list[str] = field(default_factory=list)          # its grid stopped: resumable, or never started
    mode: str = "packed_sequential"                           # or "packed_vectorised"
    why: str = ""                                             # why the mode was chosen

    def metrics(self) -> dict[str, Any]:
        return {"cells_ran": float(len(self.ran)), "cells_failed": float(len(self.failed)),
                "cells_skipped": float(len(self.skipped)), "cells_stopped": float(len(self.stopped)),
                "vectorised": float(self.mode == "packed_vectorised"),
                "mode": self.mode, "why": self.why}


VECTORISE = ("auto", "always", "never")   # --vectorise: batched where it measures faster / wherever it can / never
# A CPU's timing of the batched model against one cell after another moved between 0.45× and 0.70× across reruns of
# one grid on the 2-core machine (issue 35): "auto" takes it only when it measured this much faster, so a rerun of
# the same grid does not flip the choice (as stacked scoring's STACKED_MUST_WIN).
VECTORISED_MUST_WIN = 1.2


def run_pack(pack: Sequence[Any], adapter: CellAdapter, experiment: str, datasets: dict[str, data.Dataset],
             store: PackCheckpoint | None = None, device: str | torch.device | None = None,
             since: float | None = None, is_chief: bool = True, node: str = "",
             parent_run_id: str | None = None, vectorise: str = "auto",
             reopen: Mapping[str, tracking.RunRecord] | None = None) -> PackResult:
    """Train a pack's cells in this process, each recorded as its own MLflow run (a child of `parent_run_id`).

    No Ray needed: `store` (a `PackCheckpoint`) is where epoch states and progress go, if anywhere. Cells
    already finished in MLflow (started at or after `since`, when given: a forced re-run) are skipped, so a
    resumed pack picks up where it stopped. A cell that fails permanently — a non-finite loss, or an
    `XferError` such as a damaged checkpoint — is recorded as failed and its pack-mates go on; any other
    exception ends the pack (its trial), which Tune retries as a crash.

    The cells train together as one batched model (`xfer.vectorised`) when they can and `vectorise` says so:
    "always"; "auto" on a GPU, and on a CPU where it measured faster for this arch, batch and pack size
    (measured once and kept in <runs>/calibration.json); else one after another. `PackResult.mode` and `.why`
    say which, and why.

    `reopen`: the cells' unfinished runs from earlier invocations (failed, stopped or killed), by key: each is
    continued in its run, from the epoch state a stopped cell saved there. When the grid stops
    (`stopping.requested`), cells end resumable and no further cell starts.
    """
    if vectorise not in VECTORISE:
        raise XferError(f"--vectorise {vectorise!r} is not one of {', '.join(VECTORISE)}.")
    store = store or PackCheckpoint({}, math.inf, lambda metrics, state_dir: None, len(pack))
    store.adopt(reopen or {})
    context = PackContext(experiment, datasets, parent_run_id)
    outcome = PackResult()
    todo = []
    done = {stage: context.finished(stage, [specs.key(s) for s in pack if adapter.stage(s) == stage], since)
            for stage in {adapter.stage(s) for s in pack}}
    for spec in pack:
        if specs.key(spec) in done[adapter.stage(spec)]:
            outcome.skipped.append(specs.key(spec))
        else:
            todo.append(spec)
    device = torch.device(device) if device is not None else loop.default_device()
    if len(todo) > 1 and vectorise != "never" and loop.dist_world()[1] == 1:
        _together(todo, adapter, context, store, device, is_chief, node, vectorise, outcome)
    else:
        outcome.why = "one cell" if len(todo) <= 1 else "--vectorise never" if vectorise == "never" else "data-parallel"
        for spec in todo:
            if stopping.requested():
                outcome.stopped.append(specs.key(spec))   # never started: the rerun runs it
                continue
            _alone(spec, adapter, context, store, device, is_chief, node, outcome)
    return outcome


def _alone(spec: Any, adapter: CellAdapter, context: PackContext, store: PackCheckpoint, device: torch.device, is_chief: bool,
           node: str, outcome: PackResult) -> None:
    key = specs.key(spec)
    try:
        result = live(adapter.cell(spec, context), context.experiment, store.session(key), device, is_chief, node)
        reason, status = result.reason, result.status
    except XferError as exc:
        reason, status = str(exc), "failed"
    _record(outcome, store, key, adapter.label(spec), reason, status)


def _record(outcome: PackResult, store: PackCheckpoint, key: str, label: str, reason: str, status: str = "") -> None:
    if status == "stopped":
        outcome.stopped.append(key)
    elif reason:
        outcome.failed[key] = reason
    else:
        outcome.ran.append(key)
    store.cell_finished(key, label, reason, stopped=status == "stopped")


def _together(todo: Sequence[Any], adapter: CellAdapter, context: PackContext, store: PackCheckpoint, device: torch.device,
              is_chief: bool, node: str, vectorise: str, outcome: PackResult) -> None:
    """The pack's cells with their runs open side by side, trained as one batched model if that is the choice."""
    from xfer import vectorised

    lives: list[tuple[Any, Life]] = []
    refused: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        for spec in todo:
            key = specs.key(spec)
            try:
                lives.append((spec, stack.enter_context(Life(adapter.cell(spec, context), context.experiment,
                                                              store.session(key), is_chief, node))))
            except XferError as exc:
                refused[key] = str(exc)
        why = _why_not(lives, device, vectorise) if len(lives) > 1 else "one cell left"
        outcome.mode, outcome.why = ("packed_sequential", why) if why else ("packed_vectorised", _why(lives, device))
        for spec in todo:
            key = specs.key(spec)
            if key in refused:
                _record(outcome, store, key, adapter.label(spec), refused[key])
        if why:
            # One after another: each cell's run ends, and its end is reported, as soon as it has trained, so the
            # progress view counts it then (not when the pack ends) and a later cell's crash cannot take its run with it.
            for spec, life in lives:
                result = life.train(device)
                life.__exit__(None, None, None)
                _record(outcome, store, specs.key(spec), adapter.label(spec), result.reason, result.status)
            return
        trained = vectorised.train_many(
            [life.cell.train for _, life in lives], [life.splits for _, life in lives],
            [life.model for _, life in lives], [life.within_epoch for _, life in lives], device=device,
            resumes=[life.resume for _, life in lives], on_epoch_end=[life.epoch_end for _, life in lives],
            stop=stopping.requested)
        results = [life.finish(result) for (_, life), result in zip(lives, trained)]
    for (spec, _), result in zip(lives, results):
        _record(outcome, store, specs.key(spec), adapter.label(spec), result.reason, result.status)


def _why_not(lives: list[tuple[Any, Life]], device: torch.device, vectorise: str) -> str:
    """Why these cells train one after another ("" when they train as one batched model)."""
    from xfer import vectorised

    built = [life.model for _, life in lives]
    refused = vectorised.vectorisable([life.cell.train for _, life in lives], built)
    if refused:
        return refused
    if len({life.resume.epoch if life.resume else 0 for _, life in lives}) > 1:
        return "after a crash the cells resume from different epochs (each resumes on its own)"
    if vectorise == "always" or device.type == "cuda":
        return ""
    if all(life.cell.train.fast_dev_run for _, life in lives):
        # Measuring takes ~2·4·N real steps (10-17 s for 8 cells): more than a rehearsal's whole pack.
        return "a --fast-dev-run rehearsal: one batch a cell, the batched model is not measured on a CPU"
    speedup = calibrated(lives, device)["speedup"]
    if speedup < VECTORISED_MUST_WIN:
        t = lives[0][1].cell.train
        return (f"on {device.type} the batched model measured {speedup:.2f}× the speed of one cell after another for "
                f"{t.arch} ({len(lives)} cells, batch {t.batch_size}); it must reach {VECTORISED_MUST_WIN:.1f}×")
    return ""


def _why(lives: list[tuple[Any, Life]], device: torch.device) -> str:
    t = lives[0][1].cell.train
    return f"{len(lives)} {t.arch} cells as one batched model on {device.type}"


def calibrated(lives: list[tuple[Any, Life]], device: torch.device, steps: int = 4, repeats: int = 3) -> dict[str, Any]:
    """The batched model's speed-up over one cell after another here for this arch, batch and pack size ("speedup"):
    measured on the pack's own cells the first time (`vectorised.measure`, the best of `repeats` timings of `steps`
    steps each way: about 2·steps·N·repeats single steps), then read from the runs folder."""
    from xfer import calibration, vectorised

    t = lives[0][1].cell.train
    key = f"vectorised/{device.type}/{t.arch}/batch{t.batch_size}/cells{len(lives)}/threads{torch.get_num_threads()}"
    known = calibration.read(calibration.path())
    if key not in known:
        timing = vectorised.measure([life.cell.train for _, life in lives], [life.splits for _, life in lives],
                                    [life.model for _, life in lives], device, steps, repeats)
        known[key] = {"speedup": timing.speedup, "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": timing.steps,
                      "repeats": repeats}
        calibration.remember(calibration.path(), key, known[key])
    return known[key]


# ---- on Ray Tune: one checkpoint folder for the pack's running cells --------------------------------

class PackCheckpoint:
    """The running cells' latest epoch states, handed to Tune as one checkpoint folder with a subfolder per cell.

    Progress (each cell's epochs, each cell's end) goes to Tune through `progress.Throttled`, at most every
    `report_interval_s`; a checkpoint goes with a report at most every `interval_s` seconds, so a killed pack loses
    at most that much of each running cell's training and Tune's experiment snapshots (forced every `num_to_keep`
    checkpoints) stay rare.
    """

    def __init__(self, restored: dict[str, TrainState], interval_s: float, report: Callable[[dict[str, Any], Path | None], None],
                 cells: int, report_interval_s: float | None = None) -> None:
        from xfer.progress import REPORT_INTERVAL_S, Throttled

        self.restored = restored
        self.interval_s = interval_s
        self._progress = Throttled(report, REPORT_INTERVAL_S if report_interval_s is None else report_interval_s)
        self._running: dict[str, TrainState] = {}
        self._last = time.monotonic()
        self.cells, self.done = cells, 0
        self.reopen: dict[str, str] = {}   # key → an earlier invocation's unfinished run of the cell

    def session(self, key: str) -> Session:
        return _CellSession(self, key)

    def adopt(self, runs: Mapping[str, tracking.RunRecord]) -> None:
        """Continue these unfinished runs (by cell key): each in its run, from the state a stopped cell left there
        (names.RESUME_DIR), unless Tune restored a newer one."""
        for key, record in runs.items():
            self.reopen[key] = record.run_id
            if key in self.restored or int(record.tags.get(names.TAG_RESUMABLE) or 0) < 1:
                continue
            with tempfile.TemporaryDirectory(prefix="xfer-resume-") as tmp:
                folder = tracking.artifact_here(record.run_id, names.RESUME_DIR, record.artifact_uri or None, Path(tmp))
                if folder is not None:
                    self.restored[key] = checkpoint.load_state(folder)

    def epoch_end(self, key: str, state: TrainState, metrics: dict[str, Any]) -> None:
        self._running[key] = state
        progress = {**metrics, "cells_done": float(self.done), "cells": float(self.cells)}
        if time.monotonic() - self._last < self.interval_s:
            self._progress.progress(progress)
            return
        with tempfile.TemporaryDirectory(prefix="xfer-pack-") as tmp:
            for cell_key, cell_state in self._running.items():
                checkpoint.save_state(Path(tmp) / cell_key, cell_state)
            self._progress.progress(progress, Path(tmp))   # Tune copies the folder into its storage before returning
        self._last = time.monotonic()

    def step(self, metrics: dict[str, Any]) -> None:
        """Where a running cell is within its epoch (progress only, no checkpoint), sent when due. Not with
        data-parallel ranks, which report every event: a report per step window would cost each a round trip."""
        if self._progress.interval_s > 0:
            self._progress.progress({**metrics, "cells_done": float(self.done), "cells": float(self.cells)})

    def cell_done(self, key: str) -> None:
        """A cell's run has ended: its state is no longer needed to resume."""
        self._running.pop(key, None)
        self.restored.pop(key, None)

    def cell_finished(self, key: str, label: str, reason: str = "", stopped: bool = False) -> None:
        """Progress: one more of the pack's cells finished (or failed, with `reason`; or `stopped` resumable)."""
        self.cell_done(key)
        self.done += 1
        self._progress.ended(label, reason, {"cells_done": float(self.done), "cells": float(self.cells)}, stopped)

    def flush(self, metrics: dict[str, Any]) -> None:
        """The pack's last report: `metrics`, with every progress event not yet sent."""
        self._progress.flush(metrics)

    @staticmethod
    def load(directory: Path | None) -> dict[str, TrainState]:
        """The states in a checkpoint folder written by `epoch_end`, by cell key."""
        if directory is None:
            return {}
        return {sub.name: checkpoint.load_state(sub) for sub in sorted(Path(directory).iterdir()) if sub.is_dir()}


class _CellSession:
    """One cell's view of its pack's checkpoint."""

    def __init__(self, pack: PackCheckpoint, key: str) -> None:
        self.pack, self.key = pack, key

    def restore(self) -> TrainState | None:
        return self.pack.restored.get(self.key)

    def reopen(self) -> str | None:
        return self.pack.reopen.get(self.key)

    def epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.pack.epoch_end(self.key, state, metrics)

    def step(self, metrics: dict[str, float]) -> None:
        self.pack.step(metrics)

    def done(self, result: loop.Result) -> None:
        self.pack.cell_done(self.key)


__all__ = ["CellAdapter", "PackContext", "PackResult", "PackCheckpoint", "PACK_SIZE", "CHECKPOINT_INTERVAL_S", "pack_key", "plan",
           "describe", "run_pack", "VECTORISED_MUST_WIN"]
