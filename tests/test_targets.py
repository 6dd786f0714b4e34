"""Each target's preset (sweeps/presets/) as a grid on small generated data: its cells, and one of each trained.

CIFAR-10 and its grayscale view come from `tiny_root` (30 train / 10 test images in torchvision's layout),
the hot-dog folder is PNGs written here, and ResNet-18's "ImageNet" weights are torchvision's state dict
saved to a file. Cells train for one or two short epochs through `training_cells.train_cell` into a real MLflow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from xfer import data, names, pipeline, specs, tracking, training_cells
from xfer import grid as grids
from xfer import train as loop
from xfer.errors import XferError
from xfer.stages import RunOptions

MARK = "layer1.0.conv1.weight"   # the tensor of the written weights file set to a known value
MARK_VALUE = 0.0125


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's resnet18 state dict (random, not ImageNet's: no network) with one tensor set to MARK_VALUE."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    state[MARK].fill_(MARK_VALUE)
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(state, path)
    return path


def assert_recorded_error_is_the_models(record: tracking.RunRecord, model: torch.nn.Module, test: data.Split) -> None:
    """The run's test error is its saved model's error on the whole test split, recomputed here (on a few random
    images the value itself says nothing; that it is this model's, on these images, does)."""
    wrong = int(round(record.metrics[names.TEST_ERROR] * len(test.labels)))
    assert record.metrics[names.TEST_ERROR] == pytest.approx(wrong / len(test.labels))   # a count of its examples
    assert loop.error(model, test.images, test.labels) == pytest.approx(record.metrics[names.TEST_ERROR])


def tiny(preset: str, **overrides) -> grids.Grid:
    """A preset shrunk to tiny_root: whole pools of 30 (10 for validation), one seed and lr, batches of 8."""
    return grids.from_preset(preset, **{"sizes": (0,), "val_size": 10, "pretrain_size": 0, "seeds": (0,), "lrs": (0.01,),
                                        "epochs": 1, "pretrain_epochs": 1, "batch_size": 8, **overrides})


def prepare(grid: grids.Grid, root: Path, experiment: str) -> tuple[grids.Cells, dict]:
    prepared = pipeline.prepare(grid, RunOptions(experiment=experiment, data_root=str(root)))
    return prepared.cells, prepared.datasets


def train(spec, experiment: str, datasets: dict) -> tracking.RunRecord:
    """Train one cell into MLflow and return its finished run."""
    result = training_cells.train_cell(spec, experiment, datasets[spec.train.dataset])
    assert result.ok, result.reason
    record = tracking.find_finished(experiment, specs.key(spec))
    assert record is not None
    return record


@pytest.mark.parametrize("name", [
    name for name in grids.list_presets()
    if name not in grids.PRESETS
])
def test_every_preset_file_is_a_valid_grid(name: str, imagenet_file: Path) -> None:
    grid = grids.from_preset(name)
    if grid.weights:  # no network here: the written file stands in for torchvision's download
        grid = dataclasses.replace(grid, weights=str(imagenet_file))
    grids.validate(grid)
    cells = grids.cells(grid)
    assert grid.name == name and cells.finetune + cells.scratch
    trained = [c.train for c in (*cells.finetune, *cells.scratch)]
    assert {t.dataset for t in trained} == {grid.target} and {t.augment for t in trained} == {grid.augment}
    keys = [specs.key(c) for c in (*cells.pretrain, *cells.finetune, *cells.scratch)]
    assert len(set(keys)) == len(keys)


def test_cifar10_preset_trains_on_tiny_cifar(tiny_root, experiment: str) -> None:
    cells, datasets = prepare(tiny("cifar10"), tiny_root.path, experiment)
    assert datasets["cifar10"].in_shape == (3, 32, 32)
    # No source shares CIFAR's shape: scratch cells only, one per arch (resnet_mini, alexnet_mini), augmented.
    assert (len(cells.pretrain), len(cells.finetune)) == (0, 0)
    assert [(c.train.arch, c.train.augment) for c in cells.scratch] == [("resnet_mini", True), ("alexnet_mini", True)]
    record = train(cells.scratch[0], experiment, datasets)
    assert record.params["train.augment"] == "true" and record.stage == names.SCRATCH
    assert record.metrics["steps"] == 2  # 30 training images less 10 for validation, batches of 8
    model, _ = tracking.load_model(record.run_id)
    assert_recorded_error_is_the_models(record, model, datasets["cifar10"].test)
    assert model.in_shape == (3, 32, 32) and model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("preset, dataset, shape, activation", [
    ("lenet_cifar10", "cifar10", (3, 32, 32), torch.nn.ReLU),
    ("lenet_cifar10_gray", "cifar10_gray", (1, 32, 32), torch.nn.ReLU),
])
def test_lenet_on_cifar10_in_colour_and_gray(tiny_root, experiment: str, preset: str, dataset: str, shape: tuple,
                                             activation: type) -> None:
    cells, datasets = prepare(tiny(preset), tiny_root.path, experiment)
    assert datasets[dataset].in_shape == shape
    assert [(c.train.dataset, c.train.optimizer) for c in cells.scratch] == [(dataset, "adamw"), (dataset, "sgd")]
    model, _ = tracking.load_model(train(cells.scratch[1], experiment, datasets).run_id)
    assert model.in_shape == shape and any(isinstance(m, activation) for m in model.body.modules())
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in model.body.modules())  # the 32×32 ReLU/max-pool LeNet
    if dataset == "cifar10_gray":  # the gray view is CIFAR's colour images in luma
        colour = data.load("cifar10", tiny_root.path).train.images.double()
        luma = (torch.tensor([0.299, 0.587, 0.114]).double()[:, None, None] * colour).sum(1, keepdim=True)
        assert (datasets[dataset].train.images.double() - luma).abs().max() <= 1


