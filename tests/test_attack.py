"""Attacks: the registry, the pure generate/evaluate core, and the attack stage read back from a real MLflow server.

Every trained model comes from one small grid trained through the real training cells into MLflow (the
`lineage` fixture, under 20 s of CPU): the pure-core tests use its scratch and fine-tuned models too, so the
module trains five tiny mixers once instead of once per concern.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

from tracking_fixtures import Server
from xfer import attack, data, names, specs, stages, tracking
from xfer.errors import XferError
from xfer.models import XferModel, build
from xfer.specs import AttackSpec, FinetuneSpec, PretrainSpec, TrainSpec

TASK = "uci_digits"   # the attacked task: scikit-learn's 8×8 digits framed as 28×28, 360 test images
N = 100               # attacked examples per setting: 10 per digit
EPS = 0.3             # the classic MNIST L∞ budget
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: an evaluation run's generation run


def _train(dataset: str, size: int, seed: int = 0, epochs: int = 3) -> TrainSpec:
    return TrainSpec(arch="mlp_mixer", dataset=dataset, size=size, val_size=50, epochs=epochs, batch_size=32, lr=3e-3, seed=seed)


# ---- the models: a tiny grid trained through the real training cells into MLflow ------------------

@dataclass(frozen=True)
class Lineage:
    experiment: str
    runs: dict[str, tracking.RunRecord]   # digits_pre, digits_pre2, letters_pre, child, scratch

    def id(self, name: str) -> str:
        return self.runs[name].run_id


@pytest.fixture(scope="module")
def lineage(mlflow_server: Server) -> Lineage:  # noqa: F811
    """Two digit-pretrained mixers (seeds 0, 1), a letter-pretrained one, digits_pre's fine-tuned child, a scratch."""
    experiment = f"attack-stage-{uuid.uuid4().hex[:8]}"
    digits_pre = PretrainSpec(_train("glyph_digits", 500, epochs=2))    # same label set as the task
    digits_pre2 = PretrainSpec(_train("glyph_digits", 500, seed=1, epochs=2))
    letters_pre = PretrainSpec(_train("glyph_letters", 260, epochs=1))  # 26 letters: another label set
    child = FinetuneSpec(_train(TASK, 1000), pretrain=digits_pre)
    scratch = FinetuneSpec(_train(TASK, 1000))
    runs = {}
    for name, spec in (("digits_pre", digits_pre), ("digits_pre2", digits_pre2), ("letters_pre", letters_pre),
                       ("child", child), ("scratch", scratch)):
        assert stages.train_cell(spec, experiment, data.load(spec.train.dataset), device="cpu").ok
        runs[name] = tracking.find_finished(experiment, specs.key(spec))
    return Lineage(experiment, runs)


@pytest.fixture(scope="module")
def mixer(lineage: Lineage) -> XferModel:
    """The scratch digit classifier (about 90% on the task's test images), read back from MLflow."""
    return tracking.load_model(lineage.id("scratch"))[0]


@pytest.fixture(scope="module")
def child(lineage: Lineage) -> XferModel:
    return tracking.load_model(lineage.id("child"))[0]


@pytest.fixture(scope="module")
def sample() -> tuple[torch.Tensor, torch.Tensor]:
    test = data.load(TASK).test
    index = data.stratified_indices(test.labels, N, seed=0)
    return test.images[index], test.labels[index]


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (attack.predict(model, images, "cpu") == labels).float().mean().item()


# ---- the registry and the refusals ----------------------------------------------------------------

def test_registry_holds_the_issue_attacks_and_names_them_when_asked_for_another() -> None:
    assert {"fgsm", "bim", "pgd", "mifgsm", "difgsm", "cw", "feature_pgd"} <= set(attack.list_attacks())
    with pytest.raises(XferError, match=r"unknown attack 'deepfool'; known attacks are bim, cw, difgsm, .*pgd"):
        attack.generate(build("mlp_mixer", (1, 28, 28), 10), torch.zeros(2, 1, 28, 28), torch.zeros(2), AttackSpec(attack="deepfool"), "cpu")


@pytest.mark.parametrize("eps", [1.5, -0.1])
def test_eps_outside_the_pixel_range_is_refused(eps: float) -> None:
    with pytest.raises(XferError, match=r"eps .* outside \[0, 1\]"):
        AttackSpec(attack="pgd", eps=eps)


