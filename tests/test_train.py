"""The one training loop: it learns, it is deterministic, it resumes exactly, it fails politely."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import pytest
import torch

from xfer import checkpoint, data, models, names, specs
from xfer import train as loop
from xfer.errors import XferError
from xfer.specs import TrainSpec


@pytest.fixture(scope="module")
def digits() -> data.Splits:
    return data.make_splits(data.load("mnist5k"), 2000, 200, seed=0)


def spec(**kw) -> TrainSpec:
    # lenet5 (the seed's sigmoid LeNet, 62k parameters) keeps the mechanics tests fast; learning is tested on resnet_mini.
    return TrainSpec(**{"arch": "lenet5", "dataset": "mnist5k", "size": 2000, "val_size": 200, "epochs": 1,
                        "batch_size": 64, "lr": 3e-3, "log_every": 5, **kw})


def test_learns_and_records_the_error_curve(digits: data.Splits) -> None:
    records: list[dict] = []
    s = spec(arch="resnet_mini", epochs=2)
    result = loop.train(s, digits, loop.prepare_model(s, digits), report=records.append)
    assert result.ok and result.metrics[names.TEST_ERROR] < 0.15  # chance is 0.9; resnet_mini reaches ~0.05-0.10 here
    train_rows = [r for r in result.curve if r["split"] == "train"]
    # 31 steps/epoch × 2, every 5, and the last 2 steps' window at the end: the final train error is never missing.
    assert [r["step"] for r in train_rows] == [*range(5, 63, 5), 62]
    epochs = [r for r in result.curve if r["split"] == "test"]
    assert [r["epoch"] for r in epochs] == [1.0, 2.0]
    seconds = [r["seconds"] for r in result.curve]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert sum(r["kind"] == "epoch" for r in records) == 2 and records[-1][names.TEST_ERROR] == epochs[-1]["error"]


def test_deterministic_on_cpu(digits: data.Splits) -> None:
    s = spec()
    a = loop.train(s, digits, loop.prepare_model(s, digits))
    b = loop.train(s, digits, loop.prepare_model(s, digits))
    assert [r["error"] for r in a.curve] == [r["error"] for r in b.curve]


def test_resume_from_epoch_state_matches_uninterrupted(digits: data.Splits, tmp_path) -> None:
    s = spec(epochs=3, schedule="cosine")
    straight = loop.prepare_model(s, digits)
    full = loop.train(s, digits, straight)
    states: list[loop.TrainState] = []
    first = loop.prepare_model(s, digits)
    loop.train(s, digits, first, on_epoch_end=states.append)
    checkpoint.save_state(tmp_path / "state", states[0])  # the state after epoch 1, through disk
    resumed_state = checkpoint.load_state(tmp_path / "state")
    resumed = loop.train(s, digits, loop.prepare_model(s, digits), resume=resumed_state)
    assert resumed_state.epoch == 1
    assert resumed.metrics[names.TEST_ERROR] == full.metrics[names.TEST_ERROR]
    assert [r["error"] for r in resumed.curve] == [r["error"] for r in full.curve]


def test_an_epoch_snapshot_stays_on_the_models_device_and_is_saved_from_it(tmp_path) -> None:
    """A GPU pack's epoch states are copies on the GPU (no wait for the device each epoch); the CPU copy is made only
    when one is saved. The meta device stands in for a GPU here: a copy to the CPU fails on it."""
    model = models.build("lenet5", (1, 28, 28), 10)
    on_meta = models.build("lenet5", (1, 28, 28), 10).to("meta")
    state = loop.snapshot(1, 5, 0.0, on_meta, {"state": {}, "param_groups": []}, None, [])
    assert {v.device.type for v in state.model.values()} == {"meta"}
    live = loop.snapshot(1, 5, 0.0, model, {"state": {}, "param_groups": []}, None, [])
    with torch.no_grad():
        next(model.parameters()).add_(1.0)   # training goes on: the snapshot must not move with it
    name = next(iter(dict(model.named_parameters())))
    assert not torch.equal(live.model[name], model.state_dict()[name])
    checkpoint.save_state(tmp_path / "state", live)
    assert torch.equal(checkpoint.load_state(tmp_path / "state").model[name], live.model[name])


@pytest.mark.parametrize("unfreeze_body", [True, False])
def test_resume_from_the_state_saved_just_before_unfreezing_matches_uninterrupted(
        digits: data.Splits, tmp_path, unfreeze_body: bool) -> None:
    # The state saved after epoch 2 holds the frozen phase's optimiser and schedule (fewer parameters in its groups
    # when the body unfreezes); the uninterrupted run starts epoch 3 with a fresh optimiser and schedule, and so must
    # the resumed one. The control (unfreeze_body False) keeps its groups but restarts its lr and schedule.
    s = spec(epochs=3, freeze_depth=4, unfreeze_epoch=2, unfreeze_body=unfreeze_body, optimizer="sgd",
             schedule="cosine")
    straight = loop.prepare_model(s, digits)
    states: list[loop.TrainState] = []
    full = loop.train(s, digits, straight, on_epoch_end=states.append)
    boundary = checkpoint.load_state(checkpoint.save_state(tmp_path / "state", states[1]))
    assert boundary.epoch == s.unfreeze_epoch
    resumed_model = loop.prepare_model(s, digits)
    resumed = loop.train(s, digits, resumed_model, resume=boundary)
    assert resumed.ok and [r["error"] for r in resumed.curve] == [r["error"] for r in full.curve]
    assert all(torch.equal(a, b) for a, b in zip(resumed_model.state_dict().values(), straight.state_dict().values()))


def test_non_finite_loss_fails_the_cell_not_the_process(digits: data.Splits) -> None:
    s = spec()
    model = loop.prepare_model(s, digits)
    with torch.no_grad():
        model.head.weight.fill_(math.nan)
    result = loop.train(s, digits, model)
    assert not result.ok and "non-finite loss" in result.reason and "lower the learning rate" in result.reason


def test_freeze_head_lr_and_unfreeze(digits: data.Splits) -> None:
    s = spec(epochs=2, freeze_depth=4, head_lr_mult=10, optimizer="sgd", schedule="plateau", unfreeze_epoch=1)
    model = loop.prepare_model(s, digits)
    body = models.layers(model)
    before = [p.detach().clone() for _, p in body]
    seen: list[loop.TrainState] = []
    loop.train(s, digits, model, on_epoch_end=seen.append)
    groups = seen[0].optimizer["param_groups"]
    assert [g["lr"] for g in groups] == [pytest.approx(3e-3), pytest.approx(3e-2)]  # phase 1: backbone, head ×10
    after_phase1 = {k: v for k, v in seen[0].model.items()}
    frozen_names = [f"body.{n}" for n, _ in body[:4]]  # lenet5's conv1 and conv2
    assert all(torch.equal(after_phase1[n], b) for n, b in zip(frozen_names, before[:4]))
    assert not torch.equal(after_phase1[f"body.{body[6][0]}"], before[6])
    # Phase 2 (epoch 2): everything unfrozen at lr × unfreeze_lr_mult, and the frozen tensors now move.
    assert [g["lr"] for g in seen[1].optimizer["param_groups"]] == [pytest.approx(3e-4), pytest.approx(3e-3)]
    assert not torch.equal(seen[1].model[frozen_names[0]], before[0])


def test_augment_batch_is_a_crop_and_flip(digits: data.Splits) -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    out = loop.augment_batch(x, pad=4)
    assert out.shape == x.shape
    # Every output image is a shifted (and maybe mirrored) window of its zero-padded input.
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_fast_dev_run_takes_one_step_an_epoch_and_records_a_complete_run(digits: data.Splits) -> None:
    s = spec(epochs=2, fast_dev_run=True)
    records: list[dict] = []
    states: list[loop.TrainState] = []
    model = loop.prepare_model(s, digits)
    before = model.head.weight.detach().clone()
    result = loop.train(s, digits, model, report=records.append, on_epoch_end=states.append)
    assert result.ok and result.metrics["steps"] == 2 and not torch.equal(model.head.weight, before)
    # Fewer steps than log_every (5): the last train-error row still ends the training, then val and test per epoch.
    assert [(r["step"], r["epoch"], r["split"]) for r in result.curve] == [
        (1, 1.0, "val"), (1, 1.0, "test"), (2, 2.0, "train"), (2, 2.0, "val"), (2, 2.0, "test")]
    assert [r["kind"] for r in records] == ["epoch", "train", "epoch"]
    assert [(st.epoch, st.step) for st in states] == [(1, 1), (2, 2)]
    assert all(math.isfinite(result.metrics[k]) for k in (names.TEST_ERROR, names.VAL_ERROR, names.TRAIN_ERROR))


def test_fast_dev_run_evaluates_the_first_batch_of_val_and_test_only(digits: data.Splits) -> None:
    batch = 64
    # Three batches: the first all class 0, the rest class 1. A model that answers 0 to everything is right on the
    # first batch (error 0) and wrong on the rest (error 2/3 over the whole split).
    labels = torch.tensor([0] * batch + [1] * 2 * batch)
    split = data.Split(digits.val.images[:3 * batch], labels)
    cut = data.Splits(digits.train, split, split, digits.class_names)

    def says_zero(s: TrainSpec) -> models.XferModel:
        model = loop.prepare_model(s, cut)
        with torch.no_grad():   # zero weights and a bias far ahead for class 0: one tiny step cannot change the answer
            model.head.weight.zero_()
            model.head.bias.zero_()
            model.head.bias[0] = 100.0
        return model

    fast = spec(batch_size=batch, lr=1e-6, fast_dev_run=True)
    result = loop.train(fast, cut, says_zero(fast))
    assert result.metrics[names.VAL_ERROR] == result.metrics[names.TEST_ERROR] == 0.0
    assert [r["error"] for r in result.curve if r["split"] in ("val", "test")] == [0.0, 0.0]
    full = spec(batch_size=batch, lr=1e-6, epochs=1)
    whole = loop.train(full, cut, says_zero(full))
    assert whole.metrics[names.VAL_ERROR] == pytest.approx(2 / 3)


def test_later_fields_have_their_own_keys_and_leave_existing_keys_alone() -> None:
    s = TrainSpec(arch="lenet5", dataset="mnist")
    assert specs.key(s) == "d21c07a3b9728938"   # recorded before fast_dev_run, unfreeze_body, epoch_steps, precision
    later = ("fast_dev_run", "unfreeze_body", "epoch_steps", "precision")
    fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in later}
    without = json.dumps({"type": "TrainSpec", "spec": fields}, sort_keys=True, separators=(",", ":"))
    assert specs.key(s) == hashlib.sha256(without.encode()).hexdigest()[:16]
    assert specs.key(specs.replace(s, fast_dev_run=True)) != specs.key(s)
    assert specs.key(specs.replace(s, precision="bf16")) != specs.key(s) == specs.key(specs.replace(s, precision="auto"))
    assert specs.from_flat(TrainSpec, specs.to_flat(specs.replace(s, precision="fp32"))).precision == "fp32"
    assert specs.from_flat(TrainSpec, specs.to_flat(specs.replace(s, fast_dev_run=True))).fast_dev_run
    unfreezing = specs.replace(s, freeze_depth=4, unfreeze_epoch=5)
    control = specs.replace(unfreezing, unfreeze_body=False)
    assert specs.key(control) != specs.key(unfreezing)
    assert not specs.from_flat(TrainSpec, specs.to_flat(control)).unfreeze_body
    with pytest.raises(XferError, match="unfreeze_body False .* needs an unfreeze_epoch"):
        specs.replace(s, unfreeze_body=False)


def _window_rank(rank: int, port: int, out: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loss = torch.tensor(float("nan") if rank == 0 else 2.0)   # only rank 0's shard diverged
        out.put((rank, loop.window(loss, torch.tensor(3.0 + rank), 4, 2)))
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_see_one_loss_so_a_nan_stops_them_all() -> None:
    """A logging window's loss, correct count and examples are all-reduced over the ranks (real gloo, two
    processes): a NaN on one rank's shard is every rank's NaN, so none goes on alone into a gradient all-reduce that
    the stopped rank would never join."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_window_rank, args=(rank, port, out)) for rank in range(2)]
    for proc in procs:
        proc.start()
    seen = dict(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(30)
    assert set(seen) == {0, 1}
    for loss, right, examples in seen.values():
        assert math.isnan(loss) and right == 7.0 and examples == 8
    # One process: the window as it is, no all-reduce.
    assert loop.window(torch.tensor(6.0), torch.tensor(3.0), 4, 1) == (6.0, 3.0, 4)
