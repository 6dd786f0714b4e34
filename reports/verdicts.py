"""The claims table: each seed document's claim 1-7 as paired differences per seed, a Student's t interval, a verdict.

The unit of replication is the seed: every difference is first averaged within a seed (over the archs,
sources, freeze depths ... of a slice), and the interval is Student's t on those per-seed means. Pairs
within a seed are not independent, so treating them as replicates would give intervals that are too narrow;
and with the 3-5 seeds a grid affords, a percentile bootstrap is too narrow as well (its resamples can only
take a handful of distinct means, and it ignores that the spread itself is estimated from 3-5 values). Every seed
is scored on the same test set, so an interval is conditional on it: it covers training randomness, not the
sampling of test examples.

The seven headlines are the confirmatory tests: their p-values are Holm-adjusted together, and a headline is
supported or contradicted only when its adjusted p is below 0.05. Every other row is descriptive (its own interval,
no multiple-comparison control). Identical per-seed differences have no spread to make an interval from: such a row
is "insufficient spread", not a verdict by sign. Cells whose test accuracy is at chance (`tables.at_chance`) are
left out of every verdict, and the report says how many.

Every claim gets exactly one headline row (`headline` true), always, in claim order, even with no runs
("no runs", with why); the rows beneath it are the same claim on narrower scopes (per size, per cell ...).
When a headline pools several scopes, each seed's value is the mean over the scopes of its within-scope
mean, so every scope weighs the same whatever its number of pairs. How each claim's headline is chosen is
in its `Claim.headline_rule`, written into SCHEMA.md. Where a grid lacks a claim's fair contrast (claim 6's
same-schedule control, claim 4's transfer_features arm, claim 3's B of C's own seed, claim 7's max-pool LeNet-5),
the headline falls back to the nearest one the grid has and its `why` says what differs. Claim 7 is a
non-inferiority test: its effect carries a 2 pp margin (`MARGIN`), so > 0 reads "within 2 pp", not "better".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from reports.schema import SCHEMAS
from reports.tables import Tables, size_order, size_text, without_chance
from xfer import names

MIN_SEEDS = 3           # below this the sd over seeds is too unstable for an interval: say so instead of guessing
CONFIDENCE = 0.95
METHOD = "paired t over seeds, conditional on the fixed test set"
ALPHA = 1 - CONFIDENCE  # a headline is decided when its Holm-adjusted p is below this
POWER = 0.8             # `seeds_for_power`: the seeds a paired t test needs for this power at the observed effect
MAX_SEEDS = 100         # ... searched up to this many (null beyond)
INSUFFICIENT = "insufficient seeds"
NO_SPREAD = "insufficient spread"   # identical per-seed differences: no spread to make an interval from
CONFIRMATORY, DESCRIPTIVE = "confirmatory", "descriptive"   # a row's `inference`: Holm over the headlines, or none
NO_RUNS = "no runs"
SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
# A row's level: the claim's headline; a summary beneath it (a size pooled, a trend, another arm); one cell of the grid.
HEADLINE, SUMMARY, CELL = "headline", "summary", "cell"
VALUES = ("diff", "treated", "control", "ceiling")   # per-pair numbers averaged per seed (ceiling: claim 3 only)
FIGURE = "figures/claim_{id}.png"                     # each claim's forest plot, relative to the report folder
SGD, HEAD_LR_MULT = "sgd", 10.0                       # claim 5: seed 004's recipe (xfer.grid.RECIPES["head10x_sgd"])
LR_MULT = 10.0                                        # ... and its other control, every layer at 10x (recipe lr10x_sgd)
LENET_SEED, LENET = "lenet5_maxpool", "lenet5"        # claim 7: seed 003's max-pool LeNet-5, else xfer's avg-pool one,
RESNET = "resnet_mini"                                # ... against resnet_mini ...
ADAM = ("adam", "adamw")                              # ... trained as seed 003 trains its LeNet (SGD: another question)
MARGIN = 0.02                                         # claim 7's non-inferiority margin: LeNet-5 within 2 pp
ADDER_CLAIM = "adder_transfer_beats_scratch"          # claim 4's key: sweeps/adder.py prints its rows
# "The same checkpoint": the pretrain run, and its source and arch for cells that have none (ImageNet weights).
CHECKPOINT = ["pretrain_run_id", "source", "arch"]
BUDGET = ["epochs", "epoch_steps"]   # "the same training budget" (a grid's steps axis makes several at one size)


@dataclass(frozen=True)
class Claim:
    """One seed claim: what it says, where it comes from, what its effect is a difference of, how its headline is made."""

    id: int
    key: str
    text: str
    seed_doc: str
    measure: str
    headline_rule: str
    where: str = ""   # the seed's own words and where they stand (file line numbers in ../shared/seeds/)


# What each seed says, where: claim id -> (section and line of the seed write-up, its words, their English).
WHERE = {
    1: "seed 000, summary (line 3): \"实验表明,微调能提高模型在小样本数据集…\" (experiments show fine-tuning improves a "
       "model on small datasets)",
    2: "no sentence of seed 000 states it: its 四 2) table (lines 526-532) reports frozen cells only, resnet frozen 20 "
       "against 23 tensors at 10,000 MNIST from Fashion-MNIST (94.24% against 93.42%), the row beneath the headline",
    3: "seed 000, aim (line 9): \"用A、B生成对抗样本攻击C,验证经过相同预训练数据集得到的预训练模型A…\" (attack C with "
       "examples made on A and B, to show that A, pretrained on C's source data, transfers better); 五, lines 534-574: "
       "5,000 examples per attack",
    4: "seed 002, 二 requirements 4-7 (lines 29-35): the adder fine-tuned from the digit CNN, the same adder from "
       "scratch, both error curves on one figure, \"对两种方法进行分析比对\" (compare the two methods)",
    5: "seed 004, lines 47-48: \"成员变量output的参数是随机初始化的通常需要更高的学习率…将成员变量output中参数的学习率设置为"
       "10n\" (the new output layer is randomly initialised and needs a higher lr: 10n for the head)",
    6: "seed 001, 明显现象 1 (line 251): \"解冻后几个epoch即可达到之前cnn训练20轮的效果,这是预训练的优势\" (a few epochs "
       "after unfreezing match 20 epochs of the CNN before: the advantage of pretraining)",
    7: "seed 003, 3.4 (line 203): \"在入门测试集上精度还是很高滴\" (on the introductory test set the accuracy is high), "
       "after 3.1's sigmoid, max-pool LeNet-5 trained with Adam for 10 epochs (lines 184-185)",
}


CLAIMS = (
    Claim(1, "finetune_beats_scratch", "fine-tuning a pretrained model beats training from scratch when target data "
          "is scarce", "000", "scratch test_error - fine-tuned test_error (full fine-tuning: freeze 0, one lr, no "
          "unfreeze; scratch of the same target, arch, size, seed, lr, optimizer and epochs); > 0 favours "
          "fine-tuning",
          "the smallest size at which at least 3 seeds are paired (else the smallest size), every target, source and "
          "arch pooled within a seed. Beneath it: each size pooled, the trend (per seed, the effect at the headline "
          "size minus the effect at the largest size; > 0: the gap shrinks as data grows), and every target x source x "
          "arch x size cell."),
    Claim(2, "freezing_beats_full_finetuning", "xfer's hypothesis on seed 000's frozen cells: a frozen pretrained "
          "body (freeze depth > 0) beats full fine-tuning",
          "000", "full fine-tuning (freeze 0) test_error - frozen-body test_error, same checkpoint, target, size, lr, "
          "seed and optimizer (one lr, no unfreeze); > 0 favours freezing",
          "the smallest size at which at least 3 seeds are paired (else the smallest size), every source, arch and "
          "freeze depth > 0 pooled within a seed. Beneath it: each size pooled, every arch x freeze depth x size, and "
          "seed 000's own contrast where the grid has it: resnet_mini frozen 20 against 23 tensors (seed 000 四 2): "
          "94.24% against 93.42% at 10,000 MNIST from Fashion-MNIST)."),
    Claim(3, "parent_examples_transfer_to_descendant", "adversarial examples made on a model's parent transfer to "
          "its fine-tuned descendant better than examples made on another source's model", "000",
          "success_rate on C of examples made on its parent A - on B (pretrained on another source, same arch as C, "
          "of C's seed; where the grid has no B of C's seed, B's seeds averaged), per attack setting; > 0 favours the "
          "claim. ceiling: white-box success on A",
          "every attack x eps setting pooled within a seed (each setting weighs the same; a seed is the fine-tuned "
          "target C's seed; `why` says for how many C the grid had no B of C's seed). Beneath it, where the grid "
          "attacked C with A' (C's source and arch, another seed): A' against B (the same source data, weights "
          "unrelated to C's) and A against A' (the parent's own weights against its source's other seeds), then each "
          "attack x eps setting."),
    Claim(4, ADDER_CLAIM, "adder: transfer beats scratch", "002",
          "scratch test_error - transfer arm test_error, same size (training pairs) and seed; > 0 favours transfer",
          "the `transfer_features` arm where the grid has it (the digit classifier's penultimate features under the "
          "scratch arm's head: it differs from scratch only in its start, the fair test), else the seed's `transfer` "
          "arm (its 10 + 10 logits -> 19 -> 19), at the largest size at which at least 3 seeds are paired (else the "
          "largest size): the largest step budget, nearest the seed's ~2,500 steps. `why` gives the digit "
          "classifier's mean test accuracy and the error floor it sets the transfer arm (a sum is wrong whenever "
          "either digit is misread: about 1 - (1 - e)^2 at digit error e). Beneath it: the transfer arm at the same "
          "size, then every arm's other sizes."),
    Claim(5, "head10x_sgd_helps", "a 10x learning rate on the new head helps SGD fine-tuning", "004",
          "test_error with SGD at one lr (head_lr_mult 1) - with SGD and head_lr_mult 10, same checkpoint, target, "
          "size, freeze depth, lr, seed and unfreeze setting; > 0 favours the 10x head",
          "every source, arch, size and freeze depth pooled within a seed. Beneath it: the head10x_sgd cells against "
          "SGD with every layer at 10x their lr (recipe lr10x_sgd: is it the head's lr, or any higher lr?), then "
          "each arch x size."),
    Claim(6, "unfreeze_helps", "freeze-then-unfreeze beats keeping the body frozen", "001",
          "test_error of the unfreeze_control cell (unfreeze_body false: at unfreeze_epoch the same lr drop under the "
          "same plateau schedule, the body kept frozen) - of the unfreeze cell (same checkpoint, target, size, freeze "
          "depth, lr, seed, optimizer, head_lr_mult and unfreeze_epoch: only the unfreezing differs); > 0 favours "
          "unfreezing",
          "the unfreeze cells against their unfreeze_control cells, every source, arch, size and freeze depth pooled "
          "within a seed (the recipe only applies where something is frozen). Where the grid has no such pair, the "
          "unfreeze cells against the frozen cells never unfrozen instead, and `why` says that the arms' schedules "
          "differ (cosine against plateau with an lr drop). Beneath it: each arch x size, the frozen cells never "
          "unfrozen (when the control is the headline), and the unfreeze cells against full fine-tuning (freeze 0) "
          "of the same checkpoint."),
    Claim(7, "lenet5_vs_resnet_mini", "seed 003's sigmoid LeNet-5 (max-pool), trained with Adam, is accurate on "
          f"MNIST digits: within {100 * MARGIN:g} pp of resnet_mini's test error at the same budget", "003",
          f"(resnet_mini test_error + {MARGIN:g}) - LeNet-5 test_error ({LENET_SEED}, seed 003's max-pool LeNet-5, "
          f"where the grid has it, else xfer's avg-pool {LENET}), same target, size, seed, optimizer and epochs (and "
          "lr where both archs ran it), Adam or AdamW cells only (seed 003 trains its LeNet with Adam); > 0: LeNet-5 "
          f"is within {100 * MARGIN:g} pp of resnet_mini (non-inferiority; treated and control means are the raw "
          "errors)",
          "scratch cells (fine-tuned cells at freeze 0 only when no scratch pair exists) at the largest size at "
          "which at least 3 seeds are paired (else the largest size) and that size's largest budget (epochs: the "
          "nearest to the seed's: the most steps under a step budget), every target pooled; `why` says when the "
          f"LeNet-5 is xfer's {LENET}, not the seed's. Beneath it: each stage x target x size x budget."),
)
CLAIMS = tuple(dataclasses.replace(c, where=WHERE[c.id]) for c in CLAIMS)
BY_KEY = {c.key: c for c in CLAIMS}


# ---- the interval and the verdict --------------------------------------------------------------------

def t_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean of `values` (one per seed, n >= 2) and its Student's t interval: mean ± t_{(1+c)/2, n-1} · sd / √n.

    Identical values (sd 0) give a zero-width interval at their mean, which `verdict_row` does not decide on.
    """
    n = len(values)
    mean = float(np.mean(values))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * np.std(values, ddof=1) / np.sqrt(n))
    return mean, mean - half, mean + half


