"""Markdown tables in the shape of the seed study's tables, built from the report tables.

Cells read "mean ± sd" over seeds, in percent; sizes of 0 (the whole training pool) read "all".
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from reports.tables import size_order, size_text
from reports.transferability import TOP_K, summary
from xfer import names
from xfer.estimators import ESTIMATORS


def render(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of `df` (index included when named)."""
    if any(df.index.names):
        df = df.reset_index()
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def mean_sd(values: pd.Series) -> str:
    """Percent "mean ± sd (n)"; a single value has no spread to show."""
    values = values.dropna()
    if values.empty:
        return ""
    if len(values) == 1:
        return f"{100 * values.iloc[0]:.2f}"
    return f"{100 * values.mean():.2f} ± {100 * values.std():.2f} ({len(values)})"


def pretrain_table(pretrain: pd.DataFrame) -> str:
    """Pretrain test accuracy (%): rows source datasets, columns archs."""
    table = pretrain.pivot_table(index="source", columns="arch", values="test_acc", aggfunc=mean_sd, fill_value="")
    return "## Pretraining: test accuracy (%) per source × arch\n\n" + render(table.rename_axis(columns=None))


def finetune_table(finetune: pd.DataFrame) -> str:
    """Fine-tune test accuracy (%): rows (arch, source, freeze depth) plus each arch's scratch row, columns sizes."""
    scratch = (finetune.dropna(subset=["scratch_run_id"]).drop_duplicates("scratch_run_id")
               .assign(source="scratch", freeze_depth="–", test_acc=lambda d: d["scratch_test_acc"]))
    rows = pd.concat([finetune.assign(freeze_depth=finetune["freeze_depth"].astype("string")), scratch])
    table = rows.pivot_table(index=["target", "arch", "source", "freeze_depth"], columns="size", values="test_acc",
                             aggfunc=mean_sd, fill_value="")
    table = table[size_order(rows["size"])].rename(columns=size_text).rename_axis(columns=None)
    return "## Fine-tuning: test accuracy (%) per size (columns) and freeze depth\n\n" + render(table)


def attacks_table(transfer: pd.DataFrame) -> str:
    """Attacks from A (pretrained on the target's source) vs B (other sources) on C (the fine-tuned target), in %.

    A includes C's parent; the white-box column is C attacked on itself, the reference for how much an attack
    can do at all.
    """
    def side(mask: pd.Series, name: str) -> pd.Series:
        return transfer[mask].groupby(keys)["adv_acc"].mean().rename(name)

    keys = ["target_label", "attack", "eps"]
    pretrained = transfer["surrogate_stage"].eq(names.PRETRAIN)
    table = pd.concat([
        transfer.groupby(keys)["clean_acc"].mean().rename("clean"),
        side(pretrained & transfer["same_source"].eq(True), "A: same source"),
        side(pretrained & transfer["is_parent"].eq(True), "A: parent"),
        side(pretrained & transfer["same_source"].eq(False), "B: other sources"),
        side(transfer["surrogate_run_id"] == transfer["target_run_id"], "C itself (white-box)"),
    ], axis=1)
    table["A − B (pp)"] = table["A: same source"] - table["B: other sources"]
    table = (100 * table).round(2).astype(object).where(table.notna(), "")
    return ("## Attacks: target C's accuracy (%) on adversarial examples from A (same source) vs B (other sources)"
            "\n\n" + render(table.rename_axis(index=["C (target)", "attack", "eps"])))


def verdicts_list(verdicts: pd.DataFrame) -> str:
    """Every verdict line (headlines and the narrower scopes beneath them) as a Markdown list, per claim."""
    parts = ["## Verdicts, every scope\n"]
    for claim_id, rows in verdicts.groupby("claim_id", sort=True):
        parts.append(f"### Claim {claim_id}\n\n" + "".join(
            f"- {'**headline** ' if headline else ''}{line}\n" for headline, line in zip(rows["headline"], rows["line"])))
    return "\n".join(parts)


def claims_table(claims: pd.DataFrame, at_chance: pd.DataFrame | None = None) -> str:
    """The claims table: one row per claim with its verdict, effect and 95% interval in pp, Holm's p, and its figure;
    the cells at chance that every verdict leaves out are counted beneath."""
    def pp(value: float) -> str:
        return "" if pd.isna(value) else f"{100 * value:+.2f}"

    table = pd.DataFrame({
        "#": claims["claim_id"], "claim": claims["text"], "seed": claims["seed_doc"], "scope": claims["scope"],
        "effect (pp)": claims["effect"].map(pp),
        "95% CI (pp)": [f"[{pp(lo)}, {pp(hi)}]" if pd.notna(lo) else "" for lo, hi in zip(claims["ci_low"], claims["ci_high"])],
        "p (Holm)": [f"{p:.2g} ({h:.2g})" if pd.notna(p) and pd.notna(h) else "" for p, h in
                     zip(claims["p_value"], claims["p_holm"])],
        "seeds": claims["n_seeds"], "verdict": claims["verdict"], "why": claims["why"].fillna(""),
        "figure": [f"[{Path(f).name}](../{f})" if isinstance(f, str) else "" for f in claims["figure"]],
    })
    return ("## Claims: each seed claim's headline verdict (paired t over seeds, 95% CI)\n\n"
            "Effect > 0 favours the claim. The headlines are Holm-adjusted together (p, and Holm's p in brackets): "
            "a headline is decided only when Holm's p < 0.05. Intervals are conditional on the fixed test set. "
            "`verdicts.md` lists every scope beneath each headline (descriptive, uncorrected).\n\n" + render(table)
            + chance_note(at_chance))


