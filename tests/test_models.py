"""The architecture registry: the seed's tensor listings, freezing by tensor count, heads, checkpoints."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import xfer.adder  # registers the adder's archs: the registry is the same whichever tests ran first
from xfer import checkpoint, models
from xfer.errors import XferError

# The seed's printed parameter listings (shape per tensor, registration order), head included.
SEED_ALEXNET = [
    (32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 64, 3, 3), (128,), (256, 128, 3, 3), (256,),
    (256, 256, 3, 3), (256,), (1024, 2304), (1024,), (512, 1024), (512,), (10, 512), (10,),
]


def _resnet_block(cin: int, cout: int) -> list[tuple[int, ...]]:
    return [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,), (cout, cin, 1, 1), (cout,), (cout,)]


SEED_RESNET = [(16, 1, 3, 3), (16,), (16,), *_resnet_block(16, 16), *_resnet_block(16, 32), *_resnet_block(32, 64), (10, 64), (10,)]


def _mixer_block() -> list[tuple[int, ...]]:
    return [(128,), (128,), (196, 49, 1), (196,), (49, 196, 1), (49,), (128,), (128,), (64, 128), (64,), (128, 64), (128,)]


def _mixer(depth: int) -> list[tuple[int, ...]]:
    return [(128, 1, 4, 4), (128,), *(_mixer_block() * depth), (128,), (128,), (10, 128), (10,)]


def _shapes(model: models.XferModel) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in model.parameters()]


@pytest.mark.parametrize("name, expected", [
    ("alexnet_mini", SEED_ALEXNET), ("resnet_mini", SEED_RESNET), ("mlp_mixer", _mixer(1)), ("mlp_mixer2", _mixer(2)),
])
def test_parameter_listing_matches_seed(name: str, expected: list[tuple[int, ...]]) -> None:
    assert _shapes(models.build(name, (1, 28, 28), 10)) == expected
    assert len(expected) == {"alexnet_mini": 16, "resnet_mini": 32, "mlp_mixer": 18, "mlp_mixer2": 30}[name]


def test_lenet5_maxpool_is_seed_003s_lenet() -> None:
    # Seed 003's nn.Sequential: conv 1→6 5×5 pad 2, sigmoid, max-pool 2; conv 6→16 5×5, sigmoid, max-pool 2;
    # 400→120→84→10 with sigmoids. xfer's lenet5 has the same tensors but average-pools on 28×28.
    model = models.build("lenet5_maxpool", (1, 28, 28), 10)
    assert _shapes(model) == [(6, 1, 5, 5), (6,), (16, 6, 5, 5), (16,), (120, 400), (120,), (84, 120), (84,),
                              (10, 84), (10,)]
    kinds = [type(m).__name__ for m in model.body]
    assert kinds.count("MaxPool2d") == 2 and kinds.count("Sigmoid") == 4 and "AvgPool2d" not in kinds
    assert "AvgPool2d" in [type(m).__name__ for m in models.build("lenet5", (1, 28, 28), 10).body]


PAIR_ARCHS = set(xfer.adder.ARCHS.values())  # take two digits as a 2-channel image


@pytest.mark.parametrize("name, in_shape", [
    (name, shape) for name in models.list_archs()
    for shape in ([(2, 28, 28)] if name in PAIR_ARCHS else [(1, 28, 28), (3, 32, 32), (1, 32, 32)])
])
def test_every_arch_forwards_and_backprops(name: str, in_shape: tuple[int, int, int]) -> None:
    model = models.build(name, in_shape, 7)
    x = torch.rand(3, *in_shape, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 7)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_seed_freeze_settings() -> None:
    alex = models.build("alexnet_mini", (1, 28, 28), 10)
    models.freeze(alex, 8)  # the seed's "freeze 8": conv1–conv4
    frozen = [n for n, p in alex.named_parameters() if not p.requires_grad]
    assert frozen == [f"body.0.{i}.{w}" for i in (0, 3, 6, 8) for w in ("weight", "bias")]
    resnet = models.build("resnet_mini", (1, 28, 28), 10)
    for depth in (20, 23):
        models.unfreeze(resnet)
        models.freeze(resnet, depth)
        assert sum(not p.requires_grad for p in resnet.parameters()) == depth
        assert all(p.requires_grad for p in resnet.head.parameters())


def test_freeze_beyond_body_is_refused_with_the_limit() -> None:
    model = models.build("alexnet_mini", (1, 28, 28), 10)
    with pytest.raises(XferError, match=r"0\.\.14"):
        models.freeze(model, 15)


def test_unknown_arch_lists_known() -> None:
    with pytest.raises(XferError, match="resnet_mini"):
        models.build("vgg99", (1, 28, 28), 10)


def test_every_arch_builds_in_a_process_that_imported_only_the_registry() -> None:
    # A Ray worker that pretrains the adder's digit_cnn classifier, or rebuilds a recorded adder model, has
    # imported xfer.models and nothing else of xfer: every listed arch must build there.
    script = (
        "from xfer import models\n"
        "for name in models.list_archs():\n"
        "    shape = (1, 32, 32) if name == 'resnet18' else (2, 28, 28) if name.startswith('adder_') else (1, 28, 28)\n"
        "    models.build(name, shape, 10)\n"
        "print(' '.join(models.list_archs()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {"digit_cnn", "adder_transfer", "adder_features", "adder_scratch", "resnet_mini"} <= set(done.stdout.split())


def test_normalisation_is_inside_the_model() -> None:
    a = models.build("lenet5", (1, 28, 28), 10)
    b = models.build("lenet5", (1, 28, 28), 10, mean=(0.5,), std=(0.25,))
    b.load_state_dict({**a.state_dict(), "mean": b.mean, "std": b.std})
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(b(x), a((x - 0.5) / 0.25))


def test_replace_head_keeps_body_and_changes_classes() -> None:
    model = models.build("resnet_mini", (1, 28, 28), 26)
    body_before = {k: v.clone() for k, v in model.body.state_dict().items()}
    models.replace_head(model, 10)
    assert model.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 10) and model.num_classes == 10
    assert all(torch.equal(v, model.body.state_dict()[k]) for k, v in body_before.items())


def test_checkpoint_round_trip_and_refusals(tmp_path) -> None:
    model = models.build("mlp_mixer2", (1, 28, 28), 10, mean=(0.13,), std=(0.3,))
    checkpoint.save(tmp_path / "ck", model, {"class_names": [str(i) for i in range(10)]})
    loaded, meta = checkpoint.load(tmp_path / "ck", expect_arch="mlp_mixer2", expect_num_classes=10)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    assert meta["arch_kwargs"] == {} and meta["class_names"][3] == "3"
    with pytest.raises(XferError, match="arch mlp_mixer2 \\(expected resnet_mini\\)"):
        checkpoint.load(tmp_path / "ck", expect_arch="resnet_mini")
    with pytest.raises(XferError, match="does not fit"):
        checkpoint.load(tmp_path / "ck", expect_in_shape=(3, 32, 32))


def test_resnet18_local_weights_file(tmp_path) -> None:
    import torchvision

    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = models.build("resnet18", (3, 32, 32), 10, weights=tmp_path / "resnet18.pth")
    torch.testing.assert_close(model.body[3][0].conv1.weight, reference.layer1[0].conv1.weight)
    assert "weights" not in model.arch_kwargs  # a checkpoint rebuilds without needing the file
    with pytest.raises(XferError, match="does not exist"):
        models.build("resnet18", (3, 32, 32), 10, weights=tmp_path / "missing.pth")
