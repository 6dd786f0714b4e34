"""Score tables: how each adversarial set does on each target, as rows of Parquet, never an MLflow run per pair.

The attack stage (`run`) makes its sets first (`xfer.attack_sets`: one MLflow run per set), then scores them:
targets of one arch are taken in blocks, each target model loaded once per block and every set it has not
been scored on streamed through it (one forward pass per set, one clean pass per clean set), as one stacked
model where that measures faster (`xfer.stacked`). A block's rows go to MLflow as one Parquet part, an artifact
of the attack stage's run (names.SCORES_DIR); the experiment's score table is the union of the parts of every
attack stage run (`read`), the newest row of each (set run, target run) pair. Once scored, each set's run gets
summary metrics the MLflow UI shows at a glance and a tag (names.TAG_SCORED) holding a hash of the targets it
is scored on, so a finished grid knows it is done without reading a table.

At the seed grid's size this is 2,952 set runs and ~430,000 rows, where one run per (set, target) was ~430,000
MLflow runs.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xfer import attack, attack_sets, data, names, stopping, tracking
from xfer.attack_sets import AttackCell, _Model
from xfer.errors import XferError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import torch

# The score table's columns, in order: the pair, the set's setting, the target's axes, the three scores, lineage.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("set_run_id", "string", "the adversarial set's MLflow run"),
    ("set_key", "string", "the set's cell key (xfer.key of its run)"),
    ("surrogate_run_id", "string", "the model(s) the set was made on ('+'-joined for an ensemble)"),
    ("attack", "string", "the attack that made the set"),
    ("eps", "float64", "its L-inf budget"),
    ("dataset", "string", "the attacked task"),
    ("n", "int64", "examples in the set"),
    ("target_run_id", "string", "the target model's MLflow run"),
    ("target_stage", "string", "finetune or scratch"),
    ("target_source", "string", "the target's pretraining source (null for scratch)"),
    ("target_arch", "string", "the target's arch"),
    ("target_size", "int64", "the target's fine-tune size (0 = the whole pool)"),
    ("target_freeze_depth", "int64", "the target's freeze depth"),
    ("target_seed", "int64", "the target's seed"),
    (names.CLEAN_ACC, "float64", "target accuracy on the clean examples"),
    (names.ADV_ACC, "float64", "target accuracy on the adversarial examples"),
    (names.SUCCESS_RATE, "float64", "share of the clean-correct examples the set flips (NaN if none were right)"),
    (names.TAG_SAME_SOURCE, "bool", "a surrogate's pretraining source is the target's"),
    (names.TAG_IS_PARENT, "bool", "a surrogate is the target's own pretrain run"),
    ("scored_at", "float64", "when the row was computed (seconds since the epoch; the newest row of a pair wins)"),
)
BLOCK = {"cpu": 8, "cuda": 32}   # targets loaded together (one stacked model); a block's rows are one part
SUMMARY_THREADS = 4             # set runs updated at once after scoring: latency-bound requests


def schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([pa.field(name, getattr(pa, kind)() if kind != "bool" else pa.bool_(), metadata={"doc": doc})
                      for name, kind, doc in COLUMNS])


def targets_hash(target_run_ids: Sequence[str]) -> str:
    """What names.TAG_SCORED holds: the targets a set is scored on, as one short hash of their sorted run ids."""
    return hashlib.sha256(" ".join(sorted(target_run_ids)).encode()).hexdigest()[:16]


# ---- what a set and a target are, as the scoring needs them -------------------------------------------

@dataclass(frozen=True)
class SetFacts:
    """A made adversarial set: its run, its setting, and its surrogates' lineage (for the same-source flags)."""

    run_id: str
    key: str
    attack: str
    eps: float
    dataset: str
    surrogate_run_ids: tuple[str, ...]
    surrogate_sources: tuple[str, ...]
    sha: str = ""            # its examples' sha256 (names.TAG_EXAMPLES_SHA) and where they are: read without asking
    artifact_uri: str = ""

    @staticmethod
    def of(record: tracking.RunRecord, cell: AttackCell, runs: Mapping[str, _Model]) -> SetFacts:
        sources = tuple(runs[i].record.tags.get(names.TAG_SOURCE, "") if i in runs else "" for i in cell.surrogate_run_ids)
        return SetFacts(record.run_id, cell.key, record.tags.get(names.TAG_ATTACK, cell.spec.attack.attack),
                        cell.spec.attack.eps, cell.spec.attack.dataset, cell.surrogate_run_ids, sources,
                        record.tags.get(names.TAG_EXAMPLES_SHA, ""), record.artifact_uri)


