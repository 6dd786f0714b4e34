"""The Parquet schema of every report table: column names, Arrow types, units and meaning, defined once.

Writers conform their DataFrames to these schemas (`to_arrow`), tests read the files back and compare
against them, and the package docstring is generated from them, so the documentation cannot drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from xfer import names
from xfer.estimators import ESTIMATORS


@dataclass(frozen=True)
class Column:
    """One documented column of a report table."""

    name: str
    type: pa.DataType
    unit: str   # "fraction" (in [0, 1]), "s" (wall-clock seconds), "examples", "id", ... or "" for labels
    doc: str


STR, I64, F64, BOOL = pa.string(), pa.int64(), pa.float64(), pa.bool_()
TIME = pa.timestamp("ms", tz="UTC")

RUN_ID = Column("run_id", STR, "id", "MLflow run id of this row's run")
KEY = Column("key", STR, "id", "xfer.key: content hash of the cell's spec")
SOURCE = Column("source", STR, "", "pretraining dataset ('' for scratch)")
TARGET = Column("target", STR, "", "dataset trained on (fine-tune / scratch)")
ARCH = Column("arch", STR, "", "architecture registry name")
SIZE = Column("size", I64, "examples", "training-set size; 0 = the whole training pool (tag 'all')")
FREEZE = Column("freeze_depth", I64, "layers", "leading layers frozen during fine-tuning")
LR = Column("lr", F64, "", "base learning rate")
SEED = Column("seed", I64, "", "random seed of the cell")
# The fine-tuning recipe (xfer.grid.RECIPES), from the run's train.* params; TrainSpec's default when not logged.
OPTIMIZER = Column("optimizer", STR, "", "train.optimizer: adamw, adam or sgd (training stages only)")
HEAD_LR_MULT = Column("head_lr_mult", F64, "", "train.head_lr_mult: the head's lr is lr × this (1 = one lr)")
UNFREEZE = Column("unfreeze_epoch", I64, "epochs", "train.unfreeze_epoch: freeze-then-unfreeze at this epoch "
                                                    "(null = the body stays as frozen as freeze_depth says)")
UNFREEZE_BODY = Column("unfreeze_body", BOOL, "", "train.unfreeze_body: false = at unfreeze_epoch only the lr drops, "
                                                  "under the same plateau schedule, and the body stays frozen (recipe "
                                                  "unfreeze_control, the unfreeze recipe's same-schedule control); "
                                                  "true when not logged")
EPOCHS = Column("epochs", I64, "epochs", "train.epochs: the training budget (training stages only)")
EPOCH_STEPS = Column("epoch_steps", I64, "optimizer steps", "train.epoch_steps: steps per epoch under a step budget "
                                                            "(the grid's steps); null = one pass over the data")

# Final metrics of a training run (also on adder runs).
TRAIN_METRICS = (
    Column("test_error", F64, "fraction", "final test error"),
    Column("test_acc", F64, "fraction", "final test accuracy"),
    Column("val_error", F64, "fraction", "final validation error"),
    Column("val_acc", F64, "fraction", "final validation accuracy"),
    Column("train_error", F64, "fraction", "final running training error"),
    Column("seconds", F64, "s", "wall-clock training time"),
)
ATTACK_METRICS = (
    Column("clean_acc", F64, "fraction", "target accuracy on the clean examples"),
    Column("adv_acc", F64, "fraction", "target accuracy on the surrogate's adversarial examples"),
    Column("success_rate", F64, "fraction", "share of clean-correct examples the attack flips"),
    Column("whitebox_success", F64, "fraction", "attack success on the surrogate itself (the set's run)"),
)
# An adversarial set's run: its white-box success and the summary of its scores (the rows are in `transfer`).
SET_METRICS = (
    ATTACK_METRICS[-1],
    Column("targets_scored", F64, "models", "attack runs: targets the set has been scored on"),
    Column("descendants_success", F64, "fraction", "attack runs: mean success on the surrogate's own fine-tuned "
                                                   "descendants"),
    Column("other_sources_success", F64, "fraction", "attack runs: mean success on fine-tuned models of other "
                                                     "pretraining sources"),
    Column("mean_adv_acc", F64, "fraction", "attack runs: mean adversarial accuracy over every target scored"),
)
# An estimate run's metrics (stage estimate): each estimator's score of one pretrained model on the grid's target,
# what it cost, and how many target images it read. Higher is better for every estimator; scores compare sources on
# one target and are not comparable across targets. A new estimator in xfer.estimators needs its line here (KeyError).
ESTIMATOR_DOCS = {
    "leep": "LEEP (Nguyen et al. 2020): mean log-likelihood of the target labels through the source head's classes "
            "(<= 0)",
    "nce": "NCE (Tran et al. 2019): negative conditional entropy of the target labels given the source head's class "
           "(<= 0)",
    "h_score": "H-score (Bao et al. 2019): how well the penultimate features separate the target classes (>= 0)",
    "logme": "LogME (You et al. 2021): log evidence per example of a linear model on the penultimate features",
}
ESTIMATE_SCORES = tuple(Column(name, F64, "", ESTIMATOR_DOCS[name]) for name in ESTIMATORS)
ESTIMATE_COSTS = (
    Column(names.ESTIMATE_EXAMPLES, I64, "examples", "estimate runs: target training images the model was scored on"),
    Column(names.FEATURES_SECONDS, F64, "s", "estimate runs: the forward pass that gives every estimator its inputs"),
    *(Column(f"{name}_seconds", F64, "s", f"estimate runs: computing {name} from those inputs") for name in ESTIMATORS),
)
ESTIMATE_METRICS = ESTIMATE_SCORES + ESTIMATE_COSTS
AT_CHANCE = Column("at_chance", BOOL, "", "test accuracy within 5 pp of chance (1 / classes): left out of every "
                                         "verdict (null when the classes are not known)")
# The matched scratch baseline, joined onto transfer rows: the same columns, prefixed.
BASELINE = (Column("scratch_run_id", STR, "id", "matched scratch run (null when none was found)"),) + tuple(
    Column("scratch_" + c.name, c.type, c.unit, "matched scratch run's " + c.doc) for c in TRAIN_METRICS
)

SCHEMAS: dict[str, tuple[Column, ...]] = {
    "runs": (
        RUN_ID,
        Column("stage", STR, "", "xfer.stage: pretrain, estimate, finetune, scratch, attack, adder, tune"),
        KEY,
        Column("status", STR, "", "MLflow run status (FINISHED, FAILED, ...)"),
        Column("run_name", STR, "", "MLflow run name"),
        Column("start_time", TIME, "UTC", "run start"),
        Column("end_time", TIME, "UTC", "run end (null while running)"),
        SOURCE, TARGET, ARCH, SIZE, FREEZE, LR, SEED,
        OPTIMIZER, HEAD_LR_MULT, UNFREEZE, UNFREEZE_BODY, EPOCHS, EPOCH_STEPS,
        Column("variant", STR, "", "adder runs: scratch, transfer, or another transfer arm (e.g. transfer_features)"),
        Column("attack", STR, "", "attack runs: attack registry name"),
        Column("eps", F64, "pixel [0,1]", "attack runs: L-inf budget"),
        Column("pretrain_run_id", STR, "id", "fine-tune runs: the pretrain run it started from; estimate runs: the "
                                             "pretrain run it scored"),
        Column("surrogate_run_id", STR, "id", "attack runs (adversarial sets): the surrogate model's run"),
        Column("parent_run_id", STR, "id", "MLflow parent run (a cell's: its stage's run)"),
        Column("failure", STR, "", "xfer.failure: why the run ended FAILED or KILLED (null otherwise)"),
        *TRAIN_METRICS,
        *SET_METRICS,
        *ESTIMATE_METRICS,
    ),
    "pretrain": (RUN_ID, KEY, SOURCE, ARCH, SIZE, LR, SEED, *TRAIN_METRICS),
    "estimates": (RUN_ID, KEY, Column("pretrain_run_id", STR, "id", "the pretrain run whose model was scored"),
                  SOURCE, Column("target", STR, "", "the grid's target, whose training images were scored"), ARCH, SEED,
                  *ESTIMATE_SCORES, *ESTIMATE_COSTS,
                  Column("seconds", F64, "s", "wall-clock time of the whole cell (loading, features, estimators)")),
    "finetune": (RUN_ID, KEY, Column("pretrain_run_id", STR, "id", "the pretrain run it started from"),
                 SOURCE, TARGET, ARCH, SIZE, FREEZE, LR, SEED, OPTIMIZER, HEAD_LR_MULT, UNFREEZE, UNFREEZE_BODY,
                 EPOCHS, EPOCH_STEPS, *TRAIN_METRICS, AT_CHANCE, *BASELINE),
    "scratch": (RUN_ID, KEY, TARGET, ARCH, SIZE, LR, SEED, OPTIMIZER, EPOCHS, EPOCH_STEPS, *TRAIN_METRICS, AT_CHANCE),
    "adder": (RUN_ID, Column("variant", STR, "", "the transfer arm: transfer, or another (e.g. transfer_features)"),
              SIZE, SEED,
              Column("pretrain_run_id", STR, "id", "the digit classifier's run (stage pretrain) the arm started from"),
              Column("classifier_test_error", F64, "fraction", "that digit classifier's final test error (null when "
                                                               "its run is not in the experiment)"),
              *TRAIN_METRICS, AT_CHANCE, *BASELINE),
    "curves": (
        RUN_ID,
        Column("step", I64, "optimizer steps", "iteration the point was recorded at"),
        Column("epoch", F64, "epochs", "fractional epoch (null when read from metric history)"),
        Column("seconds", F64, "s", "wall-clock seconds since the run started"),
        Column("split", STR, "", "train, val or test"),
        Column("error", F64, "fraction", "error on that split"),
    ),
    "transfer": (
        Column("run_id", STR, "id", "the adversarial set's MLflow run (one row per set × target: the score table's)"),
        Column("generation_run_id", STR, "id", "the run that generated the adversarial examples (= run_id)"),
        Column("surrogate_run_id", STR, "id", "model the examples were made on"),
        Column("target_run_id", STR, "id", "model evaluated on them"),
        Column("surrogate_stage", STR, "", "stage of the surrogate's run: pretrain, scratch, or finetune for a "
                                           "white-box reference (surrogate = target); null for an ensemble"),
        Column("surrogate_label", STR, "", "readable surrogate, seed left out: source/arch for a pretrained model"),
        Column("target_label", STR, "", "readable target, seed left out: source>target/arch/n<size>/f<freeze>"),
        Column("target_seed", I64, "", "the target run's seed (the unit verdicts pair over)"),
        Column("surrogate_source", STR, "", "the surrogate's pretraining source (null for an ensemble)"),
        Column("surrogate_arch", STR, "", "the surrogate's arch (null for an ensemble)"),
        Column("surrogate_seed", I64, "", "the surrogate run's seed (null for an ensemble)"),
        Column("target_source", STR, "", "the target's pretraining source"),
        Column("target_arch", STR, "", "the target's arch"),
        Column("target_size", I64, "examples", "the target's fine-tune size (0 = the whole pool)"),
        Column("attack", STR, "", "attack registry name"),
        Column("eps", F64, "pixel [0,1]", "L-inf budget"),
        *ATTACK_METRICS,
        Column("same_source", BOOL, "", "surrogate and target share a pretraining source"),
        Column("is_parent", BOOL, "", "surrogate is the target's own pretrain run"),
    ),
    "verdicts": (
        Column("claim_id", I64, "", "the seed claim, 1-7 (see 'The claims' below)"),
        Column("claim", STR, "", "the claim's stable key, e.g. finetune_beats_scratch, adder_transfer_beats_scratch"),
        Column("headline", BOOL, "", "true on the claim's one headline row (the claims table); false on the narrower "
                                     "scopes beneath it"),
        Column("level", STR, "", "headline; summary (a narrower scope pooled: a size, a trend, another arm or "
                                 "attack setting); or cell (one cell of the grid, e.g. target x source x arch x size)"),
        Column("scope", STR, "", "the slice the row tests, e.g. 'size=100, 2 sources x 3 archs pooled' "
                                 "(empty for a claim with no runs)"),
        Column("text", STR, "", "the claim in words"),
        Column("seed_doc", STR, "", "the seed document it comes from: 000-004"),
        Column("measure", STR, "", "what `effect` is a difference of; > 0 favours the claim"),
        Column("effect", F64, "fraction", "mean over seeds of the per-seed mean paired difference (x 100 = pp); null "
                                          "with fewer than 3 seeds"),
        Column("ci_low", F64, "fraction", "95% Student's t interval over the per-seed differences, lower end (null if "
                                          "insufficient)"),
        Column("ci_high", F64, "fraction", "95% Student's t interval over the per-seed differences, upper end (null "
                                           "if insufficient)"),
        Column("method", STR, "", "how the interval is made: 'paired t over seeds, conditional on the fixed test "
                                  "set'"),
        Column("n_seeds", I64, "seeds", "independent seeds: per-seed mean differences the t interval is computed over"),
        Column("verdict", STR, "", "supported (interval above 0), contradicted (below 0), inconclusive (holds 0, or "
                                   "a headline whose Holm-adjusted p is not below 0.05), insufficient seeds (fewer "
                                   "than 3), insufficient spread (the same difference in every seed) or no runs"),
        Column("why", STR, "", "why there is no verdict or what qualifies it, e.g. 'no scratch cells in this grid' "
                               "(null when nothing needs saying)"),
        Column("figure", STR, "path", "the claim's figure relative to the report folder (null with no runs)"),
        Column("treated_mean", F64, "fraction", "mean over seeds of the treated side (e.g. fine-tuned test_error, "
                                                "A's success rate); of a trend row, the effect at the smaller size"),
        Column("control_mean", F64, "fraction", "mean over seeds of the control side (e.g. scratch test_error, B's "
                                                "success rate); of a trend row, the effect at the larger size"),
        Column("ceiling", F64, "fraction", "claim 3: white-box success on the parent A, the most its examples do "
                                           "(null elsewhere)"),
        Column("seeds", pa.list_(I64), "", "the paired seeds, ascending"),
        Column("seed_effects", pa.list_(F64), "fraction", "each seed's mean paired difference, in `seeds` order"),
        Column("p_value", F64, "", "two-sided paired t test of mean 0 over the per-seed differences (null without "
                                   "an interval)"),
        Column("p_holm", F64, "", "headlines: p_value Holm-adjusted over the headlines that have one; a headline is "
                                  "decided only when it is below 0.05 (null on other rows)"),
        Column("inference", STR, "", "confirmatory (a headline: Holm over the headlines) or descriptive (no "
                                     "multiple-comparison control)"),
        Column("seeds_for_power", F64, "seeds", "seeds a paired t test needs for 80% power if the observed effect "
                                                "and spread were true (null: no effect or spread, or over 100)"),
        Column("line", STR, "", "the row as one sentence"),
    ),
    "replication": (
        Column("seed_doc", STR, "", "the seed document the number comes from: 000-004"),
        Column("row", STR, "", "the seed row's stable name (reports.replication.SEED_ROWS)"),
        Column("where", STR, "", "where the number stands in the seed document"),
        Column("stage", STR, "", "what was trained: pretrain, finetune, scratch, adder (an arm) or adder_classifier"),
        Column("source", STR, "", "the pretraining source of a fine-tune row (null elsewhere)"),
        Column("dataset", STR, "", "what the model was trained on: a pretrain row's source, else the target"),
        Column("arch", STR, "", "xfer's arch for the seed's (null for the adder's rows)"),
        Column("size", I64, "examples", "training examples (0 = the whole set; null = not stated: the grid's largest)"),
        Column("freeze_depth", I64, "layers", "leading parameter tensors frozen while fine-tuning"),
        Column("variant", STR, "", "the adder's arm: transfer or scratch (null elsewhere)"),
        Column("metric", STR, "", "test_acc or val_acc"),
        Column("seed_value", F64, "fraction", "the seed's published number (null where it states none)"),
        Column("n_seeds", I64, "seeds", "xfer's seeds with a matching finished run"),
        Column("mean", F64, "fraction", "xfer's mean over seeds (the runs of one seed averaged first)"),
        Column("ci_low", F64, "fraction", "95% Student's t interval over the per-seed values, lower end (null with "
                                          "fewer than 3 seeds)"),
        Column("ci_high", F64, "fraction", "95% Student's t interval over the per-seed values, upper end"),
        Column("difference", F64, "fraction", "xfer's mean - the seed's value (x 100 = pp; > 0: xfer higher)"),
        Column("word", STR, "", "the seed's value is within the interval, or xfer's interval lies above or below "
                                "it; not run, too few seeds, or no seed value"),
        Column("why", STR, "", "why a row was not run or has no interval (null when nothing needs saying)"),
        Column("seeds", pa.list_(I64), "", "xfer's seeds, ascending"),
        Column("seed_values", pa.list_(F64), "fraction", "xfer's value in each seed, in `seeds` order"),
    ),
    # reports.transferability: each estimator's ranking of the sources beside the measured fine-tuned test error.
    "transferability": (
        Column("target", STR, "", "the target the sources are ranked for"), ARCH,
        SIZE, FREEZE, LR, OPTIMIZER, HEAD_LR_MULT, UNFREEZE, UNFREEZE_BODY, EPOCHS, EPOCH_STEPS,
        Column("setting", STR, "", "the fine-tune setting as text: n<size>/f<freeze_depth>, its recipe (as in labels), "
                                   "and lr, epochs, steps where they vary for this target and arch"),
        Column("estimator", STR, "", "leep, nce, h_score or logme (higher ranks a source better)"),
        Column("n_sources", I64, "sources", "sources with an estimate and a finished fine-tune in this setting "
                                            "(a setting is kept from 2)"),
        Column("n_seeds", I64, "seeds", "seeds with an estimate and a fine-tune of at least one source"),
        Column("tau", F64, "", "Kendall's tau-b between the estimator's score and -(measured test error), each the "
                               "mean over seeds per source; +1: the estimator orders the sources as fine-tuning does. "
                               "Null when either side ties every source (a constant estimator ranks nothing)"),
        Column("tau_low", F64, "", "95% percentile bootstrap interval of tau, lower end: 2000 resamples of the seeds "
                                   "with replacement, both means recomputed on the same seeds, fixed generator seed; "
                                   "null with one seed (nothing to resample)"),
        Column("tau_high", F64, "", "the same interval's upper end"),
        Column("ranking", STR, "", "sources best to worst by the estimator, joined by ' > ' (ties by name)"),
        Column("measured_ranking", STR, "", "sources best to worst by measured test error, joined by ' > '"),
        Column("pick", STR, "", "the estimator's top-ranked source (null when it ties every source)"),
        Column("best", STR, "", "the source with the lowest measured test error"),
        Column("regret_top1", F64, "fraction", "pick's measured test error - best's (0 when the pick is the best; "
                                               "x 100 = pp; null without a pick)"),
        Column("regret_top2", F64, "fraction", "the lowest measured test error among the estimator's 2 top-ranked "
                                               "sources - best's: the cost of fine-tuning only those (--prune-sources "
                                               "with K=2); trivially 0 with 2 sources; null without a pick"),
        Column("sources", pa.list_(STR), "", "the sources ranked, by name"),
        Column("source_scores", pa.list_(F64), "", "each source's estimator score, mean over seeds, in `sources` "
                                                   "order"),
        Column("source_errors", pa.list_(F64), "fraction", "each source's measured test error, mean over seeds (the "
                                                           "runs of one seed averaged first), in `sources` order"),
    ),
}

MATRIX_PREFIX = "transfer_matrix_"
MATRIX_DOC = (
    f"`{MATRIX_PREFIX}<attack>_eps<eps>.parquet`, one per attack setting: column `surrogate` (string, "
    "surrogate_label), then one float64 column per target_label holding the mean `adv_acc` (fraction) over "
    "the evaluations in that cell (seeds pooled); null where the pair was not evaluated. White-box references "
    "(surrogate = target) are left out."
)
PARAMS_DOC = (
    "`runs` also carries every MLflow param as a string column named by its flat dotted key "
    "(e.g. `train.lr`), as logged; a param whose name equals a fixed column is written as `params.<name>`."
)


def arrow_schema(table: str, extra: Sequence[str] = ()) -> pa.Schema:
    """The Arrow schema of `table`; `extra` string columns (params) follow the documented ones."""
    fields = [pa.field(c.name, c.type, metadata={"unit": c.unit, "doc": c.doc}) for c in SCHEMAS[table]]
    return pa.schema(fields + [pa.field(name, STR) for name in extra])


def to_arrow(df: pd.DataFrame, table: str, extra: Sequence[str] = ()) -> pa.Table:
    """`df` as an Arrow table with exactly the documented columns, in order; absent columns become null."""
    schema = arrow_schema(table, extra)
    arrays = []
    for f in schema:
        values = df[f.name] if f.name in df.columns else pd.Series([None] * len(df), dtype=object)
        if pa.types.is_timestamp(f.type):
            values = pd.to_datetime(values, utc=True)
        elif pa.types.is_list(f.type):   # an empty table's list column reads as float NaN, which Arrow cannot list
            values = values.astype(object)
        arrays.append(pa.array(values, type=f.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)


def markdown_doc() -> str:
    """The schema as Markdown: one section per table, one row per column."""
    parts = []
    for table, columns in SCHEMAS.items():
        rows = "\n".join(f"| `{c.name}` | {c.type} | {c.unit} | {c.doc} |" for c in columns)
        parts.append(f"### `{table}.parquet`\n\n| column | type | unit | meaning |\n|---|---|---|---|\n{rows}")
    parts.append(f"### transfer matrices\n\n{MATRIX_DOC}\n\n{PARAMS_DOC}")
    return "\n\n".join(parts)
