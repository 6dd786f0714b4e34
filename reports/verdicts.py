"""Verdicts on the study's claims: paired differences per seed, Student's t interval over seeds, one line each.

The unit of replication is the seed: every difference is first averaged within a seed (over archs,
sources, freeze depths ... in the slice), and the interval is Student's t on those per-seed means. Pairs
within a seed are not independent, so treating them as replicates would give intervals that are too narrow;
and with the 3-5 seeds a grid affords, a percentile bootstrap is too narrow as well (its resamples can only
take a handful of distinct means, and it ignores that the spread itself is estimated from 3-5 values).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from reports.schema import SCHEMAS
from xfer import names

MIN_SEEDS = 3           # below this the sd over seeds is too unstable for an interval: say so instead of guessing
CONFIDENCE = 0.95
METHOD = "paired t over seeds"
INSUFFICIENT = "insufficient seeds"

ADDER_CLAIM = "adder_transfer_beats_scratch"
CLAIMS = {
    "finetune_beats_scratch": (
        "fine-tuning beats scratch", "scratch test_error - fine-tune test_error"),
    ADDER_CLAIM: (
        "adder: transfer beats scratch", "scratch test_error - transfer test_error"),
    "same_source_lowers_more": (
        "same-source pretrained surrogates lower the target's accuracy more than other-source ones",
        "adv_acc under other-source pretrained surrogates - adv_acc under same-source ones (parent included)"),
    "parent_beats_unrelated": (
        "the parent's examples lower the target's accuracy more than an unrelated pretrained surrogate's",
        "adv_acc under other-source pretrained surrogates - adv_acc under the parent"),
}


def t_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean of `values` (one per seed, n >= 2) and its Student's t interval: mean ± t_{(1+c)/2, n-1} · sd / √n.

    Identical values (sd 0) give a zero-width interval at their mean: every seed agreeing exactly is taken at
    its word, so the verdict follows the sign of the mean (and is inconclusive only at exactly 0).
    """
    n = len(values)
    mean = float(np.mean(values))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * np.std(values, ddof=1) / np.sqrt(n))
    return mean, mean - half, mean + half


def verdict_rows(diffs: pd.DataFrame, claim: str, scope_cols: list[str]) -> list[dict]:
    """One verdict per scope from per-pair differences (`seed`, `diff` > 0 favours the claim, `scope_cols`)."""
    rows = []
    diffs = diffs.dropna(subset=["seed", "diff"])
    for scope_values, group in diffs.groupby(scope_cols, sort=True):
        scope = " ".join(f"{c}={_fmt(v)}" for c, v in zip(scope_cols, scope_values))
        per_seed = group.groupby("seed")["diff"].mean().to_numpy(dtype=float)
        rows.append(_verdict(claim, scope, per_seed))
    return rows


def _verdict(claim: str, scope: str, per_seed: np.ndarray) -> dict:
    text, measure = CLAIMS[claim]
    n = len(per_seed)
    head = f"{text} ({scope})"
    if n < MIN_SEEDS:
        return dict(claim=claim, scope=scope, n_seeds=n, effect=np.nan, ci_low=np.nan, ci_high=np.nan, measure=measure,
                    verdict=INSUFFICIENT,
                    line=f"{head}: {INSUFFICIENT} ({n} paired, need {MIN_SEEDS}); no effect estimated.")
    effect, low, high = t_interval(per_seed)
    verdict = decide(low, high)
    line = (f"{head}: {verdict}; effect {100 * effect:+.2f} pp, 95% CI [{100 * low:+.2f}, {100 * high:+.2f}] pp "
            f"over {n} seeds ({METHOD}; {measure}).")
    return dict(claim=claim, scope=scope, n_seeds=n, effect=effect, ci_low=low, ci_high=high, measure=measure,
                verdict=verdict, line=line)


def decide(low: float, high: float) -> str:
    """Supported when the interval lies above 0, contradicted when below, inconclusive when it holds 0."""
    return "supported" if low > 0 else "contradicted" if high < 0 else "inconclusive"


def transfer_vs_scratch(paired: pd.DataFrame, claim: str, scope_cols: list[str]) -> list[dict]:
    """Transfer beats its matched scratch baseline: diff = scratch_test_error - test_error per pair."""
    diffs = paired.assign(diff=paired["scratch_test_error"] - paired["test_error"])
    return verdict_rows(diffs, claim, scope_cols)


def surrogate_contrast(transfer: pd.DataFrame, claim: str, treated: pd.Series, control: pd.Series) -> list[dict]:
    """Treated surrogates lower a target's accuracy more than control ones, per attack setting.

    For each target run: mean adv_acc under control surrogates minus mean under treated ones, kept only
    where the target was attacked by both; the target's seed is the pairing unit.
    """
    keys = ["attack", "eps", "target_run_id"]
    treated_acc = transfer[treated].groupby(keys)["adv_acc"].mean()
    control_acc = transfer[control].groupby(keys)["adv_acc"].mean()
    seeds = transfer.groupby(keys)["target_seed"].first()
    diffs = pd.DataFrame({"diff": control_acc - treated_acc, "seed": seeds}).reset_index()
    return verdict_rows(diffs, claim, ["attack", "eps"])


def all_verdicts(finetune: pd.DataFrame, adder: pd.DataFrame, transfer: pd.DataFrame) -> pd.DataFrame:
    """Every claim the tables can speak to; a claim whose table is empty yields no row."""
    rows = transfer_vs_scratch(finetune, "finetune_beats_scratch", ["target", "size"])
    rows += transfer_vs_scratch(adder, ADDER_CLAIM, ["size"])
    # The claims are about pretrained surrogates: white-box references (the target itself, which shares
    # its own source) and scratch surrogates would bias either side. eq(True) / eq(False) rather than
    # astype(bool): an evaluation with a missing flag belongs to neither side.
    pretrained = transfer[transfer["surrogate_stage"] == names.PRETRAIN]
    same, other = pretrained["same_source"].eq(True), pretrained["same_source"].eq(False)
    rows += surrogate_contrast(pretrained, "same_source_lowers_more", same, other)
    rows += surrogate_contrast(pretrained, "parent_beats_unrelated", pretrained["is_parent"].eq(True),
                               other & pretrained["is_parent"].eq(False))
    return pd.DataFrame(rows, columns=[c.name for c in SCHEMAS["verdicts"]])


def _fmt(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
