"""Optuna fine-tune studies: the space, ASHA, importances, the test split kept out of every trial, continuation,
best vs default in MLflow, and the grid's best configuration per (arch, size)."""

from __future__ import annotations

import csv
import json
import math
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from ray.tune.schedulers import TrialScheduler

from tracking_fixtures import Server
from xfer import data, models, names, server, specs, stages, tracking, tune_adapter, tuning
from xfer import grid as grids
from xfer import tuned as tuned_settings   # a test below names its tuned grid `tuned`
from xfer import train as loop
from xfer.errors import XferError
from xfer.specs import FinetuneSpec, PretrainSpec, TrainSpec

REPO = Path(__file__).resolve().parents[1]
SENTINEL = 77   # every test image of the spy dataset is this one flat gray level, which no MNIST digit is


def study_of(arch: str = "lenet5", epochs: int = 2, source: str = "glyph_letters", target: str = "mnist5k",
             size: int = 200, **train: Any) -> tuning.StudySpec:
    pretrain = PretrainSpec(TrainSpec(arch=arch, dataset=source, size=500, val_size=200, epochs=1))
    return tuning.StudySpec(FinetuneSpec(TrainSpec(arch=arch, dataset=target, size=size, val_size=100,
                                                   epochs=epochs, batch_size=32, **train), pretrain))


@pytest.mark.parametrize("arch", ["lenet5", "resnet_mini"])
def test_space_spans_every_body_tensor_and_its_default_point_is_the_default_cell(arch: str) -> None:
    study = study_of(arch, epochs=3, lr=2e-3)
    space = tuning.search_space(study, (1, 28, 28))
    assert set(space) == set(tuning.SEARCHED)
    depth = models.max_freeze_depth(models.build(arch, (1, 28, 28), 10))
    assert (space["freeze_depth"].low, space["freeze_depth"].high) == (0, depth)
    assert (space["unfreeze_epoch"].low, space["unfreeze_epoch"].high) == (0, 2)
    assert space["lr"].log and space["weight_decay"].log and space["head_lr_mult"].log
    point = tuning.default_params(study)
    assert all(space[k]._contains(space[k].to_internal_repr(v)) for k, v in point.items())
    assert specs.key(tuning.cell_of(study, point)) == specs.key(study.default)  # the first trial is the default cell


def test_unfreezing_needs_something_frozen() -> None:
    study = study_of(epochs=3)
    assert tuning.cell_of(study, {"freeze_depth": 0, "unfreeze_epoch": 2}).train.unfreeze_epoch is None
    assert tuning.cell_of(study, {"freeze_depth": 4, "unfreeze_epoch": 0}).train.unfreeze_epoch is None
    frozen = tuning.cell_of(study, {"freeze_depth": 4, "unfreeze_epoch": 2, "batch_size": 64})
    assert (frozen.train.freeze_depth, frozen.train.unfreeze_epoch, frozen.train.batch_size) == (4, 2, 64)
    with pytest.raises(XferError, match="unknown tuning parameters momentum"):
        tuning.cell_of(study, {"momentum": 0.5})


def test_best_is_the_lowest_full_length_trial_and_ties_go_to_the_default() -> None:
    dist = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}
    study = optuna.create_study()
    # As Ray leaves them: the result that ended a trial is its value, the epochs before it its intermediate values.
    for lr, value, earlier in ((1e-3, 0.3, {1: 0.5}), (3e-3, 0.1, {}), (1e-2, 0.3, {1: 0.4}), (5e-2, 0.35, {1: 0.6})):
        study.add_trial(create_trial(params={"lr": lr}, distributions=dist, value=value, intermediate_values=earlier))
    # Trial 1 was stopped after epoch 1 at 0.1: not comparable with full-length trials. Trials 0 and 2 tie: the first wins.
    best = tuning.best_trial(study, full_length={0, 2, 3})
    assert (best.number, best.value) == (0, 0.3)
    assert tuning.best_trial(study, full_length=set()).number == 1   # none ran every epoch: the lowest of all


