"""MLflow runs and the score table → the report's DataFrames: runs, pretrain, estimates, finetune (+ scratch
baseline), scratch, adder, curves, transfer.

Joins go through run ids recorded as lineage (pretrain run tags, the score table's set, surrogate and target run
ids), never through names; the only join on values is a transfer run with its scratch baseline, which by design
shares no lineage with it.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from reports.schema import ESTIMATE_METRICS, SCHEMAS, SET_METRICS, TRAIN_METRICS
from xfer import names, server, specs, tracking
from xfer.errors import XferError

# The treated side of every transfer-vs-scratch comparison (fine-tune runs, adder transfer runs) in figures.
TRANSFER = names.VARIANT_TRANSFER

TRAINING_STAGES = (names.PRETRAIN, names.FINETUNE, names.SCRATCH, names.ADDER)
METRIC_NAMES = [c.name for c in TRAIN_METRICS + SET_METRICS + ESTIMATE_METRICS]
FINISHED = "FINISHED"
ENSEMBLE_JOIN = "+"    # xfer.attack joins an ensemble surrogate's run ids with this
DOWNLOAD_THREADS = 8   # curve downloads are one small HTTP request each: latency-bound, so overlap them

# Tag → runs column, parsed by type; an empty or absent tag is null.
STRING_TAGS = {"source": names.TAG_SOURCE, "target": names.TAG_TARGET, "arch": names.TAG_ARCH,
               "variant": names.TAG_VARIANT, "attack": names.TAG_ATTACK, "pretrain_run_id": names.TAG_PRETRAIN_RUN,
               "surrogate_run_id": names.TAG_SURROGATE_RUN, "parent_run_id": MLFLOW_PARENT_RUN_ID,
               "run_name": MLFLOW_RUN_NAME}
INT_TAGS = {"size": names.TAG_SIZE, "freeze_depth": names.TAG_FREEZE, "seed": names.TAG_SEED}
FLOAT_TAGS = {"eps": names.TAG_EPS}
LR_PARAMS = ("train.lr", "lr")   # a training cell's lr (TrainSpec), an adder cell's (AdderSpec); the lr has no tag
WHOLE_POOL = ("all", "None")  # size tags of a run on the whole training pool (stages write "all")
# The fine-tuning recipe of a training run, from its TrainSpec params (typed columns; see xfer.grid.RECIPES).
# A training run that did not log one (written before the field existed) ran with the TrainSpec default.
RECIPE_PARAMS = {"optimizer": ("train.optimizer", str), "head_lr_mult": ("train.head_lr_mult", float),
                 "unfreeze_epoch": ("train.unfreeze_epoch", int), "unfreeze_body": ("train.unfreeze_body", bool),
                 "epochs": ("train.epochs", int), "epoch_steps": ("train.epoch_steps", int)}
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(specs.TrainSpec)}
SPEC_STAGES = (names.PRETRAIN, names.FINETUNE, names.SCRATCH)   # the stages whose params are a TrainSpec


@dataclass(frozen=True)
class Tables:
    """Everything the figures, Markdown and verdicts are drawn from; `params` are the runs table's extra columns."""

    runs: pd.DataFrame
    params: list[str]
    without_curve: list[str]   # finished training runs that logged no curve artifact
    pretrain: pd.DataFrame
    finetune: pd.DataFrame
    scratch: pd.DataFrame
    adder: pd.DataFrame
    curves: pd.DataFrame
    transfer: pd.DataFrame
    # Finished estimate runs; empty by default, so tables built by hand for the verdicts need not name it.
    estimates: pd.DataFrame = dataclasses.field(default_factory=lambda: _select(pd.DataFrame(), "estimates"))


def inputs(experiment: str, snapshot: tracking.Snapshot | None = None) -> list[tracking.RunRecord]:
    """Every run of `experiment` a report reads: all but the report's own runs and the grid's parent runs."""
    records = snapshot.query(status=None) if snapshot is not None else tracking.query(experiment, status=None)
    return [r for r in records if r.stage not in (names.REPORT, names.GRID)]


