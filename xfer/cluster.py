"""Joining Ray, lazily: the one place xfer starts or joins a Ray cluster.

Entry scripts do not call `ray.init` up front: a stage calls `connect` only once it has cells to run, so a
grid with nothing left to do (or a command refused by validation) never starts Ray. Workers get the tracking
environment, so every trial logs to the same MLflow server.
"""

from __future__ import annotations

import math
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


GPU_MEMORY_ENV = "XFER_GPU_MEMORY_GB"   # a GPU's memory on the cluster's GPU nodes (cluster.yaml sets it per instance type)
MEMORY_HEADROOM = 0.8   # of a trial's share: the CUDA context, the allocator's fragmentation, what the estimate omits


def _gib(text: str) -> float:
    """$XFER_GPU_MEMORY_GB as a positive number of GiB, or a refusal naming it."""
    from xfer.errors import XferError

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise XferError(f"{GPU_MEMORY_ENV}={text!r} is not a GPU's memory in GiB; set it to a positive number, e.g. 22 "
                        f"for the 24 GB A10G of a g5.xlarge (cluster.yaml), or unset it on a machine whose GPU torch sees.")
    return value


def trial_memory(gpus_per_trial: float, cpus_per_trial: float) -> tuple[float, str] | None:
    """Bytes one trial's pack may hold, and whence the figure, or None where it is not known. On GPUs: the trial's
    share of one GPU's memory ($XFER_GPU_MEMORY_GB, else the GPU this process sees); on CPUs: the memory Ray gives
    the largest node (its `memory` resource) over the trials it runs at once. Both × MEMORY_HEADROOM."""
    import ray

    if gpus_per_trial:
        if os.environ.get(GPU_MEMORY_ENV):
            total, where = _gib(os.environ[GPU_MEMORY_ENV]) * 2**30, f"${GPU_MEMORY_ENV}"
        else:
            import torch

            if not torch.cuda.is_available():
                return None   # a CPU head planning for GPU workers it cannot see: cluster.yaml sets the variable
            total, where = float(torch.cuda.get_device_properties(0).total_memory), torch.cuda.get_device_name(0)
        share = min(1.0, gpus_per_trial)
        return total * share * MEMORY_HEADROOM, f"{share:g} of a {total / 2**30:.0f} GiB GPU ({where})"
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    if not nodes:
        return None
    node = max(nodes, key=lambda r: r.get("memory", 0.0))
    trials = max(1, int(node["CPU"] // max(cpus_per_trial, 1e-3)))
    return (node.get("memory", 0.0) / trials * MEMORY_HEADROOM,
            f"1/{trials} of the {node.get('memory', 0.0) / 2**30:.1f} GiB Ray gives a node")


def node_cpus() -> int:
    """The CPUs of the largest live node: the most one trial can use (a trial runs on one node)."""
    import ray

    return max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1) or 1


__all__ = ["connect", "gpus_per_trial", "slots", "node_cpus", "GPU_SHARE", "trial_memory", "trial_storage", "check_shared", "spot_notice",
           "drain_for_preemption", "watch_spot"]


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


# ---- spot instances: a reclaim is a preemption, not a trial's failure ----------------------------------------------
#
# Ray Tune does not count a trial whose actor died with its node against FailureConfig.max_failures when Ray knows the
# node was preempted (RayActorError.preempted: the node was drained with reason PREEMPTION before it died). Nothing on
# a `ray up` AWS cluster tells Ray that: EC2 posts a two-minute notice in the instance metadata and then stops the
# machine, so every spot reclaim cost a trial one of its --max-failures. cluster.yaml starts `watch_spot` on each
# worker: at the notice it drains the node for preemption, Ray schedules nothing new there, and the trials it held are
# retried elsewhere, each from its last checkpoint, with their failure budget untouched.

IMDS = "http://169.254.169.254"   # EC2's instance metadata service
SPOT_POLL_S = 5.0                  # the notice comes two minutes ahead; AWS suggests polling every 5 s


def spot_notice(imds: str = IMDS, timeout_s: float = 2.0) -> float | None:
    """Seconds until EC2 reclaims this spot instance, or None while no notice is posted (IMDSv2: a session token,
    then /latest/meta-data/spot/instance-action, which answers 404 until the notice)."""
    import datetime
    import json
    import urllib.error
    import urllib.request

    token = urllib.request.Request(f"{imds}/latest/api/token", method="PUT",
                                   headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    with urllib.request.urlopen(token, timeout=timeout_s) as answer:
        headers = {"X-aws-ec2-metadata-token": answer.read().decode()}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{imds}/latest/meta-data/spot/instance-action",
                                                           headers=headers), timeout=timeout_s) as answer:
            action = json.load(answer)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    when = datetime.datetime.strptime(action["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def drain_for_preemption(address: str, seconds: float, node_id: str | None = None) -> None:
    """Tell Ray's GCS at `address` that node `node_id` (default: this machine's) will be preempted in `seconds`
    (Ray's own `ray drain-node`, as its autoscaler does for a preemption)."""
    import subprocess
    import sys

    from xfer.errors import XferError

    command = [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", address,
               "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "EC2 spot interruption notice",
               "--deadline-remaining-seconds", str(int(seconds)), *(["--node-id", node_id] if node_id else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise XferError(f"Ray refused to drain {node_id or 'this node'} for a spot interruption: "
                        f"{(done.stderr or done.stdout).strip()[-500:]}")


def watch_spot(address: str, node_id: str | None = None, imds: str = IMDS, poll_s: float = SPOT_POLL_S,
               echo: Any = print, stop: Any = None) -> float | None:
    """Poll the instance metadata until a spot interruption notice, then drain this node for preemption; returns the
    seconds the notice gave (None if `stop()` ended the watch first). Metadata that does not answer is said once and
    polled again: a node is never drained on a guess."""
    import time

    quiet = False
    while stop is None or not stop():
        try:
            left = spot_notice(imds)
            quiet = False
        except OSError as exc:
            if not quiet:
                echo(f"spot watch: the instance metadata at {imds} does not answer ({exc}); polling on")
                quiet = True
            left = None
        if left is not None:
            drain_for_preemption(address, left, node_id)
            echo(f"spot watch: EC2 reclaims this node in {left:.0f} s; drained it for preemption, so its trials are "
                 "retried elsewhere without spending --max-failures")
            return left
        time.sleep(poll_s)
    return None


if __name__ == "__main__":   # cluster.yaml: python -m xfer.cluster watch-spot --address $RAY_HEAD_IP:6379
    import argparse

    parser = argparse.ArgumentParser(prog="python -m xfer.cluster", description="xfer's cluster-side helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    spot = sub.add_parser("watch-spot", help="drain this node for preemption at an EC2 spot interruption notice")
    spot.add_argument("--address", required=True, help="the Ray head's GCS address (host:port)")
    spot.add_argument("--node-id", default=None, help="the node to drain (default: this machine's)")
    spot.add_argument("--imds", default=IMDS, help="the instance metadata service's URL")
    spot.add_argument("--poll-s", type=float, default=SPOT_POLL_S)
    args = parser.parse_args()
    watch_spot(args.address, args.node_id, args.imds, args.poll_s, echo=lambda line: print(line, flush=True))
