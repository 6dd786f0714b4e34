"""Reports on a small real experiment: runs logged through xfer.tracking on a local MLflow server, no training.

The experiment plants known answers: fine-tuning at n=1000 beats scratch by 10 points over 5 seeds, n=500
has no effect (zero-mean noise), n=100 has only 2 seeds; the parent's adversarial examples cut the target's
accuracy to 0.2 where the other source's leave 0.6; the adder's transfer variant beats scratch over 3 seeds.
At n=1000, 3 seeds also carry the recipes: freezing 20 layers is 10 points worse than full fine-tuning, SGD with
a 10x head 1 point better than SGD at one lr, unfreezing the frozen body 9 points better than keeping it frozen.
Verdict logic on every claim is tested on constructed tables in test_verdicts.py; here, the real path.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import duckdb
import matplotlib.image
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from tracking_fixtures import Server

from reports import SCHEMAS, build_report
from xfer.cli.tools import report as report_command
from reports.schema import MATRIX_PREFIX, arrow_schema
from reports.verdicts import ADDER_CLAIM, INSUFFICIENT, METHOD, MIN_SEEDS, NO_RUNS, t_interval
from xfer import names, scores, tracking
from xfer.cli import run_main
from xfer.errors import XferError

SUFFIX = uuid.uuid4().hex[:8]   # the MLflow server is shared by the whole session: names must not collide
EXPERIMENT, EMPTY, PARTIAL, CLI = (f"{name}-{SUFFIX}" for name in ("study", "empty", "partial", "cli"))
TARGET, ARCH, LR = "mnist", "resnet_mini", 0.001
SEEDS = range(5)
NOISE = (0.01, -0.02, 0.005, 0.02, -0.015)   # zero mean: a "no effect" slice differs by noise alone
PARENT_ADV, OTHER_ADV, WHITEBOX_ADV = 0.2, 0.6, 0.0
ADDER_SEEDS = range(3)
ADDER_TRANSFER_ERROR = [0.02 + NOISE[seed] / 10 for seed in ADDER_SEEDS]
ADDER_SCRATCH_ERROR = [0.10 + NOISE[seed + 1] / 10 for seed in ADDER_SEEDS]
RECIPE_SEEDS = range(3)
FROZEN_ERROR, SGD_ERROR, HEAD10X_ERROR, UNFREEZE_ERROR = 0.15, 0.07, 0.06, 0.06   # at n=1000; full fine-tuning 0.05


def _training_run(stage: str, seed: int, size: int, test_error: float, source: str = "", target: str = TARGET,
                  pretrain_run: str | None = None, curve: bool = True, experiment: str = EXPERIMENT, freeze: int = 0,
                  optimizer: str = "adamw", head_lr_mult: float = 1.0, unfreeze_epoch: int | None = None) -> str:
    tags = {names.TAG_SOURCE: source, names.TAG_TARGET: target, names.TAG_ARCH: ARCH, names.TAG_SIZE: str(size),
            names.TAG_FREEZE: str(freeze), names.TAG_SEED: str(seed)}
    if pretrain_run:
        tags[names.TAG_PRETRAIN_RUN] = pretrain_run
    params = {"train.arch": ARCH, "train.lr": LR, "train.seed": seed, "train.size": size, "train.optimizer": optimizer,
              "train.head_lr_mult": head_lr_mult, "train.unfreeze_epoch": unfreeze_epoch, "train.freeze_depth": freeze}
    key = f"{stage}-{source}-{size}-{seed}-{freeze}-{optimizer}-{head_lr_mult}-{unfreeze_epoch}"
    with tracking.start_run(experiment, stage, key, tags=tags, params=params) as run:
        # The last point is the final error: MLflow's "latest" metric value is the one at the highest step.
        points = [(step, test_error + 0.01 * (30 - step)) for step in (0, 10, 20, 30)]
        if curve:
            run.log_curve([{"step": s, "epoch": s / 10, "seconds": 0.5 * s, "split": split, "error": e}
                           for s, e in points for split in ("train", "test")])
        else:  # a run without the curve artifact: named in the report's missing parts
            for s, e in points:
                run.log_metrics({names.TEST_ERROR: e}, step=s)
        run.log_metrics({names.TEST_ERROR: test_error, names.TEST_ACC: 1 - test_error, names.VAL_ERROR: test_error,
                         names.VAL_ACC: 1 - test_error, names.TRAIN_ERROR: test_error / 2, names.SECONDS: 15.0})
    return run.run_id


def _adder_run(variant: str, seed: int, test_error: float) -> None:
    tags = {names.TAG_VARIANT: variant, names.TAG_SIZE: "200", names.TAG_SEED: str(seed)}
    with tracking.start_run(EXPERIMENT, names.ADDER, f"adder-{variant}-{seed}", tags=tags) as run:
        run.log_curve([{"step": s, "epoch": s / 10, "seconds": 0.2 * s, "split": "val", "error": test_error + 0.3 / (1 + s)}
                       for s in (0, 10, 20)])
        run.log_metrics({names.TEST_ERROR: test_error, names.TEST_ACC: 1 - test_error})


def _attack(surrogate: str, targets: list[str], adv_acc: float, same_source: bool, is_parent: bool,
            stage_run: str) -> None:
    """One adversarial set's run (surrogate, pgd eps 0.3) and its score rows on each target, as the attack stage
    writes them: one Parquet part on the attack stage's run."""
    setting = {names.TAG_SURROGATE_RUN: surrogate, names.TAG_ATTACK: "pgd", names.TAG_EPS: "0.3"}
    with tracking.start_run(EXPERIMENT, names.ATTACK, f"set-{surrogate}", tags=setting) as made:
        made.log_metrics({names.WHITEBOX_SUCCESS: 0.99})
    scores.write_part(stage_run, [
        {"set_run_id": made.run_id, "set_key": f"set-{surrogate}", "surrogate_run_id": surrogate, "attack": "pgd",
         "eps": 0.3, "target_run_id": target, names.CLEAN_ACC: 0.95, names.ADV_ACC: adv_acc + NOISE[seed] / 2,
         names.SUCCESS_RATE: 1 - adv_acc - NOISE[(seed + is_parent) % 5] / 2, names.TAG_SAME_SOURCE: same_source,
         names.TAG_IS_PARENT: is_parent, "scored_at": 0.0}
        for seed, target in enumerate(targets)])


