"""Bodies of processes forked by tests/test_tracking.py that log to the MLflow server of $MLFLOW_TRACKING_URI.

Forking skips re-importing mlflow (~4 CPU-seconds per process); each child still has its own HTTP connections.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from multiprocessing.queues import SimpleQueue
from multiprocessing.synchronize import Event
from pathlib import Path

from xfer import names, specs, tracking

CURVE_POINTS = 500     # per run: 250 train_error + 250 val_error points, one log_batch, plus the Parquet artifact
STEP_POINTS = 100      # per run: train_loss logged one request per step, as a training loop reports
BLOB_BYTES = 256 * 1024


class RetryCounter(logging.Handler):
    """Counts urllib3's "Retrying ..." warnings: every one is a request the server failed or dropped."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "Retrying" in record.getMessage()


def log_run(experiment: str, index: int, go: Event, blob_dir: Path) -> None:
    """Wait for `go`, log one run, write what was logged to ``blob_dir/result-INDEX.json``."""
    retries = RetryCounter()
    logging.getLogger("urllib3").addHandler(retries)
    blob = blob_dir / f"blob-{index}.bin"
    blob.write_bytes(os.urandom(BLOB_BYTES))
    spec = specs.PretrainSpec(specs.TrainSpec(arch="lenet5", dataset="mnist", seed=index))
    go.wait()  # all workers start logging at the same moment
    start = time.perf_counter()
    with tracking.start_run(experiment, names.PRETRAIN, f"worker-{index}", tags=tracking.spec_tags(spec), params=spec) as run:
        for step in range(STEP_POINTS):
            run.log_metrics({names.TRAIN_LOSS: 1.0 / (step + 1)}, step=step)
        rows = [{"step": i // 2, "epoch": i // 100, "seconds": i * 0.01, "split": "train" if i % 2 == 0 else "val",
                 "error": (index + i / CURVE_POINTS) / 10} for i in range(CURVE_POINTS)]
        run.log_curve(rows)
        run.log_artifact(blob)
    (blob_dir / f"result-{index}.json").write_text(json.dumps({
        "run_id": run.run_id, "sha256": hashlib.sha256(blob.read_bytes()).hexdigest(), "retries": retries.count,
        "seconds": time.perf_counter() - start}))


def hold_run(experiment: str, key: str, opened: SimpleQueue) -> None:
    """A run that stays open, logging, until the process is signalled; its id goes to `opened`."""
    with tracking.start_run(experiment, names.PRETRAIN, key) as run:
        opened.put(run.run_id)
        for step in range(100_000):
            run.log_metrics({names.TRAIN_LOSS: 1.0}, step=step)
            time.sleep(0.05)
