"""Figures from the report tables, each saved as PNG and SVG.

Figures are built on `matplotlib.figure.Figure` rather than pyplot: no global figure registry and no
backend state, so building a report inside a long-lived process (the grid's last stage) leaks nothing.
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from reports.tables import TRANSFER, size_order, size_text
from reports.verdicts import CELL, scope_values
from xfer import names
from xfer.estimators import ESTIMATORS

SPLIT_PREFERENCE = ("test", "val", "train")   # the curve drawn is the first split the runs recorded
GROUP_COLORS = {TRANSFER: "tab:blue", names.SCRATCH: "tab:orange"}
OTHER_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:pink")   # further adder arms, by name
ANNOTATE_MAX_CELLS = 400                       # beyond this, numbers in heatmap cells are unreadable
HEATMAP_MAX_TARGETS = 12                       # more targets per attack setting: one heatmap per target arch x size
DPI = 100
# Constrained layout fits labels while drawing; bbox_inches="tight" would draw every figure twice per file.
LAYOUT = "constrained"


def save(fig: Figure, directory: Path, stem: str, svg: bool = True) -> list[Path]:
    """Write `fig` as `<stem>.png` and, with `svg`, `<stem>.svg` in `directory`. A heatmap is an image: its SVG
    would wrap the same pixels in XML (the seed grid has 60 of them, a minute of its report), so it has none."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.png"] + ([directory / f"{stem}.svg"] if svg else [])
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


def heatmap_splits(matrix: pd.DataFrame, groups: dict[str, tuple[str, int]]) -> list[tuple[str, list[str]]]:
    """The target columns of one attack setting's matrix, one heatmap's worth each, with a file-stem suffix.

    Up to HEATMAP_MAX_TARGETS targets make one heatmap; more are split by the target's (arch, size) from
    `groups` (target label -> (arch, size)), e.g. ``_resnet_mini_n1000``: the seed grid's 440 targets per
    setting become 20 heatmaps of 16-24 targets that a reader can take in.
    """
    columns = list(matrix.columns)
    if len(columns) <= HEATMAP_MAX_TARGETS:
        return [("", columns)]
    order = {size: i for i, size in enumerate(size_order(pd.Series([g[1] for g in groups.values()], dtype="Int64")))}
    split: dict[tuple[str, int], list[str]] = {}
    for column in columns:
        split.setdefault(groups.get(column, ("other", None)), []).append(column)
    keys = sorted(split, key=lambda k: (str(k[0]), order.get(k[1], len(order))))
    return [(f"_{arch}_n{size_text(size)}", split[(arch, size)]) for arch, size in keys]


def shorten(labels: list[str]) -> tuple[list[str], str]:
    """Labels without the parts every one of them shares, and those shared parts (for the title).

    ``kmnist>mnist/resnet_mini/n1000/f0`` and ``svhn>mnist/resnet_mini/n1000/f20`` read ``kmnist/f0`` and
    ``svhn/f20`` under "mnist/resnet_mini/n1000". A shared part is removed once per label, from the right,
    so a source named like the target (``mnist>mnist/...``) keeps its source.
    """
    tokens = [re.split(r"[>/]", label) for label in labels]
    common = Counter(tokens[0])
    for parts in tokens[1:]:
        common &= Counter(parts)
    if len(labels) < 2 or not common:
        return labels, ""
    short = []
    for parts in tokens:
        left = list(parts)
        for token, count in common.items():
            for _ in range(count):
                del left[len(left) - 1 - left[::-1].index(token)]
        short.append("/".join(left) or "(all shared)")
    shared = [t for t in tokens[0] if t in common]
    return short, "/".join(dict.fromkeys(shared))


