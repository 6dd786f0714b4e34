"""A cluster rehearsal on one machine: `ray up cluster.yaml`, then README's `ray job submit`, with real parts.

cluster.yaml's node setup and head setup commands run exactly as Ray's command runner runs them (a scratch HOME
whose ~/xfer holds this checkout's venv), so the head's own commands start its MLflow server; two Ray nodes start
with `ray start` on loopback; moto's S3 server on 127.0.0.1 stands in for the bucket cluster.yaml names (found
through AWS_ENDPOINT_URL, which boto3, and so MLflow, and pyarrow, and so Ray Tune, honour); and README's own
`ray job submit --working-dir .` line runs a narrowed smoke grid. Run it alone with
`python -m pytest tests/test_rehearsal.py` (README: On a cluster).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from test_cluster import CLUSTER, free_port, run_as_ray_runs

from xfer import names

REPO = CLUSTER.parent
README = REPO / "README.md"
# The smoke preset narrowed to one source and arch, 100 fine-tune examples, one epoch: 14 cells (4 of them training,
# 8 adversarial sets). Two freeze depths make two fine-tune packs, one a node; every epoch's state goes to Tune
# (--checkpoint-every 0), so trial checkpoints reach the bucket.
FLAGS = ("--preset smoke --sources uci_digits --archs mlp_mixer --sizes 100 --freeze 0 2 --epochs 1 "
         "--pretrain-epochs 1 --attack-n 20 --checkpoint-every 0")
OBJECT_STORE = 200 * 2**20   # each node's; Ray's default (30% of RAM) is far more than this grid moves
JOB_AGENT_TRIES = 12         # a minute for the head's job agent to register with its dashboard
NO_AGENT_YET = "No available agent to submit job"   # Ray's refusal until it has


def readme_job_command() -> str:
    """README's `ray job submit …` line (with its continuation lines), without its comment."""
    section = README.read_text().split("### On a cluster")[1].split("## MLflow: what is recorded")[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ray job submit"))
    command = []
    for line in lines[start:]:
        line = re.sub(r"\s+#.*$", "", line)
        command.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            return " ".join(command)
    raise AssertionError("README's ray job submit command does not end")


def _wait_for(url: str, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered; {log}:\n" + (
            log.read_text()[-3000:] if log.is_file() else "(no log)")
        time.sleep(0.5)


def _stop(marks: list[str], pids: list[int]) -> None:
    """End the processes this test started: those whose command line names one of `marks` (its own folders and
    ports), `pids`, and every process they started, and no one else's (another Ray on this machine keeps running)."""
    ours = {psutil.Process().pid, *(p.pid for p in psutil.Process().parents())}
    found: set[psutil.Process] = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid in pids or any(mark in " ".join(proc.info["cmdline"] or []) for mark in marks):
                found.add(proc)
                found.update(proc.children(recursive=True))
        except psutil.Error:
            continue
    found = {proc for proc in found if proc.pid not in ours}
    for proc in found:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(found, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cluster_rehearsal_on_one_machine(tmp_path: Path) -> None:
    """`ray up cluster.yaml` and README's `ray job submit`, on this machine: the job succeeds, every cell of the
    grid is a finished run in the head's MLflow with its model in the bucket, Tune's trial checkpoints are in the
    bucket, and trials ran on both nodes. If the head's MLflow did not start (the `pgrep -f "mlflow server"` check
    that matched its own shell), the rehearsal stops there, with the server's log."""
    import boto3
    from mlflow.tracking import MlflowClient

    config = CLUSTER.read_text()
    bucket = re.search(r"export XFER_BUCKET=s3://([\w.-]+)", config).group(1)   # the one cluster.yaml names
    # Ray's sockets live under its temp dir, and a socket path must fit 107 bytes: pytest's tmp_path is too deep.
    ray_tmp = Path(tempfile.mkdtemp(prefix="xfer-rehearsal-"))
    home = tmp_path / "home"
    (home / "xfer").mkdir(parents=True)
    (home / "xfer" / ".venv").symlink_to(sys.prefix)   # the node's venv, as setup_commands make it
    # These nodes have no GPU: set before the setup commands run, as a CPU cluster would, so that their
    # `grep -q XFER_GPUS_PER_TRIAL || echo … 0.25` keeps it (trials asking for GPUs would wait forever here).
    (home / ".bashrc").write_text("export XFER_GPUS_PER_TRIAL=0\n")
    s3_port, mlflow_port, gcs_port, dashboard_port = (free_port() for _ in range(4))
    s3 = f"http://127.0.0.1:{s3_port}"
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "XFER_MLFLOW_PORT": str(mlflow_port),
           "XFER_RUNS": str(tmp_path / "runs"), "RAY_USAGE_STATS_ENABLED": "0",
           # S3 on loopback in place of AWS's: any credentials, no instance metadata to ask for a role or region.
           "AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "rehearsal", "AWS_SECRET_ACCESS_KEY": "rehearsal",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    env |= {k: os.environ[k] for k in ("LANG", "LC_ALL", "TMPDIR") if k in os.environ}
    # The nodes reach MLflow at this machine's first address (cluster.yaml's MLFLOW_TRACKING_URI line), and MLflow
    # answers only Host headers of localhost and private addresses, as a VPC's are; this machine's may not be one.
    address = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()[0]
    env["MLFLOW_SERVER_ALLOWED_HOSTS"] = f"localhost:*,127.0.0.1:*,{address}:*"
    logs = tmp_path / "logs"
    logs.mkdir()
    with open(logs / "s3.log", "w") as s3_log:
        moto = subprocess.Popen([str(Path(sys.prefix) / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                                stdout=s3_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    laps = [("start", time.monotonic())]   # where the rehearsal's time goes, printed at its end
    try:
        _wait_for(f"{s3}/moto-api/", 60, logs / "s3.log")
        storage = boto3.client("s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="rehearsal",
                               aws_secret_access_key="rehearsal")
        storage.create_bucket(Bucket=bucket)

        # `ray up`: every node's setup commands (the venv is this one: no install), then the head's.
        import yaml

        cluster = yaml.safe_load(config)
        setup = [c for c in cluster["setup_commands"] if "uv pip install" not in c]
        for i, command in enumerate(setup + cluster["head_setup_commands"]):
            run_as_ray_runs(command, env, logs / f"setup-{i}.log")
        _wait_for(f"http://127.0.0.1:{mlflow_port}/health", 90, home / "mlflow" / "server.log")
        laps.append(("S3, setup commands, MLflow answers", time.monotonic()))

        # Two nodes of one CPU on loopback (cluster.yaml's start commands but for `ray stop`, which would end every
        # Ray on this machine, the autoscaler, which would call AWS, and fixed ports another Ray may hold).
        node = (f"--node-ip-address=127.0.0.1 --num-cpus=1 --num-gpus=0 --object-store-memory={OBJECT_STORE} "
                "--disable-usage-stats")
        run_as_ray_runs(f"ray start --head --port={gcs_port} --temp-dir={ray_tmp} --dashboard-host=127.0.0.1 "
                        f"--dashboard-port={dashboard_port} --dashboard-agent-listen-port={free_port()} "
                        f"--ray-client-server-port={free_port()} {node}", env, logs / "head.log", timeout=120)
        # Each node its own temp dir, as each machine has its own disk: a node that finds a working_dir package it
        # did not unpack itself unpacks it again over it (Ray's runtime_env packaging), under the head's job driver.
        run_as_ray_runs(f"ray start --address=127.0.0.1:{gcs_port} --temp-dir={ray_tmp / 'node2'} "
                        f"--dashboard-agent-listen-port={free_port()} {node}", env, logs / "worker.log", timeout=120)
        _wait_for(f"http://127.0.0.1:{dashboard_port}/api/version", 60, logs / "head.log")   # ray[default]'s job API
        laps.append(("two Ray nodes", time.monotonic()))

        # README's command as written there, from this checkout, on the rehearsal's dashboard port and grid.
        command = readme_job_command()
        # No --storage-path: on a node where cluster.yaml exported XFER_BUCKET, Tune's storage is $XFER_BUCKET/ray.
        assert "http://127.0.0.1:8265" in command and command.endswith("-- python sweeps/full_grid.py"), command
        command = command.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dashboard_port}") + " " + FLAGS
        laptop = env | {"PATH": f"{Path(sys.prefix) / 'bin'}:{env['PATH']}"}
        for attempt in range(JOB_AGENT_TRIES):
            with open(logs / "job.log", "w+") as out:
                job = subprocess.run(command, shell=True, executable="/bin/bash", cwd=REPO, env=laptop, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=480)
                out.seek(0)
                said = out.read()
            # The dashboard answers before the head's job agent has registered with it; Ray then refuses the job
            # (nothing was submitted) and says to try again later, as README tells a person to.
            if job.returncode == 0 or NO_AGENT_YET not in said:
                break
            time.sleep(5)
        assert job.returncode == 0, said[-6000:]
        laps.append(("ray job submit", time.monotonic()))
        [job_id] = re.findall(r"Job '([\w-]+)' submitted successfully", said)
        with urllib.request.urlopen(f"http://127.0.0.1:{dashboard_port}/api/jobs/{job_id}", timeout=10) as answer:
            assert json.load(answer)["status"] == "SUCCEEDED"   # the job API's word, not the CLI's exit code

        # Every cell is in the head's MLflow: the grid's own plan, asked of that server, has nothing left to run.
        tracking = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
        plan = subprocess.run([sys.executable, "sweeps/full_grid.py", *FLAGS.split(), "--dry-run"], cwd=REPO,
                              env=laptop | tracking, capture_output=True, text=True, timeout=120)
        rows = {line.split()[0]: line.split()[1:4] for line in plan.stdout.splitlines()
                if line.split() and line.split()[0] in names.STAGES}   # stage: cells, in MLflow, to run
        assert len(rows) == 6 and all(row[1] == row[0] and row[2] == "0" for row in rows.values()), plan.stdout
        planned = int(re.search(r"^  total +(\d+) ", said, re.M).group(1))   # what the job's own plan counted
        assert sum(int(row[0]) for row in rows.values()) == planned == 14, (planned, plan.stdout)
        client = MlflowClient(tracking["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("smoke")
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        assert {r.info.status for r in runs} == {"FINISHED"}
        training = [r for r in runs if r.data.tags.get(names.TAG_STAGE) in (names.PRETRAIN, names.FINETUNE,
                                                                            names.SCRATCH)]
        assert len(training) == 4   # 1 pretrained model, 2 fine-tunes (freeze 0, 2), 1 scratch
        assert len({r.data.tags[names.TAG_NODE] for r in training}) == 2   # trials ran on both nodes

        # The bucket holds each training run's model (MLflow's artifacts) and Tune's trial checkpoints.
        keys = [o["Key"] for page in storage.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for o in page.get("Contents", [])]
        for run in training:
            prefix = "mlflow/" + run.info.artifact_uri.split(":", 1)[1].lstrip("/") + f"/{names.CHECKPOINT_DIR}/"
            assert any(k.startswith(prefix) for k in keys), (prefix, keys[:20])
        assert any(k.startswith("ray/") and "/checkpoint_" in k for k in keys), keys
        laps.append(("checks", time.monotonic()))
    finally:
        _stop([str(ray_tmp), str(tmp_path)], [moto.pid])
        # Ray's own logs (the job driver's, each node's) kept beside the test's, for a failure's reading.
        for session in ray_tmp.glob("**/session_2*"):
            shutil.copytree(session / "logs", logs / f"ray-{session.parent.name}-{session.name}",
                            ignore_dangling_symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        laps.append(("teardown", time.monotonic()))
        print("rehearsal:", ", ".join(f"{name} {end - start:.0f} s" for (_, start), (name, end) in zip(laps, laps[1:])))