@pytest.fixture(scope="module")
def experiment(mlflow_server: Server) -> str:
    """The planted experiment (55 runs and a score table of 15 rows)."""
    parent = _training_run(names.PRETRAIN, 0, 60000, 0.01, source="kmnist", target="")
    other = _training_run(names.PRETRAIN, 0, 60000, 0.08, source="fashion_mnist", target="")
    planted = {1000: (0.05, 0.15), 500: (0.10, 0.10)}   # size: (fine-tune error, scratch error)
    targets = []
    for size, (finetune_error, scratch_error) in planted.items():
        for seed in SEEDS:
            run_id = _training_run(names.FINETUNE, seed, size, finetune_error + NOISE[seed], "kmnist", pretrain_run=parent)
            targets += [run_id] if size == 1000 else []
            _training_run(names.SCRATCH, seed, size, scratch_error + NOISE[(seed + 2) % 5] if size == 1000
                          else scratch_error)
    for seed in RECIPE_SEEDS:   # the recipes at n=1000, from the same checkpoint as the plain cells
        _training_run(names.FINETUNE, seed, 1000, FROZEN_ERROR, "kmnist", pretrain_run=parent, freeze=20)
        _training_run(names.FINETUNE, seed, 1000, SGD_ERROR, "kmnist", pretrain_run=parent, optimizer="sgd")
        _training_run(names.FINETUNE, seed, 1000, HEAD10X_ERROR + NOISE[seed] / 10, "kmnist", pretrain_run=parent,
                      optimizer="sgd", head_lr_mult=10.0)
        _training_run(names.FINETUNE, seed, 1000, UNFREEZE_ERROR + NOISE[seed] / 10, "kmnist", pretrain_run=parent,
                      freeze=20, unfreeze_epoch=3)
    for seed in range(MIN_SEEDS - 1):   # n=100: one seed too few for a verdict
        _training_run(names.FINETUNE, seed, 100, 0.2, "kmnist", pretrain_run=parent)
        _training_run(names.SCRATCH, seed, 100, 0.4, curve=seed == 0)
    with tracking.start_run(EXPERIMENT, names.GRID, "", tags={names.TAG_GRID_STAGE: names.ATTACK}) as stage:
        _attack(parent, targets, PARENT_ADV, same_source=True, is_parent=True, stage_run=stage.run_id)
        _attack(other, targets, OTHER_ADV, same_source=False, is_parent=False, stage_run=stage.run_id)
        for target in targets:  # white-box references: shares its own source, but is no evidence about sources
            _attack(target, [target], WHITEBOX_ADV, same_source=True, is_parent=False, stage_run=stage.run_id)
    for seed in ADDER_SEEDS:
        _adder_run(names.VARIANT_TRANSFER, seed, ADDER_TRANSFER_ERROR[seed])
        _adder_run(names.VARIANT_SCRATCH, seed, ADDER_SCRATCH_ERROR[seed])
    with pytest.raises(RuntimeError), tracking.start_run(EXPERIMENT, names.FINETUNE, "crashed"):
        raise RuntimeError("a crashed cell")   # FAILED: listed in `runs`, left out of the analysis tables
    with tracking.start_run(EXPERIMENT, names.TUNE, "study-parent", params={"study.trials": 4}):
        pass
    return EXPERIMENT