def collect(experiment: str, records: list[tracking.RunRecord] | None = None) -> Tables:
    """Read every run of `experiment` (or the given `inputs`) and its score table into the tables."""
    from xfer import scores

    records = inputs(experiment) if records is None else records
    runs, params = runs_frame(records)
    finished = runs[runs["status"] == FINISHED]
    finished = finished.assign(at_chance=at_chance(finished))
    where = {r.run_id: r.artifact_uri for r in records}
    curves, without_curve = curves_frame(finished[finished["stage"].isin(TRAINING_STAGES)], where)
    return Tables(
        runs=runs, params=params, without_curve=without_curve, curves=curves,
        pretrain=_select(finished[finished["stage"] == names.PRETRAIN], "pretrain"),
        estimates=_select(finished[finished["stage"] == names.ESTIMATE], "estimates"),
        finetune=finetune_frame(finished),
        scratch=_select(finished[finished["stage"] == names.SCRATCH], "scratch"),
        adder=adder_frame(finished),
        transfer=transfer_frame(finished, scores.read(experiment)),
    )


CHANCE_MARGIN = 0.05   # a model within this of chance accuracy (1 / classes) has learnt nothing a verdict can use


def at_chance(runs: pd.DataFrame) -> pd.Series:
    """Per fine-tune, scratch and adder run: is its test accuracy within CHANCE_MARGIN of 1 / classes (its target's
    classes; the adder's 19 sums)? Null where the classes are not known (or the run is of another stage)."""
    from xfer import adder

    flags = pd.Series(pd.NA, index=runs.index, dtype="boolean")
    judged = runs["stage"].isin([names.FINETUNE, names.SCRATCH, names.ADDER]) & runs["test_acc"].notna()
    known = classes_of(set(runs.loc[judged & (runs["stage"] != names.ADDER), "target"].dropna()))
    for index, stage, target, accuracy in zip(runs.index[judged], runs["stage"][judged], runs["target"][judged],
                                              runs["test_acc"][judged]):
        classes = adder.SUMS if stage == names.ADDER else known.get(target)
        if classes:
            flags[index] = bool(accuracy <= 1 / classes + CHANCE_MARGIN)
    return flags


def classes_of(datasets: set[str]) -> dict[str, int]:
    """How many classes each of `datasets` has, without loading it: its published facts (torchvision's sets), else
    what a grid recorded in the runs folder's datasets.json when it planned (read once); absent if neither knows."""
    from xfer import data

    known = {name: data.PUBLISHED[name].num_classes for name in datasets if name in data.PUBLISHED}
    if set(datasets) - set(known):
        recorded = _recorded_classes()
        known |= {name: recorded[name] for name in set(datasets) - set(known) if name in recorded}
    return known


def _recorded_classes() -> dict[str, int]:
    import json

    try:
        known = json.loads((server.runs_dir() / "datasets.json").read_text())
    except (OSError, ValueError):
        return {}
    return {entry["info"]["name"]: int(entry["info"]["num_classes"]) for entry in known.values()
            if isinstance(entry, dict) and "name" in entry.get("info", {}) and "num_classes" in entry["info"]}


def without_chance(found: Tables) -> Tables:
    """`found` without the runs at chance (`at_chance`): fine-tune, scratch and adder rows dropped, a baseline at
    chance unjoined (its scratch_* columns null), adversarial scores on a target at chance dropped."""
    dropped = set()
    for frame in (found.finetune, found.scratch, found.adder):
        dropped |= set(frame.loc[frame["at_chance"].fillna(False).astype(bool), "run_id"])
    if not dropped:
        return found

    def unjoined(frame: pd.DataFrame) -> pd.DataFrame:
        kept = frame[~frame["run_id"].isin(dropped)].copy()
        lost = kept["scratch_run_id"].isin(dropped)
        kept.loc[lost, [c for c in kept.columns if c.startswith("scratch_")]] = np.nan
        return kept.reset_index(drop=True)

    return dataclasses.replace(
        found, finetune=unjoined(found.finetune), adder=unjoined(found.adder),
        scratch=found.scratch[~found.scratch["run_id"].isin(dropped)].reset_index(drop=True),
        transfer=found.transfer[~found.transfer["target_run_id"].isin(dropped)].reset_index(drop=True))


