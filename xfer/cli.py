"""What every entry script shares: XferError meets the terminal in `run_main`; Ray is joined in `connect_ray`."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable
from typing import Any

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


def connect_ray(address: str | None = None) -> Any:
    """Join `address` / $RAY_ADDRESS, else start Ray locally; a Ray this process already started is kept.

    Workers get the tracking environment, so every trial logs to the same MLflow server.
    """
    import ray

    from xfer import tracking

    if not ray.is_initialized():  # a caller that started Ray (tests, a notebook) keeps its own
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": tracking.worker_env()},
                 configure_logging=False)
    return ray


def gpus_per_trial(requested: float | None) -> float:
    """`requested`, else $XFER_GPUS_PER_TRIAL, else 1/4 GPU when the cluster has GPUs now, else none.

    An autoscaling cluster may have no GPU node up yet: cluster.yaml sets XFER_GPUS_PER_TRIAL so that trials
    ask for GPUs (and the autoscaler starts GPU workers) rather than running on the workers' CPUs.
    """
    if requested is not None:
        return requested
    import ray

    default = 0.25 if ray.cluster_resources().get("GPU", 0) else 0.0
    return float(os.environ.get("XFER_GPUS_PER_TRIAL", default))
