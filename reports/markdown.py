"""Markdown tables in the shape of the seed study's tables, built from the report tables.

Cells read "mean ± sd" over seeds, in percent; sizes of 0 (the whole training pool) read "all".
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from reports.tables import size_order, size_text
from xfer import names


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
