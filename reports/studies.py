"""A tuning study's files beside its best configuration: parameter importances (CSV, Markdown, figure), the study
figure and the trials table, written to runs/studies/<study name>/ and logged by `xfer.tuning.record`."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.trial import TrialState

from xfer import names
from xfer.tuning import IMPORTANCE_RUNG, StudyOutcome


def write(out: Path, ot_study: optuna.Study, outcome: StudyOutcome) -> None:
    """The importance files, the study figure and the trials table (each trial marked if it ran every epoch)."""
    _write_importance(out, outcome.importance)
    _save(study_figure(ot_study, outcome), out / names.STUDY_FIGURE)
    trials = ot_study.trials_dataframe()
    trials["ran_every_epoch"] = trials["number"].isin(outcome.full_length)
    trials.to_csv(out / names.TRIALS_FILE, index=False)


def _write_importance(out: Path, importance: Mapping[str, float]) -> None:
    table, markdown, figure = names.IMPORTANCE_FILES
    with open(out / table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["param", "importance"])
        writer.writerows((k, f"{v:.6f}") for k, v in importance.items())
    rows = [f"| {k} | {v:.3f} |" for k, v in importance.items()] or ["| (too few completed trials) | |"]
    (out / markdown).write_text(f"Optuna fANOVA importance for validation error after epoch {IMPORTANCE_RUNG}\n\n"
                                "| parameter | importance |\n|---|---|\n" + "\n".join(rows) + "\n")
    _save(importance_figure(importance), out / figure)


def importance_figure(importance: Mapping[str, float]) -> Figure:
    """Horizontal bars, most important on top."""
    fig = Figure(figsize=(7, 0.45 * max(len(importance), 2) + 1), layout="constrained")  # room for the names
    ax = fig.subplots()
    ordered = sorted(importance.items(), key=lambda kv: kv[1])
    ax.barh([k for k, _ in ordered], [v for _, v in ordered], color="tab:blue")
    ax.set_xlabel(f"importance for validation error after epoch {IMPORTANCE_RUNG} (Optuna fANOVA, sums to 1)")
    ax.set_title("hyperparameter importance" if importance else "hyperparameter importance: too few trials")
    return fig


def study_figure(ot_study: optuna.Study, outcome: StudyOutcome) -> Figure:
    """Left: each trial's validation error (full-length, or when ASHA stopped it) and the running best of the
    full-length trials. Right: default vs best, validation and test."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    history, bars = fig.subplots(1, 2)
    done = [t for t in ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    full = [t for t in done if t.number in outcome.full_length]
    stopped = [t for t in done if t.number not in outcome.full_length]
    history.scatter([t.number for t in full], [t.value for t in full], s=18, color="tab:blue", label="ran every epoch")
    history.scatter([t.number for t in stopped], [t.value for t in stopped], s=18, facecolors="none",
                    edgecolors="tab:gray", label="stopped early (error then)")
    running = [min(t.value for t in full[:i + 1]) for i in range(len(full))]
    history.step([t.number for t in full], running, where="post", color="tab:blue", label="best so far")
    if outcome.default:
        history.scatter([outcome.default.number], [outcome.default.val_error], marker="*", s=140, color="tab:orange",
                        label="default", zorder=3)
    history.set_xlabel("trial")
    history.set_ylabel("validation error")
    history.legend(fontsize="small")
    rows = [("default", outcome.default), ("best", outcome.best)] if outcome.default else [("best", outcome.best)]
    for offset, (split, colour) in enumerate(((names.VAL_ERROR, "tab:blue"), (names.TEST_ERROR, "tab:green"))):
        values = [getattr(e, split) for _, e in rows]
        positions = [i + (offset - 0.5) * 0.38 for i in range(len(rows))]
        bars.bar(positions, values, width=0.38, color=colour, label=split.replace("_", " "))
        for x, v in zip(positions, values):
            bars.annotate(f"{v:.3f}", (x, v), ha="center", va="bottom", fontsize=8)
    bars.set_xticks(range(len(rows)), [name for name, _ in rows])
    bars.set_ylabel("error")
    bars.legend()
    fig.suptitle(f"{outcome.name}: {outcome.trials} trials")
    return fig


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig).print_png(str(path))   # Agg explicitly: no pyplot, no display needed


__all__ = ["write", "importance_figure", "study_figure"]
