"""The report's index.html: one self-contained page with relative links, so it opens from disk or an MLflow artifact view.

It opens with "What this grid found": the claims table (each claim's verdict, effect and 95% interval, its
figure), the largest decided effects, and the runs that failed with their reasons.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from reports.markdown import summary_cells
from reports.transferability import TOP_K

SECTIONS = (  # file suffix → section heading, in page order
    (".md", "Tables (Markdown)"),
    (".parquet", "Data (Parquet)"),
    (".json", "Data (JSON)"),
    (".svg", "Figures (SVG)"),
)
# Figures that show a claim's raw numbers, by file-name prefix, linked beside its forest plot.
RELATED = {1: ("accuracy_vs_size",), 2: ("freeze_depth",), 3: ("transfer_",), 4: ("curves_adder_",)}
FIGURE_KINDS = (  # file-name prefix → heading; the first matching prefix wins ("" catches the rest)
    ("claim_", "Claims: forest plots and per-cell grids"),
    ("curves_adder_", "Adder: error curves, transfer arms vs scratch"),
    ("curves_", "Fine-tuning vs scratch: error curves"),
    ("accuracy_vs_size", "Fine-tuning: accuracy against size and freeze depth"),
    ("freeze_depth", "Fine-tuning: accuracy against size and freeze depth"),
    ("transfer_", "Adversarial transfer: target accuracy under each surrogate's examples"),
    ("transferability_", "Transferability estimators: score against fine-tuned test error, per source"),
    ("", "Other figures"),
)
DECIDED = ("supported", "contradicted")
LARGEST = 5          # decided effects listed under "largest effects"
FAILURES_SHOWN = 20  # failed runs listed by name; the rest are counted
VERDICT_STYLE = {"supported": "#d4edda", "contradicted": "#f8d7da", "inconclusive": "#eeeeee",
                 "insufficient seeds": "#fff3cd", "no runs": "#ffffff"}
# The replication table's words (reports.replication): the seed's value inside xfer's interval, or xfer above / below.
REPLICATION_STYLE = {"within the interval": "#d4edda", "above": "#d4edda", "below": "#f8d7da", "too few seeds": "#fff3cd"}
STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
         "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}"
         "td.num{text-align:right;white-space:nowrap}")


def index_page(experiment: str, out: Path, files: list[Path], missing: list[str], verdicts: pd.DataFrame,
               runs: pd.DataFrame, notes: list[str] | None = None, replication: pd.DataFrame | None = None,
               at_chance: pd.DataFrame | None = None, transferability: pd.DataFrame | None = None,
               pruned: pd.DataFrame | None = None) -> str:
    """The page: what to know first (`notes`), what the grid found, what is missing, every verdict, every PNG figure
    inline, links by kind. `transferability` is the estimators' summary (`reports.transferability.summary`),
    `pruned` the sources --prune-sources skipped (`pruned_groups`)."""
    def link(path: Path, text: str | None = None) -> str:
        rel = path.relative_to(out).as_posix()
        return f'<a href="{quote(rel)}">{escape(text or rel)}</a>'

    parts = [f"<h1>xfer report: {escape(experiment)}</h1>"]
    parts += [f'<p class="note"><b>Read this first.</b> {escape(note)}</p>' for note in notes or []]
    parts += ["<h2>What this grid found</h2>",
             claims_section(verdicts, files, link, at_chance), largest_section(verdicts), failures_section(runs)]
    if replication is not None:
        parts.append(replication_section(replication))
    if transferability is not None and (len(transferability) or (pruned is not None and len(pruned))):
        parts.append(transferability_section(transferability, pruned, files, link))
    if missing:
        parts.append("<h2>Missing</h2><p>This report is partial; these parts could not be made:</p><ul>"
                     + "".join(f"<li>{escape(m)}</li>" for m in missing) + "</ul>")
    parts.append(f"<h2>Verdicts, every scope</h2><details><summary>{len(verdicts)} rows: each claim's headline and "
                 "the narrower scopes beneath it</summary><ul>" + "".join(
                     f"<li>{'<b>headline</b> ' if headline else ''}{escape(line)}</li>"
                     for headline, line in zip(verdicts["headline"], verdicts["line"])) + "</ul></details>")
    figures = [p for p in files if p.suffix == ".png"]
    if figures:
        parts.append("<h2>Figures</h2>")
    for heading, chosen in figure_groups(figures):
        parts.append(f"<h3>{heading}</h3>" + "".join(
            f'<figure id="{escape(p.stem)}">{link(p)}<br><img src="{quote(p.relative_to(out).as_posix())}" '
            f'alt="{escape(p.stem)}" style="max-width:100%"></figure>' for p in chosen))
    for suffix, heading in SECTIONS:
        chosen = [p for p in files if p.suffix == suffix]
        if chosen:
            parts.append(f"<h2>{heading}</h2><ul>" + "".join(f"<li>{link(p)}</li>" for p in chosen) + "</ul>")
    body = "\n".join(parts)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>xfer report: {escape(experiment)}'
            f"</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def figure_groups(pngs: list[Path]) -> list[tuple[str, list[Path]]]:
    """The figures under their FIGURE_KINDS heading (the first matching prefix), headings in that order."""
    groups: dict[str, list[Path]] = {heading: [] for _, heading in FIGURE_KINDS}
    for png in pngs:
        groups[next(heading for prefix, heading in FIGURE_KINDS if png.stem.startswith(prefix))].append(png)
    return [(heading, chosen) for heading, chosen in groups.items() if chosen]


def claims_section(verdicts: pd.DataFrame, files: list[Path], link: Callable[..., str],
                   at_chance: pd.DataFrame | None = None) -> str:
    """The claims table: one row per claim 1-7 (its headline), effect and interval in pp, Holm's p, its figures; the
    cells at chance left out of the verdicts counted beneath."""
    pngs = [p for p in files if p.suffix == ".png"]
    rows = []
    for claim in verdicts[verdicts["headline"]].itertuples():
        figure = next((p for p in pngs if isinstance(claim.figure, str) and p.as_posix().endswith(claim.figure)), None)
        prefixes = (f"claim_{claim.claim_id}_cells", *RELATED.get(claim.claim_id, ()))
        related = [p for p in pngs if p.stem.startswith(prefixes) and p != figure]
        links = ([link(figure, "forest plot")] if figure else []) + [link(p, p.stem) for p in related]
        ci = f"[{_pp(claim.ci_low)}, {_pp(claim.ci_high)}]" if pd.notna(claim.ci_low) else ""
        rows.append(
            f"<tr><td>{claim.claim_id}</td><td>{escape(claim.text)}</td><td>{escape(claim.seed_doc)}</td>"
            f"<td>{escape(claim.scope)}</td>"
            f'<td style="background:{VERDICT_STYLE.get(claim.verdict, "#fff")}">{escape(claim.verdict)}</td>'
            f'<td class="num">{_pp(claim.effect)}</td><td class="num">{ci}</td><td class="num">{_p(claim)}</td>'
            f'<td class="num">{claim.n_seeds}</td>'
            f"<td>{escape(claim.why if isinstance(claim.why, str) else '')}</td><td>{'<br>'.join(links)}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("#", "claim", "seed doc", "headline scope", "verdict", "effect (pp)",
                                             "95% CI (pp)", "p (Holm)", "seeds", "why", "figures"))
    chance = ""
    if at_chance is not None and len(at_chance):
        by_stage = ", ".join(f"{n} {stage}" for stage, n in at_chance["stage"].value_counts().sort_index().items())
        chance = (f"<p><b>{len(at_chance)} cell(s) at chance</b> (test accuracy within 5 pp of 1 / classes: {by_stage}) "
                  "are left out of every verdict; the finetune, scratch and adder tables flag them "
                  "(<code>at_chance</code>).</p>")
    return ("<h3>Claims</h3><p>Each seed claim's headline: a paired difference per seed (effect &gt; 0 favours the "
            "claim), 95% CI by Student's t over seeds, conditional on the fixed test set; the seven headlines are "
            "Holm-adjusted together and decided only when Holm's p &lt; 0.05. SCHEMA.md says how each headline is "
            "chosen, and the verdicts below list every scope (descriptive, uncorrected).</p>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table>{chance}")


def replication_section(replication: pd.DataFrame) -> str:
    """The seeds' published numbers beside xfer's, the rows this grid ran first; the rest counted, with a link."""
    ran = replication[replication["n_seeds"] > 0]
    link = '<a href="tables/replication.md">tables/replication.md</a>'
    if ran.empty:
        return (f"<h3>Replication</h3><p>No seed row matches a finished run of this grid (the seeds' rows are on "
                f"their real data and archs: <code>--preset replicate</code>); {link} says why for each.</p>")

    def pct(value: float) -> str:
        return "" if pd.isna(value) else f"{100 * value:.2f}"

    rows = "".join(
        f"<tr><td>{escape(r.seed_doc)}</td><td>{escape(r.row)}</td><td>{escape(r.metric)}</td>"
        f'<td class="num">{pct(r.seed_value)}</td><td class="num">{pct(r.mean)}</td>'
        f'<td class="num">{f"[{pct(r.ci_low)}, {pct(r.ci_high)}]" if pd.notna(r.ci_low) else ""}</td>'
        f'<td class="num">{r.n_seeds}</td><td class="num">{_pp(r.difference)}</td>'
        f'<td style="background:{REPLICATION_STYLE.get(r.word, "#fff")}">{escape(r.word)}</td></tr>'
        for r in ran.itertuples())
    head = "".join(f"<th>{h}</th>" for h in ("seed doc", "row", "metric", "seed (%)", "xfer (%)", "95% CI (%)", "seeds",
                                             "xfer − seed (pp)", "word"))
    rest = len(replication) - len(ran)
    return ("<h3>Replication</h3><p>Each published number of the seeds this grid ran, beside xfer's mean and 95% "
            "interval over seeds (Student's t; one fixed test set, so the interval covers training randomness only)"
            f"{f'; {rest} more seed row(s) not run, with the reason, in {link}' if rest else f' ({link})'}.</p>"
            f"<table><tr>{head}</tr>{rows}</table>")


def transferability_section(summary: pd.DataFrame, pruned: pd.DataFrame | None, files: list[Path],
                            link: Callable[..., str]) -> str:
    """Each estimator's mean τ and regrets per target × arch, its figures and the Markdown table; then the sources
    --prune-sources skipped, whose fine-tunes were not run."""
    cells = summary_cells(summary)
    head = "".join(f"<th>{escape(h)}</th>" for h in cells.columns)
    rows = "".join("<tr>" + "".join(f"<td>{escape(v)}</td>" for v in row[:3])
                   + "".join(f'<td class="num">{escape(v)}</td>' for v in row[3:]) + "</tr>"
                   for row in cells.itertuples(index=False))
    links = [link(p) for p in files if p.suffix in (".png", ".md") and p.stem.startswith("transferability")]
    skipped = ""
    if pruned is not None and len(pruned):
        groups = "; ".join(f"{escape(r.target)}/{escape(r.arch)}: {escape(', '.join(r.skipped) or 'none')}"
                           for r in pruned.itertuples())
        by, k = escape(str(pruned["by"].iloc[0])), int(pruned["k"].iloc[0])
        skipped = (f"<p><b>--prune-sources</b> ranked the sources by <code>{by}</code> and fine-tuned only the best "
                   f"K = {k} per target × arch; skipped: {groups}. "
                   "Their fine-tune cells were not run, so the measured τ covers only the kept sources (the Markdown "
                   "table names any skipped source an earlier grid fine-tuned).</p>")
    table = f"<table><tr>{head}</tr>{rows}</table>" if len(summary) else ""
    return ("<h3>Transferability estimators</h3><p>How well each estimator's ranking of the sources, made before "
            "fine-tuning, predicts the measured fine-tuned test error: Kendall's τ-b per fine-tune setting (+1: the "
            "same order), averaged over settings; how often its top source was the best; the regret (pp of test "
            f"error) of fine-tuning only its top 1 or top {TOP_K} sources. Per setting, with bootstrap intervals over "
            "seeds: "
            f"{' '.join(links) or 'none made (no setting has 2 measured sources)'}.</p>{table}{skipped}")


def largest_section(verdicts: pd.DataFrame) -> str:
    """The largest decided effects (interval clear of 0), any scope; a scope repeating a claim's effect exactly
    (a headline and its only cell) is listed once."""
    decided = verdicts[verdicts["verdict"].isin(DECIDED)]
    decided = decided.loc[decided.assign(rounded=decided["effect"].round(12)).drop_duplicates(["claim_id", "rounded"]).index]
    if decided.empty:
        return "<h3>Largest effects</h3><p>No claim is decided on any scope (no interval clear of 0).</p>"
    top = decided.loc[decided["effect"].abs().sort_values(ascending=False, kind="stable").index[:LARGEST]]
    items = "".join(f"<li>claim {r.claim_id} ({escape(r.scope)}): {r.verdict}, {_pp(r.effect)} pp "
                    f"[{_pp(r.ci_low)}, {_pp(r.ci_high)}], {r.n_seeds} seeds</li>" for r in top.itertuples())
    return ("<h3>Largest effects</h3><p>Decided rows (95% interval clear of 0) of any scope, largest |effect| first; "
            f"effect &gt; 0 favours the claim:</p><ol>{items}</ol>")


def failures_section(runs: pd.DataFrame) -> str:
    """Runs that ended FAILED, with their xfer.failure reason."""
    failed = runs[runs["status"] == "FAILED"]
    if failed.empty:
        return "<h3>Failures</h3><p>No run failed.</p>"
    by_stage = ", ".join(f"{n} {stage}" for stage, n in failed["stage"].fillna("?").value_counts().sort_index().items())
    items = "".join(f"<li>{escape(str(r.stage))} <code>{escape(str(r.run_name or r.run_id))}</code>: "
                    f"{escape(r.failure or 'no reason recorded')}</li>" for r in failed.head(FAILURES_SHOWN).itertuples())
    more = f"<p>… and {len(failed) - FAILURES_SHOWN} more (runs.parquet, status FAILED).</p>" \
        if len(failed) > FAILURES_SHOWN else ""
    return f"<h3>Failures</h3><p>{len(failed)} run(s) FAILED ({by_stage}):</p><ul>{items}</ul>{more}"


def _p(claim: object) -> str:
    """A headline's p and Holm-adjusted p, e.g. "0.012 (0.048)"."""
    p, adjusted = getattr(claim, "p_value"), getattr(claim, "p_holm")
    return f"{p:.2g} ({adjusted:.2g})" if pd.notna(p) and pd.notna(adjusted) else ""


def _pp(value: float) -> str:
    return "" if pd.isna(value) else f"{100 * value:+.2f}"
