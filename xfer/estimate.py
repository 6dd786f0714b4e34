"""The estimate stage: every pretrained model scored for the grid's target before anything is fine-tuned, and
`--prune-sources`, which fine-tunes only the sources those scores rank best.

Each pretrained model (source × arch × seed) runs once over the same stratified draw of the target's training
images (`EstimateSpec.n`, fixed by the target alone so every model sees the same images): the body's features and
the source head's softmax feed the four estimators of `xfer.estimators` (LEEP, NCE, H-score, LogME). The result is
ONE MLflow run per model (stage names.ESTIMATE) with the four scores as metrics, keyed like every cell, so a rerun
skips what is there and a crashed trial's models are scored again. The stage runs on Ray Tune in packs of one arch
(a pack loads the target's data once, from the object store), as the attack stage's packs do.

The report (reports/transferability.py) sets these scores beside the measured fine-tuned errors of the same grid:
Kendall τ, bootstrap intervals and the regret of trusting them. `rank` and `prune` act on them before the fine-tune
stage: with `Grid.prune_sources` = K, only the K sources ranked best by `Grid.prune_by` (LogME by default) are
fine-tuned, per target × arch, and what was skipped is kept as the experiment tag names.TAG_PRUNED for the report.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from xfer import data, estimators, grid as grids, names, packs, specs, stages, stopping, tracking, tune_adapter
from xfer.errors import XferError
from xfer.models import check_input_shape
from xfer.specs import EstimateSpec
from xfer.stages import RunOptions, StageSummary

POOL_SEED = 0          # the draw of target images: one per target, so every model is scored on the same images
PACK_FACTOR = 8        # an estimate pack holds 8× a training pack's cells: a forward pass is cheap beside training
# Images per forward pass: on a CPU small batches stay in cache (resnet_mini, 4,000 images, one thread: 1.25 s at 128,
# 2.4 s at 512; 2026-12-07); a GPU wants large ones.
BATCH = {"cpu": 128, "cuda": 1024}


# ---- one model ------------------------------------------------------------------------------------------

def pool(dataset: data.Dataset, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels an estimate scores: `n` of the training pool (stratified, seeded by POOL_SEED alone),
    or all of it."""
    train = dataset.train
    if n is None or n >= len(train.labels):
        return train.images, train.labels
    index = data.stratified_indices(train.labels, n, POOL_SEED)
    return train.images[index], train.labels[index]


def measure(model: Any, images: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, float]:
    """The four estimates of `model` on (images, labels) with what each cost: metrics named as in names.py (each
    estimator by its name, its seconds as "<name>_seconds", the forward pass as FEATURES_SECONDS)."""
    began = time.perf_counter()
    device = next(model.parameters()).device.type
    features, probs = estimators.features_and_probs(model, images, BATCH.get(device, BATCH["cpu"]))
    forward = time.perf_counter() - began
    seconds: dict[str, float] = {}
    scores = estimators.scores(features, probs, labels.numpy(), classes, seconds)
    return {**scores, **{f"{name}_seconds": s for name, s in seconds.items()},
            names.FEATURES_SECONDS: forward, names.ESTIMATE_EXAMPLES: float(len(labels))}


@dataclass(frozen=True)
class Cell:
    """An estimate cell as a trial gets it: its spec and the run that published its pretrained model."""

    spec: EstimateSpec
    pretrain_run_id: str

    @property
    def key(self) -> str:
        return specs.key(self.spec)


def label(spec: EstimateSpec) -> str:
    """A cell in words, e.g. "estimate glyph_letters→mnist5k resnet_mini seed=0" (its run's name too)."""
    t = spec.pretrain.train
    return f"estimate {t.dataset}→{spec.target} {t.arch} seed={t.seed}"


def tags_of(cell: Cell) -> dict[str, str]:
    t = cell.spec.pretrain.train
    return {names.TAG_SOURCE: t.dataset, names.TAG_TARGET: cell.spec.target, names.TAG_ARCH: t.arch,
            names.TAG_SEED: str(t.seed), names.TAG_PRETRAIN_RUN: cell.pretrain_run_id}