@dataclass(frozen=True)
class Job:
    """One target and the sets (run ids) it is still to be scored on: the unit scoring packs are made of."""

    target: _Model
    set_run_ids: tuple[str, ...]

    @property
    def arch(self) -> str:
        return self.target.record.tags.get(names.TAG_ARCH, "")


def row(facts: SetFacts, target: _Model, clean: torch.Tensor, adv: torch.Tensor, labels: torch.Tensor,
        now: float) -> dict[str, Any]:
    """One score row from a target's predictions on a set's clean and adversarial images (as `attack.evaluate`)."""
    right_clean, right_adv = clean == labels, adv == labels
    survived = int(right_clean.sum())
    tags = target.record.tags
    source, parent = tags.get(names.TAG_SOURCE, ""), tags.get(names.TAG_PRETRAIN_RUN, "")
    return {
        "set_run_id": facts.run_id, "set_key": facts.key, "surrogate_run_id": "+".join(facts.surrogate_run_ids),
        "attack": facts.attack, "eps": facts.eps, "dataset": facts.dataset, "n": len(labels),
        "target_run_id": target.run_id, "target_stage": target.record.stage, "target_source": source or None,
        "target_arch": tags.get(names.TAG_ARCH), "target_size": _size(tags.get(names.TAG_SIZE)),
        "target_freeze_depth": _int(tags.get(names.TAG_FREEZE)), "target_seed": _int(tags.get(names.TAG_SEED)),
        names.CLEAN_ACC: right_clean.float().mean().item(), names.ADV_ACC: right_adv.float().mean().item(),
        names.SUCCESS_RATE: int((right_clean & ~right_adv).sum()) / survived if survived else math.nan,
        names.TAG_SAME_SOURCE: bool(source) and source in facts.surrogate_sources,
        names.TAG_IS_PARENT: bool(parent) and parent in facts.surrogate_run_ids,
        "scored_at": now,
    }


def _size(text: str | None) -> int | None:
    return 0 if text in ("all", "None") else _int(text)   # stages tag the whole pool "all"


def _int(text: str | None) -> int | None:
    try:
        return int(float(text)) if text is not None else None
    except ValueError:
        return None


# ---- the table in MLflow: parts on the attack stage's runs --------------------------------------------