@pytest.fixture(scope="module")
def report(experiment: str):
    return build_report(experiment)


def _duckdb_rows(path: Path) -> int:
    return duckdb.sql(f"select count(*) from read_parquet('{path}')").fetchall()[0][0]


def _data(report, table: str) -> Path:
    return report.out / "data" / f"{table}.parquet"


def test_report_goes_to_the_runs_folder_by_default(report, mlflow_server: Server) -> None:
    assert report.out == mlflow_server.root.resolve() / "reports" / EXPERIMENT
    assert (report.out / "index.html") in report.files
    assert len(report.missing) == 2   # the one run without a curve artifact; no estimate runs (test_transferability)
    assert any(m.startswith("no finished estimate runs: ") and "not made" in m for m in report.missing)


@pytest.mark.parametrize("table", list(SCHEMAS))
def test_parquet_tables_have_the_documented_schema_in_every_reader(report, table: str) -> None:
    path = _data(report, table)
    written = pq.read_schema(path)
    documented = arrow_schema(table)
    assert written.names[:len(documented)] == documented.names
    assert [f.type for f in written][:len(documented)] == documented.types
    assert written.field(documented.names[0]).metadata[b"unit"] == documented.field(0).metadata[b"unit"]
    rows = pq.read_table(path).num_rows
    assert len(pd.read_parquet(path)) == rows
    assert pl.read_parquet(path).height == rows
    assert _duckdb_rows(path) == rows


