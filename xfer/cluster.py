"""Joining Ray, lazily: the one place xfer starts or joins a Ray cluster.

Entry scripts do not call `ray.init` up front: a stage calls `connect` only once it has cells to run, so a
grid with nothing left to do (or a command refused by validation) never starts Ray. Workers get the tracking
environment, so every trial logs to the same MLflow server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from xfer import server, stopping

GPU_SHARE = 0.25   # default GPUs per trial when the cluster has GPUs: several packs share one device


def connect(address: str | None = None, log_file: str | None = None) -> Any:
    """Join `address` / $RAY_ADDRESS, else start Ray locally; a Ray this process already runs is kept (tests,
    notebooks). Returns the `ray` module.

    With `log_file`, Ray's start-up output (its banners are printed by its C++ core, past Python's logging)
    goes to that file, and the workers' output stays in Ray's own session logs instead of the terminal.
    """
    import ray

    from xfer.progress import redirected

    if not ray.is_initialized():
        with redirected(Path(log_file) if log_file else None):
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": server.worker_env()},
                     configure_logging=False, log_to_driver=log_file is None)
        stop = stopping.current()
        if stop is not None:   # Ray's SIGTERM handler would kill the driver before the grid could stop cleanly
            stop.claim_signals()
    return ray


def gpus_per_trial(requested: float | None) -> float:
    """`requested`, else $XFER_GPUS_PER_TRIAL, else GPU_SHARE when the cluster has GPUs now, else none.

    An autoscaling cluster may have no GPU node up yet: cluster.yaml sets XFER_GPUS_PER_TRIAL so that trials
    ask for GPUs (and the autoscaler starts GPU workers) rather than running on the workers' CPUs.
    """
    if requested is not None:
        return requested
    import ray

    default = GPU_SHARE if ray.cluster_resources().get("GPU", 0) else 0.0
    return float(os.environ.get("XFER_GPUS_PER_TRIAL", default))


def slots(cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials of this size the cluster can run at once now (at least one)."""
    import ray

    total = ray.cluster_resources()
    count = int(total.get("CPU", 1) // max(cpus_per_trial, 1e-3))
    if gpus_per_trial:
        count = min(count, int(total.get("GPU", 0) // gpus_per_trial))
    return max(1, count)


def node_cpus() -> int:
    """The CPUs of the largest live node: the most one trial can use (a trial runs on one node)."""
    import ray

    return max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1) or 1


__all__ = ["connect", "gpus_per_trial", "slots", "node_cpus", "GPU_SHARE"]


BUCKET_ENV = "XFER_BUCKET"   # cluster.yaml's bucket (s3://...): Ray's trial storage defaults to <bucket>/ray there


def trial_storage(requested: str | None, local: Path) -> str:
    """Where Ray Tune keeps trials' checkpoints: `requested` (--storage-path), else `$XFER_BUCKET/ray` (set on a
    cluster made from cluster.yaml), else `local`. A local folder on a cluster whose nodes are separate machines is
    refused: a trial restored on another node would not find its checkpoint."""
    import ray

    chosen = requested or (f"{os.environ[BUCKET_ENV].rstrip('/')}/ray" if os.environ.get(BUCKET_ENV) else str(local))
    if ray.is_initialized():
        machines = {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
        check_shared(chosen, machines)
    return chosen


def check_shared(storage: str, machines: set[str]) -> None:
    """Refuse a local trial storage path when the cluster's nodes are on more than one machine (by address)."""
    from xfer.errors import XferError

    if "://" not in storage and len(machines) > 1:
        raise XferError(
            f"Ray Tune would keep trial checkpoints in {storage}, a folder on this machine, but the cluster's nodes "
            f"are on {len(machines)} machines ({', '.join(sorted(machines))}), so a trial restarted on another node "
            "could not resume. Give shared storage: --storage-path s3://BUCKET/ray (or set XFER_BUCKET, as "
            "cluster.yaml does), or an NFS path mounted on every node as file:///mnt/…")
