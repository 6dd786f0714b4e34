"""cluster.yaml passes Ray's own cluster-config validation, offline, and says what the design needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_is_valid_for_ray_up() -> None:
    config = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(config)  # raises on any schema violation
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1
    assert config["head_node_type"] == "head"
    head_setup = " ".join(config["head_setup_commands"])
    assert "mlflow server" in head_setup and "s3://" in head_setup and "MLFLOW_TRACKING_URI" in head_setup
    [install] = [c for c in config["setup_commands"] if "uv pip install" in c]
    # The same versions on every node, whenever it boots: uv and Python's patch pinned, packages as of one date.
    assert re.search(r'"uv==\d+\.\d+\.\d+"', install) and re.search(r"--python 3\.11\.\d+ ", install)
    assert '--exclude-newer "${XFER_EXCLUDE_NEWER:-' in install
    assert '"ray[default]"' in install   # the dashboard's job API, for README's `ray job submit`


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_as_ray_runs(command: str, env: dict[str, str], log: Path, timeout: float = 60) -> None:
    """One of cluster.yaml's commands, wrapped exactly as Ray's command runner wraps it on a node (`bash --login -c
    -i 'source ~/.bashrc; ... && (command)'`, its `_with_interactive`), through a shell, as ssh hands it over.
    Output to `log`, not a pipe: a server it starts in the background would hold a pipe open."""
    import subprocess

    from ray.autoscaler._private.command_runner import _with_interactive

    with open(log, "w+") as out:
        done = subprocess.run(" ".join(_with_interactive(command)), shell=True, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout, stdin=subprocess.DEVNULL)
        out.seek(0)
        assert done.returncode == 0, (command, out.read()[-2000:])


def test_the_head_setup_commands_start_mlflow_when_run_as_ray_runs_them(tmp_path: Path) -> None:
    """cluster.yaml's head_setup_commands, each wrapped exactly as Ray's command runner wraps it
    (`bash --login -c -i 'source ~/.bashrc; ... && (command)'`, through a shell, as ssh hands it over), in a
    scratch HOME whose ~/xfer is this checkout: the MLflow server answers, and running them again (as `ray up`
    does on every update) starts no second one. A check that matched its own shell's command line (`pgrep -f
    "mlflow server"`) never started the server: this test fails if it comes back."""
    import os
    import sys
    import time
    import urllib.request

    import psutil

    home = tmp_path / "home"
    (home / "xfer").mkdir(parents=True)
    (home / "xfer" / ".venv").symlink_to(sys.prefix)   # the node's venv, as setup_commands made it
    port = free_port()
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "XFER_MLFLOW_PORT": str(port),
           "XFER_BUCKET": (tmp_path / "bucket").as_uri()}   # a local artifact root in place of s3://
    commands = yaml.safe_load(CLUSTER.read_text())["head_setup_commands"]

    def run_all() -> None:
        for command in commands:
            run_as_ray_runs(command, env, tmp_path / "setup.log")

    def serving() -> list[psutil.Process]:
        """The `mlflow server` processes on the test's port (each with its uvicorn worker as a child)."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "mlflow server" in cmdline and f"--port {port}" in cmdline and "bash" not in cmdline:   # the wrapper
                found.append(proc)
        return found

    try:
        run_all()
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    assert answer.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, (home / "mlflow" / "server.log").read_text()[-3000:]
                time.sleep(1)
        started = serving()
        assert len(started) == 1 and f"sqlite:///{home}/mlflow/mlflow.db" in " ".join(started[0].cmdline())
        assert "--workers 1" in " ".join(started[0].cmdline())   # one writer on SQLite
        bashrc = (home / ".bashrc").read_text()
        assert "export MLFLOW_TRACKING_URI=http://" in bashrc and f":{port}" in bashrc
        run_all()   # `ray up` again: the server answers, so none is started; the .bashrc line is not repeated
        time.sleep(2)
        assert [p.pid for p in serving()] == [started[0].pid]
        assert (home / ".bashrc").read_text().count("MLFLOW_TRACKING_URI") == 1
    finally:
        for proc in serving():
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()


def test_a_trial_holding_a_gpu_that_torch_cannot_see_stops_with_the_reason() -> None:
    """A node whose NVIDIA driver is older than torch's CUDA build: Ray hands the trial GPU ids, torch sees no
    device. The trial stops at once naming both, instead of training on the CPU without a word."""
    import pytest
    import torch

    from xfer import tune_adapter
    from xfer.errors import XferError

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here, so a GPU share is usable")
    tune_adapter.check_gpu([])   # no GPU share: CPU training is what was asked for
    with pytest.raises(XferError, match=r"holds GPU\(s\) 0 on .* sees no CUDA device there .*--gpus-per-trial 0"):
        tune_adapter.check_gpu(["0"])


def test_trial_storage_defaults_to_the_bucket_and_refuses_a_local_folder_across_machines(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    import pytest

    from xfer import cluster
    from xfer.errors import XferError

    local = tmp_path / "ray"
    monkeypatch.delenv(cluster.BUCKET_ENV, raising=False)
    assert cluster.trial_storage(None, local) == str(local)
    assert cluster.trial_storage("s3://mine/tune", local) == "s3://mine/tune"
    monkeypatch.setenv(cluster.BUCKET_ENV, "s3://xfer-bucket/")   # as cluster.yaml's setup commands export it
    assert cluster.trial_storage(None, local) == "s3://xfer-bucket/ray"
    # Several nodes on one machine (tests/test_full_grid.py's two-node cluster) share its disk: a folder will do.
    cluster.check_shared(str(local), {"10.0.0.5"})
    cluster.check_shared("s3://xfer-bucket/ray", {"10.0.0.5", "10.0.0.6"})
    with pytest.raises(XferError, match=r"nodes are on 2 machines \(10.0.0.5, 10.0.0.6\).*--storage-path s3://"):
        cluster.check_shared(str(local), {"10.0.0.5", "10.0.0.6"})


def test_a_worker_ray_gave_no_gpu_sees_none(local_ray) -> None:
    """`--gpus-per-trial 0` on a GPU node: Ray 2.60 leaves the node's CUDA_VISIBLE_DEVICES to a worker that asked for
    no GPU, so torch would train it on cuda:0 beside the trials the scheduler gave that GPU. The workers' environment
    (server.worker_env) has Ray hide the GPUs from such a worker; a worker started as if on a GPU node (its
    CUDA_VISIBLE_DEVICES naming a device) sees none once its task runs."""
    import os

    @local_ray.remote(num_gpus=0, runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": "0"}})
    def visible() -> str | None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    assert local_ray.get(visible.remote()) == ""


class _Metadata:
    """EC2's instance metadata service on loopback (IMDSv2: a token, then the spot notice, 404 until `post`)."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading
        from datetime import datetime, timedelta, timezone

        notice: dict[str, str] = {}
        self.notice = notice

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                self._answer(200, b"token" if self.path == "/latest/api/token" else b"")

            def do_GET(self) -> None:
                right = self.headers.get("X-aws-ec2-metadata-token") == "token"
                if self.path == "/latest/meta-data/spot/instance-action" and right and notice:
                    self._answer(200, json.dumps(notice).encode())
                else:
                    self._answer(404 if right else 401, b"")

            def _answer(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.post = lambda seconds: notice.update(action="terminate", time=(
            datetime.now(timezone.utc) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ"))


def test_spot_notice_reads_the_instance_metadata() -> None:
    from xfer import cluster

    metadata = _Metadata()
    try:
        assert cluster.spot_notice(metadata.url) is None   # 404: no notice
        metadata.post(120)
        assert 100 < cluster.spot_notice(metadata.url) <= 120
    finally:
        metadata.server.shutdown()


@pytest.mark.slow
@pytest.mark.own_ray
def test_a_spot_reclaim_drained_by_the_watcher_does_not_spend_max_failures(tmp_path: Path) -> None:
    """A trial on a spot node; EC2 posts its notice; the node dies. With cluster.yaml's watcher the node was drained
    for preemption first, so Ray Tune retries the trial on another node although max_failures is 0 (a failure it
    counted would end the trial in ERROR)."""
    import threading
    import time

    import ray
    from ray import tune
    from ray.cluster_utils import Cluster

    from xfer import cluster as xcluster

    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * 2**20})
    metadata = _Metadata()
    try:
        spot = nodes.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        ray.init(address=nodes.address, configure_logging=False)
        ran_on = tmp_path / "nodes"

        def trainable(config: dict) -> None:
            import ray as worker_ray
            from ray import tune as worker_tune

            with open(config["log"], "a") as log:
                log.write(worker_ray.get_runtime_context().get_node_id() + "\n")
            for i in range(200):
                time.sleep(0.1)
                worker_tune.report({"i": i})
                if i >= 5 and config["done"].exists():
                    return

        done = tmp_path / "done"
        results: dict = {}
        tuner = tune.Tuner(trainable, param_space={"log": str(ran_on), "done": done},
                           run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0,
                                                     failure_config=tune.FailureConfig(max_failures=0)))
        fit = threading.Thread(target=lambda: results.update(grid=tuner.fit()), daemon=True)
        fit.start()
        deadline = time.monotonic() + 60
        while not (ran_on.exists() and ran_on.read_text().strip()):
            assert time.monotonic() < deadline, "the trial never started"
            time.sleep(0.2)
        assert ran_on.read_text().split() == [spot.node_id]

        watched: dict = {}
        watcher = threading.Thread(target=lambda: watched.update(left=xcluster.watch_spot(
            nodes.address, spot.node_id, metadata.url, poll_s=0.2, echo=lambda line: None)), daemon=True)
        watcher.start()
        metadata.post(120)
        watcher.join(60)
        assert 100 < watched["left"] <= 120
        replacement = nodes.add_node(num_cpus=1, object_store_memory=100 * 2**20)   # the autoscaler's next node
        nodes.remove_node(spot, allow_graceful=False)   # EC2 takes the machine
        deadline = time.monotonic() + 90
        while fit.is_alive() and len(ran_on.read_text().split()) < 2:   # retried, or ended in ERROR
            assert time.monotonic() < deadline, "the trial was neither retried nor ended"
            time.sleep(0.2)
        done.touch()
        fit.join(120)
        [result] = list(results["grid"])
        assert result.error is None and result.metrics["i"] >= 5
        assert ran_on.read_text().split() == [spot.node_id, replacement.node_id]   # retried on the other node
    finally:
        metadata.server.shutdown()
        ray.shutdown()
        nodes.shutdown()
