"""The attack stage's first half: which adversarial sets a grid needs (`plan`: surrogates and targets found by MLflow
queries, checkpoints only from MLflow artifacts), and making them (`make_sets`): each (surrogate, attack setting)
one MLflow run whose adversarial set is an artifact with its sha256. Its scores on every target are rows of a table,
not runs: `xfer.scores` is the second half. The attacks themselves are `xfer.attack`'s.

Which loss a surrogate is attacked with (the label-set rule). An adversarial example of the target task
is made by raising the surrogate's loss on the task's labels, which only means something when the
surrogate's head classifies exactly the task's classes. So:
- a surrogate whose checkpoint `class_names` name the attacked task's labels (`data.same_labels`: MNIST's
  "0 - zero" is USPS's "0") is attacked with the requested attack on its logits (scratch models, every target
  as its own white-box reference, and pretrained models whose source shares the task's label set, e.g. QMNIST,
  USPS, SVHN or EMNIST digits for MNIST);
- a pretrained surrogate with another label set (KMNIST, FashionMNIST, EMNIST letters, ... for MNIST)
  has no head for the task; its *features* are what fine-tuning inherits, so it is attacked with
  `feature_pgd`: L∞ PGD that pushes the body's penultimate features away from the clean image's, a
  label-free feature-level transfer attack. Targeted attacks and CW (which need the task's labels) are
  not run from such surrogates. The attack that ran is the `attack` tag of every attack run.
Requesting `feature_pgd` itself puts every surrogate on the same footing (one loss for A and B sources).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xfer import attack, checkpoint, data, names, specs, stopping, tracking
from xfer.errors import XferError
from xfer.specs import AttackCellSpec, AttackSpec

# ---- the attack stage's sets: cells from MLflow, one MLflow run per adversarial set ------------------

FEATURE_ATTACK = "feature_pgd"   # what a surrogate of another label set runs instead of a logit attack


@dataclass(frozen=True)
class AttackCell:
    """One adversarial set: made once on the surrogate run(s), then scored on every target run (xfer.scores)."""

    spec: AttackCellSpec
    surrogate_run_ids: tuple[str, ...]   # several = an ensemble surrogate (logits averaged)
    target_run_ids: tuple[str, ...]

    @property
    def key(self) -> str:
        return specs.key(self.spec)

    @property
    def surrogate(self) -> str:
        """The surrogate run ids as the set's run records them (names.TAG_SURROGATE_RUN)."""
        return "+".join(self.surrogate_run_ids)


@dataclass(frozen=True)
class _Model:
    """A training run as the attack stage sees it: its MLflow record and its checkpoint's task facts."""

    record: tracking.RunRecord
    class_names: tuple[str, ...]
    in_shape: tuple[int, ...]

    @property
    def run_id(self) -> str:
        return self.record.run_id


SELF = "self"   # in `surrogate_stages`: each target attacked on itself (the white-box reference)


def plan(experiment: str, attacks: Sequence[AttackSpec], ensembles: bool = False, keys: Collection[str] | None = None,
         surrogate_stages: Sequence[str] = (names.PRETRAIN, names.SCRATCH, SELF),
         runs: dict[str, _Model] | None = None) -> list[AttackCell]:
    """The attack stage's cells (adversarial sets), from the experiment's finished training runs in MLflow.

    Targets of an attack setting are the fine-tuned and scratch runs trained on its dataset. Surrogates:
    every pretrained and every scratch run (scored on all targets of their input shape), and every
    fine-tuned run as its own white-box reference (scored on itself). A surrogate that does not
    classify the task's classes runs `feature_pgd` instead (see the module notes) and is skipped for
    targeted and L2 settings. `ensembles` adds, per pretraining source with two or more runs, one
    cell whose surrogate is all of them. Cells with equal keys are planned once. `keys` (a grid's cells) keeps
    only those runs (None: every training run of the experiment); `surrogate_stages` says whose examples are
    scored: pretrained and scratch models' on every target, and with SELF each target's own (white-box).
    `runs`: the experiment's `training_runs`, when the caller has them already.
    """
    for spec in attacks:
        attack.registered(spec.attack)  # an unknown name fails before any look-up
    runs = {i: m for i, m in (training_runs(experiment) if runs is None else runs).items()
            if keys is None or m.record.key in keys}
    pretrained = [m for m in runs.values() if m.record.stage == names.PRETRAIN and names.PRETRAIN in surrogate_stages]
    scratch = [m for m in runs.values() if m.record.stage == names.SCRATCH and names.SCRATCH in surrogate_stages]
    cells: dict[str, AttackCell] = {}
    for spec in attacks:
        targets = [m for m in runs.values() if m.record.stage in (names.FINETUNE, names.SCRATCH)
                   and m.record.tags.get(names.TAG_TARGET) == spec.dataset]
        if not targets:
            continue
        task = targets[0]
        groups = [[m] for m in pretrained + scratch] + (_by_source(pretrained) if ensembles else [])
        for group in groups:
            chosen = _attack_for(spec, group, task.class_names)
            fits = [t.run_id for t in targets
                    if t.in_shape == group[0].in_shape and data.same_labels(t.class_names, task.class_names)]
            if chosen is not None and fits:
                _add(cells, chosen, group, fits)
        for target in targets if SELF in surrogate_stages else ():  # the white-box reference: a target on itself
            _add(cells, spec, [target], [target.run_id])
    return list(cells.values())


