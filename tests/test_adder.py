"""The two-digit adder: pairs sum their digits' labels, test digits never reach training, the transfer model is
the issue's classifier → 20 → Linear(20, 19) → Linear(19, 19) fine-tuned end to end from the pretrained weights,
bad input is one paragraph, and `sweeps/adder.py --smoke` runs both variants as Ray Tune trials on a real 2-CPU
Ray, records them in a real MLflow, and reports the arms' curves on one figure with paired-t verdicts over seeds."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import torch
from torch import nn

from reports.verdicts import ADDER_CLAIM, INSUFFICIENT, MIN_SEEDS
from xfer import adder, checkpoint, data, models, names, server, specs, tracking
from xfer import train as loop
from xfer.cli import run_main
from xfer.errors import XferError

SWEEP = Path(__file__).resolve().parents[1] / "sweeps" / "adder.py"


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("mnist5k")


def small(variant: str = adder.SCRATCH, seed: int = 3) -> adder.AdderSpec:
    cells = adder.cells([500], [seed], pretrain_epochs=1, epochs=1, val_pairs=300, test_pairs=400, val_digits=200)
    return next(c for c in cells if c.variant == variant)


def by_bytes(split: data.Split) -> dict[bytes, int]:
    """Each image's bytes → its label: identifies a digit without trusting any index the code under test made."""
    return {image.numpy().tobytes(): int(label) for image, label in zip(split.images, split.labels)}


def digits_of(split: data.Split) -> list[bytes]:
    return [split.images[i, c].numpy().tobytes() for i in range(len(split)) for c in (0, 1)]


def test_a_pair_is_two_source_digits_labelled_by_their_sum(digits: data.Dataset) -> None:
    splits = adder.pair_splits(digits, adder.sample_pairs(digits, small()))
    assert splits.in_shape == (2, 28, 28) and splits.num_classes == 19
    for split, source in ((splits.train, digits.train), (splits.val, digits.train), (splits.test, digits.test)):
        label_of = by_bytes(source)
        for image, label in zip(split.images, split.labels):
            first, second = (label_of[image[c].numpy().tobytes()] for c in (0, 1))  # KeyError: not a source digit
            assert int(label) == first + second
    assert set(splits.train.labels.tolist()) == set(range(19))  # 500 pairs reach every sum 0..18


def test_no_test_digit_reaches_training_and_validation_digits_are_held_out(digits: data.Dataset) -> None:
    spec = small(adder.TRANSFER)
    splits = adder.pair_splits(digits, adder.sample_pairs(digits, spec))
    train, val, test = (set(digits_of(s)) for s in (splits.train, splits.val, splits.test))
    test_pool = set(by_bytes(digits.test))
    assert not train & test_pool and not val & test_pool and test <= test_pool
    assert not train & val
    # The held-out digits are what the pretrain cell holds out: the classifier never trained on a validation digit.
    pretrain = spec.pretrain.train
    seen_in_pretraining = data.make_splits(digits, pretrain.size, pretrain.val_size, pretrain.seed)
    assert val <= set(by_bytes(seen_in_pretraining.val)) and not val & set(by_bytes(seen_in_pretraining.train))


def test_pairs_are_seeded_and_test_pairs_shared_by_every_cell(digits: data.Dataset) -> None:
    a, again = adder.sample_pairs(digits, small()), adder.sample_pairs(digits, small())
    other_seed = adder.sample_pairs(digits, small(seed=4))
    assert torch.equal(a.train, again.train) and not torch.equal(a.train, other_seed.train)
    assert torch.equal(a.test, other_seed.test)


@pytest.mark.parametrize("arch", ["adder_transfer", "adder_scratch"])
def test_archs_apply_one_module_to_each_digit(arch: str) -> None:
    torch.manual_seed(0)
    model = models.build(arch, (2, 28, 28), 19).eval()
    x = torch.rand(5, 2, 28, 28)
    assert model(x).shape == (5, 19)
    per_digit = model.body[0]
    with torch.no_grad():
        features = per_digit(x)
        # Channel 0's features first, then channel 1's, each from the same shared module.
        assert torch.allclose(features, torch.cat([per_digit.net(x[:, :1]), per_digit.net(x[:, 1:])], 1), atol=1e-5)
        swapped = per_digit(x.flip(1))
    half = features.shape[1] // 2
    assert torch.allclose(swapped, torch.cat([features[:, half:], features[:, :half]], 1), atol=1e-5)
    with pytest.raises(XferError, match="2-channel"):
        models.build(arch, (1, 28, 28), 19)