def estimate(cell: Cell, experiment: str, dataset: data.Dataset, parent_run_id: str | None = None,
             device: str | torch.device = "cpu") -> dict[str, float]:
    """Score one pretrained model on the target and record it as its MLflow run; returns the metrics logged."""
    model = tracking.load_model(cell.pretrain_run_id)[0].to(device)
    check_input_shape(model, dataset.in_shape, dataset.name, "estimate on a target of the sources' shape",
                      who=f"{label(cell.spec)}: ")
    images, labels = pool(dataset, cell.spec.n)
    with tracking.start_run(experiment, names.ESTIMATE, cell.key, tags=tags_of(cell), params=cell.spec,
                            run_name=label(cell.spec), parent_run_id=parent_run_id, sigterm=False) as run:
        began = time.perf_counter()
        metrics = measure(model, images, labels, len(dataset.class_names))
        metrics[names.SECONDS] = time.perf_counter() - began
        run.log_metrics(metrics)
    return metrics


def estimate_pack(experiment: str, cells: Sequence[Cell], dataset: data.Dataset, parent_run_id: str | None = None,
                  device: str | torch.device = "cpu", progress: Callable[[dict[str, Any]], None] | None = None,
                  since: float | None = None) -> dict[str, str]:
    """A pack of estimates in one process; those already recorded (a retried trial's earlier attempt; since `since`
    under --force) are skipped, none is started once the grid is stopping. Returns the failed cells' reasons by
    key: a cell refused for bad input (`XferError`) fails alone and its pack-mates go on."""
    done = tracking.finished_for(experiment, [c.key for c in cells], names.ESTIMATE, since)
    failed: dict[str, str] = {}
    for count, cell in enumerate(cells, 1):
        if stopping.requested():
            break
        if cell.key not in done:
            try:
                estimate(cell, experiment, dataset, parent_run_id, device)
            except XferError as exc:
                failed[cell.key] = str(exc)
        if progress is not None:
            progress({"cell": label(cell.spec), "cell_finished": float(cell.key not in failed),
                      "reason": failed.get(cell.key, ""), "cells_done": float(count), "cells": float(len(cells))})
    return failed


# ---- the stage ------------------------------------------------------------------------------------------

def run_stage(cells: Sequence[EstimateSpec], options: RunOptions, datasets: Mapping[str, data.Dataset],
              view: Any = None, snapshot: tracking.Snapshot | None = None) -> StageSummary:
    """The estimate stage on Ray Tune: the grid's estimate cells not yet in MLflow, in packs of one arch. A cell
    whose pretrained model has no finished run fails with that reason (nothing to score); nothing to do starts
    nothing."""
    todo, cached = stages.pending(options.experiment, cells, options.force, names.ESTIMATE, snapshot)
    summary = StageSummary(names.ESTIMATE, len(cells), cached=cached)
    if not todo:
        return summary
    start = time.perf_counter()
    since = stages.invocation_start(options)
    models = tracking.finished_by_key(options.experiment, names.PRETRAIN, since)
    ready = []
    for spec in todo:
        record = models.get(specs.key(spec.pretrain))
        if record is None or names.TAG_CHECKPOINT_SHA not in record.tags:
            summary.failed.append((label(spec), "its pretrained model has no finished pretrain run with a checkpoint "
                                                "(the pretrain cell failed or was not run); nothing to score"))
        else:
            ready.append(Cell(spec, record.run_id))
    if not ready:
        summary.seconds = time.perf_counter() - start
        return summary
    if _in_process(ready, datasets):
        with stages.stage_run(names.ESTIMATE, options) as parent:
            failed = estimate_pack(options.experiment, ready, datasets[ready[0].spec.target], parent.run_id, since=since)
            stages.summarise(summary, names.ESTIMATE, {c.key: label(c.spec) for c in ready}, failed, options, since)
            summary.note = "in this process: less work than starting trials"
            summary.seconds = time.perf_counter() - start
            parent.log_metrics(summary.metrics())
        return summary
    with stages.launched(names.ESTIMATE, summary, options) as stage_:
        chosen = packs.plan(ready, lambda c: c.spec.pretrain.train.arch, PACK_FACTOR * stages.pack_size(stage_.options),
                            stage_.slots)
        options = stages.widened(stage_.options, len(chosen))
        refs = {name: stage_.ray.put(datasets[name]) for name in {c.spec.target for c in ready}}
        ended = tune_adapter.launch(names.ESTIMATE, _trial, chosen,
                              [f"estimates {p[0].spec.pretrain.train.arch} ×{len(p)}" for p in chosen], options, view,
                              len(ready), refs=refs, parent_run_id=stage_.run.run_id, since=since)
        stages.summarise(summary, names.ESTIMATE, {c.key: label(c.spec) for c in ready},
                         tune_adapter.member_failures(chosen, ended, key=lambda c: c.key), options, since)
        summary.packs = len(chosen)
    return summary