def test_lenet_preset_pretrains_then_unfreezes_on_mnist(tiny_root, experiment: str) -> None:
    grid = tiny("lenet", sources=("kmnist",), epochs=2, unfreeze_epoch=1)
    cells, datasets = prepare(grid, tiny_root.path, experiment)
    assert datasets["mnist"].in_shape == (1, 28, 28)
    # depths 0, 4, 6 × recipes plain, sgd, head10x_sgd (+ unfreeze at depths 4 and 6); scratch: AdamW and SGD.
    assert (len(cells.pretrain), len(cells.finetune), len(cells.scratch)) == (1, 11, 2)
    pretrain = train(cells.pretrain[0], experiment, datasets)
    [cell] = [c for c in cells.finetune if c.train.unfreeze_epoch and c.train.freeze_depth == 4]
    record = train(cell, experiment, datasets)
    assert record.tags[names.TAG_PRETRAIN_RUN] == pretrain.run_id and record.tags[names.TAG_SOURCE] == "kmnist"
    assert (record.params["train.unfreeze_epoch"], record.params["train.schedule"]) == ("1", "plateau")
    model, _ = tracking.load_model(record.run_id)
    assert any(isinstance(m, torch.nn.Sigmoid) for m in model.body.modules())  # the seed's 28×28 sigmoid LeNet
    pretrained, _ = tracking.load_model(pretrain.run_id)
    # Unfrozen after epoch 1, the convolutions moved away from their pretrained values in epoch 2.
    assert not torch.equal(model.body[0].weight, pretrained.body[0].weight)


def write_hotdog(folder: Path) -> None:
    """d2l's layout, small: {train,test}/{hotdog,not-hotdog}/*.png, reddish against greenish non-square images."""
    rng = np.random.default_rng(0)
    for part, count in (("train", 10), ("test", 3)):
        for label, channel in (("hotdog", 0), ("not-hotdog", 1)):
            (folder / part / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (40, 48, 3), dtype=np.uint8)
                pixels[..., channel] += 150
                Image.fromarray(pixels).save(folder / part / label / f"{i}.png")


