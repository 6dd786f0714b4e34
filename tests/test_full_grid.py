"""The main job end to end on a real local Ray and MLflow server: all stages, rerun, retries, DDP."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from xfer import data, estimators, grid as grids, names, pipeline, scores, server, specs, stages, tracking
from xfer.stages import RunOptions, run_training_stage
from xfer.specs import PretrainSpec, TrainSpec

# ---- end to end on a real local Ray and MLflow server --------------------------------------------

@pytest.mark.slow
def _plan_rows(grid: grids.Grid, experiment: str) -> dict[str, list[str]]:
    """The dry run's table: each stage's cells, in MLflow, to run (and the total's cells, to run, packs)."""
    lines: list[str] = []
    pipeline.dry_run(grid, RunOptions(experiment=experiment), echo=lines.append)
    return {line.split()[0]: line.split()[1:4] for line in lines if line.startswith("  ") and len(line.split()) > 4}


def test_smoke_preset_end_to_end_then_nothing_reruns(local_ray, experiment: str, capsys, full_grid) -> None:
    argv = ["--preset", "smoke", "--name", experiment, "--epochs", "2", "--pretrain-epochs", "1", "--attack-n", "200"]
    grid = full_grid.grid_from_args(full_grid.parser().parse_args(argv))
    planned_sets = _plan_rows(grid, experiment)["attack"][0]   # before anything is trained: from the grid's datasets
    assert full_grid.main(argv) == 0
    out = capsys.readouterr().out
    assert "MLflow UI: http://127.0.0.1:" in out and "report:" in out
    runs = tracking.query(experiment, status="FINISHED")
    by_stage = {stage: [r for r in runs if r.stage == stage] for stage in names.STAGES}
    assert len(by_stage[names.PRETRAIN]) == 2 and len(by_stage[names.SCRATCH]) == 1
    assert len(by_stage[names.FINETUNE]) == 4  # 2 sources × freeze {0, 20}
    pretrain_ids = {r.run_id for r in by_stage[names.PRETRAIN]}
    assert all(r.tags[names.TAG_PRETRAIN_RUN] in pretrain_ids for r in by_stage[names.FINETUNE])
    sets = by_stage[names.ATTACK]   # one run per adversarial set; its scores are rows of one table, not runs
    assert sets and all(r.tags[names.TAG_SURROGATE_RUN] and r.tags[names.TAG_SCORED] for r in sets)
    table = scores.read(experiment)
    assert len(table) == sum(int(r.metrics[names.TARGETS_SCORED]) for r in sets) > len(sets)
    assert set(table["set_run_id"]) == {r.run_id for r in sets}
    assert set(table["target_run_id"]) == {r.run_id for r in by_stage[names.FINETUNE] + by_stage[names.SCRATCH]}
    assert len(by_stage[names.REPORT]) == 1
    # The estimate stage: one run per pretrained model, its four scores as metrics, on the whole MNIST-5k pool.
    estimates = by_stage[names.ESTIMATE]
    assert sorted(r.tags[names.TAG_PRETRAIN_RUN] for r in estimates) == sorted(pretrain_ids)
    assert all(np.isfinite([r.metrics[e] for e in estimators.ESTIMATORS]).all() for r in estimates)
    assert {r.metrics[names.ESTIMATE_EXAMPLES] for r in estimates} == {4000.0}
    assert {r.tags[names.TAG_TARGET] for r in estimates} == {"mnist5k"}
    report = Path(out.split("report: ")[1].split()[0])
    assert report.is_file() and (report.parent / "data" / "transfer.parquet").is_file()
    assert not tracking.query(experiment, status="RUNNING")
    # The report's numbers are the runs': each training run's test error as MLflow has it, one transfer row per score.
    tables = report.parent / "data"
    for stage in (names.FINETUNE, names.SCRATCH):
        errors = pd.read_parquet(tables / f"{stage}.parquet").set_index("run_id")["test_error"]
        assert errors.to_dict() == pytest.approx({r.run_id: r.metrics[names.TEST_ERROR] for r in by_stage[stage]},
                                                 rel=1e-12)
    transfer = pd.read_parquet(tables / "transfer.parquet")
    scored = table.set_index(["set_run_id", "target_run_id"])[[names.ADV_ACC, names.SUCCESS_RATE]]
    rows_ = transfer.set_index(["run_id", "target_run_id"])[[names.ADV_ACC, names.SUCCESS_RATE]]
    assert len(transfer) == len(table) and rows_.index.is_unique and set(rows_.index) == set(scored.index)
    pd.testing.assert_frame_equal(rows_.sort_index(), scored.sort_index(), check_dtype=False, check_names=False)
    key_file = report.parent / ".report-key"
    made = key_file.stat().st_mtime_ns
    # The plan of the finished grid: every stage's cells are in MLflow, the attack cells counted as they ran, and
    # as the plan counted them before anything was trained.
    rows = _plan_rows(grid, experiment)
    attack_cells = len({r.tags[names.TAG_KEY] for r in sets})
    assert planned_sets == str(attack_cells) == "13"   # the smoke grid: 14 settings × surrogates, letters' 2 are one
    assert rows["attack"] == [str(attack_cells)] * 2 + ["0"] and rows["report"] == ["1", "1", "0"]
    assert rows["pretrain"] == ["2", "2", "0"] and rows["total"][1:] == ["0", "0"]   # to run, packs
    assert rows["estimate"] == ["2", "2", "0"]
    # The same grid again: every cell is found by its key in MLflow, nothing re-runs, the report is kept as made.
    outcome = pipeline.run_grid(grid, RunOptions(experiment=experiment))
    assert [s.ran for s in outcome.summaries] == [0] * 6   # pretrain, estimate, finetune, scratch, attack, report
    assert sum(s.cached for s in outcome.summaries) == sum(s.cells for s in outcome.summaries) > 0
    assert outcome.summaries[-1].stage == names.REPORT and outcome.report_dir == str(report.parent)
    assert key_file.stat().st_mtime_ns == made and len(tracking.query(experiment, tags={names.TAG_STAGE: names.REPORT})) == 1
    # ... and it is recorded as a child of the grid's run, not as a second, empty top-level run in the UI.
    first, again = tracking.query(experiment, names.GRID, tags={names.TAG_GRID_STAGE: "all"})
    assert "mlflow.parentRunId" not in first.tags and again.tags["mlflow.parentRunId"] == first.run_id
    assert again.tags["mlflow.runName"].endswith("(nothing to do)")
    assert tracking.ui_url(experiment).endswith(f"/#/experiments/{tracking.experiment_id(experiment)}/runs")
    assert tracking._client().get_experiment_by_name(experiment).tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_fast_dev_run_rehearses_every_stage_on_one_batch_in_an_experiment_of_its_own(
        local_ray, experiment: str, capsys, full_grid, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    # kmnist's files are not under this data root: a synthetic set of its published shape stands in for it.
    argv = ["--preset", "smoke", "--name", experiment, "--sources", "glyph_letters", "kmnist",
            "--data-root", str(tmp_path / "empty"), "--fast-dev-run"]
    assert full_grid.main(argv) == 0
    out = capsys.readouterr().out
    rehearsal = experiment + "-fast-dev-run"
    assert "synthetic stand-ins for kmnist" in out and "orchestration" in out and "s per cell" in out
    assert not tracking.experiment_exists(experiment), "a rehearsal writes nothing into the grid's own experiment"
    runs = tracking.query(rehearsal, status=None)
    by_stage = {stage: [r for r in runs if r.stage == stage] for stage in names.STAGES}
    assert all(r.status == "FINISHED" for r in runs)
    assert (len(by_stage[names.PRETRAIN]), len(by_stage[names.FINETUNE]), len(by_stage[names.SCRATCH])) == (2, 4, 1)
    # One optimiser step a cell (the smoke grid's cells train 6 epochs of 500 examples), one evaluation batch.
    assert {r.metrics["steps"] for r in by_stage[names.FINETUNE] + by_stage[names.SCRATCH]} == {1.0}
    assert {r.params["train.epochs"] for r in by_stage[names.FINETUNE]} == {"1"}
    kmnist = [r for r in by_stage[names.PRETRAIN] if r.tags[names.TAG_SOURCE] == "kmnist"][0]
    assert json.loads(kmnist.tags[names.TAG_CLASSES]) == list(data.PUBLISHED["kmnist"].class_names)
    sets = by_stage[names.ATTACK]
    table = scores.read(rehearsal)
    assert sets and len(table) == sum(int(r.metrics[names.TARGETS_SCORED]) for r in sets)
    assert set(table["n"]) == {grids.FAST_DEV_RUN_ATTACK_N}
    assert len(by_stage[names.ESTIMATE]) == 2   # on one batch of target images
    assert {r.metrics[names.ESTIMATE_EXAMPLES] for r in by_stage[names.ESTIMATE]} == {32.0}
    cells = sum(len(by_stage[s]) for s in (names.PRETRAIN, names.ESTIMATE, names.FINETUNE, names.SCRATCH, names.ATTACK))
    assert len(runs) <= cells + 1 + 7   # the cells, the report, and the grid's parent runs (grid + 6 stages)
    report = Path(out.split("report: ")[1].split()[0])
    assert "synthetic stand-ins for kmnist" in report.read_text()
    # Its rerun: nothing to do.
    assert full_grid.main(argv) == 0
    assert "nothing to run" in capsys.readouterr().out


TINY = ["--preset", "smoke", "--sources", "uci_digits", "--archs", "mlp_mixer", "--sizes", "100", "--epochs", "1",
        "--pretrain-epochs", "1", "--attack-n", "20"]   # one cell a training stage: 1,137 uci_digits, 1 epoch


def _cells(experiment: str) -> list[tracking.RunRecord]:
    """The experiment's cell runs (any status), oldest first: not the grid's and its stages' parent runs."""
    return [r for r in tracking.query(experiment, status=None) if r.stage in names.STAGES]


@pytest.mark.slow
def test_stages_runs_only_the_stages_named(local_ray, experiment: str, capsys, full_grid) -> None:
    argv = [*TINY, "--name", experiment, "--stages", "pretrain"]
    assert full_grid.main(argv) == 0
    out = capsys.readouterr().out
    # The plan said so: the other stages are rows marked skipped, out of the total (one pretrain cell).
    plan = {line.split()[0]: line.split()[1:4] for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert [stage for stage, row in plan.items() if row[2:] == ["skipped"]] == ["estimate", "finetune", "scratch", "attack",
                                                                               "report"]
    assert plan["total"] == ["1", "1", "1"] and "report:" not in out
    assert [(r.stage, r.status) for r in _cells(experiment)] == [(names.PRETRAIN, "FINISHED")]   # no other stage ran
    assert full_grid.main(argv) == 0   # again: nothing to run, and still nothing of the other stages
    assert len(_cells(experiment)) == 1 and "nothing to run" in capsys.readouterr().out


@pytest.mark.slow
def test_force_runs_the_finished_cells_again_as_new_runs_of_their_keys(local_ray, experiment: str, full_grid) -> None:
    argv = [*TINY, "--name", experiment, "--stages", "pretrain"]
    assert full_grid.main(argv) == 0
    [first] = _cells(experiment)
    assert full_grid.main([*argv, "--force"]) == 0
    again = _cells(experiment)
    assert [(r.stage, r.status, r.key) for r in again] == [(names.PRETRAIN, "FINISHED", first.key)] * 2
    assert again[-1].run_id != first.run_id and again[-1].start_time > first.end_time


def _tiny_pretrain(epochs: int, seed: int = 0) -> PretrainSpec:
    return PretrainSpec(TrainSpec(arch="lenet5", dataset="mnist5k", size=600, val_size=100, epochs=epochs,
                                  batch_size=32, lr=3e-3, seed=seed))


def _own_trials() -> list[psutil.Process]:
    """The Tune trial processes of this test session's Ray, and no one else's: the session's local Ray was started
    by this process (`ray.init`), its raylet starts the workers, so they descend from this process; another job's
    trials on the same machine do not."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "ImplicitFunc" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:   # it ended meanwhile
            continue
    return found


def _kill_trial_when(experiment: str, key: str, epoch: int, done: threading.Event) -> list[int]:
    """SIGKILL this session's trial process once its MLflow run has logged `epoch` validation points."""
    killed: list[int] = []
    deadline = time.time() + 240
    while not done.is_set() and time.time() < deadline:
        record = next(iter(tracking.query(experiment, status="RUNNING", tags={names.TAG_KEY: key})), None)
        if record and len(tracking._client().get_metric_history(record.run_id, names.VAL_ERROR)) >= epoch:
            for proc in _own_trials():
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
            return killed
        time.sleep(0.2)
    return killed


@pytest.mark.slow
def test_killed_trial_resumes_from_its_checkpoint(local_ray, experiment: str) -> None:
    spec = _tiny_pretrain(epochs=6)
    key = specs.key(spec)
    done = threading.Event()
    killed: list[int] = []
    killer = threading.Thread(target=lambda: killed.extend(_kill_trial_when(experiment, key, 2, done)))
    killer.start()
    datasets = stages.load_datasets({"mnist5k"}, RunOptions(experiment=experiment))
    # A checkpoint at every epoch (no interval), so the kill lands after epoch 2's state reached Tune.
    options = RunOptions(experiment=experiment, max_failures=2, checkpoint_interval_s=0.0)
    summary = run_training_stage(names.PRETRAIN, [spec], options, datasets)
    done.set()
    killer.join()
    assert killed, "the trial was never killed"
    assert summary.ran == 1 and summary.resumed == 1 and not summary.failed
    assert "1 resumed after a crash" in summary.line()   # reported as resumed, not as an errored trial
    record = tracking.find_finished(experiment, key)
    resumed_from = int(record.tags["xfer.resumed_from_epoch"])
    # Killed once MLflow had epoch 2's validation point (each epoch's points are logged, then its state handed to
    # Tune): the last checkpoint is epoch 2, or a neighbour when the kill raced an epoch's end — never zero,
    # never the end.
    assert 1 <= resumed_from < 6
    curve = tracking.read_curve(record.run_id)
    assert [r["epoch"] for r in curve if r["split"] == "val"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


@pytest.mark.slow
def test_workers_per_trial_trains_with_two_gloo_workers(local_ray, experiment: str) -> None:
    spec = _tiny_pretrain(epochs=1, seed=1)
    datasets = stages.load_datasets({"mnist5k"}, RunOptions(experiment=experiment))
    summary = run_training_stage(names.PRETRAIN, [spec], RunOptions(experiment=experiment, workers_per_trial=2), datasets)
    assert summary.ran == 1 and not summary.failed, summary.failed
    record = tracking.find_finished(experiment, specs.key(spec))
    assert record.tags["xfer.workers"] == "2"
    # Each of the 2 ranks takes half of the 600 training examples: 300 // 32 = 9 steps, not 18.
    assert record.metrics["steps"] == 9


@pytest.mark.slow
@pytest.mark.own_ray
def test_two_node_cluster_runs_trials_on_both_nodes(mlflow_server, experiment: str) -> None:
    """A simulated two-node cluster (Ray's own `cluster_utils.Cluster`): one 1-CPU trial per node at a time.

    A driver joins one Ray at a time, so this shuts the session's local Ray down; marked `own_ray`, it runs after
    every other test, so the session's Ray is not started a second time (`local_ray` would, if one came later)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the session's local Ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": server.worker_env()}, configure_logging=False)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        cells = [_tiny_pretrain(epochs=1, seed=s) for s in range(4)]
        datasets = stages.load_datasets({"mnist5k"}, RunOptions(experiment=experiment))
        summary = run_training_stage(names.PRETRAIN, cells, RunOptions(experiment=experiment), datasets)
        assert summary.ran == 4 and not summary.failed, summary.failed
        records = [tracking.find_finished(experiment, specs.key(c)) for c in cells]
        assert all(r is not None and names.TAG_CHECKPOINT_SHA in r.tags for r in records)
        assert {r.tags["xfer.node"] for r in records} == nodes  # trials landed on both nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
