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

import math
import tempfile
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xfer import checkpoint, data, specs, tracking
from xfer import train as loop
from xfer.cells import Cell, Session, live
from xfer.checkpoint import TrainState
from xfer.errors import XferError
from xfer.models import XferModel
from xfer.specs import TrainSpec

# Default cells per pack (`--pack-size`), by the device a trial trains on. Measured 2026-12-02 with
# `python -m xfer.bench --pack` (README, Results): on a CPU a pack's cost is its cells' training once a trial's
# start-up (~4 s) is spread over a few cells, and larger packs only cost parallelism, which `plan` restores by
# splitting packs across the free slots; on a GPU a pack is one batched model, and more cells per step fill it.
PACK_SIZE = {"cpu": 8, "cuda": 32}
CHECKPOINT_INTERVAL_S = 10.0   # a killed pack loses at most this much of each running cell's training


@dataclass(frozen=True)
class Kind:
    """How one kind of spec becomes a recorded cell; each adapter defines one (stages.TRAINING, adder.ADDER)."""

    name: str
    cell: Callable[[Any, Context], Cell]      # the recorded cell of a spec, in its pack's context
    train: Callable[[Any], TrainSpec]         # what the one loop trains (the pack key reads it)
    stage: Callable[[Any], str]               # the stage of the spec's MLflow run
    label: Callable[[Any], str]               # the spec in words, for summaries and progress


def pack_key(kind: Kind, spec: Any) -> tuple[Any, ...]:
    """Cells with equal keys may share a pack: same kind, arch, dataset and training length."""
    t = kind.train(spec)
    return (kind.name, kind.stage(spec), t.arch, t.dataset, t.size, t.batch_size, t.epochs, t.augment)


def plan(cells: Sequence[Any], key: Callable[[Any], Hashable], pack_size: int, slots: int = 1) -> list[tuple[Any, ...]]:
    """Packs: cells of equal `key` (for training cells, `pack_key`) cut into packs of ≤ `pack_size`, then the
    largest packs halved until there are `slots` packs (or every pack is one cell). Cells keep their order, so
    neighbours (fine-tunes of one pretrained model, attacks from one surrogate) tend to share a pack and what
    it loads once."""
    if pack_size < 1:
        raise XferError(f"--pack-size {pack_size}: a pack holds at least one cell (1 = one cell per trial).")
    groups: dict[Hashable, list[Any]] = {}
    for cell in cells:
        groups.setdefault(key(cell), []).append(cell)
    chosen = [piece for group in groups.values() for piece in _split(group, math.ceil(len(group) / pack_size))]
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


def describe(pack: Sequence[Any], kind: Kind) -> str:
    """A pack in words: what its cells share, and how many there are."""
    t = kind.train(pack[0])
    n = f"n={t.size or 'all'}"
    return f"{kind.stage(pack[0])} {t.dataset} {t.arch} {n} ×{len(pack)}"


# ---- one pack, no Ray -------------------------------------------------------------------------------

class Context:
    """What the cells of one pack share in their process: datasets, MLflow look-ups made once, models loaded once."""

    def __init__(self, experiment: str, datasets: dict[str, data.Dataset]) -> None:
        self.experiment = experiment
        self.datasets = datasets
        self._finished: dict[tuple[str, float | None], dict[str, tracking.RunRecord]] = {}
        self._models: dict[str, XferModel] = {}

    def finished(self, stage: str, since: float | None = None) -> dict[str, tracking.RunRecord]:
        """The stage's finished runs by key (one search per stage and process)."""
        if (stage, since) not in self._finished:
            self._finished[stage, since] = tracking.finished_by_key(self.experiment, stage, since)
        return self._finished[stage, since]

    def model(self, run_id: str) -> XferModel:
        """A fresh copy of the model run `run_id` published (downloaded and verified once per process)."""
        if run_id not in self._models:
            self._models[run_id] = tracking.load_model(run_id)[0]
        import copy

        return copy.deepcopy(self._models[run_id])