def test_asha_stops_weak_trials_by_validation_error_but_never_the_default() -> None:
    study = study_of(epochs=9)
    scheduler = tuning.asha(study)
    assert scheduler.set_search_properties(names.VAL_ERROR, "min")   # what TuneConfig(metric=..., mode=...) does
    default = tuning.default_params(study)
    trials = {name: SimpleNamespace(trial_id=name, config={**default, "lr": lr})
              for name, lr in (("good", 3e-3), ("better", 5e-3), ("weak", 2e-2))}
    trials["default"] = SimpleNamespace(trial_id="default", config=dict(default))
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def decide(name: str, epoch: int, val_error: float) -> str:
        result = {"training_iteration": epoch, names.EPOCH: float(epoch), names.VAL_ERROR: val_error}
        return scheduler.on_trial_result(None, trials[name], result)

    assert decide("good", 1, 0.20) == TrialScheduler.CONTINUE     # first at the epoch-1 rung
    assert decide("better", 1, 0.10) == TrialScheduler.CONTINUE
    assert decide("weak", 1, 0.60) == TrialScheduler.STOP         # worse than the best third at epoch 1
    assert decide("default", 1, 0.90) == TrialScheduler.CONTINUE  # worse still, but the baseline runs to the end
    assert decide("good", 2, 0.90) == TrialScheduler.CONTINUE     # between rungs (1, 3, 9) nothing is judged


def test_importances_rank_parameters_by_validation_error_at_the_first_rung() -> None:
    """Every trial reaches epoch 1; here lr decides the epoch-1 error and weight decay only the final one."""
    space = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "weight_decay": FloatDistribution(1e-6, 1e-1, log=True)}
    study = optuna.create_study()
    for i in range(16):
        lr, weight_decay = 10 ** (-4 + 3 * ((i * 7) % 16) / 15), 10 ** (-6 + 5 * ((i * 5 + 3) % 16) / 15)
        early, final = 0.1 + 0.05 * math.log10(lr / 1e-4), 0.05 + 0.01 * math.log10(weight_decay / 1e-6)
        study.add_trial(create_trial(params={"lr": lr, "weight_decay": weight_decay}, distributions=space,
                                     value=final, intermediate_values={1: early}))
    importance, note = tuning.param_importances(study)
    assert set(importance) == {"lr", "weight_decay"} and math.isclose(sum(importance.values()), 1.0)
    assert importance["lr"] > 0.9, importance                     # the final values would have ranked weight decay first
    assert tuning.param_importances(study) == (importance, note)  # seeded: the same study, the same importances


class ListSession:
    """What a trial reports, kept in a list; nothing to resume."""

    def __init__(self) -> None:
        self.reports: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], state_dir: Path | None = None) -> None:
        self.reports.append(dict(metrics))

    def restore(self) -> None:
        return None


