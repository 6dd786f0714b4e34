"""Vectorised packs: cell i trained in a batch of cells is cell i trained alone (train.train), number for number.

Tolerances. Curves: every row at the same step, epoch and split, its error within one example of the
window or split. Weights and BatchNorm statistics: allclose with rtol 1e-4 and the atol each test names.
The comparisons use SGD for resnet_mini, mlp_mixer and alexnet_mini, and Adam/AdamW on lenet5: under
Adam, resnet_mini and mlp_mixer amplify float-order noise (a 1-ulp change of the initial weights moves
train.train's own weights by ~1e-3 within 16 steps, as much as the batched path does), so only an
optimiser that does not amplify it can pin the maths; lenet5 does not amplify it under Adam.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from xfer import checkpoint, data, models, names
from xfer import train as loop
from xfer import vectorised as vec
from xfer.errors import XferError
from xfer.specs import TrainSpec

SIZE, VAL, TEST, BATCH, LOG_EVERY = 64, 32, 64, 16, 3  # 4 steps an epoch; train rows every 3 steps (48 examples)
SGD_ATOL = 2e-6       # SGD: the paths differ by <=4e-7 (vmap's grouped convolutions sum in another order)
ADAM_ATOL = 2e-5      # Adam(W) on lenet5: ~4e-6; a frozen tensor moved or a weight decay misplaced moves ~1e-3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On a shared 2-core machine, OpenMP barriers under contention make 2 threads ~20x slower than 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pool() -> data.Dataset:
    return data.load("mnist5k")


def splits(pool: data.Dataset, seed: int) -> data.Splits:
    """Cell data as the pipeline makes it (seed picks the subset); one fixed test sample shared by all cells."""
    s = data.make_splits(pool, SIZE, VAL, seed=seed)
    return data.Splits(s.train, s.val, _test_sample(pool), s.class_names)


_TEST: dict[int, data.Split] = {}


def _test_sample(pool: data.Dataset) -> data.Split:
    if id(pool) not in _TEST:
        _TEST[id(pool)] = pool.test.subset(torch.randperm(len(pool.test), generator=torch.Generator().manual_seed(0))[:TEST])
    return _TEST[id(pool)]


def spec(**kw) -> TrainSpec:
    return TrainSpec(**{"arch": "lenet5", "dataset": "mnist5k", "size": SIZE, "val_size": VAL, "epochs": 2,
                        "batch_size": BATCH, "log_every": LOG_EVERY, **kw})


def pretrained(pool: data.Dataset, cell: TrainSpec, cell_data: data.Splits) -> models.XferModel:
    """A model whose body was trained a little on other digits first, given a new head for the cell."""
    source = spec(arch=cell.arch, epochs=1, seed=7, optimizer="sgd", lr=0.05)
    model = loop.prepare_model(source, splits(pool, 7))
    loop.train(source, splits(pool, 7), model, device="cpu")
    return loop.prepare_model(cell, cell_data, pretrained=model)


def train_both(specs, cell_data, cell_models, **kw):
    """(train.train per cell on copies, train_many on the originals): results and trained models of each."""
    alone = [copy.deepcopy(m) for m in cell_models]
    sequential = [loop.train(s, d, m, device="cpu") for s, d, m in zip(specs, cell_data, alone)]
    batched = vec.train_many(specs, cell_data, cell_models, device="cpu", **kw)
    return sequential, alone, batched, list(cell_models)


def assert_same_cell(a: loop.Result, b: loop.Result, model_a: torch.nn.Module, model_b: torch.nn.Module, atol: float) -> None:
    assert (b.status, b.reason) == (a.status, a.reason)
    assert [(r["step"], r["epoch"], r["split"]) for r in b.curve] == [(r["step"], r["epoch"], r["split"]) for r in a.curve]
    window = {"train": LOG_EVERY * BATCH, "val": VAL, "test": TEST}
    for ra, rb in zip(a.curve, b.curve):
        assert abs(ra["error"] - rb["error"]) <= 1 / window[ra["split"]] + 1e-12, (ra, rb)
    assert b.metrics.keys() == a.metrics.keys()
    for key in (names.TEST_ERROR, names.VAL_ERROR):
        if key in a.metrics:
            assert abs(a.metrics[key] - b.metrics[key]) <= 1 / window[key.split("_")[0]] + 1e-12
    assert b.metrics["steps"] == a.metrics["steps"]
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert list(state_b) == list(state_a)
    for key, value in state_a.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(state_b[key].cpu(), value.cpu(), rtol=1e-4, atol=atol, equal_nan=True, msg=key)
        else:
            assert torch.equal(state_b[key].cpu(), value.cpu()), key  # BatchNorm's num_batches_tracked


@pytest.mark.parametrize("arch", ["lenet5", "mlp_mixer", "resnet_mini"])
def test_each_cell_trains_as_it_would_alone(pool: data.Dataset, arch: str) -> None:
    # Cells differ in lr, weight decay, momentum, seed (so data subset and batch order), freeze depth, head lr, init.
    specs = [
        spec(arch=arch, optimizer="sgd", lr=0.005, weight_decay=0.0, seed=0),
        spec(arch=arch, optimizer="sgd", lr=0.005, weight_decay=0.3, seed=1, freeze_depth=4, head_lr_mult=10),
        spec(arch=arch, optimizer="sgd", lr=0.002, weight_decay=1e-2, momentum=0.5, seed=2, freeze_depth=2),
    ]
    cell_data = [splits(pool, s.seed) for s in specs]
    cell_models = [loop.prepare_model(specs[0], cell_data[0]), pretrained(pool, specs[1], cell_data[1]),
                   loop.prepare_model(specs[2], cell_data[2])]
    frozen = {n: p.detach().clone() for n, p in models.layers(cell_models[1])[:4]}
    records: list[list[dict]] = [[], [], []]
    sequential, alone, batched, trained = train_both(specs, cell_data, cell_models, reports=[r.append for r in records])
    for i in range(3):
        assert_same_cell(sequential[i], batched[i], alone[i], trained[i], SGD_ATOL)
    # Frozen tensors get no update and no weight decay: bit for bit what they were.
    assert all(torch.equal(dict(models.layers(trained[1]))[n].cpu(), before) for n, before in frozen.items())
    # The cells really differ (a pack that trained one cell N times would fail here).
    assert not torch.allclose(trained[0].head.weight, trained[2].head.weight)
    # Each cell reports as train.train does: train rows every 3 steps (and the last steps' window before the
    # last epoch row), an epoch row after each epoch.
    assert [r["kind"] for r in records[0]] == ["train", "epoch", "train", "train", "epoch"]
    assert records[2][-1][names.TEST_ERROR] == batched[2].curve[-1]["error"]


@pytest.mark.parametrize("optimizer, schedule", [("adamw", "cosine"), ("adam", "plateau"), ("sgd", "none")])
def test_optimiser_maths_and_schedules_match_torch_optim(pool: data.Dataset, optimizer: str, schedule: str) -> None:
    specs = [
        spec(optimizer=optimizer, schedule=schedule, epochs=3, lr=3e-3, weight_decay=0.3, seed=0),
        spec(optimizer=optimizer, schedule=schedule, epochs=3, lr=1e-3, weight_decay=0.0, seed=1, freeze_depth=2,
             head_lr_mult=10),
    ]
    cell_data = [splits(pool, s.seed) for s in specs]
    cell_models = [loop.prepare_model(s, d) for s, d in zip(specs, cell_data)]
    states: list[list[loop.TrainState]] = [[], []]
    sequential, alone, batched, trained = train_both(specs, cell_data, cell_models, on_epoch_end=[s.append for s in states])
    for i in range(2):
        assert_same_cell(sequential[i], batched[i], alone[i], trained[i], ADAM_ATOL)
    # The learning rates written to the epoch states are the schedule's, per cell and per param group.
    lrs = [[g["lr"] for g in s.optimizer["param_groups"]] for s in states[1]]
    if schedule == "cosine":
        assert lrs[0][1] == pytest.approx(10 * lrs[0][0]) and lrs[-1][0] == pytest.approx(0.0, abs=1e-12)
    else:
        assert lrs[0] == pytest.approx([1e-3, 1e-2])


def test_dropout_masks_are_each_cells_own_stream(pool: data.Dataset) -> None:
    # alexnet_mini's dropout: each cell draws its masks from its own generator, seeded as train.py seeds the
    # global one, so on CPU the masks are train.train's bit for bit (weights would differ by ~lr otherwise).
    specs = [spec(arch="alexnet_mini", optimizer="sgd", lr=0.005, seed=s, epochs=1) for s in (0, 1)]
    cell_data = [splits(pool, s.seed) for s in specs]
    cell_models = [loop.prepare_model(s, d) for s, d in zip(specs, cell_data)]
    assert vec.vectorisable(specs, cell_models) is None
    sequential, alone, batched, trained = train_both(specs, cell_data, cell_models)
    for i in range(2):
        assert_same_cell(sequential[i], batched[i], alone[i], trained[i], SGD_ATOL)


def test_a_cell_does_not_depend_on_its_pack_mates(pool: data.Dataset) -> None:
    # BatchNorm statistics, grouped convolutions, the flat optimiser: nothing may mix cells, bit for bit.
    specs = [spec(arch="resnet_mini", optimizer="sgd", lr=0.005, seed=s, epochs=1) for s in range(3)]
    cell_data = [splits(pool, s.seed) for s in specs]
    cell_models = [loop.prepare_model(s, d) for s, d in zip(specs, cell_data)]
    with_1 = [copy.deepcopy(cell_models[i]) for i in (0, 1)]
    with_2 = [copy.deepcopy(cell_models[i]) for i in (0, 2)]
    vec.train_many([specs[0], specs[1]], [cell_data[0], cell_data[1]], with_1, device="cpu")
    vec.train_many([specs[0], specs[2]], [cell_data[0], cell_data[2]], with_2, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(with_1[0].state_dict().values(), with_2[0].state_dict().values()))
    assert not torch.equal(with_1[0].head.weight, cell_models[0].head.weight)  # it did train


def test_augmentation_unfreezing_and_label_smoothing(pool: data.Dataset) -> None:
    common = {"optimizer": "sgd", "augment": True, "unfreeze_epoch": 1, "label_smoothing": 0.1, "freeze_depth": 4}
    specs = [spec(lr=0.05, seed=0, **common), spec(lr=0.02, seed=1, unfreeze_lr_mult=0.5, **common)]
    cell_data = [splits(pool, s.seed) for s in specs]
    cell_models = [loop.prepare_model(s, d) for s, d in zip(specs, cell_data)]
    before = models.layers(cell_models[0])[0][1].detach().clone()
    sequential, alone, batched, trained = train_both(specs, cell_data, cell_models)
    for i in range(2):
        assert_same_cell(sequential[i], batched[i], alone[i], trained[i], SGD_ATOL)
    assert not torch.equal(models.layers(trained[0])[0][1], before)  # frozen in epoch 1, trained after unfreezing


def test_step_budget_epochs_and_the_unfreeze_control_train_as_they_would_alone(pool: data.Dataset) -> None:
    # epoch_steps beyond one pass (the epoch cycles through fresh permutations), and a cell that switches its lr at
    # the unfreeze epoch with its body kept frozen (unfreeze_body False) beside one that unfreezes.
    steps = 3 * (SIZE // BATCH) + 1
    common = {"optimizer": "sgd", "unfreeze_epoch": 1, "freeze_depth": 4, "epoch_steps": steps, "schedule": "plateau"}
    specs = [spec(lr=0.05, seed=0, **common), spec(lr=0.05, seed=1, unfreeze_body=False, **common)]
    cell_data = [splits(pool, s.seed) for s in specs]
    cell_models = [loop.prepare_model(s, d) for s, d in zip(specs, cell_data)]
    before = [models.layers(m)[0][1].detach().clone() for m in cell_models]
    sequential, alone, batched, trained = train_both(specs, cell_data, cell_models)
    for i in range(2):
        assert_same_cell(sequential[i], batched[i], alone[i], trained[i], SGD_ATOL)
        assert batched[i].metrics["steps"] == 2 * steps
    assert not torch.equal(models.layers(trained[0])[0][1], before[0])   # unfrozen at epoch 1
    assert torch.equal(models.layers(trained[1])[0][1].cpu(), before[1])  # the control's body never moves


@pytest.mark.parametrize("log_every", [LOG_EVERY, 20])  # caught at a log step, or at the end of the epoch
def test_a_diverging_cell_fails_alone(pool: data.Dataset, log_every: int) -> None:
    specs = [spec(seed=s, log_every=log_every) for s in range(3)]
    cell_data = [splits(pool, s.seed) for s in specs]
    cell_models = [loop.prepare_model(s, d) for s, d in zip(specs, cell_data)]
    with torch.no_grad():
        cell_models[1].head.weight.fill_(math.nan)
    sequential, alone, batched, trained = train_both(specs, cell_data, cell_models)
    assert [r.status for r in batched] == ["ok", "failed", "ok"]
    expected_step = log_every if log_every < 4 else 4
    assert batched[1].reason.startswith(f"non-finite loss at step {expected_step} (epoch 1) with lr 0.001")
    for i in range(3):
        assert_same_cell(sequential[i], batched[i], alone[i], trained[i], ADAM_ATOL)


def test_epoch_states_resume_either_loop(pool: data.Dataset, tmp_path) -> None:
    specs = [spec(lr=3e-3, seed=0, epochs=3), spec(lr=1e-3, seed=1, epochs=3, freeze_depth=2, head_lr_mult=10)]
    cell_data = [splits(pool, s.seed) for s in specs]
    fresh = [loop.prepare_model(s, d) for s, d in zip(specs, cell_data)]
    vec_states: list[list[loop.TrainState]] = [[], []]
    seq_states: list[list[loop.TrainState]] = [[], []]
    full_models = [copy.deepcopy(m) for m in fresh]
    full = vec.train_many(specs, cell_data, full_models, device="cpu", on_epoch_end=[s.append for s in vec_states])
    seq_models = [copy.deepcopy(m) for m in fresh]
    seq_full = [loop.train(s, d, m, device="cpu", on_epoch_end=st.append)
                for s, d, m, st in zip(specs, cell_data, seq_models, seq_states)]
    # Same format as train.py writes: param groups (lrs, initial_lr, hyper-parameters), state slots, scheduler.
    for mine, theirs in zip(vec_states, seq_states):
        assert mine[0].optimizer["param_groups"] == theirs[0].optimizer["param_groups"]
        slots = [{k: sorted(v) for k, v in state[0].optimizer["state"].items()} for state in (mine, theirs)]
        assert slots[0] == slots[1]
        assert mine[0].optimizer["state"][0]["step"].item() == 4.0
        assert mine[0].scheduler == theirs[0].scheduler and list(mine[0].model) == list(theirs[0].model)
        assert (mine[1].epoch, mine[1].step) == (theirs[1].epoch, theirs[1].step) == (2, 8)
    # Through disk, then on: the batched run from its own epoch-1 states equals the uninterrupted one exactly.
    resumes = [checkpoint.load_state(checkpoint.save_state(tmp_path / f"cell{i}", s[0])) for i, s in enumerate(vec_states)]
    again = [copy.deepcopy(m) for m in fresh]
    resumed = vec.train_many(specs, cell_data, again, device="cpu", resumes=resumes)
    for i in range(2):
        assert [r["error"] for r in resumed[i].curve] == [r["error"] for r in full[i].curve]
        assert all(torch.equal(a, b) for a, b in zip(again[i].state_dict().values(), full_models[i].state_dict().values()))
    # train.train resumes from a batched state, and the batched loop from train.train's states.
    for i in range(2):
        alone = copy.deepcopy(fresh[i])
        result = loop.train(specs[i], cell_data[i], alone, device="cpu", resume=resumes[i])
        assert_same_cell(seq_full[i], result, seq_models[i], alone, ADAM_ATOL)
    # From the last epoch's states nothing is left to train: the final metrics are evaluated, and equal.
    finished = vec.train_many(specs, cell_data, [copy.deepcopy(m) for m in fresh], device="cpu",
                              resumes=[s[-1] for s in vec_states])
    assert [r.metrics[names.TEST_ERROR] for r in finished] == [r.metrics[names.TEST_ERROR] for r in full]
    crossed = [copy.deepcopy(m) for m in fresh]
    from_sequential = vec.train_many(specs, cell_data, crossed, device="cpu", resumes=[s[0] for s in seq_states])
    for i in range(2):
        assert_same_cell(seq_full[i], from_sequential[i], seq_models[i], crossed[i], ADAM_ATOL)


def test_a_pack_resumes_from_the_states_saved_just_before_unfreezing(pool: data.Dataset, tmp_path) -> None:
    # The states saved after epoch 2 hold the frozen phase's optimiser and schedule; the uninterrupted pack starts
    # epoch 3 with fresh ones, and so must a resumed pack, or train.train resuming one cell: the cell that unfreezes
    # its body (whose groups grow) and the control that keeps it frozen (whose lr and schedule restart) alike.
    common = {"epochs": 3, "unfreeze_epoch": 2, "freeze_depth": 4, "optimizer": "sgd", "schedule": "cosine"}
    specs = [spec(lr=0.05, seed=0, **common), spec(lr=0.05, seed=1, unfreeze_body=False, **common)]
    cell_data = [splits(pool, s.seed) for s in specs]
    fresh = [loop.prepare_model(s, d) for s, d in zip(specs, cell_data)]
    states: list[list[loop.TrainState]] = [[], []]
    full_models = [copy.deepcopy(m) for m in fresh]
    full = vec.train_many(specs, cell_data, full_models, device="cpu", on_epoch_end=[s.append for s in states])
    resumes = [checkpoint.load_state(checkpoint.save_state(tmp_path / f"cell{i}", s[1])) for i, s in enumerate(states)]
    assert [r.epoch for r in resumes] == [2, 2]
    again = [copy.deepcopy(m) for m in fresh]
    resumed = vec.train_many(specs, cell_data, again, device="cpu", resumes=resumes)
    for i in range(2):
        assert [r["error"] for r in resumed[i].curve] == [r["error"] for r in full[i].curve]
        assert all(torch.equal(a, b) for a, b in zip(again[i].state_dict().values(), full_models[i].state_dict().values()))
        alone = copy.deepcopy(fresh[i])
        result = loop.train(specs[i], cell_data[i], alone, device="cpu", resume=resumes[i])
        assert_same_cell(full[i], result, full_models[i], alone, SGD_ATOL)


def test_fast_dev_run_cells_train_as_they_would_alone(pool: data.Dataset) -> None:
    # One step an epoch and the first batch (16) of val and test, in both loops: the errors' windows are a batch.
    specs = [spec(optimizer="sgd", lr=0.05, seed=0, epochs=3, fast_dev_run=True),
             spec(optimizer="sgd", lr=0.02, seed=1, epochs=3, freeze_depth=2, head_lr_mult=10, fast_dev_run=True)]
    cell_data = [splits(pool, s.seed) for s in specs]
    cell_models = [loop.prepare_model(s, d) for s, d in zip(specs, cell_data)]
    before = [m.head.weight.detach().clone() for m in cell_models]
    sequential, alone, batched, trained = train_both(specs, cell_data, cell_models)
    for i in range(2):
        assert_same_cell(sequential[i], batched[i], alone[i], trained[i], SGD_ATOL)
        assert batched[i].metrics["steps"] == 3 and not torch.equal(trained[i].head.weight, before[i])
        assert [(r["step"], r["split"]) for r in batched[i].curve] == [
            (1, "val"), (1, "test"), (2, "val"), (2, "test"), (3, "train"), (3, "val"), (3, "test")]
    # The final errors are the trained model's on the first batch (16) of val and test; on whole splits (32, 64)
    # they would differ, for these cells.
    for i, key in ((0, names.VAL_ERROR), (0, names.TEST_ERROR), (1, names.VAL_ERROR), (1, names.TEST_ERROR)):
        split = cell_data[i].val if key == names.VAL_ERROR else cell_data[i].test
        first = loop.error(trained[i], split.images[:BATCH], split.labels[:BATCH])
        assert batched[i].metrics[key] == first != loop.error(trained[i], split.images, split.labels)
    d = splits(pool, 0)
    mixed = [spec(fast_dev_run=True), spec(seed=1)]
    assert "fast_dev_run" in vec.vectorisable(mixed, [loop.prepare_model(s, d) for s in mixed])


def test_refuses_what_one_batched_model_cannot_train(pool: data.Dataset) -> None:
    d = splits(pool, 0)
    lenet = [loop.prepare_model(spec(seed=s), d) for s in range(2)]
    assert vec.vectorisable([spec(), spec(seed=1, lr=0.1, freeze_depth=3)], lenet) is None
    assert "batch_size (16, 32)" in vec.vectorisable([spec(), spec(batch_size=32)], lenet)
    assert "label_smoothing" in vec.vectorisable([spec(), spec(label_smoothing=0.1)], lenet)
    mixer = loop.prepare_model(spec(arch="mlp_mixer"), d)
    assert "arch" in vec.vectorisable([spec(), spec(arch="mlp_mixer")], [lenet[0], mixer])
    assert "models differ" in vec.vectorisable([spec(), spec()], [lenet[0], mixer])
    big = models.build("resnet18", (1, 28, 28), 10)
    assert "parameters per cell" in vec.vectorisable([spec(arch="resnet18")] * 2, [big, big])
    with pytest.raises(XferError, match="batch_size"):
        vec.train_many([spec(), spec(batch_size=32)], [d, d], lenet, device="cpu")
    states: list[loop.TrainState] = []
    loop.train(spec(epochs=1), d, copy.deepcopy(lenet[0]), device="cpu", on_epoch_end=states.append)
    with pytest.raises(XferError, match="resume from different points"):
        vec.train_many([spec(), spec(seed=1)], [d, d], lenet, device="cpu", resumes=[states[0], None])


def test_bench_pack_times_both_ways() -> None:
    row = vec.bench_pack("lenet5", n_cells=2, device="cpu", steps=2, batch_size=16)
    assert row["steps"] == 2 and row["n_cells"] == 2
    assert row["sequential_samples_per_s"] > 0 and row["vectorised_samples_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["vectorised_samples_per_s"] / row["sequential_samples_per_s"])
    assert row["vectorised_cells_per_hour"] == pytest.approx(row["vectorised_samples_per_s"] * 3600 / (2 * 16))
    # What the batched optimiser keeps: AdamW's two moments (the cells' default; 8 bytes an element) and 16 bytes per
    # (tensor, cell) block, against 8 + 16 bytes an element with the per-element slot index, weight decay and
    # momentum it replaced.
    model = models.build("lenet5", (1, 28, 28), 10)
    elements, tensors = 2 * sum(p.numel() for p in model.parameters()), 2 * len(list(model.parameters()))
    assert row["optimiser_mib"] * 2**20 == elements * 8 + tensors * 16
    assert row["optimiser_mib_per_element_layout"] * 2**20 == elements * 24


def test_cuda_draws_one_stream_for_the_pack_that_a_rerun_repeats() -> None:
    """On CUDA a pack draws each dropout site's masks, and each step's crops and flips, for all its cells in one call
    (F.dropout's CUDA kernel draws other bits than bernoulli_, so no alone-equal stream is lost); forced here on a CPU.
    The draws are per cell (cells never share a mask), at the dropout rate, scaled as F.dropout scales, and the same
    pack draws the same again."""
    pack = SimpleNamespace(dropouts=(vec._DropoutSite("drop0", 0.25, (4000,)),), n_cells=3, flat=torch.zeros(1))
    first = vec._Draws.build([5, 6, 7], torch.device("cpu"), together=True)
    assert first.together and len(first.generators) == 1
    mask = first.masks(pack)["drop0"]
    assert mask.shape == (3, 4000) and mask.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert all(abs((mask[i] == 0).float().mean().item() - 0.25) < 0.03 for i in range(3))
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[1], mask[2])
    again = vec._Draws.build([5, 6, 7], torch.device("cpu"), together=True).masks(pack)["drop0"]
    assert torch.equal(mask, again)
    assert not torch.equal(vec._Draws.build([5, 6, 8], torch.device("cpu"), together=True).masks(pack)["drop0"], mask)
    # Augmentation: every image of every cell cropped and flipped on its own, the shape kept.
    x = torch.rand(3, 8, 1, 12, 12)
    out = vec._Draws.build([5, 6, 7], torch.device("cpu"), together=True).augment(x)
    assert out.shape == x.shape and not torch.equal(out, x)
    # On a CPU each cell keeps its own generator (train.py's draws), whatever the pack.
    assert len(vec._Draws.build([5, 6, 7], torch.device("cpu")).generators) == 3


def _dtypes_and_output(model: torch.nn.Module, run) -> tuple[list[tuple[str, torch.dtype]], torch.Tensor]:
    """Each leaf module's output dtype, in call order, and the model's output."""
    seen: list[tuple[str, torch.dtype]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.append((name, out.dtype)))
             for name, m in model.named_modules() if name and not list(m.children())]
    try:
        out = run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen, out


@pytest.mark.parametrize("arch", ["resnet_mini", "mlp_mixer", "alexnet_mini", "lenet5_maxpool"])
def test_bf16_batched_layers_cast_as_autocast_does_alone(arch: str) -> None:
    # torch.autocast does not reach inside vmap: without the template's own casts a batched Linear returns float32
    # where the same cell alone, under autocast, returns bf16. Here every leaf layer's output dtype matches, and
    # the outputs agree to bf16's rounding.
    from torch.func import functional_call, vmap

    torch.manual_seed(0)
    cells = [models.build(arch, (1, 28, 28), 10).eval() for _ in range(3)]
    x = torch.rand(3, 8, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alone_dtypes, _ = _dtypes_and_output(cells[0], lambda: cells[0](x[0]))
        alone = [m(x[i]) for i, m in enumerate(cells)]
    pack = vec._stack(cells, torch.device("cpu"), 8, low=True)
    pack.template.eval()
    batched_dtypes, batched = _dtypes_and_output(pack.template, lambda: vmap(
        lambda p, b, xi: functional_call(pack.template, (p, b), (xi,)))(pack.params, pack.buffers, x))
    assert batched_dtypes == alone_dtypes and batched.dtype == alone[0].dtype == torch.bfloat16
    for i in range(3):
        torch.testing.assert_close(batched[i].float(), alone[i].float(), rtol=2e-2, atol=2e-2)
    # In float32 (the template without casts) the batched path stays float32, as the cell alone without autocast.
    fp32 = vec._stack(cells, torch.device("cpu"), 8, low=False)
    assert vmap(lambda p, b, xi: functional_call(fp32.template.eval(), (p, b), (xi,)))(
        fp32.params, fp32.buffers, x).dtype == torch.float32


def test_bf16_cells_train_in_a_pack_as_they_would_alone(pool: data.Dataset) -> None:
    # --precision bf16 on a CPU: the arithmetic a GPU cell runs ("auto" there), checked without a GPU. bf16 rounds
    # at ~3 significant digits, so weights agree loosely; the curves within one example of each window.
    specs = [spec(arch="resnet_mini", optimizer="sgd", lr=0.005, seed=s, precision="bf16") for s in (0, 1)]
    cell_data = [splits(pool, s.seed) for s in specs]
    cell_models = [loop.prepare_model(s, d) for s, d in zip(specs, cell_data)]
    sequential, alone, batched, trained = train_both(specs, cell_data, cell_models)
    for i in range(2):
        assert_same_cell(sequential[i], batched[i], alone[i], trained[i], atol=5e-3)
    # bf16 really ran: the same cell in float32 ends elsewhere.
    fp32 = dataclasses.replace(specs[0], precision="fp32")
    model = loop.prepare_model(fp32, cell_data[0])
    loop.train(fp32, cell_data[0], model, device="cpu")
    assert not torch.allclose(model.head.weight, alone[0].head.weight, atol=1e-5)


def test_precision_is_a_spec_field_that_keeps_old_keys_and_refuses_unknown_values() -> None:
    from xfer import specs as specs_

    assert specs_.key(spec()) == specs_.key(spec(precision="auto")) != specs_.key(spec(precision="fp32"))
    with pytest.raises(XferError, match="precision 'fp16' is not one of auto, fp32, bf16"):
        spec(precision="fp16")
    assert [loop.bf16(p, "cpu") for p in ("auto", "fp32", "bf16")] == [False, False, True]
    assert [loop.bf16(p, "cuda") for p in ("auto", "fp32", "bf16")] == [True, False, True]
