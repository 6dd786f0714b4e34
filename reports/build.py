"""`build_report`: one experiment's MLflow runs → Parquet, figures, Markdown, verdicts, index.html, a `report` run.

Every part is made from whatever runs exist; a part whose inputs are absent is named in `missing`
(and on the index page) instead of failing the report, so a half-finished grid still gets one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from reports import figures, markdown, schema, tables, transferability
from reports.html import index_page
from reports.replication import replication
from reports.tables import Tables
from reports.verdicts import CLAIMS, FIGURE, all_verdicts, claims_doc, claims_table
from xfer import names, server, tracking
from xfer.errors import XferError

DATA, FIGURES, TABLES = "data", "figures", "tables"   # sub-folders of the report folder
SCHEMA_FILE = "SCHEMA.md"
KEY_FILE = ".report-key"    # in the report folder: the `report_key` of the report it holds


@dataclass(frozen=True)
class ReportResult:
    """Where the report went, what it wrote, what it could not make, its MLflow run (None if not logged), and its
    verdicts (the `verdicts` table: each claim 1-7's headline row and its narrower scopes, with a printable `line`)
    and its replication table (each seed row beside xfer's mean and interval over seeds)."""

    out: Path
    files: list[Path]
    missing: list[str]
    run_id: str | None = None
    verdicts: pd.DataFrame | None = None
    cached: bool = False       # the report in `out` was already made from these same runs by this same code
    replication: pd.DataFrame | None = None
    at_chance: pd.DataFrame | None = None   # the cells left out of every verdict (`tables.chance_runs`)


def build_report(experiment: str, out: Path | None = None, log_to_mlflow: bool = True,
                 parent_run_id: str | None = None, reuse: bool = False,
                 records: list[tracking.RunRecord] | None = None) -> ReportResult:
    """Build the report of `experiment` in `out` (default ``<runs folder>/reports/<experiment>``).

    Raises XferError, naming the known experiments, when `experiment` does not exist. Files an earlier
    report left in `out` that this one does not write are left alone, and neither linked nor logged. The
    report's run is a child of `parent_run_id` (the grid invocation's run) when given. With `reuse`, a report
    already in `out` that was made from the same runs (ids, status, end times) by the same report code is kept
    as it is: nothing is read but one MLflow search, and nothing is logged (`cached` is then True). `records`: the
    report's inputs (`tables.inputs`), when the caller has listed them already.
    """
    tables.ensure_experiment(experiment)
    out = Path(out) if out is not None else server.runs_dir() / "reports" / experiment
    records = tables.inputs(experiment) if records is None else records
    key = report_key(experiment, records)
    if reuse and _made(out, key):
        return ReportResult(out, [], [], cached=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / KEY_FILE).unlink(missing_ok=True)     # written last: a report cut short is never taken as made
    found = tables.collect(experiment, records)
    verdicts, replicated, excluded = all_verdicts(found), replication(found), tables.chance_runs(found)
    ranked = transferability.transferability(found.estimates, found.finetune)
    tags = tracking.experiment_tags(experiment)
    missing = missing_inputs(experiment, found, ranked)
    try:
        pruned = transferability.pruned_groups(tags.get(names.TAG_PRUNED))
    except XferError as error:   # a tag written by hand or by another version: the rest of the report still stands
        pruned = transferability.pruned_groups("")
        missing.append(str(error))
    files = (write_data(found, verdicts, replicated, out, ranked) + write_figures(found, verdicts, out, ranked)
             + write_markdown(found, verdicts, replicated, out, excluded, ranked, pruned))
    index = out / "index.html"
    index.write_text(index_page(experiment, out, files, missing, verdicts, found.runs, notes=notes(tags),
                                replication=replicated, at_chance=excluded,
                                transferability=transferability.summary(ranked), pruned=pruned))
    files.append(index)
    run_id = log_report(experiment, out, files, found.runs["run_id"], parent_run_id) if log_to_mlflow else None
    (out / KEY_FILE).write_text(key + "\n")
    return ReportResult(out, files, missing, run_id, verdicts, replication=replicated, at_chance=excluded)


def notes(tags: dict[str, str]) -> list[str]:
    """What a reader must know before the numbers, from the experiment's `tags`: a rehearsal on synthetic stand-ins
    (--fast-dev-run) says so."""
    stand_ins = tags.get(names.TAG_STAND_INS, "")
    if not stand_ins:
        return []
    return [f"This grid ran on synthetic stand-ins for {', '.join(stand_ins.split(','))} (--fast-dev-run: their files "
            "were absent; random images of the published sizes, shapes and classes, one batch per cell). It proves "
            "that the grid runs end to end; its accuracies and verdicts mean nothing."]


def report_key(experiment: str, records: list[tracking.RunRecord]) -> str:
    """What a report is made from: the runs it reads (id, status, end time; an adversarial set's run also what it is
    scored on, which grows after it ends), the experiment tags it reads (the stand-ins of a rehearsal, the sources
    --prune-sources skipped) and the source of this package."""
    digest = hashlib.sha256(experiment.encode())
    tags = tracking.experiment_tags(experiment)
    digest.update(f"{tags.get(names.TAG_STAND_INS, '')}\n{tags.get(names.TAG_PRUNED, '')}".encode())
    for r in sorted(records, key=lambda r: r.run_id):
        scored = f" {r.tags.get(names.TAG_SCORED, '')} {r.metrics.get(names.TARGETS_SCORED, '')}" if r.stage == names.ATTACK else ""
        digest.update(f"\n{r.run_id} {r.status} {r.end_time}{scored}".encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def is_made(experiment: str, out: Path | None = None, records: list[tracking.RunRecord] | None = None) -> bool:
    """Whether `build_report(experiment, out, reuse=True)` would keep the report already there (one search, or none
    given its `records`)."""
    out = Path(out) if out is not None else server.runs_dir() / "reports" / experiment
    return _made(out, report_key(experiment, tables.inputs(experiment) if records is None else records))


def _made(out: Path, key: str) -> bool:
    stamp = out / KEY_FILE
    return (out / "index.html").is_file() and stamp.is_file() and stamp.read_text().strip() == key


def missing_inputs(experiment: str, found: Tables, ranked: pd.DataFrame | None = None) -> list[str]:
    """The inputs that are absent, each with the parts of the report it leaves empty (`ranked`: the
    transferability table, empty when no setting pairs estimates with fine-tunes of 2 sources)."""
    unmatched = len(found.finetune) > 0 and found.finetune["scratch_run_id"].isna().all()
    unranked = len(found.estimates) > 0 and ranked is not None and ranked.empty
    checks = [
        (found.runs.empty, f"no runs at all in experiment {experiment!r}: every table is empty"),
        (found.pretrain.empty, "no finished pretrain runs: the pretrain table and pretrain accuracy table are empty"),
        (found.finetune.empty, "no finished finetune runs: the finetune table, accuracy-vs-size and freeze-depth "
                               "figures, fine-tune accuracy table and fine-tune-vs-scratch verdicts are not made"),
        (unmatched, "no fine-tune run has a matching finished scratch run (same target, arch, size, seed, lr): "
                    "the scratch_* columns are empty and fine-tuning is not compared with scratch"),
        (found.curves.empty, f"no training run has a {names.CURVE_FILE} artifact: curve figures are not made"),
        (found.without_curve and not found.curves.empty,
         f"{len(found.without_curve)} finished training run(s) have no {names.CURVE_FILE} artifact and are absent "
         f"from the curves: {', '.join(found.without_curve[:5])}{' ...' if len(found.without_curve) > 5 else ''}"),
        (found.transfer.empty, "no scores of finished adversarial sets on finished targets: the transfer table, "
                               "transfer matrices, heatmaps, "
                               "attack table and attack verdicts are not made"),
        (found.adder.empty, "no finished adder transfer runs (stage adder, any variant but scratch): the adder table "
                            "is empty and adder transfer is not compared with scratch"),
        (found.estimates.empty, "no finished estimate runs: the estimates and transferability tables are empty, and "
                                "the transferability figures and table (estimators' rankings against fine-tuned "
                                "error) are not made"),
        (unranked, "no fine-tune setting has finished runs of 2 or more sources with estimates (paired through their "
                   "pretrain run and target): the transferability table is empty and its figures are not made"),
    ]
    return [message for absent, message in checks if absent]


def write_data(found: Tables, verdicts: pd.DataFrame, replicated: pd.DataFrame, out: Path,
               ranked: pd.DataFrame) -> list[Path]:
    """Every table as Parquet with its documented schema (empty tables too), the matrices, verdicts as JSON;
    `ranked` is the transferability table."""
    data = out / DATA
    data.mkdir(exist_ok=True)
    files = []
    for table, frame, extra in (("runs", found.runs, found.params), ("pretrain", found.pretrain, []),
                                ("estimates", found.estimates, []),
                                ("finetune", found.finetune, []), ("scratch", found.scratch, []),
                                ("adder", found.adder, []),
                                ("curves", found.curves, []), ("transfer", found.transfer, []),
                                ("verdicts", verdicts, []), ("replication", replicated, []),
                                ("transferability", ranked, [])):
        files.append(data / f"{table}.parquet")
        pq.write_table(schema.to_arrow(frame, table, extra), files[-1])
    for (attack, eps), (matrix, _same) in tables.matrices(found.transfer).items():
        files.append(data / f"{schema.MATRIX_PREFIX}{_slug(attack)}_eps{eps:g}.parquet")
        pq.write_table(pa.Table.from_pandas(matrix.reset_index(), preserve_index=False), files[-1])
    files.append(data / "verdicts.json")
    files[-1].write_text(json.dumps(json.loads(verdicts.to_json(orient="records")), indent=2))
    files.append(out / SCHEMA_FILE)
    files[-1].write_text("# Report tables\n\n" + schema.markdown_doc() + "\n\n" + claims_doc() + "\n")
    return files


def write_figures(found: Tables, verdicts: pd.DataFrame, out: Path, ranked: pd.DataFrame) -> list[Path]:
    """Each claim's forest plot, curves (transfer vs scratch), accuracy vs size, freeze depth, each target × arch's
    transferability scatter (`ranked`: the transferability table), transfer heatmaps."""
    directory = out / FIGURES
    files = []
    for claim in CLAIMS:
        rows = verdicts[verdicts["claim_id"] == claim.id]
        stem = Path(FIGURE.format(id=claim.id)).stem
        if rows["n_seeds"].sum() > 0:
            files += figures.save(figures.claim_forest(rows), directory, stem)
        if figures.cells_apart(rows):
            files += figures.save(figures.claim_cells(rows), directory, f"{stem}_cells")
    for (stem, title), curves in curve_sets(found).items():
        files += figures.save(figures.error_curves(curves, title), directory, stem)
    if len(found.finetune):
        files += figures.save(figures.accuracy_vs_size(found.finetune), directory, "accuracy_vs_size")
        files += figures.save(figures.freeze_effect(found.finetune), directory, "freeze_depth")
    for (target, arch), rows in ranked.groupby(["target", "arch"], sort=True):
        files += figures.save(figures.transferability_scatter(rows), directory,
                              f"transferability_{_slug(target)}_{_slug(arch)}")
    groups = {label: (arch, size) for label, arch, size in
              found.transfer[["target_label", "target_arch", "target_size"]].drop_duplicates().itertuples(index=False)}
    heatmaps = []
    for (attack, eps), (matrix, same) in tables.matrices(found.transfer).items():
        for suffix, columns in figures.heatmap_splits(matrix, groups):
            part = matrix[columns].dropna(how="all")   # surrogates that attacked none of these targets are left out
            heatmaps.append((part, same.loc[part.index, columns], f"{attack}, eps={eps:g}", directory,
                             f"transfer_{_slug(attack)}_eps{eps:g}{_slug(suffix)}"))
    return files + [path for drawn in _drawn(heatmaps) for path in drawn]


HEATMAPS_APART = 8   # more heatmaps than this are drawn by worker processes (the seed grid has 60, ~0.5 s each)


def _drawn(heatmaps: list[tuple]) -> list[list[Path]]:
    """Each heatmap drawn and saved; many of them in worker processes, one per core (matplotlib holds the GIL)."""
    import os

    workers = min(len(heatmaps) // HEATMAPS_APART, os.cpu_count() or 1)
    if workers < 2:
        return [_heatmap(*h) for h in heatmaps]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the report may run in a process with threads (Ray's, MLflow's), which fork would copy mid-lock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_heatmap_args, heatmaps, chunksize=max(1, len(heatmaps) // (4 * workers))))


def _heatmap_args(args: tuple) -> list[Path]:
    return _heatmap(*args)


def _heatmap(matrix: pd.DataFrame, same: pd.DataFrame, title: str, directory: Path, stem: str) -> list[Path]:
    return figures.save(figures.transfer_heatmap(matrix, same, title), directory, stem, svg=False)


def curve_sets(found: Tables) -> dict[tuple[str, str], pd.DataFrame]:
    """Curves of each transfer-vs-scratch comparison keyed by (file stem, title); `group` says a run's side.

    Fine-tune vs scratch: one figure per (target, size); adder transfer arms (every variant) vs scratch: one per size.
    """
    runs = found.runs.set_index("run_id")[["stage", "target", "size", "variant"]]
    curves = found.curves.join(runs, on="run_id")
    training = curves[curves["stage"].isin([names.FINETUNE, names.SCRATCH])]
    training = training.assign(group=training["stage"].map({names.FINETUNE: tables.TRANSFER, names.SCRATCH: names.SCRATCH}))
    adder = curves[(curves["stage"] == names.ADDER) & curves["variant"].notna()]
    sets = {}
    for (target, size), rows in training.groupby(["target", "size"], sort=True):
        n = tables.size_text(size)
        sets[(f"curves_{_slug(target)}_n{n}", f"{target}, n={n}: fine-tuned (transfer) vs scratch")] = rows
    for size, rows in adder.assign(group=adder["variant"]).groupby("size", sort=True):
        n = tables.size_text(size)
        arms = " / ".join(sorted(set(rows["group"]) - {names.VARIANT_SCRATCH})) or "transfer"
        sets[(f"curves_adder_n{n}", f"adder, n={n}: {arms} vs scratch")] = rows
    return sets


def write_markdown(found: Tables, verdicts: pd.DataFrame, replicated: pd.DataFrame, out: Path,
                   at_chance: pd.DataFrame | None = None, ranked: pd.DataFrame | None = None,
                   pruned: pd.DataFrame | None = None) -> list[Path]:
    """The seed-shaped tables; a table whose input is empty is left out (its absence is already in `missing`). The
    replication table is written whenever it has rows: a row not run says why this grid cannot speak to it; the
    transferability table (`ranked`) whenever it has rows or --prune-sources skipped sources (`pruned`)."""
    directory = out / TABLES
    pruned = transferability.pruned_groups("") if pruned is None else pruned
    made = {"pretrain": (found.pretrain, markdown.pretrain_table), "finetune": (found.finetune, markdown.finetune_table),
            "attacks": (found.transfer, markdown.attacks_table),
            "claims": (claims_table(verdicts), lambda claims: markdown.claims_table(claims, at_chance)),
            "verdicts": (verdicts, markdown.verdicts_list), "replication": (replicated, markdown.replication_table)}
    if ranked is not None:   # the sources --prune-sources skipped are worth the table even when nothing is ranked
        made["transferability"] = (ranked if len(ranked) else pruned,
                                   lambda _: markdown.transferability_tables(found.estimates, ranked, pruned))
    files = []
    for name, (frame, render) in made.items():
        if len(frame):
            directory.mkdir(exist_ok=True)
            files.append(directory / f"{name}.md")
            files[-1].write_text(render(frame))
    return files


def log_report(experiment: str, out: Path, files: list[Path], run_ids: pd.Series, parent_run_id: str | None = None) -> str:
    """Log the report's files as artifacts of a `report` run (same layout as on disk); its run id.

    The run's key hashes the runs the report read, so reports of the same runs share one key.
    """
    key = hashlib.sha256("\n".join([experiment, *sorted(run_ids)]).encode()).hexdigest()[:16]
    with tracking.start_run(experiment, names.REPORT, key, run_name=f"report-{experiment}", parent_run_id=parent_run_id) as run:
        for path in files:
            folder = path.parent.relative_to(out).as_posix()
            run.log_artifact(path, None if folder == "." else folder)
    return run.run_id


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in str(text))
