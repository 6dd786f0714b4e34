"""Attacks: the registry, the pure generate/evaluate core, and the attack stage read back from a real MLflow server.

Every trained model comes from one small grid trained through the real training cells into MLflow (the
`lineage` fixture, under 20 s of CPU): the pure-core tests use its scratch and fine-tuned models too, so the
module trains five tiny mixers once instead of once per concern.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

import pandas as pd
import pytest
import torch
from torch import nn

from tracking_fixtures import Server
from xfer import attack, attack_sets, bench, data, names, scores, specs, tracking, training_cells
from xfer.errors import XferError
from xfer.models import XferModel, build
from xfer.specs import AttackSpec, FinetuneSpec, PretrainSpec, TrainSpec

TASK = "uci_digits"   # the attacked task: scikit-learn's 8×8 digits framed as 28×28, 360 test images
N = 100               # attacked examples per setting: 10 per digit
EPS = 0.3             # the classic MNIST L∞ budget


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
        assert training_cells.train_cell(spec, experiment, data.load(spec.train.dataset), device="cpu").ok
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
    if attack.registered(name).linf:
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


@pytest.mark.parametrize("name", [n for n in attack.list_attacks() if attack.registered(n).targeted])
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


# ---- the attack stage against a real MLflow server: sets as runs, scores as one table ------------------

def _sets(experiment: str) -> list[tracking.RunRecord]:
    return tracking.query(experiment, names.ATTACK)


def _scored_alone(table: pd.DataFrame) -> None:
    """Every row of a score table equals its target scored alone on the stored set (attack.evaluate)."""
    for r in table.itertuples():
        stored = attack.read_examples(r.set_run_id)
        alone = attack.evaluate(tracking.load_model(r.target_run_id)[0], stored.clean, stored.adv, stored.labels, "cpu")
        assert (r.clean_acc, r.adv_acc) == pytest.approx((alone[names.CLEAN_ACC], alone[names.ADV_ACC]))
        assert r.success_rate == pytest.approx(alone[names.SUCCESS_RATE], nan_ok=True) and r.n == len(stored.labels)


def test_attack_stage_makes_each_set_once_and_scores_it_on_every_target_in_one_table(
        lineage: Lineage, monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = lineage.experiment
    settings = [AttackSpec(attack="fgsm", eps=EPS, n=N, dataset=TASK), AttackSpec(attack="pgd", eps=EPS, n=N, dataset=TASK)]
    cells = attack_sets.plan(experiment, settings)
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
    result = scores.local(experiment, cells)
    assert result.failed == {} and result.made == len(cells) == len(generations) == 9   # surrogates × settings
    assert result.pairs == sum(len(c.target_run_ids) for c in cells) == 16
    made = _sets(experiment)
    assert len(made) == 9, "one MLflow run per adversarial set, none per (set, target)"
    table = scores.read(experiment)
    assert len(table) == 16 and list(table.columns) == [c for c, _, _ in scores.COLUMNS]
    _scored_alone(table)

    def scored(surrogate: str, target: str, name: str) -> pd.Series:
        [found] = [r for _, r in table.iterrows() if r.surrogate_run_id == lineage.id(surrogate)
                   and r.target_run_id == lineage.id(target) and r.attack == name]
        return found

    whitebox = scored("scratch", "scratch", "pgd")
    assert whitebox.clean_acc > 0.6 and whitebox.adv_acc < 0.10
    transfer = scored("digits_pre", "child", "fgsm")   # FGSM from the pretrained parent onto its fine-tuned child
    assert transfer.adv_acc < transfer.clean_acc - 0.1 and transfer.is_parent and transfer.same_source
    assert transfer.target_stage == names.FINETUNE and transfer.target_source == "glyph_digits" and transfer.target_size == 1000
    sibling = scored("digits_pre2", "child", "fgsm")   # same source, not the parent
    assert not sibling.is_parent and sibling.same_source
    unrelated = scored("scratch", "child", "fgsm")
    assert not unrelated.is_parent and not unrelated.same_source
    on_scratch = scored("digits_pre", "scratch", "fgsm")   # a scratch target has no source: never "same source"
    assert pd.isna(on_scratch.target_source) and on_scratch.target_stage == names.SCRATCH and not on_scratch.same_source
    letters = scored("letters_pre", "child", "feature_pgd")
    assert letters.adv_acc < letters.clean_acc
    # Survivors of the attack are among the examples right after it (which may also include a few it fixed).
    assert transfer.adv_acc >= transfer.clean_acc * (1 - transfer.success_rate) - 1e-6

    # Each set's run: its examples (sha-verified), white-box success, and the summary of its rows at a glance.
    runs = {r.key: r for r in made}
    parent_set = runs[by[((lineage.id("digits_pre"),), "fgsm")].key]
    assert parent_set.metrics[names.TARGETS_SCORED] == 2 and parent_set.tags[names.TAG_SCORED] == scores.targets_hash(targets)
    assert parent_set.metrics[names.DESCENDANTS_SUCCESS] == pytest.approx(transfer.success_rate)
    assert names.OTHER_SOURCES_SUCCESS not in parent_set.metrics   # the only fine-tuned target is its own descendant
    assert parent_set.tags[names.TAG_SURROGATE_RUN] == lineage.id("digits_pre") and parent_set.params["attack.attack"] == "fgsm"
    pgd_set = runs[by[((lineage.id("scratch"),), "pgd")].key]
    assert pgd_set.metrics[names.WHITEBOX_SUCCESS] > 0.9 and pgd_set.tags[names.TAG_EPS] == str(EPS)
    stored = attack.read_examples(pgd_set.run_id)
    assert stored.adv.shape == (N, 1, 28, 28) and (stored.adv - stored.clean / 255).abs().max() <= EPS + 1e-3
    assert torch.bincount(stored.labels).tolist() == [N // 10] * 10  # stratified over the ten digits

    # The same stage again: every set's tag says it is scored on its targets, so nothing is made, scored or read.
    state = scores.pending(experiment, cells)
    assert state.unfinished == [] and state.table is None
    again = scores.local(experiment, cells)
    assert (again.made, again.pairs, again.failed) == (0, 0, {}) and len(generations) == 9
    assert len(_sets(experiment)) == 9


def test_a_partly_scored_set_resumes_scoring_only_its_missing_targets_and_a_retrained_model_is_attacked_anew(
        mlflow_server: Server) -> None:  # noqa: F811
    experiment = f"attack-resume-{uuid.uuid4().hex[:8]}"
    pre, tune, alone = (PretrainSpec(_train("glyph_digits", 300, epochs=1)), FinetuneSpec(_train(TASK, 300, epochs=1),
                        PretrainSpec(_train("glyph_digits", 300, epochs=1))), FinetuneSpec(_train(TASK, 300, epochs=1)))
    for spec in (pre, tune, alone):
        assert training_cells.train_cell(spec, experiment, data.load(spec.train.dataset), device="cpu").ok
    setting = AttackSpec(attack="fgsm", eps=EPS, n=40, dataset=TASK)
    [cell] = [c for c in attack_sets.plan(experiment, [setting], surrogate_stages=[names.SCRATCH])]
    child = tracking.find_finished(experiment, specs.key(tune)).run_id
    scratch = tracking.find_finished(experiment, specs.key(alone)).run_id
    assert set(cell.target_run_ids) == {child, scratch}

    # A stage that stopped after scoring one target: the set and one row exist, the tag does not say "scored".
    first = scores.local(experiment, [replace(cell, target_run_ids=(child,))])
    assert (first.made, first.pairs) == (1, 1)
    state = scores.pending(experiment, [cell])
    assert state.to_make == [] and state.to_score == {cell.key: [scratch]} and state.table is not None
    before = scores.read(experiment)
    second = scores.local(experiment, [cell])
    assert (second.made, second.pairs, second.failed) == (0, 1, {})
    table = scores.read(experiment)
    assert len(table) == 2 and set(table["target_run_id"]) == {child, scratch}
    assert table.set_index("target_run_id").loc[child, "scored_at"] == before.set_index("target_run_id").loc[child, "scored_at"]
    [made] = _sets(experiment)
    assert made.tags[names.TAG_SCORED] == scores.targets_hash(cell.target_run_ids) and made.metrics[names.TARGETS_SCORED] == 2

    # The scratch model trained again (as --force does): a new run of the same cell. Its set is made again on the
    # new model, and both targets are scored on it; the old set and its rows stay as they were.
    assert training_cells.train_cell(alone, experiment, data.load(TASK), device="cpu").ok
    retrained = tracking.find_finished(experiment, specs.key(alone)).run_id
    [fresh] = attack_sets.plan(experiment, [setting], surrogate_stages=[names.SCRATCH])
    assert fresh.key == cell.key and fresh.surrogate_run_ids == (retrained,) and set(fresh.target_run_ids) == {child, retrained}
    assert [c.key for c in scores.pending(experiment, [fresh]).to_make] == [cell.key]
    third = scores.local(experiment, [fresh])
    assert (third.made, third.pairs) == (1, 2)
    table = scores.read(experiment)
    assert len(table) == 4 and len(_sets(experiment)) == 2
    _scored_alone(table)


def test_scoring_runs_each_target_once_per_clean_sample_and_small_sets_together(
        lineage: Lineage, monkeypatch: pytest.MonkeyPatch) -> None:
    from xfer import stacked

    experiment = lineage.experiment
    # Two settings on the seed-0 examples and one on the seed-1 examples: two clean samples, three sets.
    settings = [AttackSpec(attack=a, eps=0.15, n=N, dataset=TASK, seed=seed) for a, seed in (("fgsm", 0), ("pgd", 0), ("fgsm", 1))]
    cells = [c for c in attack_sets.plan(experiment, settings) if c.surrogate_run_ids == (lineage.id("digits_pre"),)]
    assert len(cells) == 3 and all(set(c.target_run_ids) == {lineage.id("child"), lineage.id("scratch")} for c in cells)
    passes: list[str] = []
    real_predict = stacked.Stack.predict

    def counting(self, images, batch=1000, which=None):  # noqa: ANN001
        kind = "clean" if images.dtype == torch.uint8 else "adv"   # adversarial images are floats
        passes.append(f"{kind} {len(images)} images × {self.targets if which is None else len(which)} targets")
        return real_predict(self, images, batch, which)

    monkeypatch.setattr(stacked.Stack, "predict", counting)
    result = scores.local(experiment, cells)
    assert result.pairs == 6
    # Both targets in one block: one clean pass per clean sample, and the three sets' adversarial images in one pass
    # (scoring each (set, target) afresh made 3 × 2 clean and 3 × 2 adversarial passes).
    assert sorted(passes) == [f"adv {3 * N} images × 2 targets"] + [f"clean {N} images × 2 targets"] * 2


def test_the_attack_stage_refuses_models_that_do_not_fit_the_task(lineage: Lineage) -> None:
    experiment = lineage.experiment
    pgd = AttackSpec(attack="pgd", eps=EPS, n=N, dataset=TASK, seed=7)
    logits_on_letters = attack_sets.AttackCell(specs.AttackCellSpec(lineage.runs["letters_pre"].key, pgd), (lineage.id("letters_pre"),), (lineage.id("child"),))
    with pytest.raises(XferError, match=f"classifies other classes than {TASK}.*feature_pgd"):
        attack_sets.make_set(logits_on_letters, attack_sets.AttackContext(experiment), "cpu")
    assert not [r for r in tracking.query(experiment, names.ATTACK, status=None) if r.params.get("attack.seed") == "7"]
    letters_target = attack_sets.AttackCell(specs.AttackCellSpec(lineage.runs["scratch"].key, pgd), (lineage.id("scratch"),),
                                       (lineage.id("letters_pre"),))
    result = scores.local(experiment, [letters_target])
    assert result.made == 1 and result.pairs == 0
    assert f"target run {lineage.id('letters_pre')} classifies 26 classes" in result.failed[letters_target.key]


def test_plan_with_ensembles_adds_one_set_whose_surrogate_is_every_pretrained_run_of_a_source(lineage: Lineage) -> None:
    experiment = lineage.experiment
    setting = AttackSpec(attack="mifgsm", eps=EPS, n=N, dataset=TASK, seed=11)
    alone = attack_sets.plan(experiment, [setting])
    with_ensembles = attack_sets.plan(experiment, [setting], ensembles=True)
    # The two digit pretrains make one ensemble; the letters pretrain is alone in its source and makes none.
    [ensemble] = [c for c in with_ensembles if c not in alone]
    assert len(with_ensembles) == len(alone) + 1
    members = (lineage.runs["digits_pre"], lineage.runs["digits_pre2"])
    assert set(ensemble.surrogate_run_ids) == {m.run_id for m in members}
    assert set(ensemble.target_run_ids) == {lineage.id("child"), lineage.id("scratch")}

    result = scores.local(experiment, [ensemble])
    assert (result.made, result.pairs, result.failed) == (1, 2, {})
    [made] = [r for r in _sets(experiment) if r.key == ensemble.key]   # one set for the whole ensemble
    assert made.metrics[names.WHITEBOX_SUCCESS] > 0.9
    assert made.tags[names.TAG_SURROGATE_RUN] == "+".join(ensemble.surrogate_run_ids)
    assert made.params["surrogate_key"] == "+".join(sorted(m.key for m in members))
    table = scores.read(experiment)
    rows = table[table["set_run_id"] == made.run_id].set_index("target_run_id")
    child, scratch = rows.loc[lineage.id("child")], rows.loc[lineage.id("scratch")]
    assert child.is_parent and child.same_source   # a member is its parent
    assert not scratch.is_parent and not scratch.same_source
    assert child.adv_acc < child.clean_acc - 0.1
    assert attack.read_examples(made.run_id).adv.shape == (N, 1, 28, 28)


def test_bench_prints_examples_per_second(capsys: pytest.CaptureFixture) -> None:
    rows = bench.attack_rows(n=16, steps=2, devices=["cpu"])
    assert rows[0]["examples"] == 16 and rows[0]["examples_per_s"] > 0
    assert "examples/s" in capsys.readouterr().out


def test_every_registry_attack_makes_the_examples_it_made_before_the_torchattacks_change() -> None:
    """torchattacks 3.5.1 → 3.3.0 (plain pip installs, issue 32): each registry attack, targeted and not, makes the
    examples recorded under 3.5.1 (tests/attack_reference.py), bit for bit on a CPU with one thread. Bits depend on
    torch's kernels too, so the comparison is exact under the torch release that recorded them, close otherwise."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    import attack_reference as reference

    recorded = load_file(reference.RECORDED)
    with safe_open(reference.RECORDED, "pt") as f:
        made_under = f.metadata()
    assert made_under["torchattacks"] == "3.5.1"
    made = reference.examples()
    assert set(made) == set(recorded) == {f"{n}/{'targeted' if t else 'untargeted'}" for n, t in reference.cases()}
    for case, examples in made.items():
        if torch.__version__ == made_under["torch"]:
            assert torch.equal(examples, recorded[case]), case
        else:   # another torch's kernels may round differently, and a rounding can flip a gradient's sign here and
            # there: most pixels still agree exactly
            assert examples.shape == recorded[case].shape and (examples == recorded[case]).float().mean() >= 0.9, case