def chance_note(at_chance: pd.DataFrame | None) -> str:
    """How many cells are at chance and left out of every verdict (nothing when none is)."""
    if at_chance is None or at_chance.empty:
        return ""
    by_stage = ", ".join(f"{n} {stage}" for stage, n in at_chance["stage"].value_counts().sort_index().items())
    return (f"\n{len(at_chance)} cell(s) at chance (test accuracy within 5 pp of 1 / classes: {by_stage}) are left out "
            "of every verdict; the finetune, scratch and adder tables flag them (`at_chance`).\n")


def replication_table(replicated: pd.DataFrame) -> str:
    """The replication table: each seed row, the seed's value, xfer's mean and 95% interval over seeds (n), the
    difference in pp, and the word; rows not run keep their reason."""
    def pct(value: float) -> str:
        return "" if pd.isna(value) else f"{100 * value:.2f}"

    table = pd.DataFrame({
        "seed": replicated["seed_doc"], "row": replicated["row"], "metric": replicated["metric"],
        "seed (%)": replicated["seed_value"].map(pct), "xfer (%)": replicated["mean"].map(pct),
        "95% CI (%)": [f"[{pct(lo)}, {pct(hi)}]" if pd.notna(lo) else "" for lo, hi in
                       zip(replicated["ci_low"], replicated["ci_high"])],
        "n": replicated["n_seeds"], "xfer − seed (pp)": (100 * replicated["difference"]).map(
            lambda d: "" if pd.isna(d) else f"{d:+.2f}"),
        "word": replicated["word"], "why": replicated["why"].fillna(""), "where in the seed": replicated["where"],
    })
    return ("## Replication: the seeds' published numbers beside xfer's (mean and 95% t interval over seeds)\n\n"
            "The intervals are over seeds on one fixed test set (the dataset's own), so they cover training "
            "randomness, not test-set sampling. `word`: the seed's value lies within xfer's interval, or xfer's "
            "interval lies above or below it.\n\n" + render(table))


def transferability_tables(estimates: pd.DataFrame, ranked: pd.DataFrame, pruned: pd.DataFrame) -> str:
    """The transferability table: the summary per target × arch × estimator first; then per target × arch the
    sources' estimator scores and measured errors side by side, and each setting's τ, interval and regrets; then the
    sources --prune-sources skipped, when it skipped any."""
    def pp(value: float) -> str:
        return "" if pd.isna(value) else f"{100 * value:.2f}"

    def tau(value: float) -> str:
        return "" if pd.isna(value) else f"{value:+.2f}"

    parts = ["## Transferability: each estimator's ranking of the sources beside the measured fine-tuned test error\n\n"
             "Per fine-tune setting measured for 2 or more sources: Kendall's τ-b between each estimator's score and "
             "the measured test error, both means over seeds (+1: the estimator orders the sources as fine-tuning "
             "does; empty when either side ties every source), its 95% percentile bootstrap interval over seeds "
             "(empty with one seed), and the regret of fine-tuning only the estimator's top source (top-1) or its "
             f"top {TOP_K} (top-{TOP_K}: 0 by construction with {TOP_K} sources), in pp of test error. Fine-tunes at "
             "chance are kept: choosing such a source is a real, bad outcome.\n"]
    if len(ranked):
        parts.append("### Summary: mean over settings\n\n" + render(summary_cells(summary(ranked))))
    for (target, arch), rows in ranked.groupby(["target", "arch"], sort=True):
        parts.append(f"### {target} / {arch}\n\n" + _scores_beside_errors(estimates, rows, target, arch)
                     + "\n" + render(pd.DataFrame({
                         "setting": rows["setting"], "estimator": rows["estimator"], "sources": rows["n_sources"],
                         "seeds": rows["n_seeds"], "τ": rows["tau"].map(tau),
                         "95% interval": [f"[{tau(lo)}, {tau(hi)}]" if pd.notna(lo) else "" for lo, hi in
                                          zip(rows["tau_low"], rows["tau_high"])],
                         "ranking": rows["ranking"], "pick": rows["pick"].fillna(""), "best": rows["best"],
                         "regret top-1 (pp)": rows["regret_top1"].map(pp),
                         f"regret top-{TOP_K} (pp)": rows["regret_top2"].map(pp)})))
    return "\n".join(parts) + pruned_section(pruned, ranked)


