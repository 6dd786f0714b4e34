"""The estimate stage (xfer.estimate): one MLflow run per pretrained model with its transferability scores, on a
real local Ray and MLflow server; and --prune-sources, which fine-tunes only the sources they rank best."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone

import numpy as np
import pytest
import torch

from xfer import data, estimate, estimators, grid as grids, names, pipeline, specs, tracking
from xfer.errors import XferError
from xfer.stages import RunOptions


def _record(spec: specs.EstimateSpec, **metrics: float) -> tracking.RunRecord:
    now = datetime.now(timezone.utc)
    return tracking.RunRecord("run-" + specs.key(spec), "x", names.ESTIMATE, specs.key(spec), "FINISHED", {}, {},
                              dict(metrics), now, now)


THREE = ("glyph_letters", "uci_digits", "glyph_digits")


def test_rank_keeps_the_k_best_sources_per_arch_by_the_chosen_estimator_mean_over_seeds() -> None:
    grid = grids.from_preset("smoke", sources=THREE, archs=("resnet_mini", "lenet5"), seeds=(0, 1), prune_sources=1,
                             prune_by="leep", freeze={"resnet_mini": (0,), "lenet5": (0,)})
    cells = grids.cells(grid)
    # resnet_mini: uci_digits best on average over its two seeds (-0.2, -0.6 → -0.4) though glyph_digits wins seed 0.
    # lenet5: glyph_letters best; glyph_digits has no estimate at all, so it cannot be ranked and is kept.
    leep = {("resnet_mini", "glyph_letters"): (-0.9, -0.9), ("resnet_mini", "uci_digits"): (-0.2, -0.6),
            ("resnet_mini", "glyph_digits"): (-0.1, -0.8), ("lenet5", "glyph_letters"): (-0.3, -0.3),
            ("lenet5", "uci_digits"): (-0.5, -0.5)}
    records = [_record(s, leep=leep[(s.pretrain.train.arch, s.pretrain.train.dataset)][s.pretrain.train.seed],
                       logme=0.0) for s in cells.estimates if (s.pretrain.train.arch, s.pretrain.train.dataset) in leep]
    pruning = estimate.rank(grid, cells, records)
    groups = {g.arch: g for g in pruning.groups}
    assert groups["resnet_mini"].kept == ("uci_digits",)
    assert groups["resnet_mini"].skipped == ("glyph_digits", "glyph_letters")   # in rank order
    assert groups["resnet_mini"].scores["uci_digits"] == pytest.approx(-0.4)
    assert groups["lenet5"].kept == ("glyph_letters", "glyph_digits") and groups["lenet5"].unscored == ("glyph_digits",)
    assert groups["lenet5"].skipped == ("uci_digits",)
    kept = estimate.prune(cells, pruning)
    assert {(c.train.arch, c.source) for c in kept.finetune} == {
        ("resnet_mini", "uci_digits"), ("lenet5", "glyph_letters"), ("lenet5", "glyph_digits")}
    assert kept.scratch == cells.scratch and kept.pretrain == cells.pretrain and kept.estimates == cells.estimates
    assert len(kept.finetune) == 3 * len(cells.finetune) // 6   # each (arch, source) has the same cells
    tag = json.loads(pruning.tag())
    assert (tag["k"], tag["by"]) == (1, "leep") and {g["arch"]: g["skipped"] for g in tag["groups"]} == {
        "resnet_mini": ["glyph_digits", "glyph_letters"], "lenet5": ["uci_digits"]}
    lines = "\n".join(pruning.lines())
    assert "skipping glyph_digits, glyph_letters" in lines and "glyph_digits (lenet5) have no estimate" in lines


def test_a_tie_goes_to_the_source_listed_first() -> None:
    grid = grids.from_preset("smoke", sources=THREE, prune_sources=2)
    cells = grids.cells(grid)
    records = [_record(s, logme=1.0) for s in cells.estimates]
    [group] = estimate.rank(grid, cells, records).groups
    assert group.kept == THREE[:2] and group.skipped == THREE[2:]


def test_the_plan_counts_the_cells_pruning_saves_before_and_after_the_estimates() -> None:
    grid = grids.from_preset("smoke", sources=THREE, prune_sources=1)
    cells = grids.cells(grid)
    kept, note = estimate.planned(grid, cells, None)
    assert len(kept.finetune) == len(cells.finetune) // 3 == 2
    assert note.startswith("--prune-sources 1 by logme: 4 cells not run, of the 2 source(s) per arch ranked lowest")
    records = [_record(s, logme={"glyph_letters": 1.0, "uci_digits": 3.0, "glyph_digits": 2.0}[s.pretrain.train.dataset])
               for s in cells.estimates]
    kept, note = estimate.planned(grid, cells, records)
    assert {c.source for c in kept.finetune} == {"uci_digits"}
    assert note == "--prune-sources 1 by logme: 4 cells of glyph_digits, glyph_letters not run"
    assert estimate.planned(dataclasses.replace(grid, prune_sources=3), cells, None) == (cells, "")   # K ≥ sources


@pytest.mark.parametrize("overrides, words", [
    (dict(prune_by="kendall"), "--prune-by / prune_by: 'kendall' is not an estimator; use one of leep, nce, h_score, logme"),
    (dict(prune_sources=-1), "-1 must be at least 0 (sources kept for fine-tuning per arch"),
    (dict(estimate_n=-5), "-5 must be at least 0 (target images each pretrained model is scored on"),
])
def test_bad_estimate_settings_are_refused_before_anything_starts(overrides, words) -> None:
    with pytest.raises(XferError, match="the grid is not valid") as refused:
        grids.validate(grids.from_preset("smoke", **overrides))
    assert words in str(refused.value) and "Nothing was launched" in str(refused.value)


def test_estimate_cells_score_the_pool_or_its_draw_and_keep_their_keys() -> None:
    grid = grids.from_preset("smoke")
    everything = grids.cells(grid, {"mnist5k": 4000, "glyph_letters": 15600, "uci_digits": 1437})
    assert {s.n for s in everything.estimates} == {None}   # estimate_n 10,000 ≥ the pool: the whole pool
    drawn = grids.cells(dataclasses.replace(grid, estimate_n=500), {"mnist5k": 4000})
    assert {s.n for s in drawn.estimates} == {500}
    assert [s.pretrain for s in drawn.estimates] == list(drawn.pretrain)
    rehearsal = grids.cells(grids.fast_dev_run(grid))
    assert {s.n for s in rehearsal.estimates} == {grid.batch_size}
    # A draw is stratified, fixed by the target alone, and a smaller one lies inside a larger one.
    dataset = data.load("uci_digits")
    images, labels = estimate.pool(dataset, 200)
    again, _ = estimate.pool(dataset, 200)
    larger, _ = estimate.pool(dataset, 400)
    assert torch.equal(images, again) and len(labels) == 200
    assert set(map(bytes, images.flatten(1).numpy())) <= set(map(bytes, larger.flatten(1).numpy()))
    assert torch.bincount(labels).min() >= 18   # ~20 a class
    assert estimate.pool(dataset, None)[0] is dataset.train.images


def test_measure_gives_the_estimators_values_on_the_models_own_forward_pass() -> None:
    from xfer import models

    torch.manual_seed(0)
    dataset = data.load("uci_digits")
    model = models.build("lenet5", dataset.in_shape, 26)
    images, labels = estimate.pool(dataset, 300)
    metrics = estimate.measure(model, images, labels, 10)
    features, probs = estimators.features_and_probs(model, images)
    expected = estimators.scores(features, probs, labels.numpy(), 10)
    assert {k: metrics[k] for k in estimators.ESTIMATORS} == pytest.approx(expected, rel=1e-9)
    assert metrics[names.ESTIMATE_EXAMPLES] == 300 and all(metrics[f"{e}_seconds"] >= 0 for e in estimators.ESTIMATORS)


def test_a_model_whose_pretraining_has_no_run_fails_with_that_reason_and_starts_nothing(experiment: str) -> None:
    import ray

    grid = grids.from_preset("smoke", name=experiment)
    cells = grids.cells(grid)
    ray_before = ray.is_initialized()  # another test in this process may have started Ray already
    summary = estimate.run_stage(cells.estimates, RunOptions(experiment=experiment), {})
    assert summary.ran == 0 and summary.packs == 0 and len(summary.failed) == 2
    assert ray.is_initialized() == ray_before
    assert all("has no finished pretrain run" in reason for _, reason in summary.failed)
    assert summary.failed[0][0].startswith("estimate glyph_letters→mnist5k resnet_mini seed=0")


TINY = ["--preset", "smoke", "--archs", "mlp_mixer", "--sizes", "100", "--epochs", "1", "--pretrain-epochs", "1",
        "--pretrain-size", "600", "--estimate-n", "300"]


@pytest.mark.slow
def test_prune_sources_fine_tunes_only_the_best_ranked_and_says_which_it_skipped(
        local_ray, experiment: str, capsys, full_grid, monkeypatch: pytest.MonkeyPatch) -> None:
    # As trials on Ray Tune, not in the grid's process: what a grid with more work than this one does.
    monkeypatch.setattr(estimate, "IN_PROCESS_S", 0.0)
    argv = [*TINY, "--name", experiment, "--sources", *THREE, "--prune-sources", "1",
            "--stages", "pretrain", "estimate", "finetune"]
    assert full_grid.main([*argv, "--dry-run"]) == 0
    assert "--prune-sources 1 by logme: 2 cells not run" in capsys.readouterr().out
    assert full_grid.main(argv) == 0
    out = capsys.readouterr().out
    runs = tracking.query(experiment)
    found = [r for r in runs if r.stage == names.ESTIMATE]
    assert len(found) == 3 and all(r.tags[names.TAG_ARCH] == "mlp_mixer" for r in found)
    by_source = {r.tags[names.TAG_SOURCE]: r for r in found}
    best = max(by_source, key=lambda s: by_source[s].metrics["logme"])
    finetuned = {r.tags[names.TAG_SOURCE] for r in runs if r.stage == names.FINETUNE}
    assert finetuned == {best}
    skipped = sorted(set(THREE) - {best}, key=lambda s: -by_source[s].metrics["logme"])
    assert f"fine-tuning {best}; skipping {', '.join(skipped)}" in out
    tag = json.loads(tracking.experiment_tags(experiment)[names.TAG_PRUNED])
    assert tag["groups"][0]["kept"] == [best] and tag["groups"][0]["skipped"] == skipped
    assert tag["groups"][0]["scores"] == pytest.approx({s: r.metrics["logme"] for s, r in by_source.items()})
    # Each run's scores are the estimators' on its pretrained model, recomputed here from MLflow's checkpoint.
    record = by_source[best]
    model = tracking.load_model(record.tags[names.TAG_PRETRAIN_RUN])[0]
    images, labels = estimate.pool(data.load("mnist5k"), 300)
    again = estimate.measure(model, images, labels, 10)
    assert {e: record.metrics[e] for e in estimators.ESTIMATORS} == pytest.approx(
        {e: again[e] for e in estimators.ESTIMATORS}, rel=1e-4, abs=1e-6)
    assert np.isfinite(list(again.values())).all()
    # The rerun: nothing to do, and the same sources kept.
    outcome = pipeline.run_grid(full_grid.grid_from_args(full_grid.parser().parse_args(argv)),
                                RunOptions(experiment=experiment), only=(names.PRETRAIN, names.ESTIMATE, names.FINETUNE))
    assert [(s.stage, s.ran, s.cached) for s in outcome.summaries] == [
        (names.PRETRAIN, 0, 3), (names.ESTIMATE, 0, 3), (names.FINETUNE, 0, 1)]
    # Without --prune-sources the skipped sources are fine-tuned too, and the tag is cleared: the report must not
    # name sources as skipped that now ran.
    at = argv.index("--prune-sources")
    plain = argv[:at] + argv[at + 2:]
    assert full_grid.main(plain) == 0
    assert {r.tags[names.TAG_SOURCE] for r in tracking.query(experiment, names.FINETUNE)} == set(THREE)
    assert tracking.experiment_tags(experiment)[names.TAG_PRUNED] == ""