def write_part(stage_run_id: str, rows: Sequence[Mapping[str, Any]], pack: str = "") -> None:
    """Rows as one Parquet part under names.SCORES_DIR of the attack stage's run (each part a new file: packs
    scoring side by side never write the same one), named for the `pack` that wrote it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        return
    table = pa.Table.from_pylist([dict(r) for r in rows], schema=schema())
    with tempfile.TemporaryDirectory(prefix="xfer-scores-") as tmp:
        path = Path(tmp) / f"part-{pack or 'any'}-{uuid.uuid4().hex}.parquet"
        pq.write_table(table, path)
        tracking.log_artifact_to(stage_run_id, path, names.SCORES_DIR)


def stage_runs(experiment: str) -> list[tracking.RunRecord]:
    """The attack stage's runs of every invocation (any status: an interrupted one's parts count too)."""
    return tracking.query(experiment, names.GRID, status=None, tags={names.TAG_GRID_STAGE: names.ATTACK})


def read(experiment: str | None, runs: Sequence[tracking.RunRecord] | None = None) -> pd.DataFrame:
    """The score table of `experiment` (or of the attack stage runs `runs` alone): every part, the newest row per pair."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    runs = stage_runs(experiment or "") if runs is None else list(runs)
    with tempfile.TemporaryDirectory(prefix="xfer-scores-") as tmp:
        def fetch(run: tracking.RunRecord) -> list[Path]:
            folder = tracking.artifact_here(run.run_id, names.SCORES_DIR, run.artifact_uri, Path(tmp) / run.run_id)
            return sorted(folder.glob("*.parquet")) if folder is not None else []

        with ThreadPoolExecutor(8) as pool:
            files = [f for found in pool.map(fetch, runs) for f in found]
        tables = [pq.read_table(f, schema=schema()) for f in files]
    table = pa.concat_tables(tables) if tables else schema().empty_table()
    frame = table.to_pandas()
    frame = frame.sort_values("scored_at", kind="stable").drop_duplicates(["set_run_id", "target_run_id"], keep="last")
    return frame.reset_index(drop=True) if len(frame) else pd.DataFrame(columns=[c for c, _, _ in COLUMNS])


# ---- what is left to do ---------------------------------------------------------------------------------

@dataclass
class Pending:
    """The attack stage's cells as MLflow has them: sets made, sets to make, and the targets each set still lacks."""

    cells: list[AttackCell]
    made: dict[str, tracking.RunRecord]              # cell key → its set's run
    to_score: dict[str, list[str]]                   # cell key → target run ids it is not scored on yet
    table: pd.DataFrame | None = None                # the score table, when the set runs' tags could not answer

    @property
    def to_make(self) -> list[AttackCell]:
        return [c for c in self.cells if c.key not in self.made]

    @property
    def unfinished(self) -> list[AttackCell]:
        return [c for c in self.cells if c.key not in self.made or self.to_score.get(c.key)]

    @property
    def untagged(self) -> list[AttackCell]:
        """Made and fully scored, but the set's run does not say so yet (a stage stopped before `summarise`)."""
        return [c for c in self.cells if c.key in self.made and not self.to_score.get(c.key)
                and self.made[c.key].tags.get(names.TAG_SCORED) != targets_hash(c.target_run_ids)]


def pending(experiment: str, cells: Sequence[AttackCell], since: float | None = None,
            records: Sequence[tracking.RunRecord] | None = None) -> Pending:
    """Which of `cells` have their set, and which targets each set is still to be scored on: one search of the
    attack runs; the score table is read only when a set's tag does not already say it is scored on every target."""
    cells = list(cells)
    records = tracking.query(experiment, names.ATTACK) if records is None else records
    made = attack_sets.made(records, cells, since)
    state = Pending(cells, made, {})
    unsure = {c.key for c in cells if c.key in made and made[c.key].tags.get(names.TAG_SCORED) != targets_hash(c.target_run_ids)}
    scored: set[tuple[str, str]] = set()
    if unsure:
        state.table = read(experiment)
        scored = set(zip(state.table["set_run_id"], state.table["target_run_id"]))
    for cell in cells:
        if cell.key not in made:
            state.to_score[cell.key] = list(cell.target_run_ids)
        elif cell.key in unsure:
            run_id = made[cell.key].run_id
            state.to_score[cell.key] = [t for t in cell.target_run_ids if (run_id, t) not in scored]
    return state


