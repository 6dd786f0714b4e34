"""The one training loop: it learns, it is deterministic, it resumes exactly, it fails politely."""

from __future__ import annotations

import math

import pytest
import torch

from xfer import checkpoint, data, models, names
from xfer import train as loop
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
    assert result.ok and result.metrics[names.TEST_ERROR] < 0.35  # chance is 0.9
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