def chance_runs(found: Tables) -> pd.DataFrame:
    """The fine-tune, scratch and adder runs at chance (run_id, stage, label, test_acc), for the report to name."""
    parts = []
    for stage, frame in ((names.FINETUNE, found.finetune), (names.SCRATCH, found.scratch), (names.ADDER, found.adder)):
        hit = frame[frame["at_chance"].fillna(False).astype(bool)]
        described = [" ".join(f"{c}={size_text(v) if c == 'size' else v}" for c, v in row.items() if pd.notna(v))
                     for row in hit.reindex(columns=["source", "target", "arch", "variant", "size", "freeze_depth",
                                                     "optimizer", "seed"]).to_dict("records")]
        parts.append(pd.DataFrame({"run_id": hit["run_id"], "stage": stage, "label": described, "test_acc": hit["test_acc"]}))
    return pd.concat(parts, ignore_index=True)


def ensure_experiment(experiment: str) -> None:
    """Fail with the known experiment names when `experiment` does not exist."""
    client = MlflowClient(server.ensure_server())
    if client.get_experiment_by_name(experiment) is None:
        known = sorted(e.name for e in client.search_experiments())
        raise XferError(
            f"no MLflow experiment named {experiment!r} at {client.tracking_uri}; known experiments: "
            f"{', '.join(known) or '(none)'}. Pass one of these to --experiment, or point MLFLOW_TRACKING_URI "
            "(or XFER_RUNS) at the server that recorded the grid."
        )


def runs_frame(records: list[tracking.RunRecord]) -> tuple[pd.DataFrame, list[str]]:
    """One row per run: typed tags, lineage ids, final metrics, and each param under its own (string) column."""
    fixed = {c.name for c in SCHEMAS["runs"]}
    rows, params = [], set()
    for r in records:
        row = {"run_id": r.run_id, "stage": r.stage, "key": r.key, "status": r.status,
               "start_time": r.start_time, "end_time": r.end_time}
        row |= {col: r.tags.get(tag) or None for col, tag in STRING_TAGS.items()}
        row |= {col: _number(r.tags.get(tag), int) for col, tag in INT_TAGS.items()}
        if r.tags.get(names.TAG_SIZE) in WHOLE_POOL:
            row["size"] = 0
        row |= {col: _number(r.tags.get(tag), float) for col, tag in FLOAT_TAGS.items()}
        # Runs recorded before the lr tag was dropped still have their lr as a param too.
        row["lr"] = _number(next((r.params[k] for k in LR_PARAMS if k in r.params), r.tags.get("lr")), float)
        row["failure"] = r.tags.get(names.TAG_FAILURE) or None
        if r.stage in SPEC_STAGES:
            row |= recipe_of(r.params)
        row |= {m: r.metrics.get(m, np.nan) for m in METRIC_NAMES}
        renamed = {("params." + k if k in fixed else k): v for k, v in r.params.items()}
        params.update(renamed)
        rows.append(row | renamed)
    columns = [c.name for c in SCHEMAS["runs"]] + sorted(params)
    frame = pd.DataFrame(rows, columns=columns)
    integers = list(INT_TAGS) + ["unfreeze_epoch", "epochs", "epoch_steps", names.ESTIMATE_EXAMPLES]
    frame[integers] = frame[integers].astype("Int64")
    return frame, sorted(params)


def recipe_of(params: dict[str, str]) -> dict[str, object]:
    """A training run's recipe columns from its params; an absent param is the TrainSpec default."""
    out = {}
    for column, (param, kind) in RECIPE_PARAMS.items():
        text = params.get(param)
        if text is None:
            out[column] = TRAIN_DEFAULTS[column]
        else:  # "None" (unfreeze_epoch unset) parses to null
            out[column] = text if kind is str else _flag(text) if kind is bool else _number(text, kind)
    return out


def finetune_frame(finished: pd.DataFrame) -> pd.DataFrame:
    """Fine-tune runs with the scratch run of the same target, arch, size, seed, lr, optimizer and training budget
    (epochs and epoch_steps) joined as scratch_*.

    The optimizer is part of the match because a grid trains one scratch cell per recipe optimizer (an `sgd`
    recipe's fine-tune cells are measured against SGD scratch cells, the rest against the grid's optimizer).
    """
    finetune = _select(finished[finished["stage"] == names.FINETUNE], "finetune")
    scratch = finished[finished["stage"] == names.SCRATCH]
    on = ["target", "arch", "size", "seed", "lr", "optimizer", "epochs", "epoch_steps"]
    return _select(with_baseline(finetune, scratch, on), "finetune")