def jobs(state: Pending, runs: Mapping[str, _Model]) -> tuple[list[Job], dict[str, SetFacts]]:
    """The scoring work of the made sets: per target the sets it still needs (targets in arch order, so one pack's
    targets stack), and every such set's facts by run id."""
    needs: dict[str, list[str]] = {}
    facts: dict[str, SetFacts] = {}
    for cell in state.cells:
        record = state.made.get(cell.key)
        if record is None or not state.to_score.get(cell.key):
            continue
        facts[record.run_id] = SetFacts.of(record, cell, runs)
        for target in state.to_score[cell.key]:
            needs.setdefault(target, []).append(record.run_id)
    work = [Job(runs[t], tuple(ids)) for t, ids in needs.items() if t in runs]
    return sorted(work, key=lambda j: (j.arch, j.target.in_shape, j.target.run_id)), facts


# ---- scoring: blocks of targets, every set streamed through them -------------------------------------------

@dataclass
class Scored:
    """What a scoring pack did: pairs scored, its seconds of work, how its targets ran, and the failed targets."""

    pairs: int = 0
    seconds: float = 0.0      # the scoring itself: forward passes (loading models and sets is not counted)
    mode: str = ""
    why: str = ""
    failed: dict[str, str] = field(default_factory=dict)   # target run id → reason


def score_pack(pack: Sequence[Job], sets: Mapping[str, SetFacts], stage_run_id: str | None,
               device: torch.device | str | None = None, block: int | None = None, mode: str = "auto",
               progress: Callable[[dict[str, Any]], None] | None = None,
               rows_out: list[dict[str, Any]] | None = None) -> Scored:
    """Score a pack of targets on their sets, `block` targets at a time: each target model loaded once, every set
    read once per pack and streamed through all of the block's targets that need it. Each block's rows are one part
    on `stage_run_id` (and appended to `rows_out`, when given). Pairs already in this stage run's parts (a retried
    trial's earlier attempt) are not scored again. A target that cannot be scored (its checkpoint refused, its
    classes not the set's) fails alone; `progress` hears each target's end."""
    import torch

    from xfer import stacked

    device = torch.device(device) if device is not None else attack.device_of(None)
    block = block or BLOCK[device.type]
    name = targets_hash([job.target.run_id for job in pack])   # the pack's name on its parts
    done = _already(stage_run_id, name) if stage_run_id else set()
    examples = _Examples(sets)
    outcome, finished = Scored(), 0
    ordered = list(pack)
    for begin in range(0, len(ordered), block):
        if stopping.requested():
            break   # the grid is stopping: the rows written so far stay, the rerun scores the rest
        group, loaded = [], []
        for job in ordered[begin:begin + block]:
            try:
                loaded.append(tracking.load_model(job.target.run_id, job.target.record)[0])
                group.append(job)
            except XferError as exc:
                outcome.failed[job.target.run_id] = str(exc)
        rows: list[dict[str, Any]] = []
        if group:
            chosen = _mode(mode, loaded, device, examples, group)
            if not outcome.mode or len(group) > 1:   # a block of one target says little of how the pack ran
                outcome.mode, outcome.why = chosen
            rows = _score_block(group, stacked.Stack(loaded, device, chosen[0]), examples, done, outcome)
        if stage_run_id:
            write_part(stage_run_id, rows, name)
        if rows_out is not None:
            rows_out.extend(rows)
        outcome.pairs += len(rows)
        for job in ordered[begin:begin + block]:
            finished += 1
            if progress is not None:
                reason = outcome.failed.get(job.target.run_id, "")
                progress({"cell": attack_sets.model_label(job.target), "cell_finished": float(not reason), "reason": reason,
                          "cells_done": float(finished), "cells": float(len(ordered))})
    return outcome


CHUNK = 2048          # images per pass when several small sets go through the targets together
KEEP_BYTES = 2 << 30  # a pack keeps the sets it read in memory up to this much (every block streams them all)


