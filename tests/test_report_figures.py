"""Report figures stay readable: every label inside the canvas, crowded heatmaps split, shared label parts in the title.

No MLflow: the figures are drawn from constructed report tables, as reports.build draws them.
"""

from __future__ import annotations

from itertools import product

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from reports import figures, tables
from reports.schema import SCHEMAS
from reports.verdicts import CELL, HEADLINE, SUMMARY, claim_finetune_vs_scratch, scope_text, scope_values
from xfer import names

SOURCES = ("glyph_letters", "uci_digits", "emnist_letters")


def _transfer(archs: tuple[str, ...], sizes: tuple[int, ...], freezes: tuple[int, ...]) -> pd.DataFrame:
    """Attack evaluations of every pretrained surrogate on every fine-tuned target, as tables.transfer_frame gives them."""
    rng = np.random.default_rng(0)
    rows = []
    for (s_source, s_arch), (t_source, t_arch, size, freeze) in product(product(SOURCES, archs),
                                                                           product(SOURCES, archs, sizes, freezes)):
        rows.append(dict(surrogate_label=f"{s_source}/{s_arch}", surrogate_run_id=f"{s_source}/{s_arch}",
                         target_label=f"{t_source}>mnist5k/{t_arch}/n{tables.size_text(size)}/f{freeze}",
                         target_run_id=f"{t_source}-{t_arch}-{size}-{freeze}", target_arch=t_arch, target_size=size,
                         surrogate_stage=names.PRETRAIN, attack="pgd", eps=0.3, adv_acc=rng.uniform(),
                         same_source=s_source == t_source))
    return pd.DataFrame(rows)


def _texts_inside(fig: Figure) -> list[str]:
    """Draw `fig` and name what sticks out of its canvas (a label cut off in the PNG): each axes with its drawn
    tick labels, axis labels and title (a colour bar is an axes too), and the figure's own texts."""
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    parts = [(f"axes {ax.get_title() or ax.get_ylabel() or i!r}", ax.get_tightbbox(renderer))
             for i, ax in enumerate(fig.axes)]
    parts += [(text.get_text(), text.get_window_extent(renderer)) for text in fig.texts if text.get_text().strip()]
    edge = fig.bbox
    return [name for name, box in parts
            if box.x0 < edge.x0 - 1 or box.y0 < edge.y0 - 1 or box.x1 > edge.x1 + 1 or box.y1 > edge.y1 + 1]


def test_a_crowded_matrix_is_split_per_target_arch_and_size_with_every_label_inside() -> None:
    transfer = _transfer(("resnet_mini", "lenet5"), (100, 0), (0, 20))
    [((attack, eps), (matrix, same))] = tables.matrices(transfer).items()
    assert matrix.shape == (6, 24)
    groups = {r.target_label: (r.target_arch, r.target_size) for r in transfer.itertuples()}
    splits = figures.heatmap_splits(matrix, groups)
    assert [suffix for suffix, _ in splits] == ["_lenet5_n100", "_lenet5_nall", "_resnet_mini_n100", "_resnet_mini_nall"]
    assert all(len(columns) == 6 for _, columns in splits)
    suffix, columns = splits[-1]
    fig = figures.transfer_heatmap(matrix[columns], same[columns], "pgd, eps=0.3")
    assert _texts_inside(fig) == []
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["emnist_letters/f0", "emnist_letters/f20"]
    assert "mnist5k/resnet_mini/nall" in ax.get_title()
    assert fig.axes[1].get_ylabel() == "adversarial accuracy"   # the colour bar's label, whole


def test_a_one_cell_matrix_keeps_its_colour_bar_label_whole() -> None:
    # The reported bug: one surrogate x one target made a figure shorter than the colour bar's label
    # ("adversarial accura" in the PNG); the heatmap now keeps room for two rows at least.
    transfer = _transfer(("resnet_mini",), (500,), (0,))
    one = transfer[(transfer["surrogate_label"] == "uci_digits/resnet_mini")
                   & (transfer["target_label"] == "uci_digits>mnist5k/resnet_mini/n500/f0")]
    [(matrix, same)] = tables.matrices(one).values()
    assert matrix.shape == (1, 1)
    assert _texts_inside(figures.transfer_heatmap(matrix, same, "pgd, eps=0.3")) == []


