"""Grid settings: presets, grid files, CLI overrides, recipes, and everything refused before launch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from xfer import data, models, names, pipeline, specs
from xfer import grid as grids
from xfer import train as loop
from xfer.errors import XferError
from xfer.specs import TrainSpec
from xfer.stages import RunOptions

# ---- validation before launch (no Ray, no MLflow) -----------------------------------------------

@pytest.mark.parametrize("override, message", [
    (dict(sources=("kmnist2",)), "unknown dataset 'kmnist2'"),
    (dict(archs=("vgg",)), "unknown arch 'vgg'"),
    (dict(freeze={"resnet_mini": (31,)}), r"freeze depth \[31\] beyond resnet_mini's 30 body tensors"),
    (dict(attacks=("deepfool2",)), "unknown attack 'deepfool2'"),
    (dict(eps=(2.0,)), r"--eps / eps: 2.0 must lie in \[0, 1\]"),
])
def test_bad_grids_are_refused_before_launch(override: dict, message: str) -> None:
    with pytest.raises(XferError, match=message):
        grids.validate(grids.from_preset("smoke", **override))


# Every number and axis a person can get wrong, refused by `validate` in the words of its flag and grid key.
@pytest.mark.parametrize("override, message", [
    (dict(sizes=(500, -5)), r"--sizes / sizes: -5 must be at least 0 \(fine-tune examples per cell; 0 = the whole pool\)"),
    (dict(seeds=(0, -1)), r"--seeds / seeds: -1 must be at least 0"),
    (dict(lrs=(0.0, 1e-3, 10.0)), r"--lrs / lrs: 0.0, 10.0 must lie in \(0, 10\)"),
    (dict(lrs=(float("nan"),)), r"--lrs / lrs: nan must lie in \(0, 10\)"),
    (dict(eps=(-0.1,)), r"--eps / eps: -0.1 must lie in \[0, 1\] \(images are in \[0, 1\]"),
    (dict(epochs=0), r"--epochs / epochs: 0 must be at least 1"),
    (dict(pretrain_epochs=-2), r"--pretrain-epochs / pretrain_epochs: -2 must be at least 1"),
    (dict(batch_size=0), r"--batch-size / batch_size: 0 must be at least 1"),
    (dict(attack_n=0), r"--attack-n / attack_n: 0 must be at least 1"),
    (dict(attack_steps=0), r"--attack-steps / attack_steps: 0 must be at least 1"),
    (dict(val_size=-1), r"--val-size / val_size: -1 must be at least 0"),
    (dict(pretrain_size=-100), r"--pretrain-size / pretrain_size: -100 must be at least 0"),
    (dict(unfreeze_lr_mult=0.0), r"--unfreeze-lr-mult / unfreeze_lr_mult: 0.0 must be more than 0"),
    (dict(sizes=(500, 500)), r"--sizes / sizes: 500 given more than once; each value makes its own cells"),
    (dict(seeds=(0, 1, 0)), r"--seeds / seeds: 0 given more than once"),
    (dict(lrs=(1e-3, 1e-3)), r"--lrs / lrs: 0.001 given more than once"),
    (dict(sources=("uci_digits", "uci_digits")), r"--sources / sources: uci_digits given more than once"),
    (dict(attacks=("pgd", "fgsm", "pgd")), r"--attacks / attacks: pgd given more than once"),
    (dict(eps=(0.3, 0.3)), r"--eps / eps: 0.3 given more than once"),
    (dict(seeds=()), r"--seeds / seeds: is empty; give at least one, e.g. --seeds 0 1"),
    (dict(archs=()), r"--archs / archs: is empty"),
    (dict(eps=()), r"--eps / eps: is empty but attacks fgsm, pgd need a budget"),
    (dict(freeze={"resnet_mini": (0, -1)}), r"--freeze / freeze: resnet_mini=0,-1 must be distinct depths of at least 0"),
    (dict(freeze={"resnet_mini": (20, 20)}), r"--freeze / freeze: resnet_mini=20,20 must be distinct depths"),
    (dict(target="mnist55k"), r"--target / target: unknown dataset 'mnist55k'"),
    (dict(recipes=("plain", "plian")), r"unknown recipe 'plian'"),
    (dict(name=" "), r"--name / name: is empty; it names the MLflow experiment"),
])
def test_each_setting_out_of_range_is_refused_naming_its_flag_and_key(override: dict, message: str) -> None:
    with pytest.raises(XferError, match=message) as caught:
        grids.validate(grids.from_preset("smoke", **override))
    assert str(caught.value).startswith("the grid is not valid: ") and str(caught.value).endswith("Nothing was launched.")


def test_size_zero_is_the_whole_pool_and_every_problem_is_named_at_once() -> None:
    grids.validate(grids.from_preset("smoke", sizes=(0, 500), val_size=0, pretrain_size=0, unfreeze_epoch=0))
    with pytest.raises(XferError) as caught:
        grids.validate(grids.from_preset("smoke", sizes=(-5,), epochs=0, eps=(2.0,)))
    message = str(caught.value)
    assert "--sizes / sizes: -5" in message and "--epochs / epochs: 0" in message and "--eps / eps: 2.0" in message
    assert "or None" not in message


def test_validate_reads_no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("validate read data")

    monkeypatch.setattr(data, "load", no_data)
    monkeypatch.setattr(data, "missing", no_data)
    grids.validate(grids.from_preset("seed"))  # torchvision sets, none of them on this machine
    with pytest.raises(XferError, match="--sizes / sizes: -5"):
        grids.validate(grids.from_preset("seed", sizes=(-5,)))


def test_negative_sizes_from_the_command_line_name_the_flag(full_grid) -> None:
    args = full_grid.parser().parse_args(["--preset", "smoke", "--sizes", "-5", "--seeds", "-1"])
    with pytest.raises(XferError, match=r"--sizes / sizes: -5 must be at least 0.*--seeds / seeds: -1 must be at least 0"):
        grids.validate(full_grid.grid_from_args(args))


# ---- wrong types from grid files: refused with the setting, the value and an example ---------------

@pytest.mark.parametrize("text, message", [
    ("sizes: [abc]", r"--sizes / sizes: 'abc' is not a whole number; e.g. --sizes 500 1000, or `sizes: \[500, 1000\]` in a grid file"),
    ("sizes: [500, 1.5]", r"--sizes / sizes: 1.5 is not a whole number"),
    ('epochs: "ten"', r"--epochs / epochs: 'ten' is not a whole number; e.g. --epochs 10, or `epochs: 10` in a grid file"),
    ("epochs: [10]", r"--epochs / epochs: \[10\] is not a whole number"),
    ("lrs: [fast]", r"--lrs / lrs: 'fast' is not a number"),
    ("augment: maybe", r"augment: 'maybe' is not true or false; e.g. `augment: false` in a grid file"),
    ("sources: [kmnist, 7]", r"--sources / sources: 7 is not text \(a name\)"),
    ("seeds: [true]", r"--seeds / seeds: True is not a whole number"),
    ("freeze: {resnet_mini: [0, twenty]}", r"--freeze / freeze: resnet_mini=\[0, 'twenty'\] is not a list of whole numbers"),
    ("tuned: 5", r"--tuned / tuned: 5 is not a mapping of 'arch/size' to settings"),
    ("weights: 5", r"--weights / weights: 5 is not text"),
])
def test_wrong_types_in_a_grid_file_are_refused_without_a_traceback(text: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text(text + "\n")
    with pytest.raises(XferError, match=message) as caught:
        grids.make(**grids.load_file(tmp_path / "g.yaml"))
    assert str(caught.value).endswith("Nothing was launched.")


def test_numbers_are_read_as_their_setting_wants(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text("lrs: [1e-3, 1]\nepochs: 4.0\nsizes: 500\n")  # YAML reads 1e-3 as text
    grid = grids.make(**grids.load_file(tmp_path / "g.yaml"))
    assert grid.lrs == (0.001, 1.0) and all(type(lr) is float for lr in grid.lrs)  # lr 1 and 1.0: the same cells
    assert grid.epochs == 4 and type(grid.epochs) is int and grid.sizes == (500,)
    (tmp_path / "g.toml").write_text("epochs = 10.5\n")
    with pytest.raises(XferError, match="--epochs / epochs: 10.5 is not a whole number"):
        grids.make(**grids.load_file(tmp_path / "g.toml"))


def test_a_grid_built_by_hand_with_a_wrong_type_is_refused_by_validate() -> None:
    import dataclasses

    with pytest.raises(XferError, match="--epochs / epochs: 'ten' is not a whole number"):
        grids.validate(dataclasses.replace(grids.from_preset("smoke"), epochs="ten"))


def test_size_beyond_the_pool_is_refused() -> None:
    grid = grids.from_preset("smoke", sizes=(500, 4000))
    with pytest.raises(XferError, match=r"size\(s\) \[4000\] exceed mnist5k's training pool of 3700"):
        pipeline.prepare(grid, RunOptions(experiment="x"))


def test_missing_torchvision_data_names_sets_and_remedies(tmp_path: Path) -> None:
    grid = grids.from_preset("seed", sources=("kmnist", "svhn"), archs=("resnet_mini",))
    with pytest.raises(XferError) as info:
        pipeline.check_data(grid, RunOptions(experiment="x", data_root=str(tmp_path)))
    text = str(info.value)
    assert "kmnist" in text and "svhn" in text and "mnist" in text and str(tmp_path) in text
    assert "--download" in text and "--preset smoke" in text
    # The refusal names the files it looked for, as torchvision ships them too (.gz), and their folder.
    assert "train-images-idx3-ubyte" in text and "train-images-idx3-ubyte.gz" in text and "train_32x32.mat" in text


def test_cli_overrides_and_grid_file(tmp_path: Path, full_grid) -> None:
    (tmp_path / "g.yaml").write_text("sizes: [100, 200]\nseeds: [0, 1, 2]\nfreeze: {resnet_mini: [0, 23]}\n")
    args = full_grid.parser().parse_args(["--preset", "smoke", "--grid", str(tmp_path / "g.yaml"), "--lrs", "0.01"])
    grid = full_grid.grid_from_args(args)
    assert grid.sizes == (100, 200) and grid.seeds == (0, 1, 2) and grid.lrs == (0.01,)
    cells = grids.cells(grid)
    # 2 sources × 1 arch × 3 seeds pretrains; fine-tunes: 2 sizes × 3 seeds × 2 sources × 2 depths; scratch 2 × 3.
    assert (len(cells.pretrain), len(cells.finetune), len(cells.scratch)) == (6, 24, 6)
    assert {c.train.freeze_depth for c in cells.finetune} == {0, 23}
    (tmp_path / "bad.toml").write_text("sizez = [1]\n")
    with pytest.raises(XferError, match="unknown grid settings sizez"):
        grids.make(**grids.load_file(tmp_path / "bad.toml"))


# ---- fine-tuning recipes as a grid axis -----------------------------------------------------------

RECIPE_GRID = dict(recipes=("plain", "sgd", "head10x_sgd", "unfreeze"), unfreeze_epoch=2)


def _recipe_of(t: TrainSpec) -> tuple:
    return (t.optimizer, t.head_lr_mult, t.unfreeze_epoch, t.schedule)


def test_recipes_axis_expands_into_distinct_cells() -> None:
    grid = grids.from_preset("smoke", **RECIPE_GRID)
    grids.validate(grid)
    cells = grids.cells(grid)
    # 2 sources × (depth 0: plain, sgd, head10x_sgd; depth 20: those and unfreeze); scratch: one per optimizer.
    assert (len(cells.pretrain), len(cells.finetune), len(cells.scratch)) == (2, 14, 2)
    by_depth = {d: [_recipe_of(c.train) for c in cells.finetune if c.train.freeze_depth == d and c.source == "uci_digits"]
                for d in (0, 20)}
    plain, sgd, head10x = ("adamw", 1.0, None, "cosine"), ("sgd", 1.0, None, "cosine"), ("sgd", 10.0, None, "cosine")
    assert by_depth[0] == [plain, sgd, head10x]
    assert by_depth[20] == [plain, sgd, head10x, ("adamw", 1.0, 2, "plateau")]
    assert {c.train.unfreeze_lr_mult for c in cells.finetune if c.train.unfreeze_epoch} == {grid.unfreeze_lr_mult}
    # Scratch baselines have no pretrained body: only each recipe's optimizer reaches them.
    assert [_recipe_of(c.train) + (c.train.freeze_depth,) for c in cells.scratch] == [plain + (0,), sgd + (0,)]
    keys = [specs.key(c) for c in (*cells.pretrain, *cells.finetune, *cells.scratch)]
    assert len(set(keys)) == len(keys)
    # Adding recipes changes no key: the plain cells are exactly the plain-only grid's cells.
    plain_only = grids.cells(grids.from_preset("smoke"))
    assert {specs.key(c) for c in plain_only.finetune + plain_only.scratch} <= set(keys)


def test_combined_recipe_and_the_unfreeze_defaults() -> None:
    grid = grids.from_preset("smoke", recipes=("head10x_sgd+unfreeze",), epochs=4, unfreeze_lr_mult=0.2)
    grids.validate(grid)
    [t] = {c.train for c in grids.cells(grid).finetune if c.source == "uci_digits"}  # depth 0 has nothing to unfreeze
    assert (t.freeze_depth, t.optimizer, t.head_lr_mult, t.schedule) == (20, "sgd", 10.0, "plateau")
    assert (t.unfreeze_epoch, t.unfreeze_lr_mult) == (2, 0.2)  # unfreeze_epoch 0 = half of the 4 epochs


@pytest.mark.parametrize("override, message", [
    (dict(recipes=("plain", "head10x")), r"unknown recipe 'head10x'; known recipes are plain, sgd, head10x_sgd, lr10x_sgd, unfreeze, unfreeze_control"),
    (dict(recipes=("sgd+unfreez",)), r"unknown recipe 'unfreez' in 'sgd\+unfreez'"),
    (dict(recipes=("plain", "sgd"), optimizer="sgd"), "recipes 'plain' and 'sgd' give the same cells"),
    (dict(recipes=("unfreeze",), epochs=1), r"unfreezes at epoch 0, which must lie in 1..0"),
    (dict(recipes=("unfreeze",), unfreeze_epoch=6), r"unfreezes at epoch 6, which must lie in 1..5"),
    (dict(recipes=("unfreeze",), freeze={"resnet_mini": (0,)}), "no fine-tune cell has a freeze depth > 0"),
    (dict(recipes=("plain", "unfreeze"), sources=()), "no fine-tune cell has a freeze depth > 0"),
    (dict(recipes=()), "at least one recipe"),
    (dict(optimizer="lion"), "optimizer 'lion' is not one of adamw, adam, sgd"),
    (dict(sources=(), scratch=False), "the grid has no training cells"),
])
def test_bad_recipes_are_refused_before_launch(override: dict, message: str) -> None:
    with pytest.raises(XferError, match=message):
        grids.validate(grids.from_preset("smoke", **override))


def test_a_recipe_setting_given_twice_must_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(grids.RECIPES, "adam", grids.Recipe(optimizer="adam"))
    with pytest.raises(XferError, match="recipe 'adam\\+head10x_sgd' sets optimizer to both 'adam' and 'sgd'"):
        grids.validate(grids.from_preset("smoke", recipes=("adam+head10x_sgd",)))


def test_recipes_from_the_cli_and_grid_files(tmp_path: Path, full_grid) -> None:
    args = full_grid.parser().parse_args(["--preset", "smoke", "--recipes", "plain", "head10x_sgd+unfreeze",
                                          "--unfreeze-epoch", "2", "--unfreeze-lr-mult", "0.5", "--augment"])
    grid = full_grid.grid_from_args(args)
    assert (grid.recipes, grid.unfreeze_epoch, grid.unfreeze_lr_mult, grid.augment) == (
        ("plain", "head10x_sgd+unfreeze"), 2, 0.5, True)
    (tmp_path / "g.yaml").write_text("recipes: [sgd, unfreeze]\nunfreeze_epoch: 1\n")
    grid = full_grid.grid_from_args(full_grid.parser().parse_args(["--preset", "smoke", "--grid", str(tmp_path / "g.yaml")]))
    assert grid.recipes == ("sgd", "unfreeze") and grid.unfreeze_epoch == 1
    # A preset file's augment can be switched off on the command line.
    assert full_grid.grid_from_args(full_grid.parser().parse_args(["--preset", "cifar10"])).augment is True
    assert full_grid.grid_from_args(full_grid.parser().parse_args(["--preset", "cifar10", "--no-augment"])).augment is False


def test_preset_files_are_presets(tmp_path: Path, full_grid) -> None:
    usage = full_grid.parser().format_help()
    for name in ("seed", "smoke", "claims", "cifar10", "lenet", "lenet_cifar10", "lenet_cifar10_gray", "resnet18", "hotdog"):
        assert name in grids.list_presets() and name in usage
    with pytest.raises(XferError, match=r"unknown preset 'cifar100'; known presets are cifar10, claims, claims_sgd_lr, hotdog"):
        grids.from_preset("cifar100")
    (tmp_path / "mine.toml").write_text('name = "mine"\nsizes = [7]\n')
    assert grids.list_presets(tmp_path) == ["mine", "seed", "smoke"]
    assert grids.preset_values("mine", tmp_path) == {"name": "mine", "sizes": [7]}


def test_weights_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert grids.make(weights="w/resnet18.pth").weights == str(tmp_path / "w" / "resnet18.pth")  # Ray trials run elsewhere
    assert grids.make(weights="imagenet").weights == "imagenet" and grids.make(weights=None).weights == ""


# ---- recipes reach the one loop: the head's lr, the frozen body, the epoch it unfreezes ------------

def test_recipe_cells_train_as_their_recipe_says() -> None:
    grid = grids.make(name="r", sources=("uci_digits",), archs=("lenet5",), target="mnist5k", sizes=(400,),
                      freeze={"lenet5": (0, 4)}, lrs=(0.01,), seeds=(0,), epochs=3, val_size=100, batch_size=50,
                      recipes=("head10x_sgd", "lr10x_sgd", "unfreeze", "unfreeze_control"), unfreeze_epoch=2,
                      attacks=("fgsm",))
    grids.validate(grid)
    by_recipe = {(c.train.optimizer, c.train.head_lr_mult, c.train.unfreeze_body, c.train.freeze_depth): c.train
                 for c in grids.cells(grid).finetune}
    assert by_recipe[("sgd", 1.0, True, 4)].lr == pytest.approx(0.1)   # lr10x_sgd: every layer at 10 × 0.01
    # The mechanics need gradients, not a learnable task: noise images in mnist5k's shape stand in for it.
    images = torch.randint(0, 256, (600, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(600) % 10
    noise = data.Dataset("noise", data.Split(images[:500], labels[:500]), data.Split(images[500:], labels[500:]),
                         tuple("0123456789"))
    splits = data.make_splits(noise, 400, 100, seed=0)

    def run(spec: TrainSpec) -> tuple[dict[str, torch.Tensor], list[loop.TrainState]]:
        """The initial values of the 4 frozen tensors (lenet5's convolutions), and the state after each epoch."""
        model = loop.prepare_model(spec, splits)
        convs = {f"body.{n}": p.detach().clone() for n, p in models.layers(model)[:4]}
        states: list[loop.TrainState] = []
        assert loop.train(spec, splits, model, on_epoch_end=states.append).ok
        return convs, states

    _, states = run(by_recipe[("sgd", 10.0, True, 4)])
    groups = states[0].optimizer["param_groups"]
    assert [len(g["params"]) for g in groups] == [4, 2]  # the unfrozen body tensors (fc1, fc2), then the head
    assert [g["initial_lr"] for g in groups] == [pytest.approx(0.01), pytest.approx(0.1)]
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"]) and groups[0]["momentum"] == 0.9  # SGD, cosine-decayed

    convs, states = run(by_recipe[("adamw", 1.0, True, 4)])
    for epoch in (0, 1):  # epochs 1 and 2: the convolutions stay frozen; the rest of the body and the head at lr
        assert all(torch.equal(states[epoch].model[name], value) for name, value in convs.items())
        assert [(len(g["params"]), g["lr"]) for g in states[epoch].optimizer["param_groups"]] == [(4, 0.01), (2, 0.01)]
    # Epoch 3: every layer unfrozen at lr × 0.1 under ReduceLROnPlateau, and the convolutions move.
    unfrozen = [(len(g["params"]), g["lr"]) for g in states[2].optimizer["param_groups"]]
    assert unfrozen == [(8, pytest.approx(0.001)), (2, pytest.approx(0.001))]
    assert "patience" in states[2].scheduler
    assert not any(torch.equal(states[2].model[name], value) for name, value in convs.items())

    # unfreeze_control: the same switch at epoch 3 (lr × 0.1, ReduceLROnPlateau), but the convolutions stay frozen.
    control = by_recipe[("adamw", 1.0, False, 4)]
    assert (control.unfreeze_epoch, control.schedule) == (2, "plateau")
    convs, states = run(control)
    assert [(len(g["params"]), g["lr"]) for g in states[2].optimizer["param_groups"]] == [
        (4, pytest.approx(0.001)), (2, pytest.approx(0.001))]
    assert "patience" in states[2].scheduler
    assert all(torch.equal(states[2].model[name], value) for name, value in convs.items())
    assert not torch.equal(states[2].model["head.weight"], states[1].model["head.weight"])


def test_steps_budget_sgd_lrs_and_only_by_optimizer() -> None:
    grid = grids.from_preset("smoke", sizes=(100, 500, 0), batch_size=32, epochs=4, steps=(200,), lrs=(0.002,),
                             sgd_lrs=(0.03,), recipes=("plain", "sgd", "lr10x_sgd", "unfreeze"),
                             only=({"stage": "scratch", "optimizer": "adamw"}, {"stage": "finetune"}))
    grids.validate(grid)
    cells = grids.cells(grid, {"mnist5k": 4000, "glyph_letters": 5000, "uci_digits": 1797})
    # 200 steps whatever the size: 4 epochs of 50 steps each (an epoch of 100 examples is 16 passes over them).
    for c in cells.finetune + cells.scratch:
        t = c.train
        assert (t.epochs, t.epoch_steps) == (4, 50)
        assert t.unfreeze_epoch == (2 if t.schedule == "plateau" else None)
        assert t.lr == pytest.approx({"adamw": 0.002, "sgd": 0.03}[t.optimizer] * (10 if t.lr > 0.1 else 1))
    sgd = [c.train for c in cells.finetune if c.train.optimizer == "sgd"]
    assert sorted({t.lr for t in sgd}) == [pytest.approx(0.03), pytest.approx(0.3)]   # sgd, lr10x_sgd
    # `only` by optimizer: the SGD scratch cells the recipes would bring are left out.
    assert {c.train.optimizer for c in cells.scratch} == {"adamw"} and len(cells.scratch) == 3
    # Without a steps budget an epoch is one pass, and without sgd_lrs SGD takes the lrs axis.
    plain = grids.cells(grids.from_preset("smoke", recipes=("plain", "sgd")))
    assert {c.train.epoch_steps for c in plain.finetune} == {None}
    assert {c.train.lr for c in plain.finetune} == set(grids.from_preset("smoke").lrs)
    # Budgets are an axis: a second one makes its own cells where `only` keeps them (here: scratch at the pool), the
    # first budget's cells unchanged; 1,150 steps round up to 4 epochs of 288.
    two = dataclasses.replace(grid, steps=(200, 1150), only=grids.make(only=[
        {"stage": "scratch", "optimizer": "adamw", "steps": 200}, {"stage": "finetune", "steps": 200},
        {"stage": "scratch", "optimizer": "adamw", "steps": 1150, "size": 0}]).only)
    grids.validate(two)
    more = grids.cells(two, {"mnist5k": 4000, "glyph_letters": 5000, "uci_digits": 1797})
    assert more.finetune == cells.finetune and set(cells.scratch) < set(more.scratch)
    extra = [c.train for c in more.scratch if c not in cells.scratch]
    assert [(t.size, t.epochs, t.epoch_steps) for t in extra] == [(None, 4, 288)]
    # Two budgets that round to the same steps an epoch make one cell, not two.
    same = dataclasses.replace(grid, steps=(200, 197), only=())
    assert grids.cells(same).scratch == grids.cells(dataclasses.replace(same, steps=(200,))).scratch


def test_an_epoch_steps_epoch_cycles_through_the_data_and_is_evaluated_once() -> None:
    # 100 examples at batch 32: one pass is 3 steps; an epoch of 10 steps draws from 4 passes (fresh permutations),
    # so the loop and the vectorised pack take 10 steps an epoch, and every example is seen in the first 4 batches.
    small = data.make_splits(data.load("mnist5k"), 100, 50, seed=0)
    spec = TrainSpec(arch="lenet5", dataset="mnist5k", size=100, val_size=50, epochs=2, batch_size=32, lr=1e-3,
                     epoch_steps=10)
    order = loop.epoch_order(100, spec, 0, 10 * 32)
    assert len(order) == 400 and all(sorted(order[i * 100:(i + 1) * 100].tolist()) == list(range(100)) for i in range(4))
    assert torch.equal(order[:100], loop.epoch_order(100, dataclasses.replace(spec, epoch_steps=None), 0))
    result = loop.train(spec, small, loop.prepare_model(spec, small))
    assert result.ok and result.metrics["steps"] == 20
    assert [r["epoch"] for r in result.curve if r["split"] == "val"] == [1.0, 2.0]



def test_sources_of_another_image_shape_are_refused_before_launch(tiny_root) -> None:
    grid = grids.from_preset("smoke", sources=("glyph_letters",), target="cifar10_gray", sizes=(10,), val_size=5,
                             pretrain_size=100, freeze={"resnet_mini": (0,)})
    with pytest.raises(XferError, match=r"glyph_letters \(1, 28, 28\) do not share the target cifar10_gray's image shape \(1, 32, 32\)"):
        pipeline.prepare(grid, RunOptions(experiment="x", data_root=str(tiny_root.path)))


def test_pretrain_size_is_a_cap_so_small_sources_are_used_whole() -> None:
    grid = grids.from_preset("smoke", pretrain_size=3000, val_size=300)
    sizes = {c.train.dataset: c.train.size for c in grids.cells(grid, {"glyph_letters": 15600, "uci_digits": 1437}).pretrain}
    assert sizes == {"glyph_letters": 3000, "uci_digits": None}  # uci_digits' 1137 non-validation digits, all of them
    grids.check_pools(grid, {"glyph_letters": 15600, "uci_digits": 1437, "mnist5k": 4000})


def test_dry_run_plans_the_seed_grid_without_its_data_ray_or_a_trial(full_grid, mlflow_server, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from xfer import cluster, plan

    def no_ray(*args, **kwargs):
        raise AssertionError("a dry run must not start Ray")

    monkeypatch.setattr(cluster, "connect", no_ray)
    # A calibration kept from earlier (what a second dry run reuses), so this test measures nothing itself.
    calibration = {f"throughput/cpu/{arch}/1x28x28/batch128/threads1": {"samples_per_s": 500.0, "measured": "earlier"}
                   for arch in ("alexnet_mini", "resnet_mini", "mlp_mixer", "mlp_mixer2")}
    (mlflow_server.root / "calibration.json").write_text(json.dumps(calibration))
    assert full_grid.main(["--dry-run", "--gpus", "2", "--data-root", str(tmp_path), "--name", f"dry-{tmp_path.name}"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert rows["pretrain"][1:4] == ["96", "0", "96"] and rows["finetune"][1:4] == ["1320", "0", "1320"]
    assert rows["scratch"][1] == "60" and "on 2 GPU(s)" in out
    assert "warning: the data of emnist_balanced, emnist_letters, fashion_mnist, kmnist, mnist, qmnist, svhn, usps is missing" in out
    assert "train-images-idx3-ubyte" in out and "resnet_mini 500 (measured earlier)" in out
    assert plan.duration(3 * 3600) == "3.0 h" and plan.duration(600) == "10 min"


def test_throughput_is_measured_once_and_kept(tmp_path: Path) -> None:
    from xfer import plan

    cache = tmp_path / "calibration.json"
    rate, how = plan.throughput("lenet5", (1, 28, 28), 10, 16, cache=cache)
    assert rate > 0 and how == "measured now"
    again, how_again = plan.throughput("lenet5", (1, 28, 28), 10, 16, cache=cache)
    assert again == rate and how_again.startswith("measured 20")


def test_the_claims_preset_answers_every_claim_from_embedded_data() -> None:
    grid = grids.from_preset("claims")
    grids.validate(grid)   # no data needed: every source and the target are embedded or rendered
    # Its rehearsal keeps the steps axis its `only` patterns name (a step an epoch, whatever the budget).
    rehearsal = grids.fast_dev_run(grid)
    grids.validate(rehearsal)
    assert len(grids.cells(rehearsal).finetune) == len(grids.cells(grid).finetune)
    assert {grid.target, *grid.sources} <= {n for n in data.list_datasets() if data._entry(n).embedded}
    cells = grids.cells(grid, {"mnist5k": 4000, "glyph_digits": 6000, "glyph_letters": 15600})
    fine, scratch = [c.train for c in cells.finetune], [c.train for c in cells.scratch]
    assert len(grid.seeds) >= 3 and {("resnet_mini", "adamw"), ("lenet5_maxpool", "adamw")} <= {
        (t.arch, t.optimizer) for t in scratch}                                           # claim 7: seed 003's LeNet
    assert {t.freeze_depth for t in fine} == {0, 20, 23}                                  # claim 2 (20 vs 23 beneath)
    sgd = {(t.freeze_depth, t.head_lr_mult, t.lr) for t in fine if t.optimizer == "sgd"}
    assert sgd == {(d, m, lr) for d in (0, 20) for m, lr in ((1.0, 0.03), (10.0, 0.03), (1.0, 0.3))}   # claim 5
    assert {t.unfreeze_body for t in fine if t.unfreeze_epoch} == {True, False}           # claim 6: same schedule
    assert len({t.size for t in fine}) >= 3 and {t.size for t in scratch} == {t.size for t in fine}   # claim 1
    # A fixed step budget: every cell takes 200 optimiser steps whatever its size; claim 7's headline pair alone,
    # scratch on the whole pool, also at seed 003's 10 passes over it (1,152 steps).
    assert grid.steps == (200, 1150)
    seed_budget = [t for t in scratch if t.epoch_steps * t.epochs > 1000]
    assert {(t.arch, t.size, t.seed) for t in seed_budget} == {(a, None, s) for a in ("resnet_mini", "lenet5_maxpool")
                                                              for s in grid.seeds}
    assert {t.epochs * t.epoch_steps for t in fine + scratch if t not in seed_budget} == {200}
    assert grid.attack_surrogates == ("pretrain",) and len(grid.sources) >= 2            # claim 3: A, A' and B
    adder_cells = grids.adder_cells(grid)                                                # claim 4
    assert {c.variant for c in adder_cells} == {"transfer", "transfer_features", "scratch"}
    assert {c.seed for c in adder_cells} == set(grid.seeds) and all(c.dataset == "mnist5k" for c in adder_cells)
    steps = {c.size // c.batch_size * c.epochs for c in adder_cells}
    assert steps == {2500}   # the seed's step budget


def test_only_keeps_the_named_cells_and_leaves_pretraining_and_keys_alone() -> None:
    pools = {"glyph_letters": 15600, "uci_digits": 1797, "mnist5k": 4000}
    full = grids.from_preset("smoke", sizes=(100, 500), freeze={"resnet_mini": (0, 20, 23)})
    only = dataclasses.replace(full, only=grids.make(only=[
        {"stage": "finetune", "source": "uci_digits", "size": 500, "freeze": [20, 23]},
        {"stage": "scratch", "size": 100}]).only)
    grids.validate(only)
    every, kept = grids.cells(full, pools), grids.cells(only, pools)
    assert [(c.source, c.train.size, c.train.freeze_depth) for c in kept.finetune] == [("uci_digits", 500, 20),
                                                                                      ("uci_digits", 500, 23)]
    assert [c.train.size for c in kept.scratch] == [100]
    assert kept.pretrain == every.pretrain    # every source is still pretrained (and attacked)
    assert set(kept.finetune) < set(every.finetune) and set(kept.scratch) < set(every.scratch)   # the same specs: keys


@pytest.mark.parametrize("only, message", [
    ([{"stage": "pretrain"}], "stage pretrain is not fine-tune or scratch"),
    ([{"source": "fmnist"}], "source fmnist is not a source xfer knows"),
    ([{"arch": "alexnet"}], "arch alexnet is not an arch xfer knows"),
    ([{"recipe": "sgd10"}], "unknown recipe 'sgd10'"),
    ([{"source": "uci_digits", "size": 1000}], r"the patterns \{source: uci_digits, size: 1000\} keep no fine-tune"),
    ([{"colour": "red"}], "colour cannot select cells"),
    ([{"size": "big"}], "size: 'big' is not a whole number"),
    (["finetune"], "'finetune' is not a mapping of cell settings"),
])
def test_bad_only_patterns_are_refused_naming_the_pattern(only: list, message: str) -> None:
    with pytest.raises(XferError, match=message):
        grids.validate(grids.from_preset("smoke", only=only))


def test_a_preset_narrowed_on_the_command_line_keeps_what_its_patterns_still_match(full_grid) -> None:
    # The replicate preset names alexnet_mini cells too; --archs resnet_mini leaves those patterns matching nothing.
    grid = full_grid.grid_from_args(full_grid.parser().parse_args(["--preset", "replicate", "--archs", "resnet_mini"]))
    grids.validate(grid)
    kept = grids.cells(grid)
    assert {c.train.arch for c in kept.finetune + kept.scratch} == {"resnet_mini"} and len(kept.finetune) == 4 * 3


def test_the_replicate_preset_is_seed_000s_cells_and_seed_002s_adder() -> None:
    from reports.replication import SEED_ROWS

    grid = grids.from_preset("replicate")
    grids.validate(grid)
    cells = grids.cells(grid, {"mnist": 60000, "fashion_mnist": 60000})
    ran = {(c.stage, c.source, c.train.arch, c.train.size or 0, c.train.freeze_depth) for c in cells.finetune + cells.scratch}
    ran |= {("pretrain", "", c.train.arch, c.train.dataset, 0) for c in cells.pretrain}
    # Every seed-000 row of MNIST and Fashion-MNIST is a cell of the preset, and the preset runs nothing else.
    rows = [r for r in SEED_ROWS if r.seed == "000" and {r.dataset, r.source} <= {"mnist", "fashion_mnist", ""}]
    wanted = {("pretrain", "", r.arch, r.dataset, 0) if r.stage == "pretrain"
              else (r.stage, r.source, r.arch, r.size, r.freeze) for r in rows}
    assert len(rows) == 14 and wanted == ran
    assert len(cells.pretrain) == 12 and all(c.train.size is None for c in cells.pretrain)   # whole training sets
    assert grid.attacks == ("fgsm", "pgd") and grid.eps == (0.3,) and grid.attack_n == 5000
    adder = grids.adder_cells(grid)
    assert {c.variant for c in adder} == {"transfer", "scratch"} and {c.batch_size for c in adder} == {200}
    classifiers = {c.pretrain for c in adder if c.pretrain is not None}
    assert classifiers <= set(cells.pretrain) and {p.train.dataset for p in classifiers} == {"mnist"}  # trained once


def test_adder_and_attack_surrogate_settings_are_checked_before_launch() -> None:
    with pytest.raises(XferError, match="adder settings colour are unknown"):
        grids.validate(grids.from_preset("smoke", adder={"colour": "blue"}))
    with pytest.raises(XferError, match="adder variants nope"):
        grids.validate(grids.from_preset("smoke", adder={"variants": ["nope"]}))
    with pytest.raises(XferError, match="--attack-surrogates / attack_surrogates: everyone are not surrogates"):
        grids.validate(grids.from_preset("smoke", attack_surrogates=["pretrain", "everyone"]))
    with pytest.raises(XferError, match="is not a mapping of adder settings"):
        grids.make(adder=[5000])


def test_the_grid_timing_line_reads_orchestration_per_cell_over_the_trial_slots() -> None:
    from xfer.stages import StageSummary

    serial = pipeline.GridOutcome([StageSummary("finetune", 4, ran=4, work_seconds=30.0, slots=1)], None, seconds=40.0)
    assert serial.orchestration_per_cell() == pytest.approx(2.5)   # (40 s × 1 slot − 30 s) / 4 cells
    assert "2.50 s per cell over 4 cells (25% of the slots' time" in serial.timing()
    # Two slots side by side: 40 s of wall time is 80 s of slot time, 60 s of it the cells' own.
    side_by_side = pipeline.GridOutcome([StageSummary("finetune", 3, ran=3, work_seconds=60.0, slots=2),
                                         StageSummary("attack", 2, ran=1, failed=[("x", "y")], slots=2)], None, seconds=40.0)
    assert side_by_side.cells_run == 5 and side_by_side.orchestration_per_cell() == pytest.approx(4.0)
    assert "on 2 trial slot(s)" in side_by_side.timing() and "4.00 s per cell over 5 cells (25%" in side_by_side.timing()
    assert pipeline.GridOutcome([], None).timing() == ""
    nothing = pipeline.GridOutcome([StageSummary("finetune", 4, cached=4)], None, seconds=0.4)
    assert nothing.timing() == "grid: nothing to run, every cell is in MLflow (0.4 s wall time)"


# ---- the plan: what --stages leaves out, and the attack stage's count before anything is trained ----------------

SMOKE_POOLS = {"glyph_letters": 15600, "uci_digits": 1437, "mnist5k": 4000}
LETTERS, DIGITS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), tuple("0123456789")


def _infos(class_names: bool = True) -> dict[str, data.Info]:
    """The smoke grid's datasets as `data.info` describes them (class names, or none: a datasets.json of before)."""
    classes = {"glyph_letters": LETTERS, "uci_digits": DIGITS, "mnist5k": DIGITS}
    return {name: data.Info(name, pool, 1000, (1, 28, 28), len(classes[name]), "cache",
                            classes[name] if class_names else ())
            for name, pool in SMOKE_POOLS.items()}


def _trained(cells: grids.Cells, infos: dict[str, data.Info]) -> dict:
    """The grid's training cells as the attack stage finds them in MLflow (`attack_sets.training_runs`): finished runs
    with a checkpoint, their stage, key, target tag and their model's label set and input shape."""
    from datetime import datetime, timezone

    from xfer import attack_sets, tracking

    runs = {}
    for stage, group in pipeline.training_stages(cells):
        for cell in group:
            key = specs.key(cell)
            record = tracking.RunRecord(f"run-{key}", "x", stage, key, "FINISHED",
                                        {names.TAG_TARGET: cell.train.dataset, names.TAG_CHECKPOINT_SHA: "0"}, {}, {},
                                        datetime.now(timezone.utc), None)
            runs[record.run_id] = attack_sets._Model(record, infos[cell.train.dataset].class_names, (1, 28, 28))
    return runs


@pytest.mark.parametrize("attacks, eps, expected", [
    (("fgsm", "pgd"), (0.3,), 13),          # the smoke grid: glyph_letters' FGSM and PGD are one feature_pgd set
    # Letters: FGSM and PGD at each eps are one feature_pgd set, and CW (L2) needs a head over the digits: none. The
    # others (uci_digits, scratch and each of 4 fine-tunes on itself) make all 6 settings.
    (("fgsm", "pgd", "cw"), (0.1, 0.3), 2 + 6 * (1 + 1 + 4)),
])
def test_the_plan_counts_the_attack_sets_the_run_makes(attacks: tuple, eps: tuple, expected: int) -> None:
    from xfer import attack_sets, plan

    grid = grids.from_preset("smoke", attacks=attacks, eps=eps)
    cells = grids.cells(grid, SMOKE_POOLS)
    made, exact = plan.attack_sets(grid, cells, _infos())
    # What the attack stage will plan (attack_sets.plan, the label-set rule) from the runs training will leave in MLflow.
    ran = attack_sets.plan("x", list(cells.attacks), surrogate_stages=grid.attack_surrogates, runs=_trained(cells, _infos()))
    assert exact and sum(sets for _, sets in made) == len(ran) == expected
    # Before the class names were kept (a datasets.json of before): every setting counts, and the plan says "at most".
    made, exact = plan.attack_sets(grid, cells, _infos(class_names=False))
    assert not exact and sum(sets for _, sets in made) == len(cells.attacks) * 7 > expected


def test_the_attack_row_is_an_upper_bound_only_where_class_names_are_unknown(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from xfer import calibration, plan

    monkeypatch.setenv("XFER_RUNS", str(tmp_path))   # a calibration of its own, so nothing is measured here
    for key in ("throughput/cpu/resnet_mini/1x28x28/batch32/threads1", "score/cpu/resnet_mini/1x28x28/targets4/threads1"):
        calibration.remember(tmp_path / "calibration.json", key, {"samples_per_s": 800.0, "examples_per_s": 5000.0,
                                                                  "measured": "earlier"})
    grid = grids.from_preset("smoke")
    cells = grids.cells(grid, SMOKE_POOLS)

    def rows(infos: dict[str, data.Info]) -> dict[str, list[str]]:
        made = plan.plan(grid, cells, infos, lambda stage: set(), {}, lambda on_gpu: 8, slots=2)
        return {line.split()[0]: line.split()[1:4] for line in made.lines()[1:] if line.split()[0] in ("attack", "total")}

    # total: 2 pretrain, 2 estimate, 4 finetune, 1 scratch, the attack cells and the report
    assert rows(_infos()) == {"attack": ["13", "0", "13"], "total": ["23", "23", "8"]}
    assert rows(_infos(class_names=False)) == {"attack": ["≤14", "0", "≤14"], "total": ["≤24", "≤24", "8"]}


def test_dataset_class_names_are_kept_in_datasets_json_and_an_older_file_still_reads(tmp_path: Path) -> None:
    cache = tmp_path / "datasets.json"
    loaded = data.info("uci_digits", tmp_path, cache)
    assert loaded.source == "loaded" and loaded.class_names == DIGITS
    assert data.info("uci_digits", tmp_path, cache) == dataclasses.replace(loaded, source="cache")
    written = json.loads(cache.read_text())
    for entry in written.values():   # as the file was before class names were kept
        del entry["info"]["class_names"]
    cache.write_text(json.dumps(written))
    older = data.info("uci_digits", tmp_path, cache)
    assert (older.source, older.train, older.class_names) == ("cache", loaded.train, ())   # not known: not loaded again


def test_the_plan_with_stages_shows_the_others_skipped_and_leaves_them_out_of_the_total(
        full_grid, mlflow_server, tmp_path: Path, capsys) -> None:
    from xfer import calibration

    for key in ("throughput/cpu/resnet_mini/1x28x28/batch32/threads1", "score/cpu/resnet_mini/1x28x28/targets4/threads1"):
        if key not in calibration.read(calibration.path()):   # measured once by whichever test plans the smoke grid
            calibration.remember(calibration.path(), key, {"samples_per_s": 800.0, "examples_per_s": 5000.0,
                                                           "measured": "earlier"})
    name = f"stages-{tmp_path.name}"
    some = ["--stages", "pretrain", "finetune", "scratch", "report"]
    assert full_grid.main(["--preset", "smoke", "--name", name, *some, "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert rows["attack"][:4] == ["attack", "13", "0", "skipped"] and rows["estimate"][:4] == ["estimate", "2", "0", "skipped"]
    assert out.count("(not in --stages)") == 2
    assert rows["total"][1:4] == ["8", "8", "5"]   # 2 + 4 + 1 training cells and the report; not the 13 sets
    # The same plan as objects: the total and the estimate are the stages' that run, and nothing of attack's is counted.
    grid = full_grid.grid_from_args(full_grid.parser().parse_args(["--preset", "smoke", "--name", name]))
    options = RunOptions(experiment=name)
    prepared = pipeline.prepare(grid, options, allow_missing=True)
    everything = pipeline.planned(prepared, grid, options)
    chosen = pipeline.planned(prepared, grid, options, only=("pretrain", "finetune", "scratch", "report"))
    skipped = {s.stage: s for s in chosen.stages if s.skipped}
    assert set(skipped) == {names.ESTIMATE, names.ATTACK} and skipped[names.ATTACK].seconds_here == 0
    seconds = {s.stage: s.seconds_here for s in everything.stages}
    assert sum(s.seconds_here for s in chosen.stages) == pytest.approx(
        sum(seconds.values()) - seconds[names.ATTACK] - seconds[names.ESTIMATE])
    [total] = [line for line in everything.lines() if line.startswith("  total")]
    assert total.split()[1:3] == ["23", "23"]


def test_the_live_headline_keeps_its_columns_as_the_done_count_grows() -> None:
    from xfer import progress

    view = progress.GridView(live=False)
    stage = progress.StageProgress(names.ATTACK, 13, view)
    widths = []
    for done in (9, 10):
        stage.done = done
        line = stage.headline()
        widths.append(line.index("cells done"))
        assert f"{done:>2}/13 cells done" in line
    assert widths[0] == widths[1]   # "attack     9/13" and "attack    10/13": what follows stays put


def test_where_output_is_not_a_terminal_a_running_cell_prints_its_epochs_and_the_eta_counts_them(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from xfer import progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    view = progress.GridView(Console(file=out, width=200), live=False)
    stage = view.stage(names.PRETRAIN, 2)
    stage.started = clock[0]
    stage.started_pack("t1", "fashionmnist resnet_mini")
    cell = "fashionmnist resnet_mini n=60000"
    log = tmp_path / "grid.log"
    with progress.quiet_logs(log):
        for minute, epoch in enumerate((1, 2, 3), start=1):
            clock[0] = 1000.0 + 60 * minute
            stage.result("t1", {"cell": cell, "epoch": epoch, "epochs": 6, names.VAL_ERROR: 0.5 / epoch})
        clock[0] += 10   # a report 10 s later, same epoch: no new line; a new epoch 10 s later: held back (30 s)
        stage.result("t1", {"cell": cell, "epoch": 3, "epochs": 6, names.VAL_ERROR: 0.5 / 3})
        stage.result("t1", {"cell": cell, "epoch": 4, "epochs": 6, names.VAL_ERROR: 0.1})
        clock[0] += 60   # within the next (long) epoch: how far it is, with its train window's error
        stage.result("t1", {"cell": cell, "epoch": 4.25, "epochs": 6, names.TRAIN_ERROR: 0.08})
    lines = [line for line in out.getvalue().splitlines() if "epoch" in line]
    assert lines == [*(f"pretrain: {cell} epoch {e}/6, val_error {0.5 / e:.4f}" for e in (1, 2, 3)),
                     f"pretrain: {cell} epoch 4.25/6, train_error 0.0800"]
    assert all(line in log.read_text() for line in lines)   # and in the log file, with their times
    # No cell has finished, yet the ETA is known: 4.25 of 6 epochs of one of 2 cells in 250 s.
    assert stage.partly_done() == pytest.approx(4.25 / 6)
    assert stage.eta() == f"{round((2 - 4.25 / 6) / (4.25 / 6) * 250) // 60} min {round((2 - 4.25 / 6) / (4.25 / 6) * 250) % 60:02d} s"