def test_transfer_model_starts_from_the_pretrained_classifier_and_survives_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pretrained = models.build("resnet_mini", (1, 28, 28), 10, mean=(0.13,), std=(0.31,)).eval()
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(torch.randn_like(p))  # far from any fresh initialisation
    model = adder.transfer_model(pretrained).eval()
    inner = adder.digit_classifier(model)
    for key, value in pretrained.state_dict().items():
        assert torch.equal(inner.state_dict()[key], value), key
    x = torch.rand(4, 2, 28, 28)
    with torch.no_grad():
        assert torch.equal(inner(x[:, 1:]), pretrained(x[:, 1:]))  # its own normalisation came along
        expected = model(x)
    rebuilt, meta = checkpoint.load(checkpoint.save(tmp_path / "ckpt", model))
    assert meta["arch_kwargs"] == {"digit_arch": "resnet_mini", "digit_kwargs": {}}
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), expected)
    with pytest.raises(XferError, match="10-class"):
        adder.transfer_model(models.build("resnet_mini", (1, 28, 28), 26))


def test_spec_round_trips_flat_keys_and_refuses_a_classifier_that_saw_validation_digits() -> None:
    spec = small(adder.TRANSFER)
    assert spec.variant == adder.TRANSFER and spec.lr == 3e-3 and spec.weight_decay == 2e-3
    # The recipes by default: AdamW, batch 200, 10 epochs; transfer lr 0.003 / wd 0.002, scratch 0.002 / 0.003.
    recipes = {c.variant: c.train_spec() for c in adder.cells([1000], [0])}
    for variant, (lr, weight_decay) in {adder.TRANSFER: (3e-3, 2e-3), adder.SCRATCH: (2e-3, 3e-3)}.items():
        t = recipes[variant]
        assert (t.optimizer, t.lr, t.weight_decay, t.batch_size, t.epochs) == ("adamw", lr, weight_decay, 200, 10)
        assert (t.schedule, t.head_lr_mult, t.freeze_depth, t.label_smoothing) == ("none", 1.0, 0, 0.0)
    back = specs.from_flat(adder.AdderSpec, {k: str(v) for k, v in specs.to_flat(spec).items()})  # as MLflow params
    assert back == spec and specs.key(back) == specs.key(spec)
    assert small().train_spec().arch == "adder_scratch" and small().lr == 2e-3
    with pytest.raises(XferError, match="val_size=200"):
        specs.replace(spec, pretrain=adder.digit_pretrain("mnist5k", "resnet_mini", 3, val_digits=100))




def test_transfer_is_classifier_logits_then_20_to_19_to_19_and_scratch_is_a_cnn_per_digit() -> None:
    transfer = models.build("adder_transfer", (2, 28, 28), 19)
    per_digit, first, *rest = transfer.body
    x = torch.rand(3, 2, 28, 28)
    with torch.no_grad():
        assert per_digit.eval()(x).shape == (3, 20)  # the classifier's 10 logits per image, concatenated
    assert isinstance(per_digit.net, models.XferModel) and per_digit.net.num_classes == 10
    assert isinstance(first, nn.Linear) and (first.in_features, first.out_features) == (20, 19)
    assert (transfer.head.in_features, transfer.head.out_features) == (19, 19)
    outside = [m for m in transfer.modules() if isinstance(m, nn.Linear)][-2:]  # the classifier's own head comes before
    assert outside == [first, transfer.head]
    scratch = models.build("adder_scratch", (2, 28, 28), 19)
    cnn = scratch.body[0].net
    assert any(isinstance(m, nn.Conv2d) for m in cnn.modules()) and scratch.head.out_features == 19
    with torch.no_grad():
        features = cnn(x[:, :1])
        assert scratch.body[0](x).shape == (3, 2 * features.shape[1])  # features of both digits, concatenated


def test_the_features_arm_is_the_pretrained_body_under_the_scratch_head() -> None:
    torch.manual_seed(0)
    pretrained = models.build("resnet_mini", (1, 28, 28), 10, mean=(0.13,), std=(0.31,)).eval()
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(torch.randn_like(p))
    model = adder.transfer_model(pretrained, adder.FEATURES).eval()
    features, hidden, _ = model.body
    x = torch.rand(4, 2, 28, 28)
    with torch.no_grad():
        # Each digit's penultimate features, under the classifier's own normalisation; its logits are not used.
        body = pretrained.body((x[:, 1:] - pretrained.mean) / pretrained.std)
        assert torch.allclose(features(x)[:, body.shape[1]:], body, atol=1e-6)
    assert not any(k.startswith("head") for k in adder.digit_classifier(model).state_dict())
    assert (hidden.in_features, hidden.out_features) == (2 * 64, 128)   # resnet_mini's 64 features per digit
    scratch = models.build("adder_scratch", (2, 28, 28), 19)
    assert (model.head.in_features, model.head.out_features) == (scratch.head.in_features, scratch.head.out_features)
    spec = next(c for c in adder.cells([500], [0]) if c.variant == adder.FEATURES)
    assert spec.arm == "features" and spec.train_spec().arch == "adder_features" and spec.lr == adder.RECIPES[adder.SCRATCH]["lr"]
    # The seed's transfer cell keeps the key it had before the features arm existed.
    assert specs.key(next(c for c in adder.cells([500], [0]) if c.variant == adder.TRANSFER)) == "5a72e10ae2d4e1e0"


