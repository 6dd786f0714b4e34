"""The two-digit adder, `xfer adder`: see xfer/cli/adder.py (or --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

from xfer.cli import run_main  # noqa: E402
from xfer.cli.adder import main, parser, SMOKE  # noqa: E402,F401  (importable from the script too)

if __name__ == "__main__":
    run_main(main)