def test_tables_hold_the_planted_runs(report) -> None:
    runs = pd.read_parquet(_data(report, "runs"))
    # pretrain, ft+scratch, recipes, n=100, adversarial sets (A and B, a white-box one per target), adder, failed,
    # tune: no run per (set, target), and the attack stage's run (a parent) is not an input
    assert len(runs) == 2 + 2 * 10 + 4 * 3 + 2 * 2 + 2 + 5 + 6 + 1 + 1
    assert set(runs["status"]) == {"FINISHED", "FAILED"}
    assert sorted(runs.loc[runs["stage"] == names.FINETUNE, "train.head_lr_mult"].dropna().unique()) == ["1.0", "10.0"]
    assert runs.loc[runs["stage"] == names.TUNE, "study.trials"].tolist() == ["4"]
    [failed] = runs[runs["status"] == "FAILED"].itertuples()
    assert failed.failure == "RuntimeError: a crashed cell"
    # the recipe, typed from the train.* params ("None" is null); the failed run logged none: TrainSpec's defaults
    trained = runs[runs["stage"].isin([names.FINETUNE, names.SCRATCH])]
    assert trained.value_counts(["optimizer", "head_lr_mult"]).to_dict() == {("adamw", 1.0): 31, ("sgd", 1.0): 3,
                                                                             ("sgd", 10.0): 3}
    assert sorted(trained["unfreeze_epoch"].dropna()) == [3, 3, 3]

    finetune = pd.read_parquet(_data(report, "finetune"))
    assert len(finetune) == 12 + 12   # the FAILED fine-tune run is not analysed
    plain = finetune[finetune["freeze_depth"].eq(0) & finetune["optimizer"].eq("adamw")]
    at_1000 = plain[plain["size"] == 1000]
    assert at_1000["scratch_test_error"].mean() == pytest.approx(0.15)
    assert at_1000["test_error"].mean() == pytest.approx(0.05)
    assert finetune["pretrain_run_id"].nunique() == 1
    # scratch is matched on the optimizer too: the grid has no SGD scratch cell, so SGD cells have none
    assert finetune["scratch_run_id"].isna().tolist() == finetune["optimizer"].eq("sgd").tolist()
    assert len(pd.read_parquet(_data(report, "scratch"))) == 12
    plain = finetune[finetune["scratch_run_id"].notna()]
    # each fine-tune run is paired with the scratch run of its own seed and size, never another's
    scratch = runs.set_index("run_id").loc[plain["scratch_run_id"]]
    assert (scratch["seed"].to_numpy() == plain["seed"].to_numpy()).all()
    assert (scratch["size"].to_numpy() == plain["size"].to_numpy()).all()

    transfer = pd.read_parquet(_data(report, "transfer"))
    assert len(transfer) == 15 and transfer["generation_run_id"].notna().all()
    assert transfer["whitebox_success"].eq(0.99).all()
    assert transfer.loc[transfer["is_parent"], "adv_acc"].mean() == pytest.approx(PARENT_ADV)
    assert set(transfer["surrogate_label"]) == {f"kmnist/{ARCH}", f"fashion_mnist/{ARCH}", f"kmnist>{TARGET}/{ARCH}/n1000/f0"}
    assert transfer["surrogate_stage"].value_counts().to_dict() == {names.PRETRAIN: 10, names.FINETUNE: 5}
    assert sorted(transfer["target_seed"]) == sorted(list(SEEDS) * 3)
    assert transfer["target_arch"].eq(ARCH).all() and transfer["target_size"].eq(1000).all()
    assert set(transfer["surrogate_source"]) == {"kmnist", "fashion_mnist"} and transfer["target_source"].eq("kmnist").all()
    adder = pd.read_parquet(_data(report, "adder"))
    assert adder["variant"].eq(names.VARIANT_TRANSFER).all() and adder["scratch_run_id"].notna().all()

    curves = pd.read_parquet(_data(report, "curves"))
    assert curves["run_id"].nunique() == 2 + 20 + 12 + 4 - 1 + 6   # every training run but the one without a curve
    assert set(curves["split"]) == {"train", "val", "test"}
    [no_curve] = [m for m in report.missing if names.CURVE_FILE in m]
    assert no_curve.startswith("1 finished training run")


def test_one_transfer_matrix_per_attack_setting(report) -> None:
    path = report.out / "data" / f"{MATRIX_PREFIX}pgd_eps0.3.parquet"
    matrix = pd.read_parquet(path).set_index("surrogate")
    target = f"kmnist>{TARGET}/{ARCH}/n1000/f0"
    assert list(matrix.columns) == [target]
    assert matrix.loc[f"kmnist/{ARCH}", target] == pytest.approx(PARENT_ADV)
    assert matrix.loc[f"fashion_mnist/{ARCH}", target] == pytest.approx(OTHER_ADV)
    assert pl.read_parquet(path).shape == (2, 2)
    assert _duckdb_rows(path) == 2


def test_figures_exist_as_png_and_svg_and_are_not_blank(report) -> None:
    # Heatmaps are images: PNG only (an SVG would wrap the same pixels).
    pngs = {p.stem: p for p in report.files if p.suffix == ".png"}
    assert set(pngs) == {f"curves_{TARGET}_n1000", f"curves_{TARGET}_n500", f"curves_{TARGET}_n100", "curves_adder_n200",
                         "accuracy_vs_size", "freeze_depth", "transfer_pgd_eps0.3",
                         *(f"claim_{i}" for i in range(1, 7))}   # claim 7 (LeNet-5) has no runs, so no figure
    for stem, png in pngs.items():
        pixels = matplotlib.image.imread(png)
        assert pixels.std() > 0.05, f"{stem}.png looks blank"
        if stem.startswith("transfer_"):
            assert not png.with_suffix(".svg").exists()
        else:
            assert "<svg" in png.with_suffix(".svg").read_text()[:2000]