def summary_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The estimators' summary (`reports.transferability.summary`) as text, for this table and the index page: τ
    signed, the share of settings whose pick was the best in %, regrets in pp."""
    def number(value: float, spec: str, scale: float = 1.0, unit: str = "") -> str:
        return "" if pd.isna(value) else f"{scale * value:{spec}}{unit}"

    return pd.DataFrame({
        "target": table["target"], "arch": table["arch"], "estimator": table["estimator"],
        "settings": table["settings"].astype(str), "mean τ": table["mean_tau"].map(lambda v: number(v, "+.2f")),
        "pick is best": table["pick_is_best"].map(lambda v: number(v, ".0f", 100, "%")),
        "mean regret top-1 (pp)": table["mean_regret_top1"].map(lambda v: number(v, ".2f", 100)),
        f"mean regret top-{TOP_K} (pp)": table["mean_regret_top2"].map(lambda v: number(v, ".2f", 100))})


def _scores_beside_errors(estimates: pd.DataFrame, ranked: pd.DataFrame, target: str, arch: str) -> str:
    """Sources across: each estimator's score (mean over seeds) with its rank, then each setting's measured test
    error (%, mean over seeds) with its rank; 1 = best. A source with an estimate but no fine-tune has no error."""
    own = estimates[(estimates["target"] == target) & (estimates["arch"] == arch)]
    scores = own.groupby(["source", "seed"])[list(ESTIMATORS)].mean().groupby("source").mean()
    errors = {}
    for setting, rows in ranked.groupby("setting", sort=False):
        errors[setting] = pd.Series({s: e for r in rows.itertuples() for s, e in zip(r.sources, r.source_errors)})
    sources = sorted(set(scores.index) | {s for e in errors.values() for s in e.index})
    lines = {f"{name} score": _with_rank(scores[name], ascending=False, digits=".4g") for name in ESTIMATORS}
    lines |= {f"{setting} error (%)": _with_rank(100 * values, ascending=True, digits=".2f")
              for setting, values in errors.items()}
    table = pd.DataFrame.from_dict(lines, orient="index", columns=sources).fillna("")
    table.insert(0, "", table.index)
    return ("Scores (mean over seeds) and measured test error (%, mean over seeds), rank in brackets, 1 = best:\n\n"
            + render(table))


def _with_rank(values: pd.Series, ascending: bool, digits: str) -> dict[str, str]:
    """Each source's value and its rank among them (1 = best; equal values share the better rank)."""
    values = values.dropna()
    ranks = values.rank(ascending=ascending, method="min")
    return {source: f"{value:{digits}} ({int(ranks[source])})" for source, value in values.items()}


def pruned_section(pruned: pd.DataFrame, ranked: pd.DataFrame) -> str:
    """The sources --prune-sources skipped per target × arch, with the estimator, K and every source's score; their
    fine-tune cells were not run, so the measured τ covers only the kept ones (a skipped source an earlier grid
    fine-tuned is named). Nothing when the last grid pruned nothing."""
    if pruned.empty:
        return ""
    by, k = pruned["by"].iloc[0], int(pruned["k"].iloc[0])

    def scored(sources: list[str], scores: dict[str, float]) -> str:   # a source kept unranked has no estimate
        return ", ".join(f"{s} ({scores[s]:.4g})" if s in scores else f"{s} (no estimate)" for s in sources) or "none"

    measured = {(t, a): {s for listed in rows["sources"] for s in listed} for (t, a), rows in
                ranked.groupby(["target", "arch"])} if len(ranked) else {}
    anyway = [[s for s in r.skipped if s in measured.get((r.target, r.arch), set())] for r in pruned.itertuples()]
    table = pd.DataFrame({
        "target": pruned["target"], "arch": pruned["arch"], "by": pruned["by"], "K": pruned["k"],
        "kept (score)": [scored(r.kept, r.scores) for r in pruned.itertuples()],
        "skipped (score)": [scored(r.skipped, r.scores) for r in pruned.itertuples()],
        "skipped but fine-tuned by an earlier grid": [", ".join(found) or "none" for found in anyway]})
    few = (f" With K = {k} and no skipped source measured, each τ is over {k} sources (+1 or −1) and the top-{k} "
           "regret is 0 by construction." if k <= 2 and not any(anyway) else "")
    return ("\n## Sources skipped by --prune-sources\n\n"
            f"The last grid ranked each target × arch's sources by `{by}` and fine-tuned only the best K = {k}. The "
            "sources below were skipped: their fine-tune cells were not run, so the measured τ and regrets above "
            "cover only the kept sources (and any skipped source an earlier grid fine-tuned, named in the last column)."
            f"{few}\n\n" + render(table))
