"""Scoring many targets of one arch: stacked (vmap) answers exactly as one after another and as attack.predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from xfer import attack, data, models, stacked
from xfer.cli import tools
from xfer.errors import XferError

# The archs built for MNIST-shaped 1×28×28 images (`xfer archs` gives resnet18 32×32 and the adder's archs two
# channels): a newly registered arch is checked here for free.
ARCHS_28 = [a for a in models.list_archs() if a != "resnet18" and not a.startswith("adder_")]


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return data.load("mnist5k").test.images[:200]


def target(arch: str, seed: int, images: torch.Tensor) -> models.XferModel:
    """An untrained model made to disagree with its siblings image by image, as trained targets do.

    Untrained, every arch answers one class for nearly every image (a shared feature component dominates the
    logits), and agreeing on a constant says little. So each target gets its own normalisation buffers,
    random BatchNorm running statistics, and a random head centred on these images' mean feature.
    """
    model = stacked.untrained(arch, seed).eval()
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        model.mean.fill_(0.1 + 0.03 * seed)
        model.std.fill_(0.3 + 0.05 * seed)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) * 2 + 0.25)
        features = model.body((images.float() / 255 - model.mean) / model.std)
        weight = torch.randn(model.head.weight.shape, generator=g) / features.std(0).clamp_min(1e-6)
        model.head.weight.copy_(weight)
        model.head.bias.copy_(-(weight @ features.mean(0)))
    return model


@pytest.mark.parametrize("arch", ARCHS_28)
def test_stacked_answers_exactly_as_one_after_another_and_as_attack_predict(arch: str, digits: torch.Tensor) -> None:
    targets = [target(arch, seed, digits) for seed in range(3)]
    targets[1].train()   # a caller's model left in train mode: the Stack scores it in eval mode all the same
    alone = torch.stack([attack.predict(m, digits, "cpu") for m in targets])
    assert targets[1].training, "attack.predict restores the mode; so must the Stack"

    stack = stacked.Stack(targets, "cpu", "stacked")
    assert (stack.mode, stack.why) == ("stacked", "")
    together = stack.predict(digits, batch=64)   # 200 images: three full chunks and a short one
    one_by_one = stacked.Stack(targets, "cpu", "loop").predict(digits.float() / 255, batch=64)

    assert together.shape == (3, 200) and together.dtype == torch.long and together.device.type == "cpu"
    assert torch.equal(together, alone) and torch.equal(one_by_one, alone)
    # The check has teeth: the targets disagree with each other and predict many classes, so a stack that ran
    # one target's tensors (or buffers) for all of them would fail above.
    assert (alone[0] != alone[1]).float().mean() > 0.5 and (alone[1] != alone[2]).float().mean() > 0.5
    assert all(len(row.unique()) >= 5 for row in alone)
    assert targets[1].training and all(p.requires_grad for p in targets[1].parameters()), "the caller's models are untouched"


def test_batchnorm_running_statistics_are_each_targets_own(digits: torch.Tensor) -> None:
    targets = [target("resnet_mini", seed, digits) for seed in range(3)]
    alone = torch.stack([attack.predict(m, digits, "cpu") for m in targets])
    assert torch.equal(stacked.Stack(targets, "cpu").predict(digits), alone)
    # Batch statistics (train mode) instead of each target's running ones would change most answers ...
    with torch.no_grad():
        in_train_mode = targets[0].train()(digits.float() / 255).argmax(1)
    assert (in_train_mode != alone[0]).float().mean() > 0.3
    # ... and so would the first target's running statistics in every target.
    swapped = [target("resnet_mini", seed, digits) for seed in range(3)]
    first = {k: v for k, v in targets[0].state_dict().items() if "running" in k}
    swapped[1].load_state_dict(first, strict=False)
    assert (stacked.Stack(swapped, "cpu").predict(digits)[1] != alone[1]).float().mean() > 0.3


def test_models_that_cannot_be_stacked_are_refused_with_a_reason_and_scored_one_after_another(
        digits: torch.Tensor) -> None:
    lenet = stacked.untrained("lenet5", 0)
    assert stacked.stackable([lenet, stacked.untrained("lenet5", 1)]) == ""
    assert "different classes" in stacked.stackable([lenet, nn.Linear(2, 3)])
    assert "lenet5 for (1, 28, 28) images" in stacked.stackable([lenet, stacked.untrained("resnet_mini", 0)])
    assert "(1, 32, 32)" in stacked.stackable([lenet, models.build("lenet5", (1, 32, 32), 10)])
    five_classes = models.build("lenet5", (1, 28, 28), 5)
    assert stacked.stackable([lenet, five_classes]) == "parameter head.weight is [10, 84] float32 in one model and [5, 84] float32 in another"
    assert "float16" in stacked.stackable([lenet, stacked.untrained("lenet5", 1).half()])
    assert stacked.stackable([]) == "there are no models"

    stack = stacked.Stack([lenet, five_classes], "cpu", "stacked")
    assert stack.mode == "loop" and "head.weight" in stack.why
    expected = torch.stack([attack.predict(m, digits, "cpu") for m in (lenet, five_classes)])
    assert torch.equal(stack.predict(digits), expected) and expected[1].max() < 5
    assert stack.predict(digits[:0]).shape == (2, 0)
    with pytest.raises(XferError, match=r"shape \(1, 28, 28\) but these are \(1, 32, 32\)"):
        stack.predict(torch.zeros(4, 1, 32, 32))
    with pytest.raises(XferError, match="not one of stacked, loop"):
        stacked.Stack([lenet], "cpu", "vmap")


def test_choose_measures_once_keeps_it_in_the_calibration_file_and_reads_it_back(
        digits: torch.Tensor, tmp_path: Path) -> None:
    cache = tmp_path / "runs" / "calibration.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps({"vectorised/cpu/lenet5/batch64/cells2/threads1": {"vectorised_is_faster": False}}))
    targets = [target("lenet5", seed, digits) for seed in range(3)]
    key = f"scoring/cpu/lenet5/1x28x28/targets3/threads{torch.get_num_threads()}"

    mode, why = stacked.choose(targets, "cpu", cache, digits)
    written = json.loads(cache.read_text())
    entry = written[key]
    assert "vectorised/cpu/lenet5/batch64/cells2/threads1" in written, "other measurements are kept"
    assert entry["images"] == 200 and entry["loop_s"] > 0 and entry["stacked_s"] > 0
    assert entry["speedup"] == pytest.approx(entry["loop_s"] / entry["stacked_s"])
    assert mode == entry["mode"] == ("stacked" if entry["speedup"] >= stacked.STACKED_MUST_WIN else "loop")
    assert f"{entry['speedup']:.2f}×" in why and "on cpu" in why
    assert not list(cache.parent.glob("*.partial")), "written atomically, no partial file left"

    # Read back, not measured again: the file is unchanged to the last digit of its timings.
    assert stacked.choose(targets, "cpu", cache, digits) == (mode, why)
    assert json.loads(cache.read_text()) == written
    # What the file says is what is chosen (a measurement from another run of this machine).
    cache.write_text(json.dumps({**written, key: {**entry, "mode": "stacked", "speedup": 1.45}}))
    assert stacked.choose(targets, "cpu", cache, digits) == ("stacked", "stacked 3 lenet5 targets measured 1.45× faster on cpu")
    cache.write_text(json.dumps({**written, key: {**entry, "mode": "loop", "speedup": 0.8}}))
    assert stacked.choose(targets, "cpu", cache, digits)[1].startswith("one target after another: stacked measured 0.80× on cpu")

    # On CUDA stacking is chosen without a measurement; models that cannot be stacked go one after another.
    before = cache.read_text()
    assert stacked.choose(targets, "cuda", cache, digits)[0] == "stacked"
    mode, why = stacked.choose([targets[0], models.build("lenet5", (1, 28, 28), 5)], "cpu", cache, digits)
    assert mode == "loop" and why.startswith("one target after another: parameter head.weight")
    assert cache.read_text() == before


def test_bench_scores_both_ways_side_by_side() -> None:
    lines: list[str] = []
    rows = stacked.bench(["lenet5"], targets=2, n=48, devices=["cpu"], echo=lines.append)
    assert len(rows) == 1
    row = rows[0]
    assert set(row) == {"arch", "device", "targets", "examples", "loop_per_s", "stacked_per_s", "ratio"}
    assert (row["arch"], row["device"], row["targets"], row["examples"]) == ("lenet5", "cpu", 2, 48)
    assert row["loop_per_s"] > 0 and row["stacked_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["stacked_per_s"] / row["loop_per_s"])
    assert "stacked/s" in lines[1] and lines[2].startswith("lenet5")


def test_bench_command_prints_score_rows_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert tools.run_bench(["--score", "--archs", "mlp_mixer", "--targets", "2", "--n", "64", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])   # the command's default devices
    assert [(r["arch"], r["device"], r["targets"], r["examples"]) for r in rows] == [("mlp_mixer", d, 2, 64) for d in devices]
    assert rows[0]["loop_per_s"] > 0 and rows[0]["stacked_per_s"] > 0 and rows[0]["ratio"] > 0
    assert "loop/s" in err, "the table goes to stderr, so stdout is JSON alone"


@pytest.mark.parametrize("mode", stacked.MODES)
def test_a_stack_answers_for_some_of_its_targets_as_they_would_alone(mode: str) -> None:
    models_ = [stacked.untrained("mlp_mixer", seed) for seed in range(4)]
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    stack = stacked.Stack(models_, "cpu", mode)
    every = stack.predict(images, batch=16)
    for which in ([2], [3, 0], [1, 2, 3]):   # fewer than half go alone, the rest through the stacked model
        assert torch.equal(stack.predict(images, batch=16, which=which), every[which])
    assert stack.predict(images, which=[]).shape == (0, 50)