class _Examples:
    """A scoring pack's adversarial sets, each read (and verified) once per pack while they fit in KEEP_BYTES."""

    def __init__(self, facts: Mapping[str, SetFacts]) -> None:
        self.facts = facts
        self._kept: dict[str, attack.Examples] = {}
        self._bytes = 0

    def __getitem__(self, set_run_id: str) -> attack.Examples:
        if set_run_id in self._kept:
            return self._kept[set_run_id]
        facts = self.facts[set_run_id]
        found = attack.read_examples(set_run_id, facts.sha or None, facts.artifact_uri or None)
        size = found.clean.numel() + 4 * found.adv.numel()
        if self._bytes + size <= KEEP_BYTES:
            self._kept[set_run_id] = found
            self._bytes += size
        return found


def _score_block(group: list[Job], stack: Any, examples: _Examples, done: set[tuple[str, str]],
                 outcome: Scored) -> list[dict[str, Any]]:
    """The block's rows. Sets are taken in groups needing the same targets (every set of another surrogate: all of
    them; a white-box set: its own), small sets of a group passing through the targets together (CHUNK images)."""
    import torch

    sets = examples.facts
    by_need: dict[tuple[int, ...], list[str]] = {}
    for set_run_id in sorted({s for job in group for s in job.set_run_ids}, key=lambda s: (sets[s].dataset, s)):
        who = tuple(i for i, job in enumerate(group) if set_run_id in job.set_run_ids
                    and (set_run_id, job.target.run_id) not in done)
        if who:
            by_need.setdefault(who, []).append(set_run_id)
    clean: dict[tuple[str, bytes], torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    for who, ids in by_need.items():
        chunk: list[tuple[str, attack.Examples]] = []
        for position, set_run_id in enumerate(ids):
            chunk.append((set_run_id, examples[set_run_id]))
            if position + 1 < len(ids) and sum(len(e.adv) for _, e in chunk) < CHUNK:
                continue
            fit = [i for i in who if _fits(group[i].target, chunk, outcome)]
            if fit:
                rows += _score_chunk(group, stack, fit, chunk, sets, clean, outcome)
            chunk = []
    return rows


def _fits(target: _Model, chunk: list[tuple[str, attack.Examples]], outcome: Scored) -> bool:
    """Whether the target classifies these sets' classes from their images; a target that does not fails, named."""
    if target.run_id in outcome.failed:
        return False
    for set_run_id, found in chunk:
        if not data.same_labels(target.class_names, found.class_names) or target.in_shape != tuple(found.clean.shape[1:]):
            outcome.failed[target.run_id] = (
                f"target run {target.run_id} classifies {len(target.class_names)} classes from images {target.in_shape}, "
                f"not the {len(found.class_names)} classes and images {tuple(found.clean.shape[1:])} of the set "
                f"{set_run_id}; targets must be trained on the attacked task")
            return False
    return True


def _score_chunk(group: list[Job], stack: Any, who: list[int], chunk: list[tuple[str, attack.Examples]],
                 facts: Mapping[str, SetFacts], clean: dict[tuple[str, bytes], Any], outcome: Scored) -> list[dict[str, Any]]:
    """One pass of the chunk's adversarial images through the targets `who`; each set's clean sample (shared by every
    set of one dataset, n and seed) through every target of the block once."""
    import torch

    began = time.perf_counter()
    adv = stack.predict(torch.cat([found.adv for _, found in chunk]), which=who)
    rows, begin, now = [], 0, time.time()
    for set_run_id, found in chunk:
        sample = (facts[set_run_id].dataset, found.indices.numpy().tobytes())
        if sample not in clean:
            clean[sample] = stack.predict(found.clean)
        end = begin + len(found.adv)
        rows += [row(facts[set_run_id], group[i].target, clean[sample][i], adv[w, begin:end], found.labels, now)
                 for w, i in enumerate(who)]
        begin = end
    outcome.seconds += time.perf_counter() - began
    return rows


def _mode(mode: str, loaded: list[Any], device: Any, examples: _Examples, group: list[Job]) -> tuple[str, str]:
    """How a block's targets run: "stacked" or "loop" as asked, or for "auto" as measured (`stacked.choose`)."""
    from xfer import calibration, stacked

    if mode != "auto":
        return mode, f"scoring mode {mode}"
    if len(loaded) == 1:
        return "loop", "one target"
    reason = stacked.stackable(loaded)
    if reason:
        return "loop", reason
    return stacked.choose(loaded, device, calibration.path(), examples[group[0].set_run_ids[0]].adv)


def _already(stage_run_id: str, pack: str) -> set[tuple[str, str]]:
    """The pairs this pack wrote to `stage_run_id` so far: what an earlier attempt of a retried trial scored (its
    parts carry the pack's name; reading every pack's parts at each pack's start would grow with the stage)."""
    import pyarrow.parquet as pq

    mine = [p for p in tracking.list_artifacts(stage_run_id, names.SCORES_DIR) if Path(p).name.startswith(f"part-{pack}-")]
    pairs: set[tuple[str, str]] = set()
    with tempfile.TemporaryDirectory(prefix="xfer-scores-") as tmp:
        for path in mine:
            table = pq.read_table(tracking.download_artifact(stage_run_id, path, Path(tmp)),
                                  columns=["set_run_id", "target_run_id"])
            pairs |= set(zip(table["set_run_id"].to_pylist(), table["target_run_id"].to_pylist()))
    return pairs


# ---- after scoring: each set's run says how it did -----------------------------------------------------------

def summary(rows: pd.DataFrame) -> dict[str, float]:
    """A set's summary metrics from its score rows: targets scored, mean success on the surrogate's own
    descendants and on fine-tuned models of other sources, mean adversarial accuracy (absent when undefined)."""
    finetuned = rows["target_stage"] == names.FINETUNE
    parts = {
        names.TARGETS_SCORED: float(len(rows)),
        names.DESCENDANTS_SUCCESS: rows.loc[rows[names.TAG_IS_PARENT].astype(bool), names.SUCCESS_RATE].mean(),
        names.OTHER_SOURCES_SUCCESS: rows.loc[finetuned & ~rows[names.TAG_SAME_SOURCE].astype(bool), names.SUCCESS_RATE].mean(),
        names.MEAN_ADV_ACC: rows[names.ADV_ACC].mean(),
    }
    return {k: float(v) for k, v in parts.items() if v == v}   # NaN (nothing to average) is left out


def summarise(state: Pending, table: pd.DataFrame) -> int:
    """Log each made set's summary metrics and, once it is scored on every planned target, its names.TAG_SCORED;
    sets whose tag already says so are left alone. Returns how many set runs were updated."""
    by_set = {run_id: rows for run_id, rows in table.groupby("set_run_id")} if len(table) else {}
    updates = []
    for cell in state.cells:
        record = state.made.get(cell.key)
        if record is None:
            continue
        want = targets_hash(cell.target_run_ids)
        if record.tags.get(names.TAG_SCORED) == want:
            continue
        rows = by_set.get(record.run_id)
        if rows is None:
            continue
        rows = rows[rows["target_run_id"].isin(cell.target_run_ids)]
        complete = set(rows["target_run_id"]) >= set(cell.target_run_ids)
        updates.append((record.run_id, summary(rows), {names.TAG_SCORED: want} if complete else {}))
    with ThreadPoolExecutor(SUMMARY_THREADS) as pool:
        list(pool.map(lambda u: tracking.update_run(*u), updates))
    return len(updates)


# ---- the stage's flow, whatever runs its packs ---------------------------------------------------------------

@dataclass
class StageResult:
    """What the attack stage did: sets made, pairs scored, work seconds, and what failed, with reasons."""

    cells: int
    cached: int
    made: int = 0
    pairs: int = 0
    targets: int = 0
    work_seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)        # cell key → reason (its set, or its scoring)
    stopped: list[str] = field(default_factory=list)            # cell keys left for the rerun: the grid stopped
    modes: dict[str, str] = field(default_factory=dict)         # scoring mode → why


