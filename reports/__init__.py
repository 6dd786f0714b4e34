"""Reports: one experiment's MLflow runs → Parquet tables, figures, Markdown tables, verdicts and an index page.

    python -m reports --experiment NAME [--out DIR] [--no-mlflow]
    build_report(experiment, out=None, log_to_mlflow=True) -> ReportResult(out, files, missing, run_id, verdicts)

The report folder (default ``<runs folder>/reports/<experiment>``, runs folder = ``$XFER_RUNS`` or ``./runs``):

    index.html      opens from disk (relative links): "What this grid found" (the claims table, the largest
                    effects, failed runs), the replication table (the seeds' published numbers beside xfer's),
                    the transferability summary (each estimator's mean τ and regrets) and the sources
                    --prune-sources skipped, missing parts, every verdict, every figure and table
    SCHEMA.md       the tables' schema and the claims below
    data/           runs, pretrain, estimates, finetune, scratch, adder, curves, transfer, verdicts, replication,
                    transferability (.parquet), verdicts.json,
                    transfer_matrix_<attack>_eps<eps>.parquet (one per attack setting)
    figures/        claim_<1-7> (forest plots), curves_<target>_n<size>, curves_adder_n<size>, accuracy_vs_size,
                    freeze_depth, transferability_<target>_<arch> (each estimator's score against the measured
                    fine-tuned error, per source), each as .png and .svg; transfer_<attack>_eps<eps>[_<arch>_n<size>]
                    (heatmaps, .png)
    tables/         claims.md, replication.md, transferability.md, pretrain.md, finetune.md, attacks.md, verdicts.md

The same files are logged as artifacts of a run with stage ``report`` in the experiment.
Every Parquet table is written, empty if need be, with the schema below (`reports.schema.SCHEMAS`);
units: "fraction" is in [0, 1], "s" is wall-clock seconds.

Schema
------
"""

from reports.build import ReportResult, build_report
from reports.schema import SCHEMAS, markdown_doc
from reports.verdicts import claims_doc

# Generated from SCHEMAS and CLAIMS, the one definition writers and tests use, so this documentation cannot drift.
__doc__ += markdown_doc() + "\n\n" + claims_doc()

__all__ = ["ReportResult", "SCHEMAS", "build_report"]