def test_digits_are_digits_whatever_torchvision_calls_them() -> None:
    """MNIST and QMNIST name their classes "0 - zero"…, USPS, SVHN and EMNIST digits "0"…: the same labels in the same
    order, so a USPS-pretrained surrogate is attacked on its logits against MNIST, as a QMNIST one is; KMNIST,
    Fashion-MNIST and EMNIST's 47 balanced classes are other label sets (feature_pgd)."""
    from xfer import plan

    names_ = {name: published.class_names for name, published in data.PUBLISHED.items()}
    mnist = names_["mnist"]
    assert data.label_set(mnist) == tuple("0123456789")
    for digits in ("qmnist", "usps", "svhn", "emnist_digits"):
        assert data.same_labels(names_[digits], mnist), digits
    for other in ("kmnist", "fashion_mnist", "emnist_balanced", "emnist_letters"):
        assert not data.same_labels(names_[other], mnist), other
    assert not data.same_labels(tuple(reversed(mnist)), mnist)   # the same names in another order: other labels
    pgd = AttackSpec(attack="pgd", eps=0.3, dataset="mnist")
    assert attack_sets._attack_for(pgd, [plan._Surrogate(names_["usps"])], mnist) == pgd
    assert attack_sets._attack_for(pgd, [plan._Surrogate(names_["kmnist"])], mnist).attack == attack_sets.FEATURE_ATTACK
