"""Transferability estimators against measured fine-tuning: τ, its bootstrap interval, the regrets, the pruning note.

The unit tests build the estimates and finetune tables by hand (as reports.tables gives them) with answers worked
out on paper; the last test plants estimate and fine-tune runs on the session's real MLflow server and reads the
report's Parquet, figure and Markdown back.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from tracking_fixtures import Server

from reports import build_report, markdown
from reports.schema import SCHEMAS
from reports.transferability import (BOOTSTRAP, TOP_K, kendall_tau_b, pruned_groups, summary, transferability)
from xfer import names, tracking
from xfer.errors import XferError
from xfer.estimators import ESTIMATORS

TARGET, ARCH = "mnist", "resnet_mini"


def _frames(errors: dict[tuple[str, int], list[float]], scores: dict[str, dict[str, list[float]]],
            freeze: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The estimates and finetune tables: `errors[(source, size)]` is the test error per seed (NaN: no run),
    `scores[source][estimator]` the score per seed; an estimator not given scores 0 (ties every source)."""
    estimates = [{"run_id": f"e-{source}-{seed}", "pretrain_run_id": f"p-{source}-{seed}", "source": source,
                  "target": TARGET, "arch": ARCH, "seed": seed,
                  **{name: by_name.get(name, [0.0] * len(by_name["logme"]))[seed] for name in ESTIMATORS}}
                 for source, by_name in scores.items() for seed in range(len(by_name["logme"]))]
    finetune = [{"run_id": f"f-{source}-{size}-{seed}", "pretrain_run_id": f"p-{source}-{seed}", "source": source,
                 "target": TARGET, "arch": ARCH, "size": size, "freeze_depth": freeze, "lr": 1e-3, "seed": seed,
                 "optimizer": "adamw", "head_lr_mult": 1.0, "unfreeze_body": True, "epochs": 10, "test_error": error}
                for (source, size), by_seed in errors.items() for seed, error in enumerate(by_seed)
                if not np.isnan(error)]
    return (pd.DataFrame(estimates).reindex(columns=[c.name for c in SCHEMAS["estimates"]]),
            pd.DataFrame(finetune).reindex(columns=[c.name for c in SCHEMAS["finetune"]]))


def _row(table: pd.DataFrame, estimator: str, size: int = 100) -> pd.Series:
    [row] = table[(table["estimator"] == estimator) & (table["size"] == size)].to_dict("records")
    return pd.Series(row)


# Four sources, two seeds; measured error a < b < c < d at n=100 (a is best), seed 1 a point worse than seed 0.
ERRORS = {("a", 100): [0.10, 0.11], ("b", 100): [0.20, 0.21], ("c", 100): [0.30, 0.31], ("d", 100): [0.40, 0.41]}
SCORES = {  # per source: logme orders them exactly, leep exactly backwards, h_score swaps the best two (c, d kept)
    "a": {"logme": [4.0, 4.1], "leep": [-4.0, -4.1], "h_score": [2.9, 3.0]},
    "b": {"logme": [3.0, 3.1], "leep": [-3.0, -3.1], "h_score": [4.0, 4.1]},
    "c": {"logme": [2.0, 2.1], "leep": [-2.0, -2.1], "h_score": [2.0, 2.1]},
    "d": {"logme": [1.0, 1.1], "leep": [-1.0, -1.1], "h_score": [1.0, 1.1]},
}


def test_tau_is_one_for_the_measured_order_minus_one_reversed_and_two_thirds_with_one_discordant_pair() -> None:
    table = transferability(*_frames(ERRORS, SCORES))
    assert set(table["estimator"]) == set(ESTIMATORS)
    assert table["n_sources"].eq(4).all() and table["n_seeds"].eq(2).all()
    logme, leep, h_score = (_row(table, name) for name in ("logme", "leep", "h_score"))
    assert logme["tau"] == 1.0 and leep["tau"] == -1.0
    assert h_score["tau"] == pytest.approx((6 - 2 * 1) / 6)   # 6 pairs, (a, b) the only discordant one
    assert logme["ranking"] == logme["measured_ranking"] == "a > b > c > d"
    assert leep["ranking"] == "d > c > b > a" and h_score["ranking"] == "b > a > c > d"
    assert list(logme["sources"]) == ["a", "b", "c", "d"]
    assert np.allclose(logme["source_scores"], [4.05, 3.05, 2.05, 1.05])
    assert np.allclose(logme["source_errors"], [0.105, 0.205, 0.305, 0.405])
    assert logme["setting"] == "n100/f0"