def made(records: Sequence[tracking.RunRecord], cells: Sequence[AttackCell], since: float | None = None
         ) -> dict[str, tracking.RunRecord]:
    """Each cell's adversarial set among finished attack runs `records`, by cell key: the newest run of its key made on
    the cell's own surrogate runs (a surrogate trained again, after --force, makes the set again), started at or after
    `since` when given (a forced re-run)."""
    wanted = {c.key: c.surrogate for c in cells}
    found: dict[str, tracking.RunRecord] = {}
    for record in records:   # oldest first: the newest wins
        if (record.key in wanted and record.tags.get(names.TAG_SURROGATE_RUN) == wanted[record.key]
                and names.TAG_EXAMPLES_SHA in record.tags
                and (since is None or record.start_time.timestamp() >= since)):
            found[record.key] = record
    return found


class AttackContext:
    """What one process making adversarial sets shares: the training runs they attack, the attacked datasets, and
    every model loaded once."""

    def __init__(self, experiment: str, datasets: Mapping[str, data.Dataset] | None = None,
                 data_root: str | Path | None = None, parent_run_id: str | None = None,
                 runs: dict[str, _Model] | None = None, device: torch.device | str | None = None) -> None:
        self.experiment, self.data_root = experiment, data_root
        self.parent_run_id = parent_run_id   # the attack stage's run: set runs are its children
        self.device = attack.device_of(device)   # where its models live: loaded there once, never moved back and forth
        self.datasets = dict(datasets or {})
        self._runs = runs
        self._models = tracking.LoadedModels(self.device)

    def runs(self, ids: Sequence[str]) -> list[_Model]:
        """The training runs `ids`, in order; refused unless each is finished with a checkpoint."""
        if self._runs is None:
            self._runs = training_runs(self.experiment)
        missing = [i for i in ids if i not in self._runs]
        if missing:
            raise XferError(f"run(s) {', '.join(missing)} are not finished training runs with a checkpoint in experiment "
                            f"{self.experiment!r}; plan the attack cells again (attack_sets.plan) from what MLflow holds now.")
        return [self._runs[i] for i in ids]

    def model(self, run_id: str) -> nn.Module:
        """The model run `run_id` published, downloaded and verified once per process (attacks never change it)."""
        known = self._runs.get(run_id) if self._runs is not None else None
        return self._models.get(run_id, known.record if known else None)

    def dataset(self, name: str) -> data.Dataset:
        """The attacked task's data: handed over by the stage (Ray's object store), else loaded here."""
        if name not in self.datasets:
            self.datasets[name] = data.load(name, self.data_root)
        return self.datasets[name]

    def made(self, cells: Sequence[AttackCell]) -> dict[str, tracking.RunRecord]:
        """The cells' sets already made (by a retried trial's earlier attempt, say): a search per cell."""
        return made(tracking.query_keys(self.experiment, [c.key for c in cells], names.ATTACK), cells)


def _add(cells: dict[str, AttackCell], spec: AttackSpec, surrogates: list[_Model], targets: list[str]) -> None:
    ordered = sorted(surrogates, key=lambda m: m.record.key)
    cell = AttackCell(AttackCellSpec("+".join(m.record.key for m in ordered), spec),
                      tuple(m.run_id for m in ordered), tuple(targets))
    cells.setdefault(cell.key, cell)


def _attack_for(spec: AttackSpec, surrogates: list[_Model], task_classes: tuple[str, ...]) -> AttackSpec | None:
    """The label-set rule: the asked attack if the surrogates classify the task's classes, else feature_pgd (or none)."""
    asked = attack.registered(spec.attack)
    if asked.loss == "features" or all(data.same_labels(m.class_names, task_classes) for m in surrogates):
        return spec
    if spec.targeted or not asked.linf:
        return None  # a targeted or L2 attack needs a head over the task's labels
    return specs.replace(spec, attack=FEATURE_ATTACK)