def test_a_small_matrix_is_one_heatmap() -> None:
    transfer = _transfer(("resnet_mini",), (500,), (0, 20))
    [(matrix, same)] = tables.matrices(transfer).values()
    assert figures.heatmap_splits(matrix, {}) == [("", list(matrix.columns))]
    assert _texts_inside(figures.transfer_heatmap(matrix, same, "fgsm, eps=0.1")) == []


def test_shorten_moves_shared_parts_to_the_title_and_keeps_a_source_named_like_the_target() -> None:
    short, shared = figures.shorten(["mnist>mnist/resnet_mini/n100/f0", "kmnist>mnist/resnet_mini/n100/f20"])
    assert short == ["mnist/f0", "kmnist/f20"] and shared == "mnist/resnet_mini/n100"
    assert figures.shorten(["only/one"]) == (["only/one"], "")


def _claim_1_rows(sources: int) -> pd.DataFrame:
    rows = []
    for source, arch, size, seed in product([f"source{i}" for i in range(sources)], ("resnet_mini", "alexnet_mini"),
                                            (100, 1000, 0), range(3)):
        rows.append(dict(run_id=f"{source}{arch}{size}{seed}", pretrain_run_id="p", source=source, target="mnist5k",
                         arch=arch, size=size, freeze_depth=0, lr=1e-3, seed=seed, optimizer="adamw", head_lr_mult=1.0,
                         test_error=0.1 + 0.01 * seed, scratch_run_id="s", scratch_test_error=0.2 - 0.05 * (size > 0)))
    finetune = pd.DataFrame(rows).reindex(columns=[c.name for c in SCHEMAS["finetune"]])
    return pd.DataFrame(claim_finetune_vs_scratch(finetune, finetune.head(1)))


def test_a_claim_with_few_rows_is_one_forest_plot_with_every_label_inside() -> None:
    rows = _claim_1_rows(sources=1)
    assert list(rows["level"][:2]) == [HEADLINE, SUMMARY] and rows["level"].eq(CELL).sum() == 6
    assert not figures.cells_apart(rows)
    fig = figures.claim_forest(rows)
    assert len(fig.axes[0].get_yticklabels()) == len(rows) and _texts_inside(fig) == []


def test_a_claim_with_many_cells_draws_them_as_a_grid_beside_a_short_forest_plot() -> None:
    rows = _claim_1_rows(sources=8)   # 48 cells
    assert figures.cells_apart(rows)
    forest = figures.claim_forest(rows)
    assert len(forest.axes[0].get_yticklabels()) == (rows["level"] != CELL).sum() and _texts_inside(forest) == []
    grid = figures.claim_cells(rows)
    assert [ax.get_title() for ax in grid.axes[:3]] == ["size=100", "size=1000", "size=all"]
    assert _texts_inside(grid) == []
    assert {t.get_text() for t in grid.axes[0].texts} == {"+4.0*"}   # 0.15 - 0.11 in every cell, decided


@pytest.mark.parametrize("values", [("mnist5k", "kmnist", 0), ("mnist5k", "svhn", 500)])
def test_scope_values_reads_a_cell_scope_back(values: tuple) -> None:
    columns = ["target", "source", "size"]
    scope = scope_text(columns, values) + ", 2 archs pooled"
    assert scope_values(scope) == dict(zip(columns, [values[0], values[1], tables.size_text(values[2])]))


def test_the_other_figures_keep_every_label_inside_with_many_sources() -> None:
    finetune = pd.DataFrame([dict(source=source, arch=arch, size=size, freeze_depth=freeze, test_acc=0.9, seed=seed,
                                  scratch_run_id=f"s{arch}{size}{seed}", scratch_test_acc=0.8)
                             for source, arch, size, freeze, seed in product(
                                 ("emnist_balanced", "emnist_letters", "fashion_mnist", "glyph_letters", "uci_digits",
                                  "kmnist", "qmnist", "svhn"), ("resnet_mini", "mlp_mixer2"), (100, 1000, 0), (0, 20),
                                 range(2))])
    curves = pd.DataFrame([dict(run_id=f"{group}{seed}", step=step, seconds=step / 10, split="test", error=1 / (1 + step),
                                group=group) for group in (names.VARIANT_TRANSFER, "transfer_features", names.SCRATCH)
                           for seed in range(2) for step in (0, 10, 20)])
    for fig in (figures.accuracy_vs_size(finetune), figures.freeze_effect(finetune),
                figures.error_curves(curves, "adder, n=5000: transfer / transfer_features vs scratch")):
        assert _texts_inside(fig) == []