def adder_frame(finished: pd.DataFrame) -> pd.DataFrame:
    """Adder runs of every transfer arm (any variant but scratch) with their digit classifier's test error (through
    the pretrain run id they record) and the scratch run of the same size and seed joined as scratch_*."""
    adder = finished[finished["stage"] == names.ADDER]
    arms = adder[adder["variant"].notna() & (adder["variant"] != names.VARIANT_SCRATCH)]
    classifiers = finished[finished["stage"] == names.PRETRAIN].set_index("run_id")["test_error"]
    arms = arms.assign(classifier_test_error=arms["pretrain_run_id"].map(classifiers))
    scratch = adder[adder["variant"] == names.VARIANT_SCRATCH]
    return _select(with_baseline(arms, scratch, ["size", "seed"]), "adder")


def with_baseline(treated: pd.DataFrame, baseline: pd.DataFrame, on: list[str]) -> pd.DataFrame:
    """Left-join each treated run with its baseline run on `on`; of several candidates the newest wins."""
    metrics = [c.name for c in TRAIN_METRICS]
    base = baseline.sort_values("start_time").drop_duplicates(on, keep="last")[on + ["run_id"] + metrics]
    base = base.rename(columns={c: "scratch_" + c for c in ["run_id"] + metrics})
    return treated[[c for c in treated.columns if not c.startswith("scratch_")]].merge(base, on=on, how="left")


