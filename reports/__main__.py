"""`python -m reports --experiment NAME [--out DIR]`: `xfer report`, under the report package's own name."""

import sys

from xfer.cli import main, run_main

if __name__ == "__main__":
    run_main(lambda: main(["report", *sys.argv[1:]]))