def transfer_heatmap(matrix: pd.DataFrame, same_source: pd.DataFrame, title: str) -> Figure:
    """Adversarial accuracy of each target (columns) under each surrogate's examples (rows).

    Same-source cells are outlined: the seed's claim is that those cells are darker (lower accuracy). Parts of
    the labels that every target (or surrogate) shares go to the title, so the axes carry only what differs;
    the figure grows with the number of rows and columns, so cells and labels keep a readable size.
    """
    values = matrix.to_numpy(dtype=float)
    rows, cols = values.shape
    targets, target_common = shorten([str(c) for c in matrix.columns])
    surrogates, surrogate_common = shorten([str(i) for i in matrix.index])
    longest = max(len(t) for t in targets)
    fig = Figure(figsize=(3.5 + max(0.1 * max(len(s) for s in surrogates), 1.0) + 0.5 * max(cols, 4),
                          2.5 + 0.07 * longest + 0.4 * max(rows, 2)), layout=LAYOUT)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, label="adversarial accuracy", fraction=0.05, pad=0.02)
    ax.set_xticks(range(cols), targets, rotation=45 if longest > 6 else 0, ha="right" if longest > 6 else "center",
                  rotation_mode="anchor", fontsize="small")
    ax.set_yticks(range(rows), surrogates, fontsize="small")
    ax.set_xlabel(f"target (fine-tuned or scratch model){f': {target_common}/…' if target_common else ''}")
    ax.set_ylabel(f"surrogate{f': {surrogate_common}' if surrogate_common else ''}")
    for i, j in zip(*np.nonzero(same_source.reindex_like(matrix).eq(True).to_numpy())):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    if rows * cols <= ANNOTATE_MAX_CELLS:
        for i, j in zip(*np.nonzero(~np.isnan(values))):   # dark text on the light end of viridis
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize="x-small",
                    color="black" if values[i, j] > 0.6 else "white")
    head = f"{title}: adversarial accuracy" + (f" of {target_common} targets" if target_common else "")
    ax.set_title(wrap(head, 60) + "\nred outline: surrogate and target share a source", fontsize="medium")
    return fig


VERDICT_COLORS = {"supported": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:gray",
                  "insufficient seeds": "silver"}
LABEL_WIDTH = 48       # characters per line of a forest plot's row label: long scopes wrap instead of crowding the axes
FOREST_MAX_ROWS = 24   # a claim with more rows keeps its cells out of the forest plot, in a grid of its own (claim_cells)
DECIDED = ("supported", "contradicted")


def cells_apart(rows: pd.DataFrame) -> bool:
    """Whether a claim's cell rows are drawn as their own grid (`claim_cells`) rather than in its forest plot."""
    drawn = rows[rows["n_seeds"] > 0]
    return len(drawn) > FOREST_MAX_ROWS and (drawn["level"] == CELL).any()


def claim_forest(rows: pd.DataFrame) -> Figure:
    """One claim's verdict rows as a forest plot: per-seed differences (dots), effect and 95% t interval (bar), in pp.

    The headline is the top row (bold); the narrower scopes follow in table order. Colour says the verdict.
    When the rows would not fit at a glance (`cells_apart`), the cells are left to `claim_cells`.
    """
    if cells_apart(rows):
        rows = rows[rows["level"] != CELL]
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
    ax.tick_params(axis="x", labeltop=len(rows) > 8)   # a tall plot keeps its scale in view at the top too
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