MakeSets = Callable[[list[AttackCell]], dict[str, str]]                        # cells → failed cell keys' reasons
ScoreJobs = Callable[[list[Job], dict[str, SetFacts]], list[Scored]]           # jobs, set facts → each pack's outcome


def run(experiment: str, cells: Sequence[AttackCell], runs: Mapping[str, _Model], make: MakeSets, score: ScoreJobs,
        since: float | None = None, state: Pending | None = None,
        stopping: Callable[[], bool] = lambda: False) -> StageResult:
    """The attack stage over `cells`: make the missing sets (`make`), score every set on the targets it still
    lacks (`score`), then record each set's summary on its run. `make` and `score` run packs: in this process
    (`local`) or as Ray Tune trials (xfer.pipeline). Once `stopping()`, nothing more is launched and what is left
    is `stopped`, not failed: the rerun goes on with it."""
    state = state or pending(experiment, cells, since)
    result = StageResult(len(state.cells), len(state.cells) - len(state.unfinished))
    to_make = state.to_make
    failed_sets = make(to_make) if to_make else {}
    if to_make:
        state.made.update(attack_sets.made(tracking.query(experiment, names.ATTACK), to_make, since))
        result.made = sum(c.key in state.made for c in to_make)
        result.work_seconds += sum(state.made[c.key].metrics.get(names.SECONDS, 0.0) for c in to_make if c.key in state.made)
    for cell in to_make:
        if cell.key not in state.made:
            if cell.key in failed_sets or not stopping():
                result.failed[cell.key] = failed_sets.get(cell.key) or "its adversarial set was not made"
            else:
                result.stopped.append(cell.key)
    work, facts = jobs(state, runs)
    outcomes = score(work, facts) if work and not stopping() else []
    for outcome in outcomes:
        result.pairs += outcome.pairs
        result.work_seconds += outcome.seconds
        if outcome.mode:
            result.modes.setdefault(outcome.mode, outcome.why)
    result.targets = len(work)
    table = read(experiment) if (outcomes or state.untagged) else state.table
    if table is not None:
        summarise(state, table)
        scored = set(zip(table["set_run_id"], table["target_run_id"]))
        reasons = {t: r for o in outcomes for t, r in o.failed.items()}
        for cell in state.cells:
            record = state.made.get(cell.key)
            if record is None or cell.key in result.failed:
                continue
            missing = [t for t in cell.target_run_ids if (record.run_id, t) not in scored]
            if missing and stopping() and not any(t in reasons for t in missing):
                result.stopped.append(cell.key)
            elif missing:
                why = next((reasons[t] for t in missing if t in reasons), "its scoring pack did not finish")
                result.failed[cell.key] = f"not scored on {len(missing)} of {len(cell.target_run_ids)} target(s): {why}"
    return result


def local(experiment: str, cells: Sequence[AttackCell], device: torch.device | str | None = "cpu",
          parent_run_id: str | None = None, mode: str = "auto", since: float | None = None) -> StageResult:
    """The attack stage in this process, without Ray (tests, notebooks): a stage run is opened to hold the parts."""
    runs = attack_sets.training_runs(experiment)
    with tracking.start_run(experiment, names.GRID, "", tags={names.TAG_GRID_STAGE: names.ATTACK}, run_name="attack",
                            parent_run_id=parent_run_id) as stage:
        context = attack_sets.AttackContext(experiment, parent_run_id=stage.run_id, runs=runs, device=device)
        return run(experiment, cells, runs,
                   make=lambda todo: attack_sets.make_sets(experiment, todo, device, context),
                   score=lambda work, facts: [score_pack(work, facts, stage.run_id, device, mode=mode)],
                   since=since)


__all__ = ["COLUMNS", "SetFacts", "Job", "Pending", "Scored", "StageResult", "pending", "jobs", "score_pack", "read",
           "write_part", "summary", "summarise", "run", "local", "targets_hash", "schema"]