def test_regret_is_the_picks_measured_error_minus_the_best_and_top2_the_better_of_the_first_two() -> None:
    table = transferability(*_frames(ERRORS, SCORES))
    logme, leep, h_score = (_row(table, name) for name in ("logme", "leep", "h_score"))
    assert (logme["pick"], logme["best"], logme["regret_top1"], logme["regret_top2"]) == ("a", "a", 0.0, 0.0)
    # leep picks d (0.405) over the best a (0.105); its top two, d and c, hold 0.305 at best
    assert leep["pick"] == "d" and leep["regret_top1"] == pytest.approx(0.30)
    assert leep["regret_top2"] == pytest.approx(0.20)
    # h_score picks b: 10 points worse than a; but a is its second, so fine-tuning its top 2 loses nothing
    assert h_score["pick"] == "b" and h_score["regret_top1"] == pytest.approx(0.10) and h_score["regret_top2"] == 0.0
    [two] = summary(transferability(*_frames({k: v for k, v in ERRORS.items() if k[0] in "cd"},
                                             {s: SCORES[s] for s in "cd"}))).query("estimator == 'leep'").itertuples()
    assert two.mean_regret_top2 == 0.0 and two.mean_regret_top1 == pytest.approx(0.10)   # 2 sources: top 2 is both


def test_an_estimator_that_ties_every_source_has_no_tau_no_pick_and_no_regret() -> None:
    table = transferability(*_frames(ERRORS, SCORES))
    nce = _row(table, "nce")   # not given: 0 for every source
    assert np.isnan(nce["tau"]) and np.isnan(nce["tau_low"]) and np.isnan(nce["tau_high"])
    assert nce["pick"] is None or pd.isna(nce["pick"])
    assert np.isnan(nce["regret_top1"]) and np.isnan(nce["regret_top2"])
    assert nce["ranking"] == "a > b > c > d"   # ties by name
    equal = transferability(*_frames({(s, 100): [0.2, 0.2] for s in "abcd"}, SCORES))   # fine-tuning ties them all
    assert equal["tau"].isna().all() and equal.loc[equal["estimator"] != "nce", "regret_top1"].eq(0).all()
    assert np.isnan(kendall_tau_b(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0]))[0])


def test_tau_b_agrees_with_scipy_with_ties_and_missing_sources() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 4, (50, 6)).astype(float), rng.integers(0, 4, (50, 6)).astype(float)
    x[::7, 2] = np.nan
    ours = kendall_tau_b(x, y)
    theirs = [stats.kendalltau(a, b, nan_policy="omit").statistic for a, b in zip(x, y)]
    assert np.allclose(ours, theirs, equal_nan=True) and np.isfinite(ours).sum() > 40


