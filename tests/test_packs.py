"""Packs: many cells in one process, each with its own MLflow run, curve, checkpoint, failure and resume."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from xfer import data, names, packs, server, specs, stages, tracking, training_cells
from xfer import train as loop
from xfer.cells import Cell
from xfer.errors import XferError
from xfer.specs import PretrainSpec, TrainSpec


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("mnist5k")


def tiny(seed: int, **kw) -> PretrainSpec:
    # 300 examples at batch 32: 9 steps an epoch, fewer than log_every, so each epoch ends on a partial window.
    return PretrainSpec(TrainSpec(**{"arch": "lenet5", "dataset": "mnist5k", "size": 300, "val_size": 100, "epochs": 2,
                                     "batch_size": 32, "lr": 3e-3, "log_every": 50, "seed": seed, **kw}))


def history(run_id: str, metric: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(server.ensure_server()).get_metric_history(run_id, metric))


# ---- planning --------------------------------------------------------------------------------------

def test_packs_group_compatible_cells_and_fill_every_slot() -> None:
    cells = [tiny(s) for s in range(5)] + [tiny(s, size=400) for s in range(3)] + [tiny(0, arch="resnet_mini")]
    key = lambda c: packs.pack_key(training_cells.TRAINING, c)  # noqa: E731
    chosen = packs.plan(cells, key, pack_size=4)
    assert sorted(map(len, chosen)) == [1, 2, 3, 3]   # 5 alike → 3 + 2; 3 of size 400; the resnet alone
    assert all(len({key(c) for c in pack}) == 1 for pack in chosen)    # never two training lengths or archs in one
    assert sorted(c for pack in chosen for c in map(specs.key, pack)) == sorted(map(specs.key, cells))
    # Eight slots and nine cells: packs are halved until every slot has one (the rule never mixes keys).
    assert len(packs.plan(cells, key, pack_size=8, slots=8)) == 8
    assert [len(p) for p in packs.plan(cells[:5], key, pack_size=1)] == [1] * 5   # --pack-size 1: a trial per cell
    with pytest.raises(XferError, match="at least one cell"):
        packs.plan(cells, key, pack_size=0)


# ---- one pack, real MLflow, no Ray -------------------------------------------------------------------

def test_a_packed_cell_is_the_cell_trained_alone_and_each_point_is_logged_once(experiment: str, digits) -> None:
    cells = [tiny(0), tiny(1, lr=1e-2, freeze_depth=2)]
    alone = training_cells.train_cell(cells[0], experiment + "-alone", digits)
    result = packs.run_pack(cells, training_cells.TRAINING, experiment, {"mnist5k": digits}, vectorise="never")
    assert result.ran == [specs.key(c) for c in cells] and not result.failed and result.mode == "packed_sequential"
    records = [tracking.find_finished(experiment, specs.key(c)) for c in cells]
    assert all(r is not None and names.TAG_CHECKPOINT_SHA in r.tags for r in records)
    assert len({r.run_id for r in records}) == 2 and records[1].params["train.freeze_depth"] == "2"
    packed_curve = tracking.read_curve(records[0].run_id)
    assert [(r["step"], r["split"]) for r in packed_curve] == [(r["step"], r["split"]) for r in alone.curve]
    assert [r["error"] for r in packed_curve] == pytest.approx([r["error"] for r in alone.curve], abs=1e-6)
    # Every point once: one validation point per epoch, one train point per window, no NaN where a value exists.
    assert [step for step, _ in history(records[0].run_id, names.VAL_ERROR)] == [9, 18]
    train = history(records[0].run_id, names.TRAIN_ERROR)
    assert [step for step, _ in train] == [18] and all(math.isfinite(v) for _, v in train)
    assert records[0].metrics[names.TEST_ACC] == pytest.approx(1 - alone.metrics[names.TEST_ERROR])
    assert records[0].tags[names.TAG_IN_SHAPE] == "1x28x28" and "7" in records[0].tags[names.TAG_CLASSES]
    # Run again: every cell is found finished in MLflow, nothing trains.
    again = packs.run_pack(cells, training_cells.TRAINING, experiment, {"mnist5k": digits})
    assert again.skipped == [specs.key(c) for c in cells] and not again.ran


def test_a_vectorised_pack_records_each_cell_as_if_trained_alone(experiment: str, digits) -> None:
    cells = [tiny(0), tiny(1, lr=1e-2, freeze_depth=2, weight_decay=1e-3), tiny(2, lr=5e-3)]
    result = packs.run_pack(cells, training_cells.TRAINING, experiment, {"mnist5k": digits}, vectorise="always")
    assert result.mode == "packed_vectorised" and result.ran == [specs.key(c) for c in cells], result.why
    # Each error is a share of its window's examples: the last epoch's 9 batches of 32 (log_every is 50, so a train
    # point is that epoch's window), the 100 validation examples, the 1,000 of the test split.
    window = {"train": 9 * 32, "val": 100, "test": len(digits.test)}
    for spec in cells:
        splits = data.make_splits(digits, 300, 100, spec.train.seed)
        alone = loop.train(spec.train, splits, loop.prepare_model(spec.train, splits))
        record = tracking.find_finished(experiment, specs.key(spec))
        curve = tracking.read_curve(record.run_id)
        assert [(r["step"], r["split"]) for r in curve] == [(r["step"], r["split"]) for r in alone.curve]
        # Within one example of each window (AdamW: float-order noise; tests/test_vectorised.py has the detail).
        for packed, single in zip(curve, alone.curve):
            assert abs(packed["error"] - single["error"]) <= 1 / window[single["split"]] + 1e-9, (packed, single)
        assert [step for step, _ in history(record.run_id, names.VAL_ERROR)] == [9, 18]
    # --vectorise auto on a CPU measures once, keeps the answer in the runs folder, and says why it chose.
    auto = packs.run_pack([tiny(3), tiny(4)], training_cells.TRAINING, experiment, {"mnist5k": digits})
    assert auto.mode in ("packed_sequential", "packed_vectorised") and auto.why
    calibration = json.loads((server.runs_dir() / "calibration.json").read_text())
    [(key, measured)] = [(k, v) for k, v in calibration.items()
                         if k.endswith(f"/lenet5/batch32/cells2/threads{torch.get_num_threads()}")]
    assert key.startswith("vectorised/cpu/") and measured["speedup"] > 0 and measured["repeats"] == 3
    assert (auto.mode == "packed_vectorised") == (measured["speedup"] >= packs.VECTORISED_MUST_WIN)


@pytest.mark.parametrize("speedup, mode", [(1.1, "packed_sequential"), (1.3, "packed_vectorised")])
def test_auto_batches_only_a_clear_win(experiment: str, digits, speedup: float, mode: str) -> None:
    """A measured speed-up within the margin (1.1× < 1.2×) keeps one cell after another: a noisy few-step timing
    cannot flip the choice between reruns; a clear one (1.3×) batches. Driven through the kept calibration."""
    from xfer import calibration

    from xfer.progress import ENDED

    key = f"vectorised/cpu/lenet5/batch32/cells3/threads{torch.get_num_threads()}"
    calibration.remember(calibration.path(), key, {"speedup": speedup, "measured": "earlier", "steps": 4})
    sent: list[dict] = []
    store = packs.PackCheckpoint({}, 3600.0, lambda metrics, state_dir: sent.append(metrics), 3, report_interval_s=1e-9)
    cells = [tiny(5), tiny(6), tiny(7)]
    try:
        result = packs.run_pack(cells, training_cells.TRAINING, experiment, {"mnist5k": digits}, store, device="cpu")
    finally:
        kept = calibration.read(calibration.path())
        kept.pop(key, None)   # no made-up figure outlives the test
        calibration.path().write_text(json.dumps(kept, indent=2, sort_keys=True))
    assert result.mode == mode and len(result.ran) == 3, result.why
    labels = [training_cells.TRAINING.label(c) for c in cells]
    ended = [next(i for i, m in enumerate(sent) if label in m.get(ENDED, "")) for label in labels]
    last_started = next(i for i, m in enumerate(sent) if m.get("cell") == labels[2] and names.EPOCH in m)
    if mode == "packed_sequential":
        assert result.why == ("on cpu the batched model measured 1.10× the speed of one cell after another for lenet5 "
                              "(3 cells, batch 32); it must reach 1.2×")
        # Each cell ends (its run FINISHED, its end reported) as soon as it has trained, not with the pack.
        assert ended[0] < ended[1] < last_started < ended[2]
    else:
        assert result.why == "3 lenet5 cells as one batched model on cpu"


def _broken_for(seeds_nan: set[int], seeds_refused: set[int]) -> packs.CellAdapter:
    """The training adapter, except that some seeds start from NaN weights and some are refused as bad input."""

    def cell(spec: PretrainSpec, context: packs.PackContext) -> Cell:
        made = training_cells.training_cell(spec, context)
        seed = spec.train.seed

        def prepare():
            if seed in seeds_refused:
                raise XferError(f"checkpoint file /data/broken-{seed}.safetensors does not match its sha256")
            splits, model = made.prepare()
            if seed in seeds_nan:
                with torch.no_grad():
                    model.head.weight.fill_(math.nan)
            return splits, model

        return dataclasses.replace(made, prepare=prepare)

    return dataclasses.replace(training_cells.TRAINING, name="broken", cell=cell)


@pytest.mark.parametrize("vectorise", ["never", "always"])
def test_a_failing_cell_fails_alone_and_its_pack_mates_finish(experiment: str, digits, vectorise: str) -> None:
    cells = [tiny(0), tiny(13), tiny(14), tiny(2)]
    result = packs.run_pack(cells, _broken_for({13}, {14}), experiment, {"mnist5k": digits}, vectorise=vectorise)
    assert result.mode == ("packed_vectorised" if vectorise == "always" else "packed_sequential")
    keys = [specs.key(c) for c in cells]
    assert result.ran == [keys[0], keys[3]]
    assert "non-finite loss" in result.failed[keys[1]] and "broken-14.safetensors" in result.failed[keys[2]]
    failed = {r.key: r for r in tracking.query(experiment, status="FAILED")}
    assert set(failed) == {keys[1], keys[2]}   # each failure is its own FAILED run, naming why
    assert "broken-14.safetensors" in failed[keys[2]].tags[names.TAG_FAILURE]
    assert not tracking.query(experiment, status="RUNNING")


def test_a_crashed_pack_resumes_each_cell_from_its_last_epoch(experiment: str, digits, tmp_path: Path) -> None:
    cells = [tiny(0, epochs=3), tiny(1, epochs=3), tiny(2, epochs=3)]
    keys = [specs.key(c) for c in cells]
    handed: list[Path] = []

    def report(metrics: dict, state_dir: Path | None) -> None:
        if state_dir is not None:   # what Tune would keep: a copy of the folder
            handed.append(Path(shutil.copytree(state_dir, tmp_path / f"ckpt-{len(handed)}")))
        if metrics["cells_done"] == 1 and metrics.get(names.EPOCH) == 2:
            raise RuntimeError("the node went away")   # a crash, not bad input: the pack (trial) ends

    store = packs.PackCheckpoint({}, 0.0, report, len(cells))
    with pytest.raises(RuntimeError, match="went away"):
        packs.run_pack(cells, training_cells.TRAINING, experiment, {"mnist5k": digits}, store, vectorise="never")
    crashed = tracking.query(experiment, status=None, tags={names.TAG_KEY: keys[1]})
    restored = packs.PackCheckpoint.load(handed[-1])
    assert set(restored) == {keys[1]} and restored[keys[1]].epoch == 2

    # Tune restarts the trial with its last checkpoint: cell 0 is done, cell 1 resumes at epoch 2, cell 2 starts.
    retry = packs.PackCheckpoint(restored, 0.0, lambda metrics, state_dir: None, len(cells))
    result = packs.run_pack(cells, training_cells.TRAINING, experiment, {"mnist5k": digits}, retry, vectorise="never")
    assert result.skipped == [keys[0]] and result.ran == keys[1:]
    record = tracking.find_finished(experiment, keys[1])
    assert record.run_id == crashed[0].run_id and record.tags[names.TAG_RESUMED] == "2"   # the same MLflow run
    assert [step for step, _ in history(record.run_id, names.VAL_ERROR)] == [9, 18, 27]   # each epoch's point once
    alone = loop.train(cells[1].train, data.make_splits(digits, 300, 100, 1),
                       loop.prepare_model(cells[1].train, data.make_splits(digits, 300, 100, 1)))
    assert [r["error"] for r in tracking.read_curve(record.run_id)] == pytest.approx([r["error"] for r in alone.curve])


def test_a_damaged_checkpoint_fails_its_cell_once_naming_the_file(experiment: str, digits, mlflow_server) -> None:
    """Permanent (bad input, XferError): the cell fails in its pack, no exception reaches Tune, so no retry."""
    from xfer.specs import FinetuneSpec

    parent = tiny(0, epochs=1)
    assert training_cells.train_cell(parent, experiment, digits).ok
    record = tracking.find_finished(experiment, specs.key(parent))
    [stored] = (mlflow_server.root / "artifacts").glob(f"*/{record.run_id}/artifacts/checkpoint/weights.safetensors")
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")   # one byte changed after it was logged
    child = FinetuneSpec(dataclasses.replace(parent.train, size=200, freeze_depth=2), parent)
    other = tiny(5, epochs=1)
    result = packs.run_pack([child, other], training_cells.TRAINING, experiment, {"mnist5k": digits}, vectorise="never")
    assert result.ran == [specs.key(other)]
    reason = result.failed[specs.key(child)]
    assert "does not match its recorded sha256" in reason and str(stored.parent) in reason
    [failed] = tracking.query(experiment, status="FAILED", tags={names.TAG_KEY: specs.key(child)})
    assert str(stored.parent) in failed.tags[names.TAG_FAILURE]


@pytest.mark.parametrize("vectorise", ["never", "always"])
def test_a_running_cell_reports_where_it_is_within_its_epoch(experiment: str, digits, vectorise: str) -> None:
    """Each train window (every log_every steps) goes to the progress view as a fractional epoch with its train
    error, between the epochs' own reports, so a long epoch shows life where output goes to a file; one cell after
    another and as one batched model alike."""
    sent: list[dict] = []
    store = packs.PackCheckpoint({}, 3600.0, lambda metrics, state_dir: sent.append(metrics), 2,
                                 report_interval_s=1e-9)
    # 300 images at batch 32: 9 full steps an epoch, windows of 3 steps (96 images)
    cells = [tiny(0, log_every=3), tiny(1, log_every=3)]
    result = packs.run_pack(cells, training_cells.TRAINING, experiment, {"mnist5k": digits}, store, vectorise=vectorise)
    assert result.ran == [specs.key(c) for c in cells]
    assert result.mode == ("packed_vectorised" if vectorise == "always" else "packed_sequential")
    for cell in cells:
        label = training_cells.TRAINING.label(cell)
        within = [m for m in sent if names.TRAIN_ERROR in m and m["cell"] == label]
        # 3, 6 and 9 steps into each epoch (96, 192 and 288 of its 300 images)
        assert [m[names.EPOCH] for m in within] == pytest.approx([e + k * 96 / 300 for e in (0, 1) for k in (1, 2, 3)])
        assert all(m["epochs"] == 2 and 0 <= m[names.TRAIN_ERROR] <= 1 for m in within)
        ends = [m for m in sent if names.VAL_ERROR in m and m["cell"] == label]
        assert sorted({m[names.EPOCH] for m in ends}) == [1.0, 2.0]   # and each epoch's end, with its val error


def test_a_training_pack_is_cut_to_what_fits_its_trials_memory(local_ray, digits, monkeypatch) -> None:
    """Four trials sharing a GPU: each pack holds no more cells than fit a quarter of the GPU's memory (less
    headroom) by the plan's estimate, and the stage's note says so; a larger GPU keeps the device's pack size."""
    from xfer import cluster
    from xfer import plan as plans

    cells = [tiny(s, arch="alexnet_mini", batch_size=128, size=1000) for s in range(32)]
    options = stages.RunOptions(experiment="unused", gpus_per_trial=0.25)
    per_cell = plans.pack_memory("alexnet_mini", (1, 28, 28), 10, 1, 128, "adamw")["total_bytes"]
    monkeypatch.setenv(cluster.GPU_MEMORY_ENV, str(10.5 * per_cell / 2**30 / 0.25 / cluster.MEMORY_HEADROOM))
    budget, where = cluster.trial_memory(0.25, 1.0)
    assert budget == pytest.approx(10.5 * per_cell) and where.startswith("0.25 of a")
    chosen, note = stages.plan_packs(cells, training_cells.TRAINING, options, {"mnist5k": digits})
    assert [len(p) for p in chosen] == [8, 8, 8, 8]   # at most 10 a pack: 32 cells in four packs of eight
    assert note == f"packs of at most 10 alexnet_mini cells, what fits {where} (plan.pack_memory)"
    assert plans.pack_memory("alexnet_mini", (1, 28, 28), 10, 10, 128, "adamw")["total_bytes"] <= budget
    monkeypatch.setenv(cluster.GPU_MEMORY_ENV, "1000")
    chosen, note = stages.plan_packs(cells, training_cells.TRAINING, options, {"mnist5k": digits})
    assert [len(p) for p in chosen] == [packs.PACK_SIZE["cuda"]] and note == ""
    # On CPUs: the memory Ray gives the largest node, over the trials it runs at once.
    budget, where = cluster.trial_memory(0.0, 1.0)
    assert 0 < budget < 64 * 2**30 and where.startswith("1/2 of the")


@pytest.mark.parametrize("value", ["24GB", "0", "-3"])
def test_a_gpu_memory_that_is_not_a_positive_number_is_refused_by_name(monkeypatch, value: str) -> None:
    from xfer import cluster

    monkeypatch.setenv(cluster.GPU_MEMORY_ENV, value)
    with pytest.raises(XferError, match=rf"XFER_GPU_MEMORY_GB='{value}' is not a GPU's memory in GiB; set it"):
        cluster.trial_memory(0.25, 1.0)