def test_hotdog_preset_fine_tunes_cifar10_pretraining_on_a_png_folder(tiny_root, experiment: str, tmp_path: Path) -> None:
    # A data root of its own (the session's tiny_root stays read-only): the hot-dog folder, and tiny CIFAR-10 linked in.
    root = tmp_path / "data"
    write_hotdog(root / "hotdog")
    (root / "cifar-10-batches-py").symlink_to(tiny_root.path / "cifar-10-batches-py", target_is_directory=True)
    grid = tiny("hotdog", val_size=4, epochs=2, unfreeze_epoch=1)
    cells, datasets = prepare(grid, root, experiment)
    folder = datasets["imagefolder:hotdog"]
    assert folder.in_shape == (3, 32, 32) and folder.class_names == ("hotdog", "not-hotdog")
    assert (len(folder.train), len(folder.test)) == (20, 6)
    # cifar10 → hotdog with resnet_mini: depths 0, 20 × plain, sgd, head10x_sgd, + unfreeze at 20; scratch ×2.
    assert (len(cells.pretrain), len(cells.finetune), len(cells.scratch)) == (1, 7, 2)
    pretrain = train(cells.pretrain[0], experiment, datasets)
    [cell] = [c for c in cells.finetune if c.train.head_lr_mult == 10 and c.train.freeze_depth == 20]
    record = train(cell, experiment, datasets)
    assert record.tags[names.TAG_PRETRAIN_RUN] == pretrain.run_id
    assert (record.params["train.optimizer"], record.params["train.head_lr_mult"]) == ("sgd", "10.0")
    assert record.metrics["steps"] == 2 * (16 // 8)  # 20 training images less 4 for validation, 2 epochs
    model, _ = tracking.load_model(record.run_id)
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 2)  # a new two-class head on the CIFAR-10 body


def test_resnet18_weights_are_checked_before_launch(tmp_path: Path) -> None:
    with pytest.raises(XferError, match=r"missing\.pth does not exist; pass the path of torchvision's resnet18-f37072fd\.pth"):
        grids.validate(grids.from_preset("resnet18", weights=str(tmp_path / "missing.pth")))
    (tmp_path / "damaged.pth").write_bytes(b"not a state dict")
    with pytest.raises(XferError, match="damaged.pth is not a readable torch state dict"):
        grids.validate(grids.from_preset("resnet18", weights=str(tmp_path / "damaged.pth")))
    with pytest.raises(XferError, match="ImageNet weights for resnet18, which is not among the archs resnet_mini"):
        grids.validate(grids.from_preset("resnet18", archs=("resnet_mini",), freeze=(0,), weights=str(tmp_path / "x.pth")))


def test_resnet18_preset_trains_from_random_init_without_weights(tiny_root, experiment: str) -> None:
    # Without weights there is no pretrained body, so only scratch cells (and recipes without unfreezing) remain.
    with pytest.raises(XferError, match="recipe 'unfreeze' unfreezes a frozen pretrained body"):
        grids.validate(tiny("resnet18", weights=""))
    cells, datasets = prepare(tiny("resnet18", weights="", recipes=("plain",)), tiny_root.path, experiment)
    assert (len(cells.finetune), [c.train.arch for c in cells.scratch]) == (0, ["resnet18"])
    record = train(cells.scratch[0], experiment, datasets)
    assert record.params["train.arch"] == "resnet18" and record.metrics["steps"] == 2
    model, _ = tracking.load_model(record.run_id)
    assert_recorded_error_is_the_models(record, model, datasets[cells.scratch[0].train.dataset].test)


def test_resnet18_imagenet_cells_start_from_the_weights_file(tiny_root, experiment: str, imagenet_file: Path) -> None:
    grid = tiny("resnet18", weights=str(imagenet_file), epochs=2, unfreeze_epoch=1)
    cells, datasets = prepare(grid, tiny_root.path, experiment)
    # ImageNet fine-tunes: depths 0, 45 × plain, sgd, head10x_sgd, + unfreeze at 45; scratch (random init) ×2.
    assert (len(cells.pretrain), len(cells.finetune), len(cells.scratch)) == (0, 7, 2)
    assert {c.train.weights for c in cells.finetune} == {str(imagenet_file)}
    assert {c.train.weights for c in cells.scratch} == {None}
    [cell] = [c for c in cells.finetune if c.train.head_lr_mult == 10 and c.train.freeze_depth == 45]
    splits = data.make_splits(datasets["cifar10"], None, 10, 0)
    body = dict(loop.prepare_model(cell.train, splits).body.named_parameters())
    assert torch.all(body["3.0.conv1.weight"] == MARK_VALUE)  # layer1 comes from the file
    record = train(cell, experiment, datasets)
    assert record.params["train.head_lr_mult"] == "10.0"