def test_bootstrap_interval_holds_tau_is_reproducible_and_is_null_with_one_seed() -> None:
    rng = np.random.default_rng(0)
    errors = {(s, 100): list(0.1 * i + rng.normal(0, 0.08, 5)) for i, s in enumerate("abcd")}
    scores = {s: {"logme": list(-i + rng.normal(0, 1.0, 5))} for i, s in enumerate("abcd")}
    first, again = (transferability(*_frames(errors, scores)) for _ in range(2))
    logme = _row(first, "logme")
    assert logme["n_seeds"] == 5 and logme["tau_low"] <= logme["tau"] <= logme["tau_high"]
    assert logme["tau_low"] < logme["tau_high"]   # the seeds disagree: the interval has width
    pd.testing.assert_frame_equal(first, again)
    fewer = transferability(*_frames(errors, scores), resamples=BOOTSTRAP // 4)
    assert _row(fewer, "logme")["tau"] == logme["tau"]   # the point estimate does not depend on resampling
    one = _row(transferability(*_frames({k: v[:1] for k, v in errors.items()},
                                        {s: {"logme": v["logme"][:1]} for s, v in scores.items()})), "logme")
    assert one["n_seeds"] == 1 and np.isfinite(one["tau"]) and np.isnan(one["tau_low"]) and np.isnan(one["tau_high"])


def test_settings_of_one_source_are_dropped_and_only_paired_runs_count() -> None:
    errors = dict(ERRORS) | {("a", 500): [0.1, 0.1], ("b", 1000): [0.2, np.nan], ("c", 1000): [np.nan, 0.3]}
    estimates, finetune = _frames(errors, SCORES)
    stray = finetune.iloc[[0]].assign(run_id="stray", pretrain_run_id="p-other-0", source="e", test_error=0.0)
    at_chance = finetune.iloc[[0]].assign(run_id="again", test_error=0.9, at_chance=True)  # a's seed 0, run twice
    table = transferability(estimates, pd.concat([finetune, stray, at_chance], ignore_index=True))
    assert set(table["size"]) == {100, 1000}   # n=500 has only a
    assert set(_row(table, "logme", 1000)["sources"]) == {"b", "c"} and _row(table, "logme", 1000)["n_seeds"] == 2
    logme = _row(table, "logme")
    assert "e" not in logme["sources"]   # fine-tuned from a model with no estimate: nothing to rank it by
    # the run at chance is kept, averaged with the same seed's other run: a's mean error (0.5 + 0.11) / 2
    assert logme["source_errors"][0] == pytest.approx(((0.10 + 0.9) / 2 + 0.11) / 2)
    assert logme["best"] == "b" and logme["regret_top1"] == pytest.approx(0.305 - 0.205)
    assert transferability(estimates.iloc[:0], finetune).empty


def test_settings_get_labels_that_tell_them_apart() -> None:
    estimates, finetune = _frames(ERRORS, SCORES)
    sgd = finetune.assign(optimizer="sgd", head_lr_mult=10.0, lr=1e-2, run_id=finetune["run_id"] + "-sgd")
    whole = finetune.assign(size=0, run_id=finetune["run_id"] + "-all")   # the whole training pool
    table = transferability(estimates, pd.concat([whole, finetune, sgd], ignore_index=True))
    assert list(dict.fromkeys(table["setting"])) == ["n100/f0/lr0.001", "n100/f0/sgd/head10x/lr0.01", "nall/f0/lr0.001"]


def test_summary_means_over_settings_in_estimator_order() -> None:
    errors = dict(ERRORS) | {(s, 1000): [0.4 - 0.1 * i] * 2 for i, s in enumerate("abcd")}   # n=1000: reversed
    table = summary(transferability(*_frames(errors, SCORES)))
    assert list(table["estimator"]) == list(ESTIMATORS)
    logme = table.set_index("estimator").loc["logme"]
    assert (logme["settings"], logme["mean_tau"], logme["pick_is_best"]) == (2, 0.0, 0.5)
    assert logme["mean_regret_top1"] == pytest.approx((0 + 0.3) / 2)


PRUNED = {"k": 2, "by": "logme", "groups": [  # as xfer.estimate writes it: e was kept unranked (no estimate run)
    {"target": TARGET, "arch": ARCH, "kept": ["a", "b", "e"], "skipped": ["c", "d"], "unscored": ["e"],
     "scores": {"a": -0.41, "b": -0.52, "c": -0.9, "d": -1.25}}]}


def test_the_pruning_tag_reads_back_and_the_section_names_the_skipped_sources() -> None:
    pruned = pruned_groups(json.dumps(PRUNED))
    assert pruned[["target", "arch", "by", "k"]].values.tolist() == [[TARGET, ARCH, "logme", 2]]
    assert pruned_groups("").empty and pruned_groups(None).empty
    with pytest.raises(XferError, match=names.TAG_PRUNED):
        pruned_groups('{"k": 2}')
    only_kept = transferability(*_frames({k: v for k, v in ERRORS.items() if k[0] in "ab"}, SCORES))
    text = markdown.pruned_section(pruned, only_kept)
    assert text.startswith("\n## Sources skipped by --prune-sources\n")
    assert "by `logme` and fine-tuned only the best K = 2" in text and "fine-tune cells were not run" in text
    assert (f"| {TARGET} | {ARCH} | logme | 2 | a (-0.41), b (-0.52), e (no estimate) | c (-0.9), d (-1.25) | none |"
            in text)
    assert "each τ is over 2 sources (+1 or −1)" in text
    earlier = markdown.pruned_section(pruned, transferability(*_frames(ERRORS, SCORES)))   # c, d measured before
    assert "| c, d |" in earlier and "each τ is over" not in earlier
    assert markdown.pruned_section(pruned_groups(""), only_kept) == ""


def test_the_schema_states_the_bootstrap_and_k_the_code_uses() -> None:
    docs = {c.name: c.doc for c in SCHEMAS["transferability"]}
    assert f"{BOOTSTRAP} resamples" in docs["tau_low"] and f"{TOP_K} top-ranked" in docs["regret_top2"]
    assert [c.name for c in SCHEMAS["estimates"]][7:11] == list(ESTIMATORS)


# ---- the real path: runs on the session's MLflow server, a report built from them ----
SEEDS = (0, 1)
MEASURED = {"a": {100: 0.10, 1000: 0.05}, "b": {100: 0.20, 1000: 0.08}, "c": {100: 0.30, 1000: 0.04}}   # d skipped
PLANTED_SCORES = {"a": {"logme": 3.0, "leep": -3.0, "nce": -1.0, "h_score": 2.0},
                  "b": {"logme": 2.0, "leep": -2.0, "nce": -1.0, "h_score": 3.0},
                  "c": {"logme": 1.0, "leep": -1.0, "nce": -1.0, "h_score": 1.0},
                  "d": {"logme": 0.5, "leep": -0.5, "nce": -1.0, "h_score": 0.5}}


def _run(experiment: str, stage: str, key: str, tags: dict[str, str], metrics: dict[str, float],
         params: dict[str, object] | None = None) -> str:
    with tracking.start_run(experiment, stage, key, tags=tags, params=params) as run:
        run.log_metrics(metrics)
    return run.run_id


def test_a_report_ranks_the_planted_sources_and_names_the_skipped_ones(mlflow_server: Server, experiment: str,
                                                                      tmp_path: Path) -> None:
    for source in PLANTED_SCORES:
        for seed in SEEDS:
            lineage = {names.TAG_SOURCE: source, names.TAG_ARCH: ARCH, names.TAG_SEED: str(seed)}
            pretrain = _run(experiment, names.PRETRAIN, f"p-{source}-{seed}", lineage, {names.TEST_ERROR: 0.01})
            paired = lineage | {names.TAG_TARGET: TARGET, names.TAG_PRETRAIN_RUN: pretrain}
            scores = {name: value + 0.01 * seed for name, value in PLANTED_SCORES[source].items()}
            _run(experiment, names.ESTIMATE, f"e-{source}-{seed}", paired, scores | {
                names.ESTIMATE_EXAMPLES: 600, names.FEATURES_SECONDS: 0.5, names.SECONDS: 1.0,
                **{f"{name}_seconds": 0.01 for name in ESTIMATORS}})
            sizes = MEASURED.get(source, {}) | ({500: 0.2} if source == "a" else {})   # n=500: a alone, dropped
            for size, error in sizes.items():
                freeze = 4 if size == 1000 else 0
                _run(experiment, names.FINETUNE, f"f-{source}-{size}-{seed}",
                     paired | {names.TAG_SIZE: str(size), names.TAG_FREEZE: str(freeze)},
                     {names.TEST_ERROR: error + 0.01 * seed, names.TEST_ACC: 1 - error - 0.01 * seed},
                     {"train.lr": 1e-3, "train.optimizer": "adamw", "train.freeze_depth": freeze})
    tracking.set_experiment_tags(experiment, {names.TAG_PRUNED: json.dumps(
        {"k": 3, "by": "logme", "groups": [{"target": TARGET, "arch": ARCH, "kept": ["a", "b", "c"], "skipped": ["d"],
                                            "scores": {s: v["logme"] for s, v in PLANTED_SCORES.items()}}]})})
    result = build_report(experiment, tmp_path / "report", log_to_mlflow=False)
    assert not any("estimate" in m for m in result.missing)

    estimates = pd.read_parquet(result.out / "data" / "estimates.parquet")
    assert len(estimates) == 8 and estimates["examples"].eq(600).all() and estimates["pretrain_run_id"].notna().all()
    table = pd.read_parquet(result.out / "data" / "transferability.parquet")
    assert len(table) == 2 * len(ESTIMATORS) and set(table["setting"]) == {"n100/f0", "n1000/f4"}
    by = table.set_index(["setting", "estimator"])
    assert by.loc[("n100/f0", "logme"), "tau"] == 1.0 and by.loc[("n100/f0", "leep"), "tau"] == -1.0
    assert by.loc[("n100/f0", "h_score"), "tau"] == pytest.approx(1 / 3)
    # n=1000: c is best, logme ranks it last: (a, b) concordant, (a, c) and (b, c) not
    assert by.loc[("n1000/f4", "logme"), "tau"] == pytest.approx(-1 / 3)
    assert by.loc[("n1000/f4", "logme"), "regret_top1"] == pytest.approx(0.01)
    assert by.loc[("n1000/f4", "logme"), ["pick", "best"]].tolist() == ["a", "c"]
    assert by.loc[("n100/f0", "logme"), "tau_low"] == by.loc[("n100/f0", "logme"), "tau_high"] == 1.0   # seeds agree
    assert by.xs("nce", level="estimator")["tau"].isna().all()

    pngs = {p.stem: p for p in result.files if p.suffix == ".png"}
    figure = pngs[f"transferability_{TARGET}_{ARCH}"]
    assert matplotlib.image.imread(figure).std() > 0.05 and "<svg" in figure.with_suffix(".svg").read_text()[:2000]
    text = (result.out / "tables" / "transferability.md").read_text()
    assert "### Summary: mean over settings" in text and f"### {TARGET} / {ARCH}" in text
    assert "| logme score | 3.005 (1) | 2.005 (2) | 1.005 (3) | 0.505 (4) |" in text
    assert "| n1000/f4 error (%) | 5.50 (2) | 8.50 (3) | 4.50 (1) |  |" in text   # d: estimated, never fine-tuned
    skipped = text[text.index("## Sources skipped by --prune-sources"):]
    assert "| d (0.5) | none |" in skipped and "K = 3" in skipped
    page = (result.out / "index.html").read_text()
    section = page[page.index("<h3>Transferability estimators"):]
    assert 'href="tables/transferability.md"' in section and "skipped: mnist/resnet_mini: d" in section
    assert section.count("<tr><td>") == len(ESTIMATORS)
