"""Figures from the report tables, each saved as PNG and SVG.

Figures are built on `matplotlib.figure.Figure` rather than pyplot: no global figure registry and no
backend state, so building a report inside a long-lived process (the grid's last stage) leaks nothing.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from reports.tables import TRANSFER, size_order, size_text
from xfer import names

SPLIT_PREFERENCE = ("test", "val", "train")   # the curve drawn is the first split the runs recorded
GROUP_COLORS = {TRANSFER: "tab:blue", names.SCRATCH: "tab:orange"}
OTHER_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:pink")   # further adder arms, by name
ANNOTATE_MAX_CELLS = 400                       # beyond this, numbers in heatmap cells are unreadable
DPI = 100
# Constrained layout fits labels while drawing; bbox_inches="tight" would draw every figure twice per file.
LAYOUT = "constrained"


def save(fig: Figure, directory: Path, stem: str) -> list[Path]:
    """Write `fig` as `<stem>.png` and `<stem>.svg` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.png", directory / f"{stem}.svg"]
    for path in paths:
        fig.savefig(path, dpi=DPI)
    return paths


def error_curves(curves: pd.DataFrame, title: str) -> Figure:
    """Transfer vs scratch error on one figure: against optimizer steps (left) and wall-clock seconds (right).

    `curves` is the long curve table plus a `group` column ("transfer" | "scratch"); one thin line per run.
    """
    split = next(s for s in SPLIT_PREFERENCE if (curves["split"] == s).any())
    fig = Figure(figsize=(11, 4), layout=LAYOUT)
    axes = fig.subplots(1, 2, sharey=True)
    colors = group_colors(curves["group"])
    for (group, _run), run in curves[curves["split"] == split].groupby(["group", "run_id"], sort=True):
        run = run.sort_values("step")
        for ax, x in zip(axes, ("step", "seconds")):
            ax.plot(run[x], run["error"], color=colors[group], alpha=0.6, lw=1)
    for g, c in colors.items():
        axes[0].plot([], [], color=c, label=g)  # one legend entry per side, not one per run
    for ax, xlabel in zip(axes, ("iterations (optimizer steps)", "wall-clock seconds")):
        _finish(ax, "", xlabel)
    axes[0].set_ylabel(f"{split} error")
    fig.suptitle(title)
    return fig


def group_colors(groups: pd.Series) -> dict[str, str]:
    """Transfer blue, scratch orange (as in every curve figure), further arms the next colours by name."""
    others = sorted(set(groups) - set(GROUP_COLORS))
    colors = {g: c for g, c in GROUP_COLORS.items() if g in set(groups)}
    return colors | {g: OTHER_COLORS[i % len(OTHER_COLORS)] for i, g in enumerate(others)}


def accuracy_vs_size(finetune: pd.DataFrame) -> Figure:
    """Test accuracy against fine-tune size: one panel per arch, one line per source, scratch dashed.

    Points are means over seeds, freeze depths and learning rates; bars are one standard deviation.
    Sizes are evenly spaced categories, since the whole pool (size 0, "all") has no place on a log axis.
    """
    order = size_order(finetune["size"])
    position = {size: i for i, size in enumerate(order)}
    fig, axes = _arch_panels(finetune)
    for ax, (arch, rows) in zip(axes, finetune.groupby("arch", sort=True)):
        for source, by_source in rows.groupby("source", sort=True):
            _mean_sd_line(ax, by_source, "size", "test_acc", position, label=source)
        scratch = rows.dropna(subset=["scratch_run_id"]).drop_duplicates("scratch_run_id")
        if len(scratch):
            _mean_sd_line(ax, scratch, "size", "scratch_test_acc", position, label="scratch", color="black", ls="--")
        ax.set_xticks(range(len(order)), [size_text(s) for s in order])
        _finish(ax, arch, "fine-tune size (examples)")
    return fig