@dataclass
class PackResult:
    """What became of a pack's cells, by key."""

    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)      # key → reason
    skipped: list[str] = field(default_factory=list)          # finished in MLflow before the pack got to them
    mode: str = "packed_sequential"                           # or "packed_vectorised"
    why: str = ""                                             # why the mode was chosen

    def metrics(self) -> dict[str, float]:
        return {"cells_ran": float(len(self.ran)), "cells_failed": float(len(self.failed)),
                "cells_skipped": float(len(self.skipped)), "vectorised": float(self.mode == "packed_vectorised")}


def run_pack(pack: Sequence[Any], kind: Kind, experiment: str, datasets: dict[str, data.Dataset],
             sessions: Callable[[str], Session] | None = None, device: str | torch.device | None = None,
             since: float | None = None, is_chief: bool = True, node: str = "") -> PackResult:
    """Train a pack's cells in this process, each recorded as its own MLflow run; no Ray needed.

    Cells already finished in MLflow (started at or after `since`, when given: a forced re-run) are skipped,
    so a resumed pack picks up where it stopped. A cell that fails permanently — a non-finite loss, or an
    `XferError` such as a damaged checkpoint — is recorded as failed and its pack-mates go on; any other
    exception ends the pack (its trial), which Tune retries as a crash.
    """
    from xfer.cells import NoSession

    sessions = sessions or (lambda key: NoSession())
    context = Context(experiment, datasets)
    outcome = PackResult()
    for spec in pack:
        key = specs.key(spec)
        if key in context.finished(kind.stage(spec), since):
            outcome.skipped.append(key)
            continue
        try:
            result = live(kind.cell(spec, context), experiment, sessions(key), device, is_chief, node)
        except XferError as exc:
            outcome.failed[key] = str(exc)
            continue
        if result.ok:
            outcome.ran.append(key)
        else:
            outcome.failed[key] = result.reason
    return outcome


# ---- on Ray Tune: one checkpoint folder for the pack's running cells --------------------------------

class PackCheckpoint:
    """The running cells' latest epoch states, handed to Tune as one checkpoint folder with a subfolder per cell.

    Every epoch of every cell is reported (progress); a checkpoint goes with the report at most every
    `interval_s` seconds, so a killed pack loses at most that much of each running cell's training and Tune's
    experiment snapshots (forced every `num_to_keep` checkpoints) stay rare.
    """

    def __init__(self, restored: dict[str, TrainState], interval_s: float, report: Callable[[dict[str, Any], Path | None], None],
                 cells: int) -> None:
        self.restored = restored
        self.interval_s = interval_s
        self._report = report
        self._running: dict[str, TrainState] = {}
        self._last = time.monotonic()
        self.cells, self.done = cells, 0

    def session(self, key: str) -> Session:
        return _CellSession(self, key)

    def epoch_end(self, key: str, state: TrainState, metrics: dict[str, float]) -> None:
        self._running[key] = state
        progress = {**metrics, "cells_done": float(self.done), "cells": float(self.cells)}
        if time.monotonic() - self._last < self.interval_s:
            self._report(progress, None)
            return
        with tempfile.TemporaryDirectory(prefix="xfer-pack-") as tmp:
            for cell_key, cell_state in self._running.items():
                checkpoint.save_state(Path(tmp) / cell_key, cell_state)
            self._report(progress, Path(tmp))   # Tune copies the folder into its storage before returning
        self._last = time.monotonic()

    def cell_done(self, key: str) -> None:
        self._running.pop(key, None)
        self.restored.pop(key, None)
        self.done += 1

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

    def epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.pack.epoch_end(self.key, state, metrics)

    def done(self, result: loop.Result) -> None:
        self.pack.cell_done(self.key)


__all__ = ["Kind", "Context", "PackResult", "PackCheckpoint", "PACK_SIZE", "CHECKPOINT_INTERVAL_S", "pack_key", "plan",
           "describe", "run_pack"]
