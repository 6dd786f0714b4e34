"""Faults a long grid meets, on real components: the tracking server dying, Ctrl-C and SIGTERM mid-stage, an artifact
store that cannot take a checkpoint. After each, one rerun of the same command finishes with every cell's run once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tracking_fixtures import Server
from xfer import names, server, specs, stages, stopping, tracking
from xfer.specs import PretrainSpec, TrainSpec
from xfer.stages import RunOptions

# Small enough for two cores, long enough to be caught mid-stage: 2 sources, mlp_mixer, freeze 0 and 2, 4 epochs.
EPOCHS = 4
GRID = ["--preset", "smoke", "--sources", "uci_digits", "glyph_digits", "--archs", "mlp_mixer", "--freeze", "0", "2",
        "--sizes", "300", "--epochs", str(EPOCHS), "--pretrain-epochs", "1", "--attacks", "fgsm", "--attack-n", "20"]


def _wait(what: str, ready, timeout: float = 240.0, every: float = 0.3):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _val_points(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, names.VAL_ERROR))


def _once_each(experiment: str) -> list[tracking.RunRecord]:
    """Every cell of the experiment has exactly one run, and it is FINISHED."""
    runs = [r for r in tracking.query(experiment, status=None) if r.stage not in (names.GRID, names.REPORT)]
    by_key = Counter(r.key for r in runs)
    assert by_key and set(by_key.values()) == {1}, f"cells with more than one run: {[k for k, n in by_key.items() if n > 1]}"
    assert {r.status for r in runs} == {"FINISHED"}, Counter(r.status for r in runs)
    return runs


# ---- the tracking server ------------------------------------------------------------------------------------

def test_a_server_whose_wrapper_died_is_still_found_serving_and_stopped_whole(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    url = server.start_server(root)
    info = server.read_server_file(root)
    workers = [pid for pid in info["serving"] if pid != info["pid"]]
    assert info["pid"] in info["serving"] and workers, "server.json names the wrapper and the worker that serves"
    os.kill(info["pid"], signal.SIGKILL)   # the `mlflow server` wrapper only: its uvicorn worker keeps serving
    _wait("the wrapper gone", lambda: not _running(info["pid"]), timeout=10)
    assert server.start_server(root) == url and server.read_server_file(root)["pid"] == info["pid"], "reused, not restarted"
    server.stop_server(root)
    assert not server._healthy(url) and not any(_running(pid) for pid in workers), "stop ends the worker too"


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"   # a zombie has ended
    except OSError:
        return False


def test_the_watch_says_it_waits_for_a_server_xfer_did_not_start_then_gives_up(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    lines: list[str] = []
    lost: list[str] = []
    began = time.monotonic()
    with server.Watch(lines.append, on_lost=lost.append, patience_s=3.0, every_s=0.5, root=tmp_path,
                      url=f"http://127.0.0.1:{port}"):
        _wait("giving up", lambda: lost, timeout=30)
    assert time.monotonic() - began < 10
    assert lines and all(f"MLflow at http://127.0.0.1:{port} unreachable" in line for line in lines)
    assert "retry in" in lines[0] and "--mlflow-patience" in lines[0]
    assert lost == [f"the MLflow tracking server at http://127.0.0.1:{port} did not answer for 3 s"]


# ---- Ctrl-C, SIGTERM, and the server killed, one grid -------------------------------------------------------

STARTS_RAY_THEN_TERMINATED = """
import os, signal, sys, time
from xfer import cluster, stopping
with stopping.Stop(lambda line: print(line, flush=True)) as stop:
    cluster.connect()      # as a grid does once a stage has cells: Ray starts after the grid's handlers are in
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1)
    print("requested", stop.requested, stop.exit_code, flush=True)