def freeze_effect(finetune: pd.DataFrame) -> Figure:
    """Test accuracy against freeze depth: one panel per arch, one line per fine-tune size (mean over the rest)."""
    fig, axes = _arch_panels(finetune)
    for ax, (arch, rows) in zip(axes, finetune.groupby("arch", sort=True)):
        for size in size_order(rows["size"]):
            _mean_sd_line(ax, rows[rows["size"] == size], "freeze_depth", "test_acc", label=f"n={size_text(size)}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _finish(ax, arch, "freeze depth (leading layers frozen)")
    return fig


def _arch_panels(finetune: pd.DataFrame) -> tuple[Figure, list[Axes]]:
    archs = finetune["arch"].nunique()
    fig = Figure(figsize=(5 * archs, 4), layout=LAYOUT)
    axes = list(fig.subplots(1, archs, sharey=True, squeeze=False)[0])
    axes[0].set_ylabel("test accuracy")
    return fig, axes


def _mean_sd_line(ax: Axes, rows: pd.DataFrame, x: str, y: str, position: dict[int, int] | None = None,
                  **style: Any) -> None:
    """Mean of `y` per `x` with one-sd bars; `position` maps x values to axis positions (categorical axes)."""
    stats = rows.groupby(x)[y].agg(["mean", "std"])
    xs = [position[v] for v in stats.index] if position else stats.index
    ax.errorbar(xs, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, **style)


def _finish(ax: Axes, title: str, xlabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def transfer_heatmap(matrix: pd.DataFrame, same_source: pd.DataFrame, title: str) -> Figure:
    """Adversarial accuracy of each target (columns) under each surrogate's examples (rows).

    Same-source cells are outlined: the seed's claim is that those cells are darker (lower accuracy).
    """
    values = matrix.to_numpy(dtype=float)
    rows, cols = values.shape
    fig = Figure(figsize=(min(7 + 0.6 * cols, 30), min(3 + 0.45 * rows, 30)), layout=LAYOUT)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, label="adversarial accuracy")
    ax.set_xticks(range(cols), matrix.columns, rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(rows), matrix.index, fontsize="small")
    ax.set_xlabel("target")
    ax.set_ylabel("surrogate")
    for i, j in zip(*np.nonzero(same_source.reindex_like(matrix).eq(True).to_numpy())):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    if rows * cols <= ANNOTATE_MAX_CELLS:
        for i, j in zip(*np.nonzero(~np.isnan(values))):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize="x-small", color="white")
    ax.set_title(f"{title}\nred outline: surrogate and target share a source", fontsize="medium")
    return fig


VERDICT_COLORS = {"supported": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:gray",
                  "insufficient seeds": "silver"}
LABEL_WIDTH = 48   # characters per line of a forest plot's row label: long scopes wrap instead of crowding the axes


def claim_forest(rows: pd.DataFrame) -> Figure:
    """One claim's verdict rows as a forest plot: per-seed differences (dots), effect and 95% t interval (bar), in pp.

    The headline is the top row (bold); the narrower scopes follow in table order. Colour says the verdict.
    """
    rows = rows[rows["n_seeds"] > 0].reset_index(drop=True)
    head = rows.iloc[0]
    labels = [wrap(("headline: " if headline else "") + (scope or "(all)"), LABEL_WIDTH)
              for scope, headline in zip(rows["scope"], rows["headline"])]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig = Figure(figsize=(10, 1.9 + 0.22 * lines + 0.12 * len(rows)), layout=LAYOUT)
    ax = fig.subplots()
    for y, row in rows.iterrows():
        color = VERDICT_COLORS.get(row["verdict"], "black")
        ax.scatter(100 * np.asarray(row["seed_effects"], dtype=float), np.full(len(row["seed_effects"]), y),
                   s=14, color=color, alpha=0.5, zorder=2)
        if pd.notna(row["effect"]):
            ax.errorbar(100 * row["effect"], y, xerr=[[100 * (row["effect"] - row["ci_low"])],
                                                      [100 * (row["ci_high"] - row["effect"])]],
                        fmt="D", color=color, capsize=4, lw=2, ms=6, zorder=3)
    ax.axvline(0, color="black", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)), labels, fontsize="small")
    ax.get_yticklabels()[0].set_fontweight("bold")
    ax.set_ylim(len(rows) - 0.5, -0.5)   # headline on top
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(wrap(f"effect (pp): {head['measure']}", 110), fontsize="small")
    for verdict, color in VERDICT_COLORS.items():
        if verdict in set(rows["verdict"]):
            ax.plot([], [], "D", color=color, label=verdict)
    ax.legend(fontsize="x-small", loc="best")
    ax.set_title(wrap(f"claim {head['claim_id']} (seed {head['seed_doc']}): {head['text']} — {head['verdict']}", 90)
                 + "\ndots: each seed's mean difference; bar: mean and 95% t interval", fontsize="medium")
    return fig


def wrap(text: str, width: int) -> str:
    """`text` broken at spaces into lines of at most `width` characters (a longer word keeps its own line)."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) or text
