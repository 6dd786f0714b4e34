"""`python -m reports --experiment NAME [--out DIR]`: build one experiment's report and say what is missing."""

from __future__ import annotations

import argparse
from pathlib import Path

from reports.build import build_report
from xfer.cli import run_main


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__)
    parser.add_argument("--experiment", required=True, help="MLflow experiment (the grid's name)")
    parser.add_argument("--out", type=Path, help="report folder (default: <runs folder>/reports/<experiment>)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report as a `report` run in MLflow")
    args = parser.parse_args()
    result = build_report(args.experiment, args.out, log_to_mlflow=not args.no_mlflow)
    print(f"report of {args.experiment!r}: {len(result.files)} files in {result.out}; open {result.out / 'index.html'}")
    if result.run_id:
        print(f"logged as MLflow run {result.run_id}")
    for line in result.missing:
        print(f"missing: {line}")
    return 0


if __name__ == "__main__":
    run_main(main)
