"""Transferability: how well each estimator's ranking of the pretraining sources predicts fine-tuned test error.

For every target × arch × fine-tune setting measured for at least 2 sources, and every estimator (LEEP, NCE,
H-score, LogME; xfer.estimators): Kendall's τ-b between the estimator's score and minus the measured test error,
each a mean over seeds per source; a percentile bootstrap interval of τ over seeds; and the regret of trusting the
ranking, i.e. fine-tuning only its top-ranked source (top 1) or its TOP_K best-ranked ones (what --prune-sources
does). A setting is every fine-tune column but the source, the seed and the run's own ids and metrics.

Estimates and fine-tunes pair through lineage, never through names: a fine-tune run and an estimate run that share
a pretrain run and a target. Fine-tune seed s starts from the pretrained model of seed s of its source and arch,
so a pair is one seed of one source, and the seed is the unit the bootstrap resamples.

Fine-tune runs at chance are kept. The verdicts leave them out because a difference between two models that
learnt nothing says nothing; here a source that leaves the target at chance is a real, bad outcome of choosing
it, and warning of exactly that is what a ranking is for.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from reports.schema import SCHEMAS
from reports.tables import recipe_text, size_text
from xfer import names
from xfer.errors import XferError
from xfer.estimators import ESTIMATORS

GROUP = ["target", "arch"]
SETTING = ["size", "freeze_depth", "lr", "optimizer", "head_lr_mult", "unfreeze_epoch", "unfreeze_body", "epochs",
           "epoch_steps"]
MIN_SOURCES = 2        # a ranking needs two sources to order
TOP_K = 2              # regret_top2: pruning to the 2 best-ranked sources (--prune-sources 2)
BOOTSTRAP = 2000       # resamples of the seeds per setting: the 2.5% and 97.5% percentiles rest on 50 each
BOOTSTRAP_SEED = 0     # one fixed generator per setting: the same runs give the same report
LEVEL = 0.95
RANK_JOIN = " > "
PRUNED_COLUMNS = ["target", "arch", "by", "k", "kept", "skipped", "scores"]


def pairs(estimates: pd.DataFrame, finetune: pd.DataFrame) -> pd.DataFrame:
    """One row per target × arch × setting × source × seed: the measured test error (the mean of that seed's runs,
    if a setting was run twice) beside each estimator's score of the same pretrained model on the same target."""
    scores = estimates.groupby(["pretrain_run_id", "target"], as_index=False)[list(ESTIMATORS)].mean()
    runs = finetune.dropna(subset=["pretrain_run_id", "seed", "test_error"])
    joined = runs[GROUP + SETTING + ["source", "seed", "pretrain_run_id", "test_error"]].merge(
        scores, on=["pretrain_run_id", "target"], how="inner")
    keys = GROUP + SETTING + ["source", "seed"]
    return joined.groupby(keys, dropna=False, sort=True, as_index=False)[["test_error", *ESTIMATORS]].mean()