"""


def test_sigterm_after_ray_started_stops_the_grid_cleanly_in_a_fresh_process(tmp_path: Path) -> None:
    """The command line's order: the grid's handlers first, then `ray.init`, whose C++ failure handler takes
    SIGTERM (a stack dump and a dead driver: what a cluster's job stop met). The grid takes SIGTERM back. The
    grid test below cannot see this: its Ray is started by the test session before the grid's handlers."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"XFER_RUNS": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", STARTS_RAY_THEN_TERMINATED], capture_output=True, text=True,
                          env=env, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopping: SIGTERM received" in done.stdout and "requested True 143" in done.stdout
    assert "SIGTERM received at time" not in done.stderr   # Ray's handler did not run

@pytest.mark.slow
def test_ctrl_c_then_sigterm_stop_the_grid_cleanly_and_a_killed_server_is_restarted_and_each_rerun_goes_on(
        local_ray, experiment: str, capsys: pytest.CaptureFixture, full_grid, mlflow_server: Server) -> None:
    client = MlflowClient(mlflow_server.url)
    argv = [*GRID, "--name", experiment]

    def signal_at(signum: int, epochs: int) -> threading.Thread:
        """Send `signum` to this process (whose main thread runs the grid) once a fine-tune run logged `epochs`
        more validation points than it had when the grid started."""
        def send() -> None:
            def ready() -> bool:
                for run in tracking.query(experiment, names.FINETUNE, status="RUNNING"):
                    if len(_val_points(client, run.run_id)) >= epochs + int(run.tags.get(names.TAG_RESUMED, 0)):
                        return True
                return False

            _wait("a fine-tune epoch", ready)
            if stopping.current() is not None:   # the grid still runs (its handlers, not pytest's, get the signal)
                os.kill(os.getpid(), signum)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        return thread

    # Ctrl-C two epochs into the fine-tune stage: running cells save their state and end resumable, then it stops.
    sender = signal_at(signal.SIGINT, epochs=2)
    began = time.monotonic()
    assert full_grid.main(argv) == 130
    sender.join(timeout=5)
    out = capsys.readouterr().out
    assert time.monotonic() - began < 300
    assert "stopping: Ctrl-C received" in out and "Go on with the same command: python sweeps/full_grid.py" in out
    assert "FAILED" not in out
    stopped = tracking.query(experiment, names.FINETUNE, status="KILLED")
    # Each stopped cell says from which epoch its saved state is (0: it stopped within its first epoch, and the rerun
    # starts it again in the same run); the one whose second epoch triggered the stop saved epoch 2.
    assert stopped and all(names.TAG_RESUMABLE in r.tags for r in stopped)
    assert max(int(r.tags[names.TAG_RESUMABLE]) for r in stopped) >= 2
    assert not tracking.query(experiment, names.ATTACK, status=None), "no later stage ran"
    assert not tracking.query(experiment, names.REPORT, status=None), "no report was made"
    assert not tracking.query(experiment, status="FAILED")

    # The same command again, stopped by SIGTERM (what a cluster's job stop sends) one epoch into its resumed cells.
    sender = signal_at(signal.SIGTERM, epochs=1)
    assert full_grid.main(argv) == 143
    sender.join(timeout=5)
    assert "stopping: SIGTERM received" in capsys.readouterr().out

    # Once more, and the tracking server (the session's own, in its runs folder) is killed with its worker, `kill -9`,
    # while a fine-tune cell runs: it is restarted on its port and the grid finishes.
    killed = server.read_server_file(mlflow_server.root)

    def kill_server() -> None:
        _wait("a fine-tune cell running", lambda: tracking.query(experiment, names.FINETUNE, status="RUNNING"))
        os.killpg(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_server, daemon=True)
    killer.start()
    assert full_grid.main(argv) == 0
    killer.join(timeout=5)
    out = capsys.readouterr().out
    assert "has exited; restarting it on the same runs folder" in out and "MLflow server restarted at" in out
    assert server._healthy(mlflow_server.url), "the restarted server answers at the same URL"
    restarted = server.read_server_file(mlflow_server.root)
    assert restarted["url"] == killed["url"] and restarted["pid"] != killed["pid"]

    # Every cell's run exactly once, the stopped cells continued in their runs.
    runs = _once_each(experiment)
    finetune = [r for r in runs if r.stage == names.FINETUNE]
    resumed = [r for r in finetune if names.TAG_RESUMED in r.tags]
    assert len(finetune) == 4 and resumed
    for run in finetune:   # each curve continues: one validation point per epoch, none twice
        steps = _val_points(client, run.run_id)
        assert len(steps) == EPOCHS and len(set(steps)) == EPOCHS, (run.tags.get(names.TAG_RESUMED), steps)


# ---- an artifact store that cannot take a checkpoint ------------------------------------------------------------

@pytest.mark.slow
def test_a_checkpoint_the_store_cannot_take_fails_the_cell_clearly_and_the_rerun_finishes_it(
        local_ray, experiment: str, mlflow_server: Server) -> None:
    from xfer import data

    spec = PretrainSpec(TrainSpec(arch="mlp_mixer", dataset="uci_digits", size=200, val_size=50, epochs=1,
                                  batch_size=32, seed=0))
    datasets = {"uci_digits": data.load("uci_digits")}
    folder = mlflow_server.root / "artifacts" / tracking.experiment_id(experiment)
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("not a folder")   # the store cannot take the run's files, as on a full or read-only disk
    try:
        summary = stages.run_training_stage(names.PRETRAIN, [spec], RunOptions(experiment=experiment), datasets)
    finally:
        folder.unlink()
    assert summary.ran == 0 and len(summary.failed) == 1
    reason = summary.failed[0][1]
    assert "could not store" in reason and "Free space there" in reason and str(folder) in reason
    [failed] = tracking.query(experiment, names.PRETRAIN, status="FAILED")
    assert names.TAG_CHECKPOINT_SHA not in failed.tags, "nothing half written is taken for a checkpoint"

    again = stages.run_training_stage(names.PRETRAIN, [spec], RunOptions(experiment=experiment), datasets)
    assert again.ran == 1 and not again.failed
    [run] = _once_each(experiment)
    assert run.run_id == failed.run_id and run.tags[names.TAG_CHECKPOINT_SHA], "the rerun went on in the same run"
    assert json.loads(run.tags[names.TAG_CLASSES]) and tracking.load_model(run.run_id)[0] is not None
    assert specs.key(spec) == run.key