def test_claims_table_has_every_claim_and_finds_the_planted_effects_only(report) -> None:
    verdicts = pd.read_parquet(_data(report, "verdicts"))
    claims = verdicts[verdicts["headline"]].set_index("claim_id")
    assert list(claims.index) == list(range(1, 8)) and claims["method"].eq(METHOD).all()
    assert claims["inference"].eq("confirmatory: Holm over 6 headline(s)").all()   # claim 7 has no runs: no test
    tested = claims.dropna(subset=["p_value"])
    assert len(tested) == 6 and (tested["p_holm"] >= tested["p_value"]).all() and claims.loc[7, "p_holm"] != claims.loc[7, "p_holm"]
    rows = verdicts.set_index(["claim_id", "scope"])
    # 1: the headline is the smallest size with >= 3 seeds (500, no effect); n=1000 beneath it, n=100 insufficient
    assert claims.loc[1, "scope"] == "size=500" and claims.loc[1, "verdict"] == "inconclusive"
    assert claims.loc[1, "ci_low"] < 0 < claims.loc[1, "ci_high"] and claims.loc[1, "figure"] == "figures/claim_1.png"
    planted = rows.loc[(1, "size=1000")]
    assert planted["verdict"] == "supported" and planted["effect"] == pytest.approx(0.10)
    assert "+10.00 pp" in planted["line"] and "over 5 seeds, p = " in planted["line"] and f"({METHOD};" in planted["line"]
    assert planted["inference"] == "descriptive: no multiple-comparison control" and np.isnan(planted["p_holm"])
    assert list(planted["seeds"]) == list(SEEDS) and np.mean(planted["seed_effects"]) == pytest.approx(0.10)
    few = rows.loc[(1, "size=100")]
    assert few["verdict"] == INSUFFICIENT and few["n_seeds"] == 2 and np.isnan(few["effect"])
    assert rows.loc[(1, "trend: size=500 minus size=1000"), "verdict"] == "contradicted"   # the gap grows here
    assert rows.loc[(1, f"target={TARGET} source=kmnist arch={ARCH} size=1000"), "verdict"] == "supported"
    # 2, 5, 6: the recipes at n=1000 from one checkpoint (3 seeds)
    full = 0.05 + np.mean([NOISE[seed] for seed in RECIPE_SEEDS])   # full fine-tuning's error at n=1000
    assert claims.loc[2, "verdict"] == "contradicted" and claims.loc[2, "effect"] == pytest.approx(full - FROZEN_ERROR)
    noise = np.mean([NOISE[seed] / 10 for seed in RECIPE_SEEDS])
    assert claims.loc[5, "verdict"] == "supported"
    assert claims.loc[5, "effect"] == pytest.approx(SGD_ERROR - HEAD10X_ERROR - noise)
    assert claims.loc[6, "verdict"] == "supported"
    assert claims.loc[6, "effect"] == pytest.approx(FROZEN_ERROR - UNFREEZE_ERROR - noise)
    # 3: the parent's examples flip 0.8 of C, the other source's 0.4; white-box success on A is the ceiling
    assert claims.loc[3, "verdict"] == "supported" and claims.loc[3, "effect"] == pytest.approx(OTHER_ADV - PARENT_ADV)
    assert claims.loc[3, "ceiling"] == pytest.approx(0.99) and claims.loc[3, "n_seeds"] == 5
    # 4: paired by seed, Student's t over the 3 per-seed differences, not over 6 unpaired errors
    effect, low, high = t_interval(np.subtract(ADDER_SCRATCH_ERROR, ADDER_TRANSFER_ERROR))
    adder = claims.loc[4]
    assert adder["scope"] == "size=200" and adder["verdict"] == "supported" and adder["n_seeds"] == 3
    assert (adder["effect"], adder["ci_low"], adder["ci_high"]) == pytest.approx((effect, low, high))
    assert f"effect {100 * effect:+.2f} pp, 95% CI [{100 * low:+.2f}, {100 * high:+.2f}] pp over 3 seeds" in adder["line"]
    assert verdicts.loc[verdicts["claim"] == ADDER_CLAIM, "line"].tolist() == [adder["line"]]   # what sweeps/adder prints
    # 7: no LeNet-5 in this grid
    assert claims.loc[7, "verdict"] == NO_RUNS and claims.loc[7, "why"] == "no Adam or AdamW lenet5 runs in this grid"
    assert pd.isna(claims.loc[7, "figure"])
    as_json = json.loads((report.out / "data" / "verdicts.json").read_text())
    assert [v["line"] for v in as_json] == list(verdicts["line"])