# Below this many seconds of forward passes (on one CPU thread, at each arch's measured scoring speed) the stage runs
# in the grid's own process: starting a Tune run's trials took ~6 s on the 2-core machine (2026-12-07, smoke preset:
# 2 models × 4,000 images, 3.5 s of work, 11 s as trials), and the driver holds the target's data already.
IN_PROCESS_S = 6.0


def _in_process(cells: Sequence[Cell], datasets: Mapping[str, data.Dataset]) -> bool:
    """Whether the stage's work is less than what starting trials costs (IN_PROCESS_S)."""
    from xfer import calibration, plan

    dataset = datasets[cells[0].spec.target]
    shape, classes = tuple(dataset.in_shape), len(dataset.class_names)
    work = 0.0
    for cell in cells:
        images = min(cell.spec.n or len(dataset.train.labels), len(dataset.train.labels))
        work += images / plan.score_rate(cell.spec.pretrain.train.arch, shape, classes, 1, calibration.path())
        if work >= IN_PROCESS_S:
            return False
    return True


def _trial(config: dict[str, Any], stage_packs: list[tuple[Cell, ...]], options: RunOptions, refs: dict[str, Any],
           parent_run_id: str | None, since: float | None) -> None:
    """One pack of estimates: the target's data from the object store, each model loaded, run once and dropped."""
    import ray

    device = "cuda" if options.gpus_per_trial and torch.cuda.is_available() else "cpu"
    progress = tune_adapter.progress()
    with tune_adapter.pack_trial(config, stage_packs, options) as pack:
        failed = estimate_pack(options.experiment, pack, ray.get(refs[pack[0].spec.target]), parent_run_id, device,
                               progress=lambda m: progress.ended(m["cell"], m["reason"], m), since=since)
    progress.flush(tune_adapter.last_report(failed))


