"""MLflow tracking against a real `mlflow server` on 127.0.0.1 with real files: runs, look-ups, checkpoints, signals."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from safetensors.numpy import save_file

from _tracking_worker import BLOB_BYTES, CURVE_POINTS, STEP_POINTS, hold_run, log_run
from tracking_fixtures import Server
from xfer import checkpoint, names, server, specs, tracking
from xfer.cli import tools
from xfer.errors import XferError

REPO = Path(__file__).resolve().parents[1]
WORKERS = 8


def write_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A checkpoint folder by hand, in xfer's layout: weights.safetensors + meta.json."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({"body.weight": rng.standard_normal((8, 4)).astype(np.float32)}, str(directory / "weights.safetensors"))
    (directory / "meta.json").write_text(json.dumps({"format": "xfer-checkpoint/1", "arch": "lenet5", "seed": seed}))
    return directory


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != server.TRACKING_URI_ENV}
    return env | {"PYTHONPATH": str(REPO)} | extra


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_serve_starts_a_detached_loopback_server_that_is_reused_then_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "runs"
    start = time.perf_counter()
    served = subprocess.run([sys.executable, "-m", "xfer", "serve", "--root", str(root)],
                            env=clean_env(), capture_output=True, text=True, timeout=180)
    print(f"server start: {time.perf_counter() - start:.1f} s")
    try:
        assert served.returncode == 0, served.stderr
        url = served.stdout.strip()
        info = json.loads((root / server.SERVER_FILE).read_text())
        assert url == info["url"] == f"http://127.0.0.1:{info['port']}"
        assert server._healthy(url), "the server must outlive the command that started it"
        assert (root / server.SERVER_LOG).stat().st_size > 0 and (root / "mlflow.db").is_file()
        if Path("/proc/net/tcp").exists():
            assert listening_addresses(info["port"]) == {"0100007F"}, "binds loopback only"

        monkeypatch.delenv(server.TRACKING_URI_ENV, raising=False)
        start = time.perf_counter()
        assert server.ensure_server(root) == url and time.perf_counter() - start < 5, "a running server is reused"
        assert os.environ[server.TRACKING_URI_ENV] == url, "Ray workers inherit the URI"
        assert server.worker_env()[server.TRACKING_URI_ENV] == url

        with socket.socket() as squatter:  # a port held by something that is not our server
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            with pytest.raises(XferError, match="in use by another program"):
                server.start_server(tmp_path / "other", port=squatter.getsockname()[1])

        assert tools.stop(["--root", str(root)]) == 0
        assert not server._healthy(url) and not server._server_alive(info["pid"])
        assert not (root / server.SERVER_FILE).exists() and server.TRACKING_URI_ENV not in os.environ
    finally:
        server.stop_server(root)


def test_a_cell_is_found_after_it_finished_and_not_after_it_failed(experiment: str, tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt")
    with tracking.start_run(experiment, names.PRETRAIN, "done") as run:
        sha = run.log_checkpoint(ckpt)
    with pytest.raises(RuntimeError, match="loss exploded"):
        with tracking.start_run(experiment, names.PRETRAIN, "crashed") as crashed:
            crashed.log_checkpoint(ckpt)  # a checkpoint does not make a failed run finished
            raise RuntimeError("loss exploded")
    with tracking.start_run(experiment, names.PRETRAIN, "nan") as nan:
        nan.fail("loss is NaN at step 7")  # ends FAILED; the block then exits quietly
    with tracking.start_run(experiment, names.PRETRAIN, "no-checkpoint"):
        pass
    with tracking.start_run(experiment, names.ATTACK, "adversarial-set"):
        pass  # attack runs publish adversarial sets, not checkpoints: finished is finished

    found = tracking.find_finished(experiment, "done")
    assert found is not None and found.run_id == run.run_id and found.status == "FINISHED"
    assert found.tags[names.TAG_CHECKPOINT_SHA] == sha == checkpoint.sha256(ckpt)
    for key in ("crashed", "nan", "no-checkpoint", "never-ran"):
        assert tracking.find_finished(experiment, key) is None, key
    assert tracking.find_finished(experiment, "adversarial-set") is not None
    assert tracking.find_finished("no-such-experiment", "done") is None

    failed = {r.key: r for r in tracking.query(experiment, status="FAILED")}
    assert set(failed) == {"crashed", "nan"}
    assert failed["crashed"].tags[names.TAG_FAILURE] == "RuntimeError: loss exploded"
    assert failed["nan"].tags[names.TAG_FAILURE] == "loss is NaN at step 7"

    with tracking.start_run(experiment, names.PRETRAIN, "done") as again:  # a forced re-run: the newest wins
        again.log_checkpoint(ckpt)
    assert tracking.find_finished(experiment, "done").run_id == again.run_id


def test_a_resumed_run_continues_the_same_mlflow_run(experiment: str, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with tracking.start_run(experiment, names.PRETRAIN, "resumed") as first:
            raise RuntimeError("node lost")
    with tracking.start_run(experiment, names.PRETRAIN, "resumed", resume_run_id=first.run_id) as second:
        second.log_checkpoint(write_checkpoint(tmp_path / "ckpt"))
    record = tracking.find_finished(experiment, "resumed")
    assert second.run_id == first.run_id == record.run_id and names.TAG_FAILURE not in record.tags
    assert len(tracking.query(experiment, status=None)) == 1


def test_checkpoints_in_the_runs_folder_are_verified_where_they_are_and_a_tampered_one_is_refused(
        mlflow_server: Server, experiment: str, tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt")
    with tracking.start_run(experiment, names.PRETRAIN, "cell") as run:
        run.log_checkpoint(ckpt)
    other = write_checkpoint(tmp_path / "renamed", seed=0)
    (other / "meta.json").rename(other / "meta2.json")
    assert checkpoint.sha256(other) != checkpoint.sha256(ckpt), "names are part of the hash"

    # The runs folder's own server keeps new experiments' artifacts as plain files: read in place, never copied.
    [stored] = (mlflow_server.root / "artifacts").glob(f"*/{run.run_id}/artifacts/{names.CHECKPOINT_DIR}/weights.safetensors")
    local = tracking.download_checkpoint(run.run_id)
    assert local == stored.parent and sorted(p.name for p in local.iterdir()) == ["meta.json", "weights.safetensors"]
    assert not (mlflow_server.root / "downloads" / run.run_id).exists()

    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")  # one byte changed where it is stored
    with pytest.raises(XferError, match="does not match its recorded sha256") as refused:
        tracking.download_checkpoint(run.run_id)
    assert str(stored.parent) in str(refused.value), "the refusal names the checkpoint's folder, not only the run"

    with tracking.start_run(experiment, names.PRETRAIN, "no-checkpoint") as bare:
        pass
    with pytest.raises(XferError, match="logged no checkpoint"):
        tracking.download_checkpoint(bare.run_id)


def test_checkpoints_served_through_the_server_are_downloaded_once_and_verified(
        mlflow_server: Server, experiment: str, tmp_path: Path) -> None:
    # Experiments recorded before the runs folder kept plain files have proxied (mlflow-artifacts:/) locations.
    tracking._client().create_experiment(experiment, artifact_location=f"mlflow-artifacts:/{experiment}")
    ckpt = write_checkpoint(tmp_path / "ckpt")
    with tracking.start_run(experiment, names.PRETRAIN, "cell") as run:
        run.log_checkpoint(ckpt)
    local = tracking.download_checkpoint(run.run_id)
    assert local == mlflow_server.root / "downloads" / run.run_id / names.CHECKPOINT_DIR
    assert (local / "weights.safetensors").read_bytes() == (ckpt / "weights.safetensors").read_bytes()

    (local / "weights.safetensors").write_bytes(b"damaged")  # a damaged cached copy is fetched again
    assert (tracking.download_checkpoint(run.run_id) / "weights.safetensors").read_bytes() == (ckpt / "weights.safetensors").read_bytes()

    [stored] = (mlflow_server.root / "artifacts").glob(f"{experiment}/{run.run_id}/artifacts/{names.CHECKPOINT_DIR}/weights.safetensors")
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")  # one byte changed on the server
    with pytest.raises(XferError, match="does not match its recorded sha256") as refused:
        tracking.download_checkpoint(run.run_id, tmp_path / "fresh")
    assert str(stored.parent) in str(refused.value)
    assert not (tmp_path / "fresh").exists(), "nothing of a refused checkpoint is left behind"


def test_load_model_rebuilds_the_published_model(experiment: str, tmp_path: Path) -> None:
    import torch

    from xfer import checkpoint, models

    model = models.build("lenet5", (1, 28, 28), 10)
    checkpoint.save(tmp_path / "ckpt", model, {"key": "lenet"})
    with tracking.start_run(experiment, names.PRETRAIN, "lenet") as run:
        run.log_checkpoint(tmp_path / "ckpt")
    loaded, meta = tracking.load_model(run.run_id)
    x = torch.rand(2, 1, 28, 28)
    assert meta["key"] == "lenet" and torch.equal(loaded.eval()(x), model.eval()(x))


def test_queries_return_typed_records_with_lineage_and_the_full_spec(experiment: str) -> None:
    train = specs.TrainSpec(arch="resnet_mini", dataset="kmnist", epochs=2, lr=3e-3, seed=1)
    pretrain = specs.PretrainSpec(train)
    finetune = specs.FinetuneSpec(specs.replace(train, dataset="mnist", size=500, freeze_depth=20), pretrain)
    tracking.log_grid(experiment, '{"name": "g"}')
    with tracking.start_run(experiment, pretrain.stage, specs.key(pretrain), tracking.spec_tags(pretrain), pretrain) as parent:
        parent.log_metrics({names.TEST_ERROR: 0.1})
    tags = tracking.spec_tags(finetune) | {names.TAG_PRETRAIN_RUN: parent.run_id}
    with tracking.start_run(experiment, finetune.stage, specs.key(finetune), tags, finetune, parent_run_id=parent.run_id) as child:
        child.log_metrics({names.TEST_ERROR: 0.3}, step=0)
        child.log_metrics({names.TEST_ERROR: 0.2}, step=1)

    [record] = tracking.query(experiment, stage=names.FINETUNE)
    assert isinstance(record, tracking.RunRecord) and record.run_id == child.run_id
    assert record.experiment == experiment and record.stage == names.FINETUNE and record.key == specs.key(finetune)
    assert record.tags[names.TAG_PRETRAIN_RUN] == parent.run_id
    assert {k: record.tags[k] for k in (names.TAG_SOURCE, names.TAG_TARGET, names.TAG_ARCH, names.TAG_SIZE, names.TAG_FREEZE,
                                        names.TAG_SEED)} == {
        "source": "kmnist", "target": "mnist", "arch": "resnet_mini", "size": "500", "freeze_depth": "20", "seed": "1"}
    assert "lr" not in record.tags and record.params["train.lr"] == "0.003"   # each value under one name
    assert specs.from_flat(specs.FinetuneSpec, record.params) == finetune, "params hold the whole spec"
    assert record.metrics == {names.TEST_ERROR: 0.2}, "the latest value of each metric"
    assert isinstance(record.start_time, datetime) and record.start_time <= record.end_time

    assert [r.run_id for r in tracking.query(experiment)] == [parent.run_id, child.run_id]
    assert [r.run_id for r in tracking.query(experiment, tags={names.TAG_SOURCE: "kmnist", names.TAG_TARGET: "mnist"})] == [child.run_id]
    assert tracking.query(experiment, stage=names.ATTACK) == [] and tracking.query(experiment, status="RUNNING") == []
    client = MlflowClient(server.ensure_server())
    assert client.get_experiment_by_name(experiment).tags[tracking.TAG_GRID] == '{"name": "g"}'
    assert tracking.ui_url(experiment).endswith(f"/#/experiments/{tracking.experiment_id(experiment)}/runs")
    with pytest.raises(XferError, match="is not one of"):
        tracking.query(experiment, status="DONE")


def test_the_curve_is_a_parquet_artifact_and_a_metric_history(experiment: str) -> None:
    rows = [{"step": 20 * i, "epoch": i // 2, "seconds": 0.5 * i, "split": split, "error": 0.5 / (i + 1)}
            for i in range(6) for split in ("train", "val", "test")]
    with tracking.start_run(experiment, names.PRETRAIN, "curve") as run:
        run.log_curve(rows)
        with pytest.raises(XferError, match="a split is one of"):
            run.log_curve([{"step": 0, "epoch": 0, "seconds": 0.0, "split": "holdout", "error": 0.1}])
    assert tracking.read_curve(run.run_id) == rows
    history = MlflowClient(server.ensure_server()).get_metric_history(run.run_id, names.VAL_ERROR)
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(r["step"], r["error"]) for r in rows if r["split"] == "val"]


def test_points_sent_behind_land_in_order_and_a_lost_request_fails_the_run_at_its_next_write(experiment: str) -> None:
    """An epoch's points go from a background thread (a GPU pack does not wait for the server); every one lands before
    the run ends, and a request the server refused is raised at the run's next write, so the run ends FAILED."""
    rows = [{"step": 10 * i, "epoch": i, "seconds": 0.1 * i, "split": "val", "error": 1.0 / (i + 1)} for i in range(1, 6)]
    with tracking.start_run(experiment, names.PRETRAIN, "behind") as run:
        for row in rows:
            run.log_points([row], behind=True)
        assert run.last_step(names.VAL_ERROR) == 50   # a read waits for what is in flight
        run.log_points(rows[-1:], behind=True)
    history = MlflowClient(server.ensure_server()).get_metric_history(run.run_id, names.VAL_ERROR)
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["error"]) for r in rows] + [(50, 1 / 6)]
    assert tracking.query(experiment, status="FINISHED")[0].run_id == run.run_id

    with pytest.raises(Exception, match="INVALID_PARAMETER_VALUE"):
        with tracking.start_run(experiment, names.PRETRAIN, "lost") as run:
            run.log_points(rows[:1], {"no good//..": 1.0}, behind=True)   # MLflow refuses the name: HTTP 400
            run.log_metrics({"seconds": 1.0})
    [failed] = tracking.query(experiment, status="FAILED")
    assert failed.run_id == run.run_id and "no good//.." in failed.tags[names.TAG_FAILURE]