def test_markdown_tables_in_the_seed_shape(report) -> None:
    tables = report.out / "tables"
    pretrain = (tables / "pretrain.md").read_text()
    assert f"| source | {ARCH} |" in pretrain and "| kmnist | 99.00 |" in pretrain
    finetune = (tables / "finetune.md").read_text()
    assert "| 100 | 500 | 1000 |" in finetune and "| scratch |" in finetune
    claims = (tables / "claims.md").read_text()
    assert claims.count("\n| ") == 8   # the header and one row per claim
    assert "| 4 | adder: transfer beats scratch | 002 | size=200 |" in claims and "[claim_4.png](../figures/claim_4.png)" in claims
    attacks = (tables / "attacks.md").read_text()
    assert "| kmnist>mnist/resnet_mini/n1000/f0 | pgd | 0.3 | 95.0 | 20.0 | 20.0 | 60.0 | 0.5 | -40.0 |" in attacks


def test_replication_puts_each_seed_value_beside_the_mean_and_interval_over_seeds(experiment: str) -> None:
    from reports.replication import ABOVE, BELOW, NOT_RUN, TOO_FEW, WITHIN, SeedRow, lines, replication
    from reports.tables import collect

    def finetuned(value: float, **changes) -> SeedRow:
        return SeedRow("000", f"ft {value}", "hand-written", names.FINETUNE, TARGET, ARCH, **{
            "size": 1000, "source": "kmnist", "value": value, **changes})

    rows = (finetuned(0.96), finetuned(0.99), finetuned(0.90),
            SeedRow("000", "pretrain kmnist", "hand-written", names.PRETRAIN, "kmnist", ARCH, 60000, value=0.99),
            SeedRow("000", "pretrain svhn", "hand-written", names.PRETRAIN, "svhn", ARCH, value=0.93),
            finetuned(0.95, freeze=23))
    table = replication(collect(experiment), rows)
    # n=1000 plain fine-tunes: 1 - (0.05 + noise) over 5 seeds; the seeds' SGD and recipe cells are not averaged in.
    expected = [1 - 0.05 - NOISE[seed] for seed in SEEDS]
    mean, low, high = t_interval(np.array(expected))
    first = table.iloc[0]
    assert first["seeds"] == list(SEEDS) and np.allclose(first["seed_values"], expected)
    assert (first["n_seeds"], first["mean"], first["ci_low"], first["ci_high"]) == pytest.approx((5, mean, low, high))
    assert first["difference"] == pytest.approx(mean - 0.96)
    assert table["word"].tolist() == [WITHIN, BELOW, ABOVE, TOO_FEW, NOT_RUN, NOT_RUN]
    assert table["why"][3] == "1 seed(s), 3 needed for an interval"
    assert table["why"][4] == "no finished pretrain run with source svhn in this grid"
    assert table["why"][5] == ("no finished finetune run with target mnist, source kmnist, arch resnet_mini, size 1000, "
                               "freeze depth 23 (one lr, never unfrozen) in this grid")
    said = lines(table)
    assert said[0] == (f"ft 0.96: seed 96.00%; xfer {100 * mean:.2f}%, 95% CI [{100 * low:.2f}, {100 * high:.2f}] "
                       f"over 5 seed(s), {100 * (mean - 0.96):+.2f} pp: within the interval.")


def test_every_report_has_the_replication_table_saying_why_each_row_was_not_run(report) -> None:
    from reports.replication import NOT_RUN, SEED_ROWS

    table = pd.read_parquet(_data(report, "replication"))
    assert table["row"].tolist() == [r.row for r in SEED_ROWS]     # this grid matches none of the seeds' rows
    assert set(table["word"]) == {NOT_RUN} and table["why"].str.contains("in this grid").all()
    assert "adder digit classifier" in set(table["row"])
    markdown = (report.out / "tables" / "replication.md").read_text()
    assert markdown.count("| not run |") == len(SEED_ROWS) and "000 四 1) table (test accuracy), FMNIST预训练alexnet" in markdown
    page = (report.out / "index.html").read_text()
    assert "<h3>Replication</h3><p>No seed row matches a finished run" in page and "--preset replicate" in page
    assert report.replication is not None and len(report.replication) == len(SEED_ROWS)