@pytest.fixture
def spy_on_forward(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts, per forward pass of any xfer model, the sentinel (test) images in the batch."""
    seen: list[int] = []
    forward = models.XferModel.forward

    def spying(self: models.XferModel, x: torch.Tensor) -> torch.Tensor:
        flat = (x.flatten(1) == SENTINEL / 255).all(1)
        seen.append(int(flat.sum()))
        return forward(self, x)

    monkeypatch.setattr(models.XferModel, "forward", spying)
    return seen


def test_trials_never_see_the_test_split(mlflow_server: Server, spy_on_forward: list[int]) -> None:
    digits = data.load("mnist5k")
    test = data.Split(torch.full((40, 1, 28, 28), SENTINEL, dtype=torch.uint8), digits.test.labels[:40])
    ds = data.Dataset("mnist5k", digits.train.subset(torch.arange(600)), test, digits.class_names)
    study = study_of()
    experiment = f"tune-spy-{uuid.uuid4().hex[:8]}"
    context = tuning.TrialContext(study, experiment, pretrain_run="none")
    pretrained = models.build("lenet5", (1, 28, 28), 26)

    with pytest.raises(XferError, match="test split"):
        tuning.run_trial(context, {}, ds, pretrained, ListSession())
    session = ListSession()
    result = tuning.run_trial(context, {"lr": 3e-3}, tuning.withhold_test(ds), pretrained, session)
    assert result.ok and len(spy_on_forward) > 5 and sum(spy_on_forward) == 0   # the model ran, never on a test image
    assert [r[names.EPOCH] for r in session.reports] == [1.0, 2.0]               # one report per epoch, for ASHA
    assert session.reports[-1][tune_adapter.STATUS] == 1.0 and 0 <= session.reports[-1][names.VAL_ERROR] <= 1
    (run,) = tracking.query(experiment, stage=names.TUNE)
    assert names.TEST_ERROR not in run.metrics and run.tags[names.TAG_TUNE_ROLE] == names.TUNE_ROLE_TRIAL

    # Positive control: the final evaluation is where test images meet the model, once.
    trial = create_trial(params={"lr": 3e-3}, distributions={"lr": FloatDistribution(1e-4, 1e-1, log=True)},
                         value=session.reports[-1][names.VAL_ERROR])
    spy_on_forward.clear()
    evaluated = tuning.evaluate_on_test(context, trial, ds)
    assert sum(spy_on_forward) == 40 and 0 <= evaluated.test_error <= 1 and evaluated.run_id == run.run_id


class StoppingSession(ListSession):
    """Stops the trial at its first report, as Ray Tune does when ASHA stops it: SystemExit(0) out of report."""

    def report(self, metrics: dict[str, float], state_dir: Path | None = None) -> None:
        super().report(metrics, state_dir)
        raise SystemExit(0)


def test_a_trial_asha_stops_ends_its_run_killed_with_the_reason(mlflow_server: Server) -> None:
    digits = data.load("mnist5k")
    ds = data.Dataset("mnist5k", digits.train.subset(torch.arange(600)), digits.test, digits.class_names)
    experiment = f"tune-stop-{uuid.uuid4().hex[:8]}"
    context = tuning.TrialContext(study_of(), experiment, pretrain_run="none")
    session = StoppingSession()
    with pytest.raises(SystemExit) as stopped:
        tuning.run_trial(context, {}, tuning.withhold_test(ds), models.build("lenet5", (1, 28, 28), 26), session)
    assert stopped.value.code == 0                    # Ray ends a trial quietly only on exit code 0
    assert [r[names.EPOCH] for r in session.reports] == [1.0]
    (run,) = tracking.query(experiment, stage=names.TUNE, status=None)
    assert run.status == "KILLED" and run.metrics[names.VAL_ERROR] == session.reports[0][names.VAL_ERROR]
    assert f"stopped early by ASHA after epoch 1 of 2 (val_error {session.reports[0][names.VAL_ERROR]:.4f})" \
        in run.tags[names.TAG_FAILURE]


def test_concurrency_is_the_free_trial_slots(local_ray: Any) -> None:
    deadline = time.monotonic() + 60   # the shared 2-CPU Ray, once an earlier test's trial actors have gone
    while local_ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert local_ray.available_resources().get("CPU") == 2
    slots = {cpus: tuning.free_slots(stages.RunOptions("x", cpus_per_trial=cpus)) for cpus in (0.5, 1, 2, 4)}
    assert slots == {0.5: 4, 1: 2, 2: 1, 4: 1}                # a trial bigger than the cluster still gets one slot


_SMOKE: dict[str, Any] = {}   # the smoke study, run once per module (local_ray may be function-scoped)


@pytest.fixture
def smoke_study(local_ray: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`tune_finetune.py --smoke` twice on one storage: --trials 1 (the default configuration alone), then the
    smoke's own 3 trials, which continue the study; after each, the stored trials as number → (params, value, state).

    One trial first, not two: each trial process costs a Ray worker's start and ~15 CPU-s of imports, and one
    is enough to show that the rerun keeps what the first run stored and adds to it."""
    if _SMOKE:
        return _SMOKE
    import importlib.util

    spec = importlib.util.spec_from_file_location("tune_finetune", REPO / "sweeps" / "tune_finetune.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    experiment = f"tune-smoke-{uuid.uuid4().hex[:8]}"
    storage = f"sqlite:///{tmp_path_factory.mktemp('optuna') / 'optuna.db'}"
    argv = ["--smoke", "--experiment", experiment, "--storage", storage]
    study = cli.study_from_args(cli.parser().parse_args(argv))
    stored = []
    for more in (["--trials", "1"], []):   # then the smoke's default, 3 in total
        assert cli.main([*argv, *more]) == 0
        ot_study = optuna.load_study(study_name=study.name, storage=storage)
        stored.append({t.number: (t.params, t.value, t.state) for t in ot_study.get_trials()})
    _SMOKE.update(experiment=experiment, study=study, stored=stored)
    return _SMOKE


@pytest.mark.slow
def test_smoke_study_continues_and_records_best_beside_default(smoke_study: dict[str, Any]) -> None:
    experiment, study = smoke_study["experiment"], smoke_study["study"]
    first, second = smoke_study["stored"]
    # The rerun (the smoke's default, 3 in total) continued the study: 3 trials, not 1 or 4; the first is kept unchanged.
    assert (len(first), len(second)) == (1, 3) and {n: second[n] for n in first} == first
    assert all(state == TrialState.COMPLETE for _, _, state in second.values())
    assert [n for n, (params, *_) in second.items() if tuning.same_params(params, tuning.default_params(study))] == [0]

    (parent,) = tracking.query(experiment, stage=names.TUNE,
                               tags={names.TAG_KEY: study.key, names.TAG_TUNE_ROLE: names.TUNE_ROLE_STUDY})
    children = tracking.query(experiment, stage=names.TUNE, status=None,
                              tags={names.TAG_STUDY: study.key, names.TAG_TUNE_ROLE: names.TUNE_ROLE_TRIAL})
    assert len(children) == 3 and {c.tags["mlflow.parentRunId"] for c in children} == {parent.run_id}
    assert all(names.TEST_ERROR not in c.metrics for c in children)
    for child in children:   # a trial ASHA stopped is ended with the reason, never left RUNNING
        assert child.status == "FINISHED" or "stopped early by ASHA" in child.tags[names.TAG_FAILURE], child
    assert len(tracking.query(experiment, stage=names.PRETRAIN)) == 1   # trained once when missing, then reused
    assert {parent.tags[k] for k in (names.TAG_SOURCE, names.TAG_TARGET, names.TAG_ARCH, names.TAG_SIZE)} == \
        {"glyph_letters", "mnist5k", "mlp_mixer", "500"}
    assert parent.metrics[names.BEST_VAL_ERROR] <= parent.metrics[names.DEFAULT_VAL_ERROR] < 0.8   # chance is 0.9

    folder = Path(tracking.download_artifact(parent.run_id, "")).resolve()
    config = json.loads((folder / names.BEST_CONFIG_FILE).read_text())
    target = data.load("mnist5k")   # test error: the best trial's own model on the test split, after the search
    best_model, _ = tracking.load_model(config["best"]["mlflow_run_id"])
    assert math.isclose(parent.metrics[names.BEST_TEST_ERROR], loop.error(best_model, target.test.images, target.test.labels))
    assert {p.name for p in folder.iterdir()} >= {names.BEST_CONFIG_FILE, names.STUDY_FIGURE, names.TRIALS_FILE,
                                                  *names.IMPORTANCE_FILES}
    assert config["trials"] == 3 and config["default"]["trial"] == 0
    assert config["default"]["params"] == tuning.default_params(study)
    best_number = config["best"]["trial"]
    assert config["best"]["params"] == second[best_number][0] and config["best"]["val_error"] == second[best_number][1]
    assert config["best"]["val_error"] == parent.metrics[names.BEST_VAL_ERROR]
    # The best is the lowest among trials that ran every epoch, which are those whose MLflow run finished.
    finished = {c.key for c in children if c.status == "FINISHED"}
    full_length = {n for n, (params, _, _) in second.items() if tuning.trial_key(study, params) in finished}
    assert 0 in full_length and config["best"]["val_error"] == min(second[n][1] for n in full_length)
    with open(folder / names.TRIALS_FILE) as handle:
        assert {int(row["number"]) for row in csv.DictReader(handle) if row["ran_every_epoch"] == "True"} == full_length
    assert {parent.tags[names.TAG_BEST_PREFIX + k] for k in ("lr", "batch_size")} == \
        {str(config["best"]["cell"][f"train.{k}"]) for k in ("lr", "batch_size")}
    assert set(config["importance"]) == set(tuning.SEARCHED) and math.isclose(sum(config["importance"].values()), 1.0)
    with open(folder / names.IMPORTANCE_FILES[0]) as handle:
        assert {row["param"] for row in csv.DictReader(handle)} == set(tuning.SEARCHED)
    assert all((folder / name).read_bytes()[:4] == b"\x89PNG" for name in (names.IMPORTANCE_FILES[2], names.STUDY_FIGURE))


def record_study(experiment: str, study: tuning.StudySpec, best: dict[str, Any], best_val: float,
                 out: Path) -> None:
    """A study's parent run as `run_study` records it, from a two-trial in-memory study (default, best): no training."""
    space, default = tuning.search_space(study), tuning.default_params(study)
    ot_study = optuna.create_study()
    evaluated = []
    for number, (params, val) in enumerate(((default, 0.5), ({**default, **best}, best_val))):
        ot_study.add_trial(create_trial(params=params, distributions=space, value=val, intermediate_values={2: val}))
        evaluated.append(tuning.Evaluated(number, params, val, 0.5, run_id=""))
    outcome = tuning.StudyOutcome(name=study.name, storage="memory", trials=2, ran=2, stopped_early=0,
                                  best=evaluated[1], default=evaluated[0], importance={}, parent_run_id="",
                                  out_dir=out / study.name)
    with tuning.study_run(study, experiment, "memory") as run:
        tuning.record(run, study, ot_study, outcome)


@pytest.mark.slow
def test_the_grid_gets_the_best_configuration_per_arch_and_size(smoke_study: dict[str, Any], tmp_path: Path) -> None:
    experiment = smoke_study["experiment"]   # holds the smoke study: glyph_letters → mnist5k, mlp_mixer, n=500
    record_study(experiment, study_of("mlp_mixer", size=500, source="uci_digits"), {"lr": 2e-2}, 0.99, tmp_path)
    record_study(experiment, study_of("mlp_mixer", size=200), {"lr": 2e-2}, 0.30, tmp_path)
    record_study(experiment, study_of("mlp_mixer", size=200, source="uci_digits"), {"lr": 5e-3}, 0.20, tmp_path)
    record_study(experiment, study_of("mlp_mixer", size=200, target="uci_digits"), {"lr": 1e-4}, 0.01, tmp_path)
    record_study(experiment, study_of("lenet5", size=200), {"lr": 7e-3, "batch_size": 64}, 0.25, tmp_path)
    grid = grids.make(name="g", sources=["glyph_letters", "uci_digits"], archs=["mlp_mixer", "lenet5"],
                      target="mnist5k", sizes=[200, 500], lrs=[1e-3], freeze=[0])

    found = tuned_settings.best_settings(grid, experiment)
    (smoke,) = tracking.query(experiment, stage=names.TUNE, tags={names.TAG_KEY: smoke_study["study"].key})
    assert set(found) == {("mlp_mixer", 200), ("mlp_mixer", 500), ("lenet5", 200)}
    # n=500: the smoke study beats the uci_digits study (0.99); n=200: uci_digits (0.20) beats glyph_letters (0.30),
    # and the 0.01 of a study on another target does not count.
    assert (found[("mlp_mixer", 500)].run_id, found[("mlp_mixer", 500)].source) == (smoke.run_id, "glyph_letters")
    assert found[("mlp_mixer", 500)].settings["lr"] == float(smoke.tags[names.TAG_BEST_PREFIX + "lr"])
    assert (found[("mlp_mixer", 200)].source, found[("mlp_mixer", 200)].settings["lr"]) == ("uci_digits", 5e-3)
    assert (found[("lenet5", 200)].settings["lr"], found[("lenet5", 200)].settings["batch_size"]) == (7e-3, 64)
    assert all(set(f.settings) == set(tuned_settings.GRID_SETTINGS) for f in found.values())

    lines = tuned_settings.choice_lines(grid, found, experiment)   # what `full_grid.py --tuned` prints, in grid order
    assert len(lines) == 4
    assert lines[0].startswith("mlp_mixer n=200: tuned lr=0.005 ") and "uci_digits→mnist5k" in lines[0]
    assert lines[1].startswith("mlp_mixer n=500: tuned lr=") and "glyph_letters→mnist5k" in lines[1]
    assert lines[2].startswith("lenet5 n=200: tuned lr=0.007 ") and "batch_size=64" in lines[2]
    assert lines[3].startswith("lenet5 n=500: no finished tune study") and "0.001" in lines[3]


@pytest.mark.slow
def test_apply_best_puts_the_tuned_settings_into_the_grid_cells(smoke_study: dict[str, Any]) -> None:
    grid = grids.make(name="g", sources=["glyph_letters"], archs=["mlp_mixer"], target="mnist5k", sizes=[500, 1000],
                      lrs=[1e-3], freeze=[0])
    lines: list[str] = []
    tuned = tuned_settings.apply_best(grid, echo=lines.append, experiment=smoke_study["experiment"])
    settings = tuned_settings.best_settings(grid, smoke_study["experiment"])[("mlp_mixer", 500)].settings
    assert tuned.tuned == {"mlp_mixer/500": settings} and len(lines) == 2
    by_size = {c.train.size: c.train for c in grids.cells(tuned).finetune}
    assert {k: getattr(by_size[500], k) for k in tuned_settings.GRID_SETTINGS} == settings and by_size[1000].lr == 1e-3


def test_default_storage_lives_in_the_runs_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(server.RUNS_ENV, str(tmp_path))
    assert tuning.default_storage() == f"sqlite:///{tmp_path / tuning.STUDY_DB}"
    assert tuning._shown("postgresql://me:secret@db/optuna") == "postgresql://me:***@db/optuna"  # never logged


@pytest.mark.slow
def test_tune_is_as_quiet_as_the_grid(tmp_path: Path) -> None:
    """`xfer tune` as a new user runs it, in a fresh process with its own Ray and MLflow server: a line per trial
    event on the terminal; Tune's boxed trial table, Ray's banner and the workers' "Checkpoint successfully created"
    lines only in the log file it names. The smallest study (the smoke's, one trial)."""
    import os
    import subprocess
    import sys

    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in (server.TRACKING_URI_ENV, "RAY_ADDRESS")}
    env[server.RUNS_ENV] = str(runs)
    try:
        done = subprocess.run([sys.executable, str(REPO / "sweeps" / "tune_finetune.py"), "--smoke", "--trials", "1",
                               "--experiment", "quiet"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.stop_server(runs)
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal[-3000:]
    assert "╭" not in terminal and "Checkpoint successfully created" not in terminal, terminal
    assert "Token authentication" not in terminal and "ray.tune" not in terminal   # Ray's banner, Tune's logger
    assert "trial 1/1 started: batch_size=32 freeze_depth=0" in done.stdout
    assert "trial 1/1 finished: val_error" in done.stdout and "== study" in done.stdout
    [log] = [Path(line.removeprefix("log: ")) for line in done.stdout.splitlines() if line.startswith("log: ")]
    text = log.read_text()
    # What the terminal left out is in the log: Optuna's and Tune's own messages.
    assert log.parent == runs / "logs" and "A new study created" in text and "A new study created" not in terminal