def claim_cells(rows: pd.DataFrame) -> Figure:
    """A claim's cell rows as a grid of effects (pp): one panel per size, the cell's arch (or last key) across,
    its other varying keys down; * marks an interval clear of 0, a blank cell fewer than 3 seeds."""
    cells = rows[rows["level"] == CELL].reset_index(drop=True)
    keys = pd.DataFrame([scope_values(scope) for scope in cells["scope"]]).fillna("")
    panel = "size" if "size" in keys else None
    across = "arch" if "arch" in keys and keys["arch"].nunique() > 1 else [k for k in keys if k != panel][-1]
    down = [k for k in keys if k not in (panel, across) and keys[k].nunique() > 1]
    frame = keys.assign(effect=100 * cells["effect"].astype(float), decided=cells["verdict"].isin(DECIDED),
                        down=keys[down].agg(" ".join, axis=1) if down else "")
    panels = sorted(set(frame[panel]), key=lambda s: (s == "all", int(s) if s.isdigit() else 0)) if panel else [None]
    columns, lines = sorted(set(frame[across])), sorted(set(frame["down"]))
    limit = float(np.nanmax(np.abs(frame["effect"]))) if frame["effect"].notna().any() else 1.0
    width = 2.5 + 0.1 * max(len(line) for line in lines) + len(panels) * (0.4 + 0.65 * len(columns))
    fig = Figure(figsize=(min(width, 40), 2.6 + 0.32 * len(lines)), layout=LAYOUT)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, value in zip(axes, panels):
        part = frame if value is None else frame[frame[panel] == value]
        grid = part.pivot_table(index="down", columns=across, values="effect", aggfunc="first", dropna=False)
        grid = grid.reindex(index=lines, columns=columns)
        image = ax.imshow(grid.to_numpy(dtype=float), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        for cell in part.itertuples():
            if pd.notna(cell.effect):
                ax.text(columns.index(getattr(cell, across)), lines.index(cell.down),
                        f"{cell.effect:+.1f}{'*' if cell.decided else ''}", ha="center", va="center", fontsize="x-small",
                        color="white" if abs(cell.effect) > 0.6 * limit else "black")   # light text on the dark ends
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", rotation_mode="anchor", fontsize="small")
        ax.set_yticks(range(len(lines)), lines, fontsize="small")
        ax.set_title(f"{panel}={value}" if panel else "", fontsize="small")
    fig.colorbar(image, ax=list(axes), label="effect (pp), > 0 favours the claim", fraction=0.03, pad=0.01)
    head = rows.iloc[0]
    fig.suptitle(wrap(f"claim {head['claim_id']} (seed {head['seed_doc']}) per cell: {head['text']}", 100)
                 + f"\n{' x '.join(down) + ' down, ' if down else ''}{across} across; * 95% t interval clear of 0; "
                   "blank: fewer than 3 seeds", fontsize="medium")
    return fig


def wrap(text: str, width: int) -> str:
    """`text` broken at spaces into lines of at most `width` characters (a longer word keeps its own line)."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) or text


SETTING_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LEGEND_MAX_SETTINGS = 12   # more settings than this: the legend would hide the points, so the title counts them


def transferability_scatter(rows: pd.DataFrame) -> Figure:
    """One target × arch's `transferability` rows: a panel per estimator, its score (x) against the measured
    fine-tuned test error (y), both means over seeds, one marker series per fine-tune setting.

    A source's score does not depend on the setting, so each source's points stand in one column and the source is
    named once, above its column. A good estimator's points fall from left to right (higher score, lower error);
    the panel title gives its τ, the mean over settings.
    """
    target, arch = rows["target"].iloc[0], rows["arch"].iloc[0]
    estimators = [name for name in ESTIMATORS if name in set(rows["estimator"])]
    order = {size: i for i, size in enumerate(size_order(rows["size"]))}
    settings = list(dict.fromkeys(rows.assign(at=rows["size"].map(order)).sort_values(
        ["at", "freeze_depth", "setting"], kind="stable")["setting"]))
    styles = {setting: (f"C{i % 10}", SETTING_MARKERS[(i // 10) % len(SETTING_MARKERS)]) for i, setting in
              enumerate(settings)}
    fig = Figure(figsize=(4.2 * len(estimators), 4.6), layout=LAYOUT)
    axes = fig.subplots(1, len(estimators), sharey=True, squeeze=False)[0]
    for ax, estimator in zip(axes, estimators):
        part = rows[rows["estimator"] == estimator]
        columns: dict[str, list[tuple[float, float]]] = {}
        for row in part.itertuples():
            color, marker = styles[row.setting]
            ax.scatter(row.source_scores, row.source_errors, color=color, marker=marker, s=22, alpha=0.8,
                       label=row.setting)
            for source, x, y in zip(row.sources, row.source_scores, row.source_errors):
                columns.setdefault(source, []).append((x, y))
        for source, points in columns.items():
            xs, ys = zip(*points)
            ax.annotate(source, (float(np.mean(xs)), max(ys)), xytext=(0, 5), textcoords="offset points",
                        ha="center", fontsize="x-small")
        tau, with_tau = part["tau"].mean(), part["tau"].notna().sum()
        ax.set_title(f"{estimator}: " + (f"τ = {tau:+.2f} (mean of {with_tau} setting(s))" if with_tau else
                                         "no τ (a side ties every source)"), fontsize="medium")
        ax.set_xlabel(f"{estimator} score (mean over seeds)")
        ax.margins(y=0.12)   # room for the source names above the highest points
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fine-tuned test error (mean over seeds)")
    if len(settings) <= LEGEND_MAX_SETTINGS:   # else the legend would cover the points
        axes[-1].legend(fontsize="x-small", title="setting", title_fontsize="x-small")
    crowded = len(settings) > LEGEND_MAX_SETTINGS
    fig.suptitle(f"{target} / {arch}: transferability estimate against measured test error, per source"
                 + (f" ({len(settings)} settings, one colour and marker each)" if crowded else ""))
    return fig
