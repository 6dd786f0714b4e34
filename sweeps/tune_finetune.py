"""Optuna over fine-tune hyperparameters, `xfer tune`: see xfer/cli/tune.py (or --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from xfer.cli import run_main  # noqa: E402
from xfer.cli.tune import main, parser, study_from_args, trials_from_args, summary, DEFAULTS, SMOKE  # noqa: E402,F401  (importable from the script too)

if __name__ == "__main__":
    run_main(main)