def _by_source(pretrained: list[_Model]) -> list[list[_Model]]:
    groups: dict[tuple[str, tuple[int, ...]], list[_Model]] = {}
    for m in pretrained:
        groups.setdefault((m.record.tags.get(names.TAG_SOURCE, ""), m.in_shape), []).append(m)
    return [g for g in groups.values() if len(g) > 1]


def training_runs(experiment: str, snapshot: tracking.Snapshot | None = None) -> dict[str, _Model]:
    """Finished training runs that published a checkpoint, by run id, with their models' label sets and input shapes:
    of a cell run more than once (--force), its newest run only, the model the cell holds now.

    Both come from the run's tags (names.TAG_CLASSES, TAG_IN_SHAPE); a run recorded before those tags existed
    has its checkpoint's meta.json read instead. `snapshot`: the experiment's runs, listed already.
    """
    newest: dict[str, tracking.RunRecord] = {}
    for stage in tracking.TRAINING_STAGES:
        records = snapshot.query(stage) if snapshot is not None else tracking.query(experiment, stage)
        for record in records:   # oldest first: the newest run of a key wins
            if names.TAG_CHECKPOINT_SHA in record.tags:
                newest[record.key or record.run_id] = record
    found: dict[str, _Model] = {}
    for record in newest.values():
        if names.TAG_CLASSES in record.tags and names.TAG_IN_SHAPE in record.tags:
            classes = json.loads(record.tags[names.TAG_CLASSES])
            shape = [int(d) for d in record.tags[names.TAG_IN_SHAPE].split("x")]
        else:
            meta = _checkpoint_meta(record.run_id)
            classes, shape = meta["class_names"], meta["in_shape"]
        found[record.run_id] = _Model(record, tuple(classes), tuple(shape))
    return found


def _checkpoint_meta(run_id: str) -> dict[str, Any]:
    # Only meta.json: planning must not download every model's weights.
    with tempfile.TemporaryDirectory(prefix="xfer-meta-") as tmp:
        path = tracking.download_artifact(run_id, f"{names.CHECKPOINT_DIR}/{checkpoint.META}", Path(tmp))
        return json.loads(path.read_text())


def make_set(cell: AttackCell, context: AttackContext, device: torch.device | str | None = None) -> str:
    """Make one cell's adversarial set and store it as an MLflow run (a child of `context.parent_run_id`): the
    examples as an artifact with their sha256, the surrogate's white-box success, the seconds it took.

    Returns the set's run id. Refuses, before any work, surrogates that do not fit the attacked task.
    """
    spec = cell.spec.attack
    surrogates = context.runs(cell.surrogate_run_ids)
    dataset = context.dataset(spec.dataset)
    _check_cell(spec, surrogates, [], dataset.class_names, dataset.in_shape)
    index = data.stratified_indices(dataset.test.labels, spec.n, spec.seed)
    clean, labels = dataset.test.images[index], dataset.test.labels[index]
    surrogate_models = [context.model(m.run_id) for m in surrogates]
    began = time.perf_counter()
    adv = attack.generate(surrogate_models, clean, labels, spec, device)
    aims = attack.target_labels(labels, len(dataset.class_names), spec.seed) if spec.targeted else labels
    # Scored as stored: float16, so a fresh set and one read back from MLflow give the same numbers.
    examples = attack.Examples(clean, adv.half().float(), labels, index, aims, dataset.class_names)
    whitebox = _whitebox_success(surrogate_models, examples, spec, device)
    seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory(prefix="xfer-adv-") as tmp:
        folder = Path(tmp) / names.ADVERSARIAL_DIR
        folder.mkdir()
        attack.save_examples(folder / attack.EXAMPLES_FILE, examples, spec)
        tags = {**_set_tags(cell), names.TAG_EXAMPLES_SHA: checkpoint.sha256(folder)}
        with tracking.start_run(context.experiment, names.ATTACK, cell.key, tags=tags, params=cell.spec,
                                run_name=_run_name(cell, surrogates), parent_run_id=context.parent_run_id) as run:
            run.log_artifact(folder)
            run.log_metrics({names.WHITEBOX_SUCCESS: whitebox, names.SECONDS: seconds})
    return run.run_id