def curves_frame(training: pd.DataFrame, where: dict[str, str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The long error curves of training runs (their curve artifacts; `where`: each run's artifact location, so local
    ones are read in place), and the runs that have none."""
    columns = [c.name for c in SCHEMAS["curves"]]
    run_ids = list(training["run_id"])
    with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        found = list(pool.map(lambda run_id: _curve(run_id, (where or {}).get(run_id)), run_ids))
    parts = [curve for curve in found if curve is not None]
    without = [run_id for run_id, curve in zip(run_ids, found) if curve is None]
    return pd.concat([pd.DataFrame(columns=columns), *parts], ignore_index=True)[columns], without


def _curve(run_id: str, artifact_uri: str | None = None) -> pd.DataFrame | None:
    try:
        return pd.DataFrame(tracking.read_curve(run_id, artifact_uri)).assign(run_id=run_id)
    except XferError:  # the run logged no curve: reported as missing, not fatal
        return None


def transfer_frame(finished: pd.DataFrame, scored: pd.DataFrame) -> pd.DataFrame:
    """The score table's rows (one per adversarial set × target) of finished sets and targets, with readable labels,
    the set's white-box success and the surrogate's stage, source and arch."""
    sets = finished[finished["stage"] == names.ATTACK].set_index("run_id")
    models = finished[finished["stage"].isin(TRAINING_STAGES)].set_index("run_id")
    labels = models.apply(label, axis=1) if len(models) else pd.Series(dtype=object)
    rows = scored[scored["set_run_id"].isin(sets.index) & scored["target_run_id"].isin(models.index)]

    def surrogate_label(run_ids: str) -> str:  # an ensemble's surrogate_run_id is its members' ids joined by "+"
        return "+".join(labels.get(run_id, run_id[:8]) for run_id in run_ids.split(ENSEMBLE_JOIN))

    surrogate_labels = {ids: surrogate_label(ids) for ids in rows["surrogate_run_id"].dropna().unique()}
    frame = rows.assign(
        run_id=rows["set_run_id"], generation_run_id=rows["set_run_id"],
        whitebox_success=rows["set_run_id"].map(sets["whitebox_success"]),
        surrogate_stage=rows["surrogate_run_id"].map(models["stage"]),
        surrogate_label=rows["surrogate_run_id"].map(surrogate_labels),
        target_label=rows["target_run_id"].map(labels),
        target_seed=rows["target_run_id"].map(models["seed"]).astype("Int64"),
        surrogate_source=rows["surrogate_run_id"].map(models["source"]),
        surrogate_arch=rows["surrogate_run_id"].map(models["arch"]),
        surrogate_seed=rows["surrogate_run_id"].map(models["seed"]).astype("Int64"),
        target_source=rows["target_run_id"].map(models["source"]),
        target_arch=rows["target_run_id"].map(models["arch"]),
        target_size=rows["target_run_id"].map(models["size"]).astype("Int64"),
        same_source=rows[names.TAG_SAME_SOURCE].astype(object), is_parent=rows[names.TAG_IS_PARENT].astype(object),
    )
    return _select(frame, "transfer")


def matrices(transfer: pd.DataFrame) -> dict[tuple[str, float], tuple[pd.DataFrame, pd.DataFrame]]:
    """Per attack setting: mean adv_acc (surrogates × targets) and whether each cell is same-source.

    White-box references (a target attacked on itself) are left out: one row per fine-tuned model with a
    single filled cell would swamp the matrix; they stay in `transfer` and the attack table.
    """
    out = {}
    transferred = transfer[transfer["surrogate_run_id"] != transfer["target_run_id"]]
    for (attack, eps), rows in transferred.groupby(["attack", "eps"], sort=True):
        pivot = dict(index="surrogate_label", columns="target_label")
        acc = rows.pivot_table(values="adv_acc", aggfunc="mean", **pivot)
        same = rows.assign(same=rows["same_source"].eq(True)).pivot_table(values="same", aggfunc="any", **pivot)
        out[(attack, eps)] = (acc.rename_axis(index="surrogate", columns=None), same.reindex_like(acc))
    return out


def label(run: pd.Series) -> str:
    """A model's readable name without its seed (matrices average seeds): e.g. ``kmnist>mnist/resnet_mini/n1000/f4``,
    with its recipe when it is not the plain one (``/sgd``, ``/head10x``, ``/unfreeze@5``, ``/unfreeze_control@5``)
    so recipes are not averaged."""
    size = size_text(run["size"])
    if run["stage"] == names.PRETRAIN:
        return f"{run['source']}/{run['arch']}"
    if run["stage"] == names.FINETUNE:
        return f"{run['source']}>{run['target']}/{run['arch']}/n{size}/f{run['freeze_depth']}{recipe_text(run)}"
    if run["stage"] == names.SCRATCH:
        return f"scratch>{run['target']}/{run['arch']}/n{size}{recipe_text(run)}"
    return f"{run['stage']}:{run.name[:8]}"


def recipe_text(run: pd.Series) -> str:
    """The recipe part of a label: what differs from TrainSpec's defaults ("" for the plain recipe). A cell whose body
    stays frozen at its unfreeze epoch (unfreeze_body false) reads ``/unfreeze_control@5``, never ``/unfreeze@5``."""
    optimizer, mult, unfreeze = run.get("optimizer"), run.get("head_lr_mult"), run.get("unfreeze_epoch")
    body = run.get("unfreeze_body")
    switch = "unfreeze_control" if pd.notna(body) and not body else "unfreeze"
    return "".join([f"/{optimizer}" if isinstance(optimizer, str) and optimizer != TRAIN_DEFAULTS["optimizer"] else "",
                    f"/head{mult:g}x" if pd.notna(mult) and mult != TRAIN_DEFAULTS["head_lr_mult"] else "",
                    f"/{switch}@{int(unfreeze)}" if pd.notna(unfreeze) else ""])


def size_text(size: int | None) -> str:
    """A size for people and file names: 0 (the whole training pool) reads "all", an unknown one "?"."""
    return "?" if pd.isna(size) else "all" if size == 0 else str(int(size))


def size_order(sizes: pd.Series) -> list[int]:
    """Distinct sizes ascending, with 0 (the whole pool, the largest) last."""
    return sorted({int(s) for s in sizes.dropna()}, key=lambda s: (s == 0, s))


def _select(frame: pd.DataFrame, table: str) -> pd.DataFrame:
    """`frame` restricted to (and completed with null) the documented columns of `table`, index reset."""
    columns = [c.name for c in SCHEMAS[table]]
    return frame.reindex(columns=columns).reset_index(drop=True)


def _flag(text: str) -> bool | None:
    """A boolean param as xfer.tracking spells it ("true"/"false"; Python's "True"/"False" too); else null."""
    return {"true": True, "false": False}.get(text.strip().lower())


def _number(text: str | None, kind: type) -> float | int | None:
    """A numeric tag; unparseable text is null rather than a crash (a report of the rest beats none)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(value):
        return None
    return int(value) if kind is int else value