# ---- --prune-sources ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """One target × arch: the sources kept for fine-tuning and those skipped, with the score each was ranked by
    (its estimate's mean over seeds). Sources without an estimate cannot be ranked and are kept (`unscored`)."""

    target: str
    arch: str
    kept: tuple[str, ...]
    skipped: tuple[str, ...]
    scores: dict[str, float]
    unscored: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pruning:
    """What --prune-sources K decided: per target × arch, the K sources best by the estimator `by`."""

    k: int
    by: str
    groups: tuple[Group, ...]

    def keeps(self, spec: Any) -> bool:
        """Whether fine-tune cell `spec` is kept (cells of other stages and of unranked groups always are)."""
        for g in self.groups:
            if (g.target, g.arch) == (spec.train.dataset, spec.train.arch):
                return spec.source not in g.skipped
        return True

    def tag(self) -> str:
        """The experiment tag names.TAG_PRUNED: what the report reads to say which sources were skipped and why."""
        return json.dumps({"k": self.k, "by": self.by, "groups": [dataclasses.asdict(g) for g in self.groups]},
                          sort_keys=True)

    def lines(self) -> list[str]:
        out = []
        for g in self.groups:
            if g.skipped:
                ranked = ", ".join(f"{s} {g.scores[s]:.4g}" for s in sorted(g.scores, key=lambda s: -g.scores[s]))
                out.append(f"--prune-sources {self.k} ({self.by}) for {g.arch} on {g.target}: fine-tuning "
                           f"{', '.join(g.kept)}; skipping {', '.join(g.skipped)} (mean {self.by} over seeds: {ranked})")
            if g.unscored:
                out.append(f"--prune-sources: {', '.join(g.unscored)} ({g.arch}) have no estimate in MLflow and are "
                           "kept unranked; run the estimate stage (--stages estimate) to rank them")
        return out


def rank(grid: grids.Grid, cells: grids.Cells, records: Sequence[tracking.RunRecord]) -> Pruning:
    """The grid's K best sources per target × arch by `grid.prune_by`, from the finished estimate runs of the grid's
    own estimate cells (`records`: the experiment's estimate runs; the newest of a key counts). Ties go to the
    source listed first in the grid."""
    wanted = {specs.key(spec): spec for spec in cells.estimates}
    newest = {r.key: r for r in records if r.key in wanted and grid.prune_by in r.metrics}
    by_group: dict[tuple[str, str], dict[str, list[float]]] = {}
    for key, spec in wanted.items():
        group = by_group.setdefault((spec.target, spec.pretrain.train.arch), {})
        if key in newest:
            group.setdefault(spec.pretrain.train.dataset, []).append(newest[key].metrics[grid.prune_by])
    groups = []
    for (target, arch), found in by_group.items():
        scores = {source: sum(v) / len(v) for source, v in found.items()}
        order = sorted(scores, key=lambda s: (-scores[s], grid.sources.index(s)))
        unscored = tuple(s for s in grid.sources if s not in scores)
        kept = tuple(order[:grid.prune_sources]) + unscored
        groups.append(Group(target, arch, kept, tuple(order[grid.prune_sources:]), scores, unscored))
    return Pruning(grid.prune_sources, grid.prune_by, tuple(groups))


def prune(cells: grids.Cells, pruning: Pruning) -> grids.Cells:
    """`cells` without the fine-tune cells of the sources `pruning` skips."""
    return dataclasses.replace(cells, finetune=tuple(c for c in cells.finetune if pruning.keeps(c)))


def applies(grid: grids.Grid) -> bool:
    """Whether --prune-sources leaves any source out (K below the number of sources)."""
    return 0 < grid.prune_sources < len(grid.sources)


def planned(grid: grids.Grid, cells: grids.Cells, records: Sequence[tracking.RunRecord] | None) -> tuple[grids.Cells, str]:
    """The fine-tune cells a grid with --prune-sources will run, and the plan's note on them. Once MLflow holds every
    estimate (`records`), the sources are known; before, the count assumes the sources listed last are skipped
    (exact whenever every source has as many cells, as in a product grid) and the note says so."""
    if not applies(grid):
        return cells, ""
    known = {r.key for r in records or () if grid.prune_by in r.metrics}
    every = {specs.key(s) for s in cells.estimates}
    if every and every <= known:
        pruning = rank(grid, cells, records or ())
        kept = prune(cells, pruning)
        skipped = sorted({s for g in pruning.groups for s in g.skipped})
        return kept, (f"--prune-sources {grid.prune_sources} by {grid.prune_by}: {len(cells.finetune) - len(kept.finetune)} "
                      f"cells of {', '.join(skipped)} not run")
    stand_in = Pruning(grid.prune_sources, grid.prune_by, tuple(
        Group(grid.target, arch, grid.sources[:grid.prune_sources], grid.sources[grid.prune_sources:], {})
        for arch in grid.archs))
    kept = prune(cells, stand_in)
    counts = collections.Counter((c.train.arch, c.source) for c in cells.finetune)
    even = all(len({n for (a, _), n in counts.items() if a == arch}) <= 1 for arch in grid.archs)   # within each arch
    return kept, (f"--prune-sources {grid.prune_sources} by {grid.prune_by}: {len(cells.finetune) - len(kept.finetune)} "
                  f"cells {'' if even else 'or so '}not run, of the {len(grid.sources) - grid.prune_sources} source(s) "
                  "per arch ranked lowest (known once the estimate stage has run)")


__all__ = ["EstimateSpec", "Cell", "Group", "Pruning", "pool", "measure", "estimate", "estimate_pack", "run_stage",
           "rank", "prune", "applies", "planned", "label"]