def make_sets(experiment: str, cells: Sequence[AttackCell], device: torch.device | str | None = None,
              context: AttackContext | None = None, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, str]:
    """A pack of adversarial sets in one process, sharing models and data; sets already made are skipped, and none is
    started once the grid is stopping. Returns the failed cells' reasons by key: a cell refused for bad input
    (`XferError`) fails alone and its pack-mates go on. `progress` hears each cell's end."""
    context = context or AttackContext(experiment, device=device)
    done = context.made(cells)
    failed: dict[str, str] = {}
    for count, cell in enumerate(cells, 1):
        if stopping.requested():
            break   # the grid is stopping: the rest are made by the rerun
        if cell.key not in done:
            try:
                make_set(cell, context, device)
            except XferError as exc:
                failed[cell.key] = str(exc)
        if progress is not None:
            progress({"cell": label(cell), "cell_finished": float(cell.key not in failed),
                      "reason": failed.get(cell.key, ""), "cells_done": float(count), "cells": float(len(cells))})
    return failed


def label(cell: AttackCell) -> str:
    a = cell.spec.attack
    return (f"{a.attack}{' targeted' if a.targeted else ''} eps={a.eps:g} from {cell.spec.surrogate_key[:12]} "
            f"→ {len(cell.target_run_ids)} target(s)")


def check_targets(spec: AttackSpec, targets: Sequence[_Model], class_names: tuple[str, ...],
                  in_shape: tuple[int, ...]) -> None:
    """Refuse targets that do not classify the attacked task's classes from its images."""
    _check_cell(spec, [], targets, class_names, in_shape)


def _check_cell(spec: AttackSpec, surrogates: Sequence[_Model], targets: Sequence[_Model], class_names: tuple[str, ...],
                in_shape: tuple[int, ...]) -> None:
    """Refuse, before any work, a cell whose models do not fit the attacked task."""
    task = f"{spec.dataset} ({len(class_names)} classes, images {tuple(in_shape)})"
    for role, group in (("surrogate", surrogates), ("target", targets)):
        for m in group:
            if m.in_shape != tuple(in_shape):
                raise XferError(f"{role} run {m.run_id} takes images of shape {m.in_shape}, but the attacked task is {task}; "
                                "surrogates and targets must share the task's image shape.")
    for m in targets:
        if not data.same_labels(m.class_names, class_names):
            raise XferError(f"target run {m.run_id} classifies {len(m.class_names)} classes ({', '.join(m.class_names[:5])}, ...), "
                            f"not those of {task}; targets must be trained on the attacked task.")
    if attack.registered(spec.attack).loss == "logits":
        for m in surrogates:
            if not data.same_labels(m.class_names, class_names):
                raise XferError(f"surrogate run {m.run_id} classifies other classes than {task}, so {spec.attack!r} has "
                                f"no loss to raise on its logits; attack it with {FEATURE_ATTACK!r} (attack_sets.plan does).")


def _whitebox_success(surrogate_models: list[nn.Module], examples: attack.Examples, spec: AttackSpec,
                      device: torch.device | str | None) -> float:
    """Success on the surrogate itself; for a feature attack, the share of its own predictions that flip."""
    model = surrogate_models[0] if len(surrogate_models) == 1 else attack.Ensemble(surrogate_models)
    truth = attack.predict(model, examples.clean, device) if attack.registered(spec.attack).loss == "features" else examples.labels
    return attack.evaluate(model, examples.clean, examples.adv, truth, device)[names.SUCCESS_RATE]


def _set_tags(cell: AttackCell) -> dict[str, str]:
    return {**tracking.spec_tags(cell.spec), names.TAG_SURROGATE_RUN: cell.surrogate,
            names.TAG_TARGET: cell.spec.attack.dataset}


def _run_name(cell: AttackCell, surrogates: Sequence[_Model]) -> str:
    a = cell.spec.attack
    return f"{a.attack}{'-targeted' if a.targeted else ''}(eps={a.eps:g}) on {' + '.join(model_label(m) for m in surrogates)}"


def model_label(m: _Model) -> str:
    """A training run in words: stage, source → target, arch, size, freeze, seed."""
    tags = m.record.tags
    source, target = tags.get(names.TAG_SOURCE, ""), tags.get(names.TAG_TARGET, "")
    where = f"{source}→{target}" if source and target else source or target
    freeze = f" f{tags.get(names.TAG_FREEZE)}" if m.record.stage == names.FINETUNE else ""
    size = f" n={tags.get(names.TAG_SIZE)}" if m.record.stage != names.PRETRAIN else ""
    return f"{m.record.stage} {where} {tags.get(names.TAG_ARCH, '')}{size}{freeze} seed={tags.get(names.TAG_SEED, '')}"