def decide(low: float, high: float) -> str:
    """Supported when the interval lies above 0, contradicted when below, inconclusive when it holds 0."""
    return SUPPORTED if low > 0 else CONTRADICTED if high < 0 else INCONCLUSIVE


def p_value(values: np.ndarray) -> float:
    """Two-sided p of the one-sample (paired) t test of mean 0 over the per-seed values (nan without spread)."""
    sd = float(np.std(values, ddof=1))
    if not sd > 0:
        return np.nan
    t = float(np.mean(values)) / (sd / np.sqrt(len(values)))
    return float(2 * stats.t.sf(abs(t), len(values) - 1))


def seeds_for_power(values: np.ndarray, power: float = POWER, alpha: float = ALPHA) -> float:
    """The fewest seeds a two-sided paired t test at `alpha` needs for `power` if the true effect and spread were the
    observed ones (noncentral t); nan with no effect or spread, or beyond MAX_SEEDS."""
    sd, mean = float(np.std(values, ddof=1)), float(np.mean(values))
    if not (sd > 0 and mean != 0):
        return np.nan
    d = abs(mean) / sd

    def enough(n: int) -> bool:
        critical, shift = stats.t.ppf(1 - alpha / 2, n - 1), d * np.sqrt(n)
        # scipy's lower tail is nan far out (a large shift), where it is 0 to double precision.
        return stats.nct.sf(critical, n - 1, shift) + np.nan_to_num(stats.nct.cdf(-critical, n - 1, shift)) >= power

    # Power grows with n: bisect (~7 noncentral-t evaluations, not up to 100 for every row of a large grid's report).
    if not enough(MAX_SEEDS):
        return np.nan
    low, high = 1, MAX_SEEDS   # enough(high); not enough(low), as one seed has no test
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return float(high)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of the p-values `p` (nan entries are not tests: left nan, not counted)."""
    p = np.asarray(p, dtype=float)
    adjusted = np.full_like(p, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def per_seed(pairs: pd.DataFrame, pool: list[str]) -> pd.DataFrame:
    """One row per seed: the mean within each (seed, pooled scope) first, then over the pooled scopes."""
    values = [v for v in VALUES if v in pairs.columns]
    within = pairs.dropna(subset=["seed", "diff"]).groupby(["seed", *pool], dropna=False)[values].mean()
    return within.groupby(level="seed").mean()


def verdict_row(claim: Claim, scope: str, seeds: pd.DataFrame, headline: bool = False, measure: str | None = None,
                note: str = "", level: str = SUMMARY) -> dict:
    """The claim on one scope from its per-seed means (`per_seed`): effect, t interval, verdict, why, line."""
    n = len(seeds)
    row = dict(claim_id=claim.id, claim=claim.key, headline=headline, level=HEADLINE if headline else level,
               text=claim.text, seed_doc=claim.seed_doc,
               scope=scope, measure=measure or claim.measure, method=METHOD, n_seeds=n,
               effect=np.nan, ci_low=np.nan, ci_high=np.nan,
               treated_mean=_mean(seeds, "treated"), control_mean=_mean(seeds, "control"),
               ceiling=_mean(seeds, "ceiling"), seeds=[int(s) for s in seeds.index],
               seed_effects=[float(d) for d in seeds["diff"]], figure=FIGURE.format(id=claim.id),
               p_value=np.nan, p_holm=np.nan, inference=DESCRIPTIVE, seeds_for_power=np.nan)
    head = f"{claim.text} ({scope})"
    if n < MIN_SEEDS:
        why = "; ".join(filter(None, [f"{n} seed(s) paired, {MIN_SEEDS} needed", note]))
        return row | dict(verdict=INSUFFICIENT, why=why,
                          line=f"{head}: {INSUFFICIENT} ({n} paired, need {MIN_SEEDS}); no effect estimated.")
    diffs = seeds["diff"].to_numpy(dtype=float)
    effect, low, high = t_interval(diffs)
    if not low < high:
        why = f"the same difference, {100 * effect:+.2f} pp, in every seed: no spread to make an interval from"
        return row | dict(effect=effect, verdict=NO_SPREAD, why="; ".join(filter(None, [note, why])),
                          line=f"{head}: {NO_SPREAD} ({why}); no interval.")
    row |= dict(effect=effect, ci_low=low, ci_high=high, verdict=decide(low, high), p_value=p_value(diffs),
                seeds_for_power=seeds_for_power(diffs), why=note or None)
    return row | dict(line=decided_line(row))


def decided_line(row: dict) -> str:
    """A row with an interval as one sentence: verdict, effect, interval, seeds, p (Holm's too on a headline)."""
    ceiling = f"; white-box ceiling {100 * row['ceiling']:.1f}%" if pd.notna(row["ceiling"]) else ""
    holm_text = f", Holm-adjusted {row['p_holm']:.2g}" if pd.notna(row.get("p_holm", np.nan)) else ""
    why = f" ({row['why']})" if row["verdict"] == INCONCLUSIVE and row.get("why") else ""
    return (f"{row['text']} ({row['scope']}): {row['verdict']}{why}; effect {100 * row['effect']:+.2f} pp, 95% CI "
            f"[{100 * row['ci_low']:+.2f}, {100 * row['ci_high']:+.2f}] pp over {row['n_seeds']} seeds, p = "
            f"{row['p_value']:.2g}{holm_text} ({METHOD}; {row['measure']}{ceiling}).")


def no_runs(claim: Claim, why: str) -> dict:
    """The headline of a claim the grid cannot speak to, and why."""
    return dict(claim_id=claim.id, claim=claim.key, headline=True, level=HEADLINE, text=claim.text,
                seed_doc=claim.seed_doc, scope="",
                measure=claim.measure, method=METHOD, n_seeds=0, effect=np.nan, ci_low=np.nan, ci_high=np.nan,
                treated_mean=np.nan, control_mean=np.nan, ceiling=np.nan, seeds=[], seed_effects=[], figure=None,
                p_value=np.nan, p_holm=np.nan, inference=CONFIRMATORY, seeds_for_power=np.nan,
                verdict=NO_RUNS, why=why, line=f"{claim.text}: {NO_RUNS}; {why}.")


# ---- pairing -----------------------------------------------------------------------------------------

def paired(frame: pd.DataFrame, treated: pd.Series, control: pd.Series, on: list[str],
           error: str = "test_error") -> pd.DataFrame:
    """Each treated run with the control run equal on `on` (the newest of several): treated, control, diff.

    `diff` = control error - treated error (> 0: the treated side is better). Keys are compared as text,
    so a null (e.g. no unfreeze epoch) matches a null, as it should for "the same setting".
    """
    keys = [f"_key_{c}" for c in on]

    def keyed(rows: pd.DataFrame) -> pd.DataFrame:
        return rows.assign(**{k: rows[c].astype(str) for k, c in zip(keys, on)})

    base = keyed(frame[control]).drop_duplicates(keys, keep="last")[keys + [error]].rename(columns={error: "control"})
    merged = keyed(frame[treated]).merge(base, on=keys).drop(columns=keys)
    return merged.assign(treated=merged[error], diff=merged["control"] - merged[error])


def one_lr(finetune: pd.DataFrame) -> pd.Series:
    """Cells fine-tuned with one lr for body and head and no unfreezing (the plain and sgd recipes)."""
    return finetune["head_lr_mult"].fillna(1.0).eq(1.0) & finetune["unfreeze_epoch"].isna()


def edge_size(pairs: pd.DataFrame, largest: bool) -> int:
    """The smallest (or largest) size with at least MIN_SEEDS paired seeds; the smallest (largest) size if none has."""
    order = size_order(pairs["size"])[::-1 if largest else 1]
    seeds = pairs.groupby("size")["seed"].nunique()
    return next((s for s in order if seeds[s] >= MIN_SEEDS), order[0])


def scope_text(columns: list[str], values: object) -> str:
    """``target=mnist size=1000`` (size 0 reads "all")."""
    values = values if isinstance(values, tuple) else (values,)
    return " ".join(f"{c}={size_text(v) if c == 'size' else _fmt(v)}" for c, v in zip(columns, values))


def scope_values(scope: str) -> dict[str, str]:
    """The inverse of `scope_text` for a cell row's scope: ``arch=resnet_mini size=all, 2 sources pooled`` ->
    ``{"arch": "resnet_mini", "size": "all"}`` (what follows the first ", " says what was pooled)."""
    return dict(part.split("=", 1) for part in scope.split(", ")[0].split() if "=" in part)


def pooled_text(pairs: pd.DataFrame, columns: list[str]) -> str:
    """What a pooled headline spans: ``2 sources x 3 archs pooled`` (columns with one value left out)."""
    spans = [f"{pairs[c].nunique()} {c}s" for c in columns if pairs[c].nunique() > 1]
    return f"{' x '.join(spans)} pooled" if spans else ""


def scoped(claim: Claim, pairs: pd.DataFrame, by: list[str], pool: list[str], skip: tuple | None = None,
           level: str = SUMMARY, measure: str | None = None) -> list[dict]:
    """One row per value of `by` (pooling `pool` within it), sizes ascending with "all" last; the group `skip` is
    the headline's and is not repeated; `measure` when it is not the claim's."""
    def order(item: tuple[tuple, pd.DataFrame]) -> tuple:
        return tuple((v == 0, v) if c == "size" else (False, str(v)) for c, v in zip(by, item[0]))

    rows = []
    for values, group in sorted(pairs.groupby(by, sort=False), key=order):
        if values != skip:
            scope = ", ".join(filter(None, [scope_text(by, values), pooled_text(group, pool)]))
            rows.append(verdict_row(claim, scope, per_seed(group, pool), level=level, measure=measure))
    return rows


# ---- the claims --------------------------------------------------------------------------------------

def claim_finetune_vs_scratch(finetune: pd.DataFrame, scratch: pd.DataFrame) -> list[dict]:
    """Claim 1 (seed 000): full fine-tuning against scratch per size, the headline at the smallest size, and the trend."""
    claim = BY_KEY["finetune_beats_scratch"]
    full = finetune[one_lr(finetune) & finetune["freeze_depth"].eq(0)]
    pairs = full.dropna(subset=["scratch_run_id"])
    why = ("no finished fine-tune runs" if finetune.empty
           else "no full fine-tuning cells (freeze depth 0, one lr, no unfreeze) in this grid" if full.empty
           else "no scratch cells in this grid" if scratch.empty
           else "no fine-tune cell has a scratch run of the same target, arch, size, seed, lr, optimizer and epochs")
    if pairs.empty:
        return [no_runs(claim, why)]
    pairs = pairs.assign(treated=pairs["test_error"], control=pairs["scratch_test_error"],
                         diff=pairs["scratch_test_error"] - pairs["test_error"])
    pool = ["target", "source", "arch"]
    small = edge_size(pairs, largest=False)
    at_small = pairs[pairs["size"] == small]
    rows = [verdict_row(claim, ", ".join(filter(None, [f"size={size_text(small)}", pooled_text(at_small, pool)])),
                        per_seed(at_small, pool), headline=True)]
    rows += scoped(claim, pairs, ["size"], pool, skip=(small,))
    large = size_order(pairs["size"])[-1]
    if large != small:
        ends = per_seed(at_small, pool)[["diff"]].join(per_seed(pairs[pairs["size"] == large], pool)[["diff"]],
                                                       rsuffix="_large", how="inner")
        trend = pd.DataFrame({"diff": ends["diff"] - ends["diff_large"], "treated": ends["diff"],
                              "control": ends["diff_large"]})
        rows.append(verdict_row(
            claim, f"trend: size={size_text(small)} minus size={size_text(large)}", trend,
            measure=f"effect at size={size_text(small)} - effect at size={size_text(large)} (the gap of the measure "
                    "above); > 0: the gap shrinks as target data grows"))
    rows += scoped(claim, pairs, ["target", "source", "arch", "size"], [], level=CELL)
    return rows


def claim_freezing(finetune: pd.DataFrame) -> list[dict]:
    """Claim 2 (seed 000's 8 / 20 / 23): frozen-body against full fine-tuning from the same checkpoint, per size."""
    claim = BY_KEY["freezing_beats_full_finetuning"]
    cells = finetune[one_lr(finetune)]
    frozen = cells["freeze_depth"] > 0
    pairs = paired(cells, frozen, cells["freeze_depth"].eq(0),
                   CHECKPOINT + ["target", "size", "lr", "seed", "optimizer"] + BUDGET)
    why = ("no finished fine-tune runs" if finetune.empty
           else "no fine-tune cells with a freeze depth > 0 in this grid" if not frozen.any()
           else "no full fine-tuning cells (freeze depth 0) in this grid" if not cells["freeze_depth"].eq(0).any()
           else "no frozen cell has a full fine-tuning cell from the same checkpoint, size, lr, seed and optimizer")
    seed_rows = seed_000_depths(claim, cells)
    if pairs.empty:
        return [no_runs(claim, why)] + seed_rows
    pool = ["source", "arch", "freeze_depth", "target"]
    small = edge_size(pairs, largest=False)
    at_small = pairs[pairs["size"] == small]
    rows = [verdict_row(claim, ", ".join(filter(None, [f"size={size_text(small)}", pooled_text(at_small, pool)])),
                        per_seed(at_small, pool), headline=True)]
    rows += scoped(claim, pairs, ["size"], pool, skip=(small,))
    rows += scoped(claim, pairs, ["arch", "freeze_depth", "size"], ["source", "target"], level=CELL)
    return rows + seed_rows


SEED_DEPTHS = (RESNET, 20, 23)   # seed 000's frozen-depth contrast: resnet frozen 20 tensors against 23


def seed_000_depths(claim: Claim, cells: pd.DataFrame) -> list[dict]:
    """Seed 000's own contrast beneath claim 2: resnet_mini frozen 20 tensors against 23, same checkpoint, target,
    size, lr, seed and optimizer, per size (none when the grid lacks either depth)."""
    arch, shallow, deep = SEED_DEPTHS
    cells = cells[cells["arch"].eq(arch)]
    pairs = paired(cells, cells["freeze_depth"].eq(shallow), cells["freeze_depth"].eq(deep),
                   CHECKPOINT + ["target", "size", "lr", "seed", "optimizer"] + BUDGET)
    if pairs.empty:
        return []
    measure = (f"{arch} test_error frozen {deep} - frozen {shallow} tensors, same checkpoint, target, size, lr, seed "
               f"and optimizer; > 0 favours the shallower frozen body, as seed 000 found")
    rows = []
    for (size,), group in sorted(pairs.groupby(["size"]), key=lambda item: (item[0][0] == 0, item[0][0])):
        scope = ", ".join(filter(None, [f"seed 000's contrast: freeze {shallow} vs {deep}, arch={arch} "
                                        f"size={size_text(size)}", pooled_text(group, ["source", "target"])]))
        rows.append(verdict_row(claim, scope, per_seed(group, ["source", "target"]), measure=measure))
    return rows


def claim_parent_examples(transfer: pd.DataFrame) -> list[dict]:
    """Claim 3 (seed 000's A/B -> C): success on C of its parent A's examples against another source's B's, B of C's
    seed; beneath it, where the grid attacked C with A' (C's source and arch, another seed), A' against B and A
    against A'."""
    claim = BY_KEY["parent_examples_transfer_to_descendant"]
    if transfer.empty:   # an empty table's columns carry no numeric dtype to average
        return [no_runs(claim, "no adversarial set was scored in this grid")]
    keys = ["target_run_id", "attack", "eps"]
    pretrained = transfer[transfer["surrogate_stage"] == names.PRETRAIN]
    parent = pretrained[pretrained["is_parent"].eq(True)]
    same_arch = pretrained[pretrained["surrogate_arch"] == pretrained["target_arch"]]
    other = same_arch[same_arch["same_source"].eq(False)]
    sibling = same_arch[same_arch["same_source"].eq(True) & same_arch["is_parent"].eq(False)]   # A'
    a_side = parent.groupby(keys).agg(treated=("success_rate", "mean"), ceiling=("whitebox_success", "mean"))
    b_side, b_seeded = seed_paired(other, keys)
    info = transfer.groupby(keys)[["target_seed", "target_arch", "target_source"]].first()
    pairs = a_side.join(b_side.rename("control"), how="inner").join(info).reset_index().rename(
        columns={"target_seed": "seed"})
    why = ("no fine-tuned model was attacked with its parent's examples" if parent.empty
           else "no fine-tuned model was attacked with examples of another source's pretrained model of its arch"
           if other.empty else "no fine-tuned model was attacked by both its parent and another source's model of "
                               "its arch in the same attack setting")
    if pairs.empty:
        return [no_runs(claim, why)]
    pairs = pairs.assign(diff=pairs["treated"] - pairs["control"])
    unseeded = set(pairs.loc[~pairs.set_index(keys).index.isin(b_seeded), "target_run_id"])
    note = (f"the grid has no B of C's seed for {len(unseeded)} of {pairs['target_run_id'].nunique()} fine-tuned "
            "model(s) C: their B's seeds are averaged" if unseeded else "")
    rows = [verdict_row(claim, settings_text(pairs), per_seed(pairs, ["attack", "eps"]), headline=True, note=note)]
    a_prime = sibling.groupby(keys)["success_rate"].mean()
    for scope, treated, control, measure in (
            ("A' vs B (same source data, unrelated weights)", a_prime, b_side,
             "success_rate on C of examples made on A' (pretrained on C's source, same arch, another seed: C's source "
             "data, weights unrelated to C's; several A' averaged) - on B (as in the headline); > 0: the source data "
             "alone carries the transfer"),
            ("A vs A' (the parent's own weights against the same source's other seeds)", a_side["treated"], a_prime,
             "success_rate on C of examples made on its parent A - on A' (C's source and arch, another seed; several "
             "A' averaged); > 0: C's inherited weights carry the transfer beyond its source data")):
        both = pd.concat({"treated": treated, "control": control}, axis=1, join="inner").join(info).reset_index()
        if len(both):
            both = both.rename(columns={"target_seed": "seed"}).assign(diff=both["treated"] - both["control"])
            rows.append(verdict_row(claim, f"{scope}, {settings_text(both)}", per_seed(both, ["attack", "eps"]),
                                    measure=measure))
    if pairs[["attack", "eps"]].drop_duplicates().shape[0] > 1:
        rows += scoped(claim, pairs, ["attack", "eps"], [])
    return rows


def seed_paired(other: pd.DataFrame, keys: list[str]) -> tuple[pd.Series, pd.Index]:
    """Claim 3's B per `keys` (target and attack setting): the mean success of the B's of C's seed where the grid
    attacked C with one, else of every B (its seeds averaged); and the keys that had a B of C's seed."""
    own = (other["surrogate_seed"] == other["target_seed"]).fillna(False).astype(bool)
    seeded = other[own].groupby(keys)["success_rate"].mean()
    return seeded.combine_first(other.groupby(keys)["success_rate"].mean()), seeded.index


def settings_text(pairs: pd.DataFrame) -> str:
    """Claim 3's pooled attack settings: ``2 attack settings pooled``, or the one setting ``attack=pgd eps=0.3``."""
    settings = pairs[["attack", "eps"]].drop_duplicates()
    return (f"{len(settings)} attack settings pooled" if len(settings) > 1
            else scope_text(["attack", "eps"], tuple(settings.iloc[0])))


def claim_adder(adder: pd.DataFrame) -> list[dict]:
    """Claim 4 (seed 002): the adder's transfer_features arm (else the seed's transfer arm) against scratch at the
    largest budget, its digit classifier's accuracy in `why`; the transfer arm at that size next, every other size
    and arm beneath."""
    claim = BY_KEY[ADDER_CLAIM]
    pairs = adder.dropna(subset=["scratch_run_id"])
    if pairs.empty:
        return [no_runs(claim, "no adder runs in this grid" if adder.empty
                        else "no adder transfer run has a scratch run of the same size and seed")]
    pairs = pairs.assign(treated=pairs["test_error"], control=pairs["scratch_test_error"],
                         diff=pairs["scratch_test_error"] - pairs["test_error"])
    # The headline's arm first (transfer_features: it differs from scratch only in its start), then the seed's.
    arms = sorted(set(pairs["variant"]), key=lambda v: (v != names.VARIANT_TRANSFER_FEATURES,
                                                        v != names.VARIANT_TRANSFER, v))
    lead = arms[0]
    large = edge_size(pairs[pairs["variant"] == lead], largest=True)
    note = classifier_note(pairs[(pairs["variant"] == lead) & (pairs["size"] == large)])
    rows = []
    for arm in arms:
        on_arm = pairs[pairs["variant"] == arm]
        for size in size_order(on_arm["size"]):
            scope = scope_text(["size"], size) if arm == names.VARIANT_TRANSFER else scope_text(["arm", "size"], (arm, size))
            said = size == large and arm in (lead, names.VARIANT_TRANSFER)
            rows.append(verdict_row(claim, scope, per_seed(on_arm[on_arm["size"] == size], []),
                                    headline=arm == lead and size == large, note=note if said else ""))
    # the headline, then the seed's transfer arm at the headline's size, then the rest in arm x size order
    return sorted(rows, key=lambda r: (not r["headline"], r["scope"] != scope_text(["size"], large)))


def classifier_note(pairs: pd.DataFrame) -> str:
    """The digit classifier of the adder runs `pairs` (each classifier run once): its mean test accuracy, and the error
    floor it sets the seed's transfer arm, which reads only its 10 + 10 logits: a sum is wrong whenever either digit
    is misread, so about 1 - (1 - e)^2 at digit error e ("" when the classifier runs are not in the table)."""
    known = pairs.dropna(subset=["classifier_test_error"]).drop_duplicates("pretrain_run_id")
    if known.empty:
        return ""
    error = float(known["classifier_test_error"].mean())
    return (f"digit classifier: {100 * (1 - error):.2f}% mean test accuracy over {len(known)} run(s), so the transfer "
            f"arm's error floor is about 1 - (1 - {error:.4f})^2 = {100 * (1 - (1 - error) ** 2):.2f}% (a sum is wrong "
            "whenever either digit is misread)")


RECIPE_POOL = ["source", "arch", "size", "freeze_depth", "target"]   # claims 5 and 6 pool every cell within a seed


def with_body(finetune: pd.DataFrame) -> pd.DataFrame:
    """`finetune` with unfreeze_body a plain boolean, so that it pairs as a key: null (a table without the column) is
    true, as for runs recorded before the field existed."""
    return finetune.assign(unfreeze_body=finetune["unfreeze_body"].ne(False))


def claim_head_lr(finetune: pd.DataFrame) -> list[dict]:
    """Claim 5 (seed 004): SGD with a 10x head lr against SGD at one lr, same checkpoint and cell; beneath it, against
    SGD with every layer at 10x that lr (lr10x_sgd)."""
    claim = BY_KEY["head10x_sgd_helps"]
    sgd = with_body(finetune[finetune["optimizer"].eq(SGD)])
    mult = sgd["head_lr_mult"].fillna(1.0)
    head, one = mult.eq(HEAD_LR_MULT), mult.eq(1.0)
    cell = CHECKPOINT + ["target", "size", "freeze_depth", "seed", "unfreeze_epoch", "unfreeze_body"] + BUDGET
    pairs = paired(sgd, head, one, cell + ["lr"])
    why = ("no finished fine-tune runs" if finetune.empty
           else f"no SGD fine-tune cells with head_lr_mult {HEAD_LR_MULT:g} (recipe head10x_sgd) in this grid"
           if not head.any()
           else "no SGD fine-tune cells at one lr (recipe sgd) to compare with" if not one.any()
           else "no head10x_sgd cell has an sgd cell from the same checkpoint, target, size, freeze depth, lr and seed")
    rows = _pooled_claim(claim, pairs, why)
    # The lr10x_sgd cell's lr is LR_MULT x the head10x cell's: compared as text to 6 significant digits, since
    # 10 x 3e-4 is 0.0030000000000000005 in floating point.
    lr = sgd["lr"].where(~head, sgd["lr"] * LR_MULT)
    everyone = paired(sgd.assign(lr_key=lr.map(lambda value: f"{value:.6g}")), head, one, cell + ["lr_key"])
    if len(everyone):
        scope = f"against every layer at {LR_MULT:g}x (lr10x_sgd)"
        rows.insert(1, verdict_row(
            claim, ", ".join(filter(None, [scope, pooled_text(everyone, RECIPE_POOL)])),
            per_seed(everyone, RECIPE_POOL),
            measure=f"test_error of SGD with every layer at {LR_MULT:g}x (recipe lr10x_sgd: head_lr_mult 1, lr "
                    f"{LR_MULT:g} x the head10x_sgd cell's) - of the head10x_sgd cell, same checkpoint, target, size, "
                    "freeze depth, seed and unfreeze setting; > 0 favours raising the head's lr alone"))
    return rows


def claim_unfreeze(finetune: pd.DataFrame) -> list[dict]:
    """Claim 6 (seed 001): freeze-then-unfreeze against its same-schedule control (unfreeze_control), else against
    the same frozen cell never unfrozen; beneath it, that frozen cell (when it is not the headline) and freeze 0."""
    claim = BY_KEY["unfreeze_helps"]
    finetune = with_body(finetune)
    switched = finetune["unfreeze_epoch"].notna()
    unfreezing, control = switched & finetune["unfreeze_body"], switched & ~finetune["unfreeze_body"]
    never = ~switched
    same_cell = CHECKPOINT + ["target", "size", "lr", "seed", "optimizer", "head_lr_mult"] + BUDGET
    same = paired(finetune, unfreezing, control, same_cell + ["freeze_depth", "unfreeze_epoch"])
    frozen = paired(finetune, unfreezing, never & (finetune["freeze_depth"] > 0), same_cell + ["freeze_depth"])
    frozen_measure = ("test_error of a frozen-body cell (freeze > 0, never unfrozen: the cosine schedule) - of the "
                      "unfreeze cell (same checkpoint, target, size, freeze depth, lr, seed, optimizer, head_lr_mult); "
                      "> 0 favours unfreezing, but the arms' schedules differ as well")
    if len(same):
        rows = _pooled_claim(claim, same, "")
        if len(frozen):
            rows.append(verdict_row(
                claim, ", ".join(filter(None, ["against the frozen cell never unfrozen (another schedule)",
                                               pooled_text(frozen, RECIPE_POOL)])),
                per_seed(frozen, RECIPE_POOL), measure=frozen_measure))
    else:
        why = ("no finished fine-tune runs" if finetune.empty
               else "no freeze-then-unfreeze cells (recipe unfreeze) in this grid" if not unfreezing.any()
               else "no unfreeze cell has an unfreeze_control or a frozen cell from the same checkpoint, target, size, "
                    "freeze depth, lr, seed, optimizer and head_lr_mult")
        missing = ("no unfreeze_control cells in this grid" if not control.any()
                   else "no unfreeze cell has an unfreeze_control cell of the same checkpoint, target, size, freeze "
                        "depth, lr, seed, optimizer, head_lr_mult and unfreeze_epoch")
        note = (f"{missing}: against the frozen cells never unfrozen instead, whose schedule differs (cosine, where "
                "the unfreeze cells run ReduceLROnPlateau with an lr drop at unfreeze_epoch)")
        rows = _pooled_claim(claim, frozen, why, note=note, measure=frozen_measure)
    full = paired(finetune, unfreezing, never & finetune["freeze_depth"].eq(0), same_cell)
    if len(full) and (len(same) or len(frozen)):
        rows.append(verdict_row(
            claim, ", ".join(filter(None, ["against full fine-tuning (freeze 0)", pooled_text(full, RECIPE_POOL)])),
            per_seed(full, RECIPE_POOL), measure="test_error of full fine-tuning (freeze 0, same checkpoint, target, "
                                                 "size, lr, seed, optimizer) - of the unfreeze cell; > 0 favours "
                                                 "unfreezing"))
    return rows


def claim_lenet(scratch: pd.DataFrame, finetune: pd.DataFrame) -> list[dict]:
    """Claim 7 (seed 003): LeNet-5 within MARGIN of resnet_mini at the same budget (non-inferiority); scratch cells,
    else full fine-tuning. The seed's max-pool LeNet-5 where the grid has it, else xfer's avg-pool one, and says so."""
    claim = BY_KEY["lenet5_vs_resnet_mini"]
    budget = ["target", "size", "seed", "optimizer"] + BUDGET
    scratch, finetune = scratch[scratch["optimizer"].isin(ADAM)], finetune[finetune["optimizer"].isin(ADAM)]
    archs = set(scratch["arch"]) | set(finetune["arch"])
    lenet = LENET_SEED if LENET_SEED in archs else LENET
    stages = [(names.SCRATCH, scratch, budget),
              (names.FINETUNE, finetune[one_lr(finetune) & finetune["freeze_depth"].eq(0)], ["source", *budget])]
    parts = []
    for stage, cells, on in stages:
        is_lenet, resnet = cells["arch"].eq(lenet), cells["arch"].eq(RESNET)
        # The same lr where both archs ran it (a shared lrs axis); else each at its own (a tuned grid).
        found = paired(cells, is_lenet, resnet, on + ["lr"])
        found = found if len(found) else paired(cells, is_lenet, resnet, on)
        parts += [found.assign(stage=stage)] if len(found) else []
    if not parts:
        missing = [a for a in (lenet, RESNET) if a not in archs]
        return [no_runs(claim, f"no Adam or AdamW {' or '.join(missing)} runs in this grid" if missing
                        else f"no {lenet} cell has a {RESNET} cell of the same stage, target, size, seed, optimizer "
                             "and training budget")]
    pairs = pd.concat(parts, ignore_index=True)
    pairs["diff"] += MARGIN   # (resnet error + MARGIN) - LeNet error; treated and control stay the raw errors
    if "source" not in pairs.columns:   # scratch cells have no source
        pairs["source"] = None
    pairs["budget"] = [budget_text(e, s) for e, s in zip(pairs["epochs"], pairs["epoch_steps"])]
    headline_stage = names.SCRATCH if (pairs["stage"] == names.SCRATCH).any() else names.FINETUNE
    main = pairs[pairs["stage"] == headline_stage]
    large = edge_size(main, largest=True)
    at_large = main[main["size"] == large]
    # The largest training budget at that size: the nearest to the seed's (a grid with a steps axis has several).
    largest = max(zip(at_large["epochs"], at_large["epoch_steps"]), key=budget_order)
    at_large = at_large[at_large["budget"].eq(budget_text(*largest))]
    scope = ", ".join(filter(None, [f"{headline_stage} size={size_text(large)}"
                                    + (f" {budget_text(*largest)}" if main["budget"].nunique() > 1 else ""),
                                    pooled_text(at_large, ["target"])]))
    note = ("" if lenet == LENET_SEED else f"the LeNet-5 is xfer's {LENET} (average-pooled), not seed 003's max-pool "
                                           f"one ({LENET_SEED}): the grid has no Adam or AdamW {LENET_SEED} cells")
    rows = [verdict_row(claim, scope, per_seed(at_large, ["target", "source"]), headline=True, note=note)]
    rows += scoped(claim, pairs, ["stage", "target", "size", "budget"], ["source"], level=CELL)
    return rows


def budget_text(epochs: object, epoch_steps: object) -> str:
    """A training budget in words: ``epochs=10``, or ``steps=4x288`` under a step budget (TrainSpec.epoch_steps)."""
    return f"steps={int(epochs)}x{int(epoch_steps)}" if pd.notna(epoch_steps) else f"epochs={_int_or(epochs)}"


def budget_order(budget: tuple[object, object]) -> tuple[float, float]:
    """Sorts budgets by their steps when a step budget sets them (epochs x epoch_steps), then by epochs."""
    epochs, epoch_steps = (float(v) if pd.notna(v) else 0.0 for v in budget)
    return epochs * epoch_steps, epochs


def _int_or(value: object) -> object:
    return int(value) if pd.notna(value) else value


def _pooled_claim(claim: Claim, pairs: pd.DataFrame, why: str, note: str = "",
                  measure: str | None = None) -> list[dict]:
    """Claims 5 and 6: the headline pools every cell (`note` qualifies it); beneath it, each arch x size."""
    if pairs.empty:
        return [no_runs(claim, why)]
    rows = [verdict_row(claim, pooled_text(pairs, RECIPE_POOL) or scope_text(["arch", "size"], (pairs["arch"].iloc[0],
                                                                                                pairs["size"].iloc[0])),
                        per_seed(pairs, RECIPE_POOL), headline=True, measure=measure, note=note)]
    if pairs.groupby(["arch", "size"]).ngroups > 1:
        rows += scoped(claim, pairs, ["arch", "size"], ["source", "freeze_depth", "target"], level=CELL,
                       measure=measure)
    return rows


CLAIM_BUILDERS: dict[int, Callable[[Tables], list[dict]]] = {
    1: lambda t: claim_finetune_vs_scratch(t.finetune, t.scratch),
    2: lambda t: claim_freezing(t.finetune),
    3: lambda t: claim_parent_examples(t.transfer),
    4: lambda t: claim_adder(t.adder),
    5: lambda t: claim_head_lr(t.finetune),
    6: lambda t: claim_unfreeze(t.finetune),
    7: lambda t: claim_lenet(t.scratch, t.finetune),
}


def all_verdicts(found: Tables) -> pd.DataFrame:
    """Every claim 1-7, its headline row first and the narrower scopes beneath, in claim order; cells at chance left
    out, the headlines Holm-adjusted together (`confirm`)."""
    clean = without_chance(found)
    rows = confirm([row for claim in CLAIMS for row in CLAIM_BUILDERS[claim.id](clean)])
    return pd.DataFrame(rows, columns=[c.name for c in SCHEMAS["verdicts"]])


def confirm(rows: list[dict]) -> list[dict]:
    """Holm's adjustment over the headlines that have a p-value: a headline whose adjusted p is not below ALPHA is
    inconclusive whatever its own interval says, and says so; every other row is descriptive. A headline whose
    seeds are too few for POWER at its observed effect says how many it would need."""
    heads = [row for row in rows if row["headline"]]
    adjusted = holm(np.array([row["p_value"] for row in heads], dtype=float))
    tested = int(np.sum(~np.isnan(adjusted)))
    for row, p in zip(heads, adjusted):
        row["inference"] = f"{CONFIRMATORY}: Holm over {tested} headline(s)" if tested else CONFIRMATORY
        if np.isnan(p):
            continue
        row["p_holm"] = float(p)
        notes = [row["why"]] if row.get("why") else []
        if row["verdict"] in (SUPPORTED, CONTRADICTED) and not p < ALPHA:
            notes.append(f"its own interval excludes 0 (p = {row['p_value']:.2g}), but the Holm-adjusted p over "
                         f"{tested} headlines is {p:.2g}")
            row["verdict"] = INCONCLUSIVE
        needed = row["seeds_for_power"]
        if row["n_seeds"] < (needed if pd.notna(needed) else MAX_SEEDS + 1):
            notes.append(f"underpowered: {f'~{needed:.0f}' if pd.notna(needed) else f'over {MAX_SEEDS}'} seeds for "
                         f"{POWER:.0%} power at this effect and spread")
        row["why"] = "; ".join(notes) or None
        row["line"] = decided_line(row)
    for row in rows:
        if not row["headline"]:
            row["inference"] = f"{DESCRIPTIVE}: no multiple-comparison control"
    return rows


def claims_table(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The headline rows: exactly one per claim 1-7."""
    return verdicts[verdicts["headline"]].reset_index(drop=True)


def _mean(seeds: pd.DataFrame, column: str) -> float:
    return float(seeds[column].mean()) if column in seeds.columns and seeds[column].notna().any() else np.nan


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def claims_doc() -> str:
    """The claims, their measures and how each headline is made, as Markdown (SCHEMA.md and the package docstring)."""
    items = "\n".join(f"{c.id}. **{c.text}** (seed {c.seed_doc}, key `{c.key}`). Source: {c.where}. Effect: "
                      f"{c.measure}. Headline: {c.headline_rule}" for c in CLAIMS)
    return ("### The claims (`verdicts.parquet`)\n\n"
            f"Every row is a paired difference averaged within each seed first; with at least {MIN_SEEDS} seeds its "
            f"95% interval is Student's t on the per-seed means (mean ± t_0.975,n-1 · sd / √n; '{METHOD}': every seed "
            "is scored on the same test set, so the interval covers training randomness, not test-set sampling), and "
            "the verdict is supported if the interval lies above 0, contradicted if below, inconclusive otherwise. "
            "The seven headlines are the confirmatory tests: their paired-t p-values (`p_value`) are Holm-adjusted "
            "together (`p_holm`), and a headline whose adjusted p is not below 0.05 is inconclusive whatever its own "
            "interval says (`why` says so). Every other row is descriptive (`inference`): its own interval, no "
            f"multiple-comparison control. Identical per-seed differences have no spread: '{NO_SPREAD}', no "
            f"interval. Fewer than {MIN_SEEDS} seeds: '{INSUFFICIENT}', no effect. `seeds_for_power` is how many seeds "
            f"a paired t test would need for {POWER:.0%} power if the observed effect and spread were true; a headline "
            "with fewer says it is underpowered. Cells whose test accuracy is at chance (the `at_chance` column of the "
            "finetune, scratch and adder tables) are left out of every verdict. Each claim has exactly one headline "
            f"row (`headline` true; '{NO_RUNS}' with `why` when the grid has no cells for it); the rows beneath it are "
            "narrower scopes. A pooled headline weighs every pooled scope equally within a seed. Where a grid lacks a "
            "claim's fair contrast (claim 6's same-schedule control, claim 4's transfer_features arm, claim 3's B of "
            "C's seed, claim 7's max-pool LeNet-5), the headline falls back to the nearest one the grid has and `why` "
            f"says what differs. Claim 7 is a non-inferiority test: its effect adds a {100 * MARGIN:g} pp margin, so "
            f"> 0 reads 'within {100 * MARGIN:g} pp', not 'better'.\n\n" + items)