def transferability(estimates: pd.DataFrame, finetune: pd.DataFrame, resamples: int = BOOTSTRAP,
                    seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """The `transferability` table (reports.schema): one row per target × arch × setting × estimator with at least
    MIN_SOURCES sources that have both an estimate and a finished fine-tune in that setting."""
    rows = []
    for setting, measured in pairs(estimates, finetune).groupby(GROUP + SETTING, dropna=False, sort=True):
        sources, at_source = np.unique(measured["source"].astype(str), return_inverse=True)
        seeds, at_seed = np.unique(measured["seed"].astype(int), return_inverse=True)

        def matrix(column: str) -> np.ndarray:   # sources × seeds; NaN where a source has no pair in a seed
            out = np.full((len(sources), len(seeds)), np.nan)
            out[at_source, at_seed] = measured[column].to_numpy(dtype=float)
            return out

        errors = matrix("test_error")
        for estimator in ESTIMATORS:   # a generator each, seeded alike: estimators on the same seeds see the same draws
            agreement = rank_agreement(list(sources), matrix(estimator), errors, resamples, np.random.default_rng(seed))
            if agreement is not None:
                rows.append(dict(zip(GROUP + SETTING, setting)) | {"estimator": estimator} | agreement)
    table = pd.DataFrame(rows) if rows else pd.DataFrame(columns=GROUP + SETTING + ["estimator"])
    table["setting"] = setting_labels(table)
    # The whole pool (size 0) is the largest size: last, as in every other table of the report.
    whole_last = table["size"].astype(float).replace(0, np.inf)
    table = table.iloc[np.lexsort((whole_last.to_numpy(), table["arch"].astype(str), table["target"].astype(str)))]
    return table.reindex(columns=[c.name for c in SCHEMAS["transferability"]]).reset_index(drop=True)


def rank_agreement(sources: list[str], scores: np.ndarray, errors: np.ndarray, resamples: int = BOOTSTRAP,
                   rng: np.random.Generator | None = None) -> dict[str, object] | None:
    """How one estimator's ranking of `sources` agrees with their measured test errors; None with fewer than
    MIN_SOURCES sources that have a score and an error in some seed.

    `scores` and `errors` are sources × seeds (NaN where a source has no pair in that seed). τ is Kendall's τ-b of
    the per-source means (scores against minus errors), null when either side ties every source. Its interval
    resamples the seeds with replacement, recomputes both means on the same resampled seeds and τ on the sources
    still present, and takes the percentiles; with one seed there is nothing to resample, and the interval is null.
    Ties in a ranking are broken by source name; an estimator that ties every source has no pick, and no regret.
    """
    valid = ~(np.isnan(scores) | np.isnan(errors))
    kept = valid.any(axis=1)
    if kept.sum() < MIN_SOURCES:
        return None
    sources = [s for s, k in zip(sources, kept) if k]
    seeds = valid[kept].any(axis=0)
    scores, errors, valid = scores[kept][:, seeds], errors[kept][:, seeds], valid[kept][:, seeds]
    score, error = (weighted_means(np.ones((1, seeds.sum())), values, valid)[0] for values in (scores, errors))
    tau = float(kendall_tau_b(score, -error)[0])
    low = high = np.nan
    if seeds.sum() > 1 and np.isfinite(tau):
        counts = bootstrap_counts(int(seeds.sum()), resamples, rng or np.random.default_rng(BOOTSTRAP_SEED))
        taus = kendall_tau_b(weighted_means(counts, scores, valid), -weighted_means(counts, errors, valid))
        taus = taus[np.isfinite(taus)]
        if len(taus):
            low, high = np.percentile(taus, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    ranking = sorted(range(len(sources)), key=lambda i: (-score[i], sources[i]))
    measured = sorted(range(len(sources)), key=lambda i: (error[i], sources[i]))
    chooses = np.ptp(score) > 0
    best = error[measured[0]]
    return {
        "n_sources": len(sources), "n_seeds": int(seeds.sum()),
        "tau": tau if np.isfinite(tau) else np.nan, "tau_low": low, "tau_high": high,
        "ranking": RANK_JOIN.join(sources[i] for i in ranking),
        "measured_ranking": RANK_JOIN.join(sources[i] for i in measured),
        "pick": sources[ranking[0]] if chooses else None, "best": sources[measured[0]],
        "regret_top1": error[ranking[0]] - best if chooses else np.nan,
        "regret_top2": min(error[i] for i in ranking[:TOP_K]) - best if chooses else np.nan,
        "sources": sources, "source_scores": [float(v) for v in score], "source_errors": [float(v) for v in error],
    }


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's τ-b of each row of `x` against the same row of `y` (1-d inputs are one row): (concordant −
    discordant pairs) / sqrt(pairs untied in x × pairs untied in y), over the pairs with no NaN; NaN where either
    side ties every pair. Vectorised over rows because the bootstrap needs thousands of τ per setting, and
    scipy.stats.kendalltau is one call per τ (the tests check the two agree)."""
    x, y = np.atleast_2d(x), np.atleast_2d(y)
    first, second = np.triu_indices(x.shape[1], k=1)
    dx, dy = np.sign(x[:, first] - x[:, second]), np.sign(y[:, first] - y[:, second])
    usable = ~(np.isnan(dx) | np.isnan(dy))
    dx, dy = np.where(usable, dx, 0.0), np.where(usable, dy, 0.0)
    untied = np.sqrt((dx != 0).sum(axis=1) * (dy != 0).sum(axis=1))
    return np.divide((dx * dy).sum(axis=1), untied, out=np.full(len(x), np.nan), where=untied > 0)


def bootstrap_counts(seeds: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """resamples × seeds: how often each seed is drawn when `seeds` seeds are drawn with replacement."""
    draws = rng.integers(0, seeds, size=(resamples, seeds))
    return (draws[:, :, None] == np.arange(seeds)).sum(axis=1).astype(float)


def weighted_means(counts: np.ndarray, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per resample (rows of `counts`, seed weights) the mean of each source's `values` (sources × seeds) over its
    valid seeds; NaN for a source none of whose valid seeds was drawn."""
    weights = valid.astype(float)
    total = counts @ (np.where(valid, values, 0.0) * weights).T
    drawn = counts @ weights.T
    return np.divide(total, drawn, out=np.full(total.shape, np.nan), where=drawn > 0)


def setting_labels(settings: pd.DataFrame) -> pd.Series:
    """A label per row of `settings` (target, arch and the SETTING columns): ``n1000/f4`` and the recipe as model
    labels spell it (``/sgd/head10x``), then ``/lr0.01``, ``/12ep``, ``/50steps`` only where the lr, epochs or steps
    differ between the settings of the same target and arch (a grid mostly fixes them)."""
    varying = {column: settings.groupby(GROUP, dropna=False)[column].transform(lambda v: v.nunique(dropna=False) > 1)
               for column in ("lr", "epochs", "epoch_steps")}

    def label(i: int, row: pd.Series) -> str:
        parts = [f"n{size_text(row['size'])}/f{'?' if pd.isna(row['freeze_depth']) else int(row['freeze_depth'])}",
                 recipe_text(row)]
        if varying["lr"].iloc[i]:
            parts.append(f"/lr{row['lr']:g}")
        if varying["epochs"].iloc[i]:
            parts.append(f"/{'?' if pd.isna(row['epochs']) else int(row['epochs'])}ep")
        if varying["epoch_steps"].iloc[i]:
            parts.append("/pass" if pd.isna(row["epoch_steps"]) else f"/{int(row['epoch_steps'])}steps")
        return "".join(parts)

    return pd.Series([label(i, row) for i, (_, row) in enumerate(settings.iterrows())], index=settings.index,
                     dtype=object)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per target × arch × estimator, over its settings: how many, mean τ (over those with one), how often the pick
    was the best source, and the mean regrets of fine-tuning only the top 1 and top TOP_K sources."""
    columns = GROUP + ["estimator", "settings", "mean_tau", "pick_is_best", "mean_regret_top1", "mean_regret_top2"]
    if table.empty:
        return pd.DataFrame(columns=columns)
    grouped = table.assign(pick_is_best=table["regret_top1"].eq(0).where(table["regret_top1"].notna())).groupby(
        GROUP + ["estimator"], sort=False)
    out = grouped.agg(settings=("setting", "size"), mean_tau=("tau", "mean"), pick_is_best=("pick_is_best", "mean"),
                      mean_regret_top1=("regret_top1", "mean"), mean_regret_top2=("regret_top2", "mean")).reset_index()
    order = {name: i for i, name in enumerate(ESTIMATORS)}
    return out.sort_values(GROUP + ["estimator"], key=lambda c: c.map(order) if c.name == "estimator" else c,
                           kind="stable").reset_index(drop=True)[columns]


def pruned_groups(tag: str | None) -> pd.DataFrame:
    """The sources --prune-sources skipped, from the experiment tag names.TAG_PRUNED: one row per target × arch with
    the estimator it ranked by, K, the kept and skipped sources and every source's score (empty when the tag is
    absent or empty: the last grid pruned nothing). A tag that is not that JSON raises XferError naming it."""
    if not tag:
        return pd.DataFrame(columns=PRUNED_COLUMNS)
    try:
        found = json.loads(tag)
        rows = [{"target": g["target"], "arch": g["arch"], "by": found["by"], "k": int(found["k"]),
                 "kept": list(g["kept"]), "skipped": list(g["skipped"]), "scores": dict(g.get("scores", {}))}
                for g in found["groups"]]
    except (ValueError, TypeError, KeyError) as error:
        raise XferError(f"the experiment tag {names.TAG_PRUNED} is not the JSON --prune-sources writes ({{'k', 'by', "
                        f"'groups': [{{'target', 'arch', 'kept', 'skipped', 'scores'}}]}}): {error!r}; the report "
                        "leaves out which sources were skipped") from error
    return pd.DataFrame(rows, columns=PRUNED_COLUMNS)