def _send_from_child(answers) -> None:  # noqa: ANN001
    answers.put(tracking._sender().submit(lambda: "sent").result(timeout=10))


def test_a_forked_process_sends_behind_on_threads_of_its_own() -> None:
    """A fork copies the parent's thread pool but none of its threads: the child must get its own, or wait forever."""
    assert tracking._sender().submit(lambda: "parent").result() == "parent"
    fork = multiprocessing.get_context("fork")
    answers = fork.Queue()
    child = fork.Process(target=_send_from_child, args=(answers,))
    child.start()
    assert answers.get(timeout=30) == "sent"
    child.join(timeout=30)


def test_an_interrupted_run_ends_killed_and_the_sigterm_handler_is_restored(experiment: str) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run(experiment, names.PRETRAIN, "interrupted"):
            assert signal.getsignal(signal.SIGTERM) is tracking._on_sigterm
            raise KeyboardInterrupt
    assert signal.getsignal(signal.SIGTERM) is before
    [record] = tracking.query(experiment, status="KILLED")
    assert record.key == "interrupted"


def test_eight_processes_log_concurrently_and_nothing_is_lost(mlflow_server: Server, experiment: str, tmp_path: Path) -> None:
    fork = multiprocessing.get_context("fork")
    go = fork.Event()
    log_start = (mlflow_server.root / server.SERVER_LOG).stat().st_size
    workers = [fork.Process(target=log_run, args=(experiment, i, go, tmp_path)) for i in range(WORKERS)]
    for worker in workers:
        worker.start()
    start = time.perf_counter()
    go.set()
    for worker in workers:
        worker.join(timeout=240)
    elapsed = time.perf_counter() - start
    assert [w.exitcode for w in workers] == [0] * WORKERS, "every process logged without an exception"
    results = [json.loads((tmp_path / f"result-{i}.json").read_text()) for i in range(WORKERS)]

    client = MlflowClient(mlflow_server.url)
    records = {r.key: r for r in tracking.query(experiment)}
    assert sorted(records) == sorted(f"worker-{i}" for i in range(WORKERS)), "every run, FINISHED"
    points = 0
    for i, result in enumerate(results):
        run_id = records[f"worker-{i}"].run_id
        assert result["run_id"] == run_id
        for metric, expected in ((names.TRAIN_LOSS, STEP_POINTS), (names.TRAIN_ERROR, CURVE_POINTS // 2), (names.VAL_ERROR, CURVE_POINTS // 2)):
            history = client.get_metric_history(run_id, metric)
            assert sorted(m.step for m in history) == list(range(expected)), (run_id, metric)
            points += len(history)
        blob = tracking.download_artifact(run_id, f"blob-{i}.bin", tmp_path / f"back-{i}")
        assert blob.stat().st_size == BLOB_BYTES
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == result["sha256"]
        assert len(tracking.read_curve(run_id)) == CURVE_POINTS
    server_log = (mlflow_server.root / server.SERVER_LOG).read_bytes()[log_start:].decode(errors="replace")
    statuses = [int(part.split()[0]) for part in server_log.split('HTTP/1.1" ')[1:]]
    failed = [s for s in statuses if s >= 500]
    retries = sum(r["retries"] for r in results)
    print(f"{WORKERS} processes: {points} metric points, {WORKERS} runs, {2 * WORKERS} artifacts, "
          f"{len(statuses)} requests, {len(failed)} server errors, {retries} client retries in {elapsed:.1f} s")
    assert points == WORKERS * (STEP_POINTS + CURVE_POINTS)
    assert "database is locked" not in server_log and failed == [] and retries == 0, "no write failed, not even once"


def test_signalled_processes_never_leave_a_run_running(experiment: str) -> None:
    # spawn, not fork: a fresh interpreter, like a real trial process, inherits no signal handlers or
    # threads from this one (a forked child of a process that ran ray.init carries Ray's SIGTERM handler).
    spawn = multiprocessing.get_context("spawn")
    opened = spawn.SimpleQueue()
    holders = {key: spawn.Process(target=hold_run, args=(experiment, key, opened)) for key in ("terminated", "killed")}
    for holder in holders.values():
        holder.start()
    opened_ids = {opened.get(), opened.get()}
    run_ids = {r.key: r.run_id for r in tracking.query(experiment, status="RUNNING")}
    assert set(run_ids.values()) == opened_ids
    holders["terminated"].terminate()  # SIGTERM
    holders["killed"].kill()
    for holder in holders.values():
        holder.join(timeout=60)
    assert holders["terminated"].exitcode == 128 + signal.SIGTERM, "exits like a process ended by SIGTERM"
    assert holders["killed"].exitcode == -signal.SIGKILL

    [terminated] = tracking.query(experiment, status="KILLED")
    assert terminated.run_id == run_ids["terminated"] and terminated.tags[names.TAG_FAILURE] == "terminated by SIGTERM"
    [orphan] = tracking.query(experiment, status="RUNNING")  # SIGKILL cannot be caught: the stage cleans up after
    assert orphan.run_id == run_ids["killed"]
    assert tracking.end_stale_runs(experiment, "killed", "the trial's worker died") == [orphan.run_id]
    assert tracking.query(experiment, status="RUNNING") == []
    assert tracking.query(experiment, status="FAILED")[0].tags[names.TAG_FAILURE] == "the trial's worker died"