def test_shape_and_label_set_mismatches_are_refused(sample: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = sample
    digits = build("mlp_mixer", (1, 28, 28), 10)  # refusals come before any work: untrained models will do
    colour = build("resnet_mini", (3, 32, 32), 10)
    with pytest.raises(XferError, match=r"surrogate takes images of shape \(3, 32, 32\) but these are \(1, 28, 28\)"):
        attack.generate(colour, images, labels, AttackSpec(attack="fgsm"), "cpu")
    with pytest.raises(XferError, match=r"target takes images of shape \(3, 32, 32\)"):
        attack.evaluate(colour, images, images.float() / 255, labels)
    letters = build("mlp_mixer", (1, 28, 28), 26)
    with pytest.raises(XferError, match="different numbers of classes"):
        attack.generate([digits, letters], images, labels, AttackSpec(attack="pgd"), "cpu")
    with pytest.raises(XferError, match="feature_pgd"):  # a 3-class head cannot be attacked on labels 0..9
        attack.generate(build("mlp_mixer", (1, 28, 28), 3), images, labels, AttackSpec(attack="pgd"), "cpu")
    with pytest.raises(XferError, match="no targeted mode"):
        attack.generate(letters, images, labels, AttackSpec(attack="feature_pgd", targeted=True), "cpu")
    with pytest.raises(XferError, match=r"uint8 or floats in \[0, 1\]"):
        attack.generate(digits, images.float(), labels, AttackSpec(attack="fgsm"), "cpu")  # 0..255 floats


# ---- the pure core ----------------------------------------------------------------------------------

def test_evaluate_counts_success_only_among_examples_the_target_got_right() -> None:
    class FirstPixel(nn.Module):
        """Predicts the class written (×1/255) in the top-left pixel."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 10).float()

    def images(classes: list[int]) -> torch.Tensor:
        x = torch.zeros(len(classes), 1, 2, 2, dtype=torch.uint8)
        x[:, 0, 0, 0] = torch.tensor(classes, dtype=torch.uint8)
        return x

    labels = torch.tensor([0, 1, 2, 9])
    metrics = attack.evaluate(FirstPixel(), images([0, 1, 2, 3]), images([0, 5, 2, 3]).float() / 255, labels)
    # clean: 3 of 4 right; adversarial: 2 of 4 right; of the 3 right when clean, 1 flipped.
    assert metrics == pytest.approx({names.CLEAN_ACC: 0.75, names.ADV_ACC: 0.5, names.SUCCESS_RATE: 1 / 3})


@pytest.mark.parametrize("name", attack.list_attacks())
def test_every_attack_fools_its_surrogate_within_budget_and_leaves_the_model_as_it_was(
        name: str, sample: tuple[torch.Tensor, torch.Tensor], mixer: XferModel) -> None:
    images, labels = sample[0][:50], sample[1][:50]
    # The model normalises inside (its data's mean and std, not the identity): attacks see and return [0, 1] pixels.
    assert mixer.mean.item() > 0.05 and mixer.std.item() != 1
    mixer.train()  # generation switches to eval mode and back
    spec = AttackSpec(attack=name, eps=EPS, steps=10 if name != "cw" else 30, n=len(labels))
    adv = attack.generate(mixer, images, labels, spec, "cpu")
    assert mixer.training and all(p.requires_grad for p in mixer.parameters())
    assert adv.dtype == torch.float32 and adv.shape == images.shape and 0 <= adv.min() and adv.max() <= 1
    if attack.kind(name).linf:
        assert (adv - images / 255).abs().max() <= EPS + 1e-6
    clean, fooled = _accuracy(mixer, images, labels), _accuracy(mixer, adv, labels)
    assert clean > 0.6 and fooled < clean - 0.3, f"{name}: accuracy {clean:.2f} -> {fooled:.2f}"
    few = replace(spec, n=8)  # seeded: the same spec gives the same examples
    assert torch.equal(*(attack.generate(mixer, images[:8], labels[:8], few, "cpu") for _ in range(2)))


def test_pgd_at_eps_03_drives_whitebox_accuracy_below_10_percent(sample: tuple[torch.Tensor, torch.Tensor], mixer: XferModel) -> None:
    images, labels = sample
    adv = attack.generate(mixer, images, labels, AttackSpec(attack="pgd", eps=EPS, n=N), "cpu")
    metrics = attack.evaluate(mixer, images, adv, labels)
    assert metrics[names.CLEAN_ACC] > 0.6 and metrics[names.ADV_ACC] < 0.10 and metrics[names.SUCCESS_RATE] > 0.9


@pytest.mark.parametrize("name", [n for n in attack.list_attacks() if attack.kind(n).targeted])
def test_targeted_attacks_hit_their_random_wrong_labels_far_more_often_than_chance(
        name: str, sample: tuple[torch.Tensor, torch.Tensor], mixer: XferModel) -> None:
    images, labels = sample[0][:50], sample[1][:50]
    spec = AttackSpec(attack=name, eps=EPS, targeted=True, steps=10 if name != "cw" else 30, n=len(labels), seed=3)
    aims = attack.target_labels(labels, 10, spec.seed)
    assert not (aims == labels).any() and len(aims.unique()) == 10
    adv = attack.generate(mixer, images, labels, spec, "cpu")
    hit = (attack.predict(mixer, adv) == aims).float().mean().item()
    assert hit > 0.3, f"{name}: {hit:.2f}"  # a random wrong label is hit by chance about 1 time in 10


def test_an_ensemble_averages_logits_and_fools_all_of_its_members(
        sample: tuple[torch.Tensor, torch.Tensor], mixer: XferModel, child: XferModel) -> None:
    images, labels = sample
    x = images.float() / 255
    with torch.no_grad():
        assert torch.allclose(attack.Ensemble([mixer, child]).eval()(x), (mixer.eval()(x) + child.eval()(x)) / 2)
    adv = attack.generate([mixer, child], images, labels, AttackSpec(attack="mifgsm", eps=EPS, n=N), "cpu")
    for member in (mixer, child):
        assert _accuracy(member, adv, labels) < 0.15 < _accuracy(member, images, labels) - 0.4


def test_adversarial_sets_round_trip_through_safetensors(sample: tuple[torch.Tensor, torch.Tensor], tmp_path) -> None:
    images, labels = sample
    adv = (images.float() / 255 + 0.1).clamp(0, 1)
    examples = attack.Examples(images, adv, labels, torch.arange(N), labels, ("a", "b"))
    back = attack.load_examples(attack.save_examples(tmp_path / "x.safetensors", examples, AttackSpec()))
    assert torch.equal(back.clean, images) and torch.equal(back.labels, labels) and back.class_names == ("a", "b")
    assert (back.adv - adv).abs().max() < 1e-3  # float16 storage


# ---- the attack stage against a real MLflow server -------------------------------------------------

def _attack_runs(experiment: str) -> tuple[list[tracking.RunRecord], list[tracking.RunRecord]]:
    runs = tracking.query(experiment, names.ATTACK)
    return [r for r in runs if names.TAG_TARGET_RUN not in r.tags], [r for r in runs if names.TAG_TARGET_RUN in r.tags]


def test_attack_stage_generates_once_per_surrogate_and_setting_and_reads_back_from_mlflow(
        lineage: Lineage, monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = lineage.experiment
    settings = [AttackSpec(attack="fgsm", eps=EPS, n=N, dataset=TASK), AttackSpec(attack="pgd", eps=EPS, n=N, dataset=TASK)]
    cells = attack.plan(experiment, settings)
    by = {(c.surrogate_run_ids, c.spec.attack.attack): c for c in cells}
    targets = {lineage.id("child"), lineage.id("scratch")}
    # Digit-pretrained and scratch surrogates: both settings on both targets; the letters model has no digit
    # head, so both settings become one feature_pgd cell; the fine-tuned child is its own white-box reference.
    assert {k: set(c.target_run_ids) for k, c in by.items()} == {
        **{((lineage.id(s),), a): targets for s in ("digits_pre", "digits_pre2", "scratch") for a in ("fgsm", "pgd")},
        ((lineage.id("letters_pre"),), "feature_pgd"): targets,
        ((lineage.id("child"),), "fgsm"): {lineage.id("child")}, ((lineage.id("child"),), "pgd"): {lineage.id("child")},
    }

    generations: list[str] = []
    real_generate = attack.generate

    def counting(surrogate, images, labels, spec, device=None):  # noqa: ANN001
        generations.append(spec.attack)
        return real_generate(surrogate, images, labels, spec, device)

    monkeypatch.setattr(attack, "generate", counting)
    # A trial that scored one target only: the later run reuses its examples and scores just the other.
    partial = by[((lineage.id("scratch"),), "pgd")]
    attack.run_cell(experiment, replace(partial, target_run_ids=(lineage.id("child"),)), device="cpu")
    assert attack.unfinished(experiment, cells) == cells
    results = [attack.run_cell(experiment, c, device="cpu") for c in cells]
    assert attack.unfinished(experiment, cells) == []
    generated, evaluated = _attack_runs(experiment)
    assert len(generations) == len(generated) == len(cells) == 9  # surrogates × settings, not × targets
    assert len(evaluated) == sum(len(c.target_run_ids) for c in cells) == 16
    assert sum(r["targets_scored"] for r in results) == 15 and sum(r["generated"] for r in results) == 8

    assert all(r["generated"] == 0 and r["targets_scored"] == 0 for r in (attack.run_cell(experiment, c) for c in cells))
    assert len(generations) == 9  # the second pass is all cache

    # Every row a report reads: the three scores and both lineage flags on the evaluation run, the
    # surrogate's white-box success on its generation run (the MLflow parent).
    whitebox_of = {r.run_id: r.metrics[names.WHITEBOX_SUCCESS] for r in generated}
    for run in evaluated:
        assert {names.CLEAN_ACC, names.ADV_ACC, names.SUCCESS_RATE} <= set(run.metrics)
        assert run.tags[names.TAG_SAME_SOURCE] in ("true", "false") and run.tags[names.TAG_IS_PARENT] in ("true", "false")
        assert run.tags[names.TAG_EPS] == str(EPS) and 0 <= whitebox_of[run.tags[PARENT_RUN_TAG]] <= 1

    def scored(surrogate: str, target: str, name: str) -> tracking.RunRecord:
        [run] = [r for r in evaluated if r.tags[names.TAG_SURROGATE_RUN] == lineage.id(surrogate)
                 and r.tags[names.TAG_TARGET_RUN] == lineage.id(target) and r.tags[names.TAG_ATTACK] == name]
        return run

    whitebox = scored("scratch", "scratch", "pgd")
    assert whitebox.metrics[names.CLEAN_ACC] > 0.6 and whitebox.metrics[names.ADV_ACC] < 0.10
    transfer = scored("digits_pre", "child", "fgsm")  # FGSM from the pretrained parent onto its fine-tuned child
    assert transfer.metrics[names.ADV_ACC] < transfer.metrics[names.CLEAN_ACC] - 0.1
    assert transfer.tags[names.TAG_IS_PARENT] == "true" and transfer.tags[names.TAG_SAME_SOURCE] == "true"
    sibling = scored("digits_pre2", "child", "fgsm")  # same source, not the parent
    assert sibling.tags[names.TAG_IS_PARENT] == "false" and sibling.tags[names.TAG_SAME_SOURCE] == "true"
    unrelated = scored("scratch", "child", "fgsm")
    assert unrelated.tags[names.TAG_IS_PARENT] == "false" and unrelated.tags[names.TAG_SAME_SOURCE] == "false"
    letters = scored("letters_pre", "child", "feature_pgd")
    assert letters.metrics[names.ADV_ACC] < letters.metrics[names.CLEAN_ACC]
    # Survivors of the attack are among the examples right after it (which may also include a few it fixed).
    assert transfer.metrics[names.ADV_ACC] >= transfer.metrics[names.CLEAN_ACC] * (1 - transfer.metrics[names.SUCCESS_RATE]) - 1e-6

    [pgd_generation] = [r for r in generated if r.key == by[((lineage.id("scratch"),), "pgd")].key]
    assert pgd_generation.metrics[names.WHITEBOX_SUCCESS] > 0.9
    assert pgd_generation.tags[names.TAG_EPS] == str(EPS) and pgd_generation.params["attack.attack"] == "pgd"
    stored = attack.read_examples(pgd_generation.run_id)
    assert stored.adv.shape == (N, 1, 28, 28) and (stored.adv - stored.clean / 255).abs().max() <= EPS + 1e-3
    assert torch.bincount(stored.labels).tolist() == [N // 10] * 10  # stratified over the ten digits


def test_a_pack_runs_each_target_once_per_clean_set_and_scores_it_as_a_fresh_pass_would(
        lineage: Lineage, monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = lineage.experiment
    # Two settings on the seed-0 examples and one on the seed-1 examples: two clean sets.
    settings = [AttackSpec(attack=a, eps=0.15, n=N, dataset=TASK, seed=seed) for a, seed in (("fgsm", 0), ("pgd", 0), ("fgsm", 1))]
    surrogates = {(lineage.id("digits_pre"),), (lineage.id("scratch"),)}
    cells = [c for c in attack.plan(experiment, settings) if c.surrogate_run_ids in surrogates]
    targets = (lineage.id("child"), lineage.id("scratch"))
    assert len(cells) == 6 and all(set(c.target_run_ids) == set(targets) for c in cells)
    clean_passes = []
    real_predict = attack.predict

    def counting(model, images, device=None):  # noqa: ANN001
        if images.dtype == torch.uint8:    # clean images; adversarial ones are floats
            clean_passes.append(images)
        return real_predict(model, images, device)

    monkeypatch.setattr(attack, "predict", counting)
    assert attack.run_pack(experiment, cells, device="cpu") == {}
    # One clean pass per generation (the surrogate's white-box score) and one per (target, clean set),
    # not one per (cell, target): 6 + 2 × 2, where scoring each cell's targets afresh made 6 + 6 × 2.
    assert len(clean_passes) == 6 + 2 * 2
    monkeypatch.setattr(attack, "predict", real_predict)

    keys = {c.key for c in cells}
    generations = {r.run_id: r for r in _attack_runs(experiment)[0] if r.key in keys}
    evaluated = [r for r in _attack_runs(experiment)[1] if r.tags[PARENT_RUN_TAG] in generations]
    assert len(evaluated) == 12
    for run in evaluated:   # each score equals the target scored alone on the stored set
        stored = attack.read_examples(generations[run.tags[PARENT_RUN_TAG]].run_id)
        alone = attack.evaluate(tracking.load_model(run.tags[names.TAG_TARGET_RUN])[0], stored.clean, stored.adv,
                                stored.labels, "cpu")
        assert {k: run.metrics[k] for k in alone} == pytest.approx(alone, nan_ok=True)


def test_attack_stage_refuses_cells_whose_models_do_not_fit_the_task(lineage: Lineage) -> None:
    experiment = lineage.experiment
    pgd = AttackSpec(attack="pgd", eps=EPS, n=N, dataset=TASK, seed=7)
    logits_on_letters = attack.AttackCell(specs.AttackCellSpec(lineage.runs["letters_pre"].key, pgd), (lineage.id("letters_pre"),), (lineage.id("child"),))
    with pytest.raises(XferError, match=f"classifies other classes than {TASK}.*feature_pgd"):
        attack.run_cell(experiment, logits_on_letters, device="cpu")
    letters_target = attack.AttackCell(specs.AttackCellSpec(lineage.runs["scratch"].key, pgd), (lineage.id("scratch"),), (lineage.id("letters_pre"),))
    with pytest.raises(XferError, match=f"target run {lineage.id('letters_pre')} classifies 26 classes"):
        attack.run_cell(experiment, letters_target, device="cpu")
    assert not [r for r in tracking.query(experiment, names.ATTACK, status=None) if r.params.get("attack.seed") == "7"]


def test_plan_with_ensembles_adds_one_cell_whose_surrogate_is_every_pretrained_run_of_a_source(lineage: Lineage) -> None:
    experiment = lineage.experiment
    setting = AttackSpec(attack="mifgsm", eps=EPS, n=N, dataset=TASK, seed=11)
    alone = attack.plan(experiment, [setting])
    with_ensembles = attack.plan(experiment, [setting], ensembles=True)
    # The two digit pretrains make one ensemble; the letters pretrain is alone in its source and makes none.
    [ensemble] = [c for c in with_ensembles if c not in alone]
    assert len(with_ensembles) == len(alone) + 1
    members = (lineage.runs["digits_pre"], lineage.runs["digits_pre2"])
    assert set(ensemble.surrogate_run_ids) == {m.run_id for m in members}
    assert set(ensemble.target_run_ids) == {lineage.id("child"), lineage.id("scratch")}

    result = attack.run_cell(experiment, ensemble, device="cpu")
    assert result["generated"] == 1 and result["targets_scored"] == 2 and result[names.WHITEBOX_SUCCESS] > 0.9
    generated, evaluated = _attack_runs(experiment)
    [generation] = [r for r in generated if r.key == ensemble.key]  # one generation for the whole ensemble
    assert generation.tags[names.TAG_SURROGATE_RUN] == "+".join(ensemble.surrogate_run_ids)
    assert generation.params["surrogate_key"] == "+".join(sorted(m.key for m in members))
    rows = {r.tags[names.TAG_TARGET_RUN]: r for r in evaluated if r.tags[PARENT_RUN_TAG] == generation.run_id}
    assert set(rows) == set(ensemble.target_run_ids)
    child, scratch = rows[lineage.id("child")], rows[lineage.id("scratch")]
    assert child.tags[names.TAG_IS_PARENT] == "true" and child.tags[names.TAG_SAME_SOURCE] == "true"  # a member is its parent
    assert scratch.tags[names.TAG_IS_PARENT] == "false" and scratch.tags[names.TAG_SAME_SOURCE] == "false"
    assert child.metrics[names.ADV_ACC] < child.metrics[names.CLEAN_ACC] - 0.1
    assert attack.read_examples(generation.run_id).adv.shape == (N, 1, 28, 28)


def test_bench_prints_examples_per_second(capsys: pytest.CaptureFixture) -> None:
    rows = attack.bench(n=16, steps=2, devices=["cpu"])
    assert rows[0]["examples"] == 16 and rows[0]["examples_per_s"] > 0
    assert "examples/s" in capsys.readouterr().out
