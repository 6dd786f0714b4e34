"""What every entry script shares: XferError meets the terminal in `run_main` (Ray is joined lazily: xfer.cluster)."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable

from xfer.errors import XferError


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`; a person-fixable problem is printed as one paragraph, without a traceback, exit 2."""
    try:
        code = main()
    except XferError as exc:
        print("\n" + textwrap.fill(f"xfer: {exc}", width=100), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nxfer: interrupted; finished cells are kept in MLflow, and running the same command again "
              "resumes where this run stopped.", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