def test_transfer_fine_tunes_every_weight_end_to_end(digits: data.Dataset) -> None:
    torch.manual_seed(0)
    pretrained = models.build("lenet5", (1, 28, 28), 10)
    model = adder.transfer_model(pretrained)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    spec = specs.replace(small(adder.TRANSFER), size=400, epochs=1, val_pairs=50, test_pairs=50)
    result = loop.train(spec.train_spec(), adder.pair_splits(digits, adder.sample_pairs(digits, spec)), model,
                        device="cpu")
    assert result.ok and result.metrics["steps"] == 2  # 400 pairs in batches of 200
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged and len(before) == 14  # lenet5: 5 layers × (weight, bias), then Linear(20, 19), head
    assert torch.equal(pretrained.head.weight, before["body.0.net.head.weight"])  # a copy was trained, not the source


def load_sweep():
    module_spec = importlib.util.spec_from_file_location("adder_sweep", SWEEP)
    sweep = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(sweep)
    return sweep


def test_bad_input_is_refused_in_one_paragraph_before_anything_runs(
        digits: data.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    colour = data.Split(torch.zeros(26, 3, 28, 28, dtype=torch.uint8), torch.arange(26))
    letters = data.Dataset("letters", colour, colour, tuple("abcdefghijklmnopqrstuvwxyz"))
    with pytest.raises(XferError, match="10 digit classes.*'letters' has 3 channel.*26 classes"):
        adder.check(adder.cells([100], [0]), letters)
    with pytest.raises(XferError, match="leaves no training digits.*pool of 4000; choose val_digits < 4000"):
        adder.check(adder.cells([100], [0], val_digits=4000), digits)
    with pytest.raises(XferError, match="pretrain size of 3500 digits is more than the 3000"):
        adder.check(adder.cells([100], [0], pretrain_size=3500), digits)
    sweep = load_sweep()
    with pytest.raises(XferError, match="not available offline.*--download.*mnist5k"):
        sweep.main(["--dataset", "mnist", "--data-root", str(tmp_path)])  # torchvision's MNIST files are absent
    with pytest.raises(XferError, match="seed -1 must be >= 0"):
        sweep.main(["--seeds", "-1"])
    # At the command line (the script's own edge, `run_main`): one paragraph on stderr, exit status 2, no traceback.
    monkeypatch.delenv(server.TRACKING_URI_ENV, raising=False)
    monkeypatch.setenv(server.RUNS_ENV, str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: sweep.main(["--sizes", "0"]))
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == "" and err.strip().startswith("xfer: invalid adder spec: size")
    assert "Traceback" not in err and "\n\n" not in err.strip()
    assert not (tmp_path / "mlflow.db").exists()  # refused before an MLflow server was started


def colour_pixels(png: Path, colour: str) -> int:
    """Pixels of the figure's right panel (seconds; no legend there) drawn in `colour` (blended on white)."""
    pixels = matplotlib.image.imread(png)[..., :3]
    right = pixels[:, pixels.shape[1] // 2:]
    r, b = right[..., 0], right[..., 2]
    return int(((b - r > 0.25) if colour == "blue" else (r - b > 0.25)).sum())


@pytest.mark.slow
def test_smoke_sweep_runs_both_variants_as_tune_trials_and_reports_curves_and_a_verdict(
        local_ray, experiment: str, mlflow_server, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    # One seed keeps this under two minutes on 2 busy cores; the interval over >= 3 seeds is checked on planted
    # runs in test_reports (test_verdicts_find_planted_effects_and_only_those).
    seeds = ["0"]
    sweep = load_sweep()
    # digit_cnn, the claims preset's classifier: its pretrain cell is built in a Ray worker that imported the
    # model registry, not the adder module.
    assert sweep.main(["--smoke", "--digit-arch", "digit_cnn", "--experiment", experiment]) == 0
    out = capsys.readouterr().out
    # The cells trained in packs of Ray Tune trials: the three arms are three archs, so three packs.
    [tune_run] = (mlflow_server.root / "ray").glob(f"{experiment}-{names.ADDER}-*")
    assert len(list(tune_run.glob(f"{names.ADDER}_*"))) == 3 * len(seeds)
    pretrain = {r.tags[names.TAG_SEED]: r.run_id for r in tracking.query(experiment, stage=names.PRETRAIN)}
    runs = {(r.tags[names.TAG_VARIANT], r.tags[names.TAG_SEED]): r for r in tracking.query(experiment, stage=names.ADDER)}
    assert set(pretrain) == set(seeds) and set(runs) == {(v, s) for v in adder.VARIANTS for s in seeds}
    assert {r.tags[names.TAG_ARCH] for r in tracking.query(experiment, stage=names.PRETRAIN)} == {"digit_cnn"}
    for (variant, seed), run in runs.items():
        assert run.tags[names.TAG_SIZE] == "200" and run.tags[names.TAG_ARCH] == adder.ARCHS[variant]
        assert run.tags.get(names.TAG_PRETRAIN_RUN) == (pretrain[seed] if variant != adder.SCRATCH else None)
        lr, weight_decay = adder.RECIPES[variant].values()
        assert (float(run.params["lr"]), float(run.params["weight_decay"]), run.params["batch_size"]) == (
            lr, weight_decay, "200")
        curve = pd.DataFrame(tracking.read_curve(run.run_id))
        assert set(curve["split"]) == {"train", "val", "test"}
        test = curve[curve["split"] == "test"]
        assert run.metrics[names.TEST_ERROR] == test["error"].iloc[-1]   # the final figure is the curve's last point
        assert list(test["epoch"]) == [1.0, 2.0] and test["seconds"].is_monotonic_increasing
        assert test["error"].iloc[-1] == run.metrics[names.TEST_ERROR]
    # The report: both variants' curves on one figure, and the verdict from the paired differences per seed.
    [figure] = [Path(line.split(": ", 1)[1]) for line in out.splitlines() if line.startswith("figure: ")]
    assert figure.name == "curves_adder_n200.png" and figure.with_suffix(".svg").is_file()
    assert matplotlib.image.imread(figure).std() > 0.05
    # Transfer (blue) and scratch (orange) are both drawn; the features arm, drawn later, may cover part of them.
    assert colour_pixels(figure, "blue") > 20 and colour_pixels(figure, "orange") > 20
    verdicts = [line for line in out.splitlines() if line.startswith("verdict: ")]
    transfer = (f"verdict: adder: transfer beats scratch (size=200): {INSUFFICIENT} (1 paired, need {MIN_SEEDS}); "
                "no effect estimated.")
    # The features arm is the headline (it differs from scratch only in its start), the seed's transfer arm next;
    # unless the features cell learnt nothing at this smoke size: then it is named as at chance (test accuracy
    # within 5 pp of 1/19), left out of the verdicts, and the transfer arm is the headline.
    features = runs[(adder.FEATURES, "0")].metrics[names.TEST_ACC]
    chance = [line for line in out.splitlines() if line.startswith("at chance, left out of the verdicts: adder")]
    if features <= 1 / adder.SUMS + 0.05:
        assert verdicts == [transfer] and len(chance) == 1 and "variant=transfer_features" in chance[0]
    else:
        assert len(verdicts) == 2 and verdicts[1] == transfer and not chance
        assert "arm=transfer_features" in verdicts[0] and INSUFFICIENT in verdicts[0]
    verdict = verdicts[0]
    table = pd.read_parquet(figure.parents[1] / "data" / "verdicts.parquet")
    saved = table[(table["claim"] == ADDER_CLAIM) & table["headline"]].iloc[0]
    assert saved["line"] == verdict.removeprefix("verdict: ") and saved["n_seeds"] == 1
    adder_table = pd.read_parquet(figure.parents[1] / "data" / "adder.parquet").set_index("variant")
    assert adder_table.loc[adder.TRANSFER, "run_id"] == runs[(adder.TRANSFER, "0")].run_id
    assert adder_table.loc[adder.FEATURES, "run_id"] == runs[(adder.FEATURES, "0")].run_id
    # Both transfer arms are paired with the scratch arm of the same size and seed.
    assert set(adder_table["scratch_run_id"]) == {runs[(adder.SCRATCH, "0")].run_id}
    # Run again: every cell is found finished by key, and nothing trains.
    assert sweep.main(["--smoke", "--digit-arch", "digit_cnn", "--experiment", experiment]) == 0
    again = capsys.readouterr().out
    assert re.search(r"pretrain +1 cells: 0 run, 1 cached", again) and re.search(r"adder +3 cells: 0 run, 3 cached", again)
    assert len(tracking.query(experiment, stage=names.ADDER)) == 3 * len(seeds)