def test_index_links_every_file_relatively(report) -> None:
    page = (report.out / "index.html").read_text()
    links = set(re.findall(r'(?:href|src)="([^"]+)"', page))
    assert all(not link.startswith(("/", "http")) and (report.out / link).is_file() for link in links)
    linked = {report.out / link for link in links}
    assert {p for p in report.files if p.name != "index.html" and p.suffix != ".png"} <= linked
    assert {p for p in report.files if p.suffix == ".png"} <= linked


def test_index_opens_with_what_the_grid_found(report) -> None:
    page = (report.out / "index.html").read_text()
    found = page[page.index("What this grid found"):page.index("Verdicts, every scope")]
    claims = found[found.index("<h3>Claims"):found.index("<h3>Largest effects")]
    assert claims.count("<tr><td>") == 7 and 'href="figures/claim_4.png"' in claims
    assert 'href="figures/curves_adder_n200.png"' in claims and 'href="figures/transfer_pgd_eps0.3.png"' in claims
    assert "no Adam or AdamW lenet5 runs in this grid" in claims and ">+10.00<" not in claims   # n=1000 is not a headline
    largest = found[found.index("<h3>Largest effects"):found.index("<h3>Failures")]
    assert largest.count("<li>") == 5 and "claim 3 (attack=pgd eps=0.3): supported, +40.00 pp" in largest.split("<li>")[1]
    assert largest.count("claim 2 ") == 1   # the headline and its one cell hold the same effect: listed once
    assert "1 run(s) FAILED (1 finetune)" in found and "RuntimeError: a crashed cell" in found


def test_report_is_logged_as_an_mlflow_run(report, mlflow_server: Server) -> None:
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(report.run_id)
    assert run.data.tags[names.TAG_STAGE] == names.REPORT
    logged = {a.path for a in client.list_artifacts(report.run_id)}
    assert {"index.html", "data", "figures", "tables", "SCHEMA.md"} <= logged
    assert len(client.list_artifacts(report.run_id, "figures")) == 2 * (7 + 6) - 1   # the heatmap has no SVG


def test_empty_experiment_gives_a_partial_report(mlflow_server: Server, tmp_path: Path) -> None:
    tracking.experiment_id(EMPTY)
    result = build_report(EMPTY, tmp_path / "report", log_to_mlflow=False)
    assert any("no runs at all" in m for m in result.missing) and len(result.missing) == 7
    assert pq.read_schema(result.out / "data" / "transferability.parquet") == arrow_schema("transferability")
    assert pq.read_schema(result.out / "data" / "finetune.parquet") == arrow_schema("finetune")
    assert not any(p.suffix == ".png" for p in result.files)
    page = (result.out / "index.html").read_text()
    assert "Missing" in page and "no scores of finished adversarial sets" in page


def test_partial_experiment_says_what_is_missing(mlflow_server: Server, tmp_path: Path) -> None:
    parent = _training_run(names.PRETRAIN, 0, 1000, 0.1, source="kmnist", target="", experiment=PARTIAL)
    _training_run(names.FINETUNE, 0, 500, 0.2, "kmnist", pretrain_run=parent, experiment=PARTIAL)
    result = build_report(PARTIAL, tmp_path / "report", log_to_mlflow=False)
    assert any("matching finished scratch run" in m for m in result.missing)
    assert not any("pretrain" in m.split(":")[0] for m in result.missing)
    assert {p.stem for p in result.files if p.suffix == ".png"} == {f"curves_{TARGET}_n500", "accuracy_vs_size",
                                                                     "freeze_depth"}


def test_unknown_experiment_names_the_known_ones(experiment: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(XferError, match=EXPERIMENT):
        build_report("no-such-grid", tmp_path)
    with pytest.raises(SystemExit) as exited:   # `xfer report` (= python -m reports) at its edge
        run_main(lambda: report_command(["--experiment", "no-such-grid", "--out", str(tmp_path)]))
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in stderr
    assert "no-such-grid" in stderr and EXPERIMENT in stderr


def test_cli_builds_a_report(mlflow_server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    tracking.experiment_id(CLI)
    assert report_command(["--experiment", CLI, "--out", str(tmp_path), "--no-mlflow"]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "index.html") in printed and "missing: no scores of finished adversarial sets" in printed
