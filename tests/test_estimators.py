"""Transferability estimators: hand-computed values, the bounds each one obeys, LogME against brute force, and one
forward pass of a real model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from xfer import estimators, models
from xfer.errors import XferError


# ---- LEEP and NCE ---------------------------------------------------------------------------------------

def test_leep_matches_a_hand_computed_case() -> None:
    probs = [[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]]
    labels = [0, 0, 1, 1]
    # Joint P(y, z) = (1/4) Σ_i θ_iz [y_i = y]:
    #   P(0,0) = (0.8 + 0.6)/4 = 0.35   P(0,1) = (0.2 + 0.4)/4 = 0.15
    #   P(1,0) = (0.3 + 0.1)/4 = 0.10   P(1,1) = (0.7 + 0.9)/4 = 0.40
    # P(z=0) = 0.45, P(z=1) = 0.55, so P(0|0) = 7/9, P(1|0) = 2/9, P(0|1) = 3/11, P(1|1) = 8/11.
    # Σ_z P(y_i|z) θ_iz per example:
    #   i=1: 0.8·7/9 + 0.2·3/11 = 28/45 + 3/55 = 335/495 = 67/99
    #   i=2: 0.6·7/9 + 0.4·3/11 = 7/15 + 6/55 = 95/165 = 57/99
    #   i=3: 0.3·2/9 + 0.7·8/11 = 1/15 + 28/55 = 95/165 = 57/99
    #   i=4: 0.1·2/9 + 0.9·8/11 = 1/45 + 36/55 = 335/495 = 67/99
    # LEEP = (1/4)(2 log 67/99 + 2 log 57/99) = ½ log(67·57/99²) ≈ −0.47125
    expected = 0.5 * math.log(67 * 57 / 99**2)
    assert estimators.leep(probs, labels, 2) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(-0.47125, abs=1e-5)


def test_nce_uses_the_source_heads_hard_predictions() -> None:
    probs = [[0.8, 0.2], [0.6, 0.4], [0.6, 0.4], [0.1, 0.9]]   # argmax z = 0, 0, 0, 1
    labels = [0, 0, 1, 1]
    # Joint of (y, z): P(0,0) = 2/4, P(1,0) = 1/4, P(1,1) = 1/4; P(z=0) = 3/4, P(z=1) = 1/4.
    # NCE = ½ log(2/3) + ¼ log(1/3) + ¼ log(1) = ½ log 2 − ¾ log 3 ≈ −0.47742
    expected = 0.5 * math.log(2) - 0.75 * math.log(3)
    assert estimators.nce(probs, labels, 2) == pytest.approx(expected, rel=1e-12)


def test_a_source_that_determines_the_labels_scores_zero_and_random_ones_score_below() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 50)
    labels[:4] = np.arange(4)
    # source class z = (y + 1) mod 4 with certainty: a relabelling, which both estimators must see through
    perfect = np.eye(4)[(labels + 1) % 4]
    assert estimators.leep(perfect, labels, 4) == pytest.approx(0.0, abs=1e-12)
    assert estimators.nce(perfect, labels, 4) == pytest.approx(0.0, abs=1e-12)
    for _ in range(5):
        probs = rng.dirichlet(np.ones(6), size=50)
        assert estimators.leep(probs, labels, 4) < 0
        assert estimators.nce(probs, labels, 4) < 0


def test_nce_of_independent_labels_is_minus_the_label_entropy() -> None:
    # every source prediction z ∈ {0, 1} sees the target labels in the same proportions 1 : 2 : 3
    labels = np.array([0, 1, 1, 2, 2, 2] * 2)
    predicted = np.repeat([0, 1], 6)
    probs = np.where(np.eye(2)[predicted] == 1, 0.9, 0.1)
    p_y = np.array([1, 2, 3]) / 6
    assert estimators.nce(probs, labels, 3) == pytest.approx(float(np.sum(p_y * np.log(p_y))), rel=1e-12)


# ---- H-score ---------------------------------------------------------------------------------------------

def test_h_score_of_one_feature_is_between_class_over_total_variance() -> None:
    features = np.array([[0.0], [2.0], [4.0], [6.0], [8.0]])
    labels = [0, 0, 1, 1, 1]
    # Class means 1 and 6, overall mean 4.
    # Total variance   = (16 + 4 + 0 + 4 + 16)/5 = 8
    # Between-class    = (3 class-0 deviations² (1−4)² = 9, twice; (6−4)² = 4, thrice) = (9+9+4+4+4)/5 = 6
    # H = 6 / 8 = 0.75
    assert estimators.h_score(features, labels) == pytest.approx(0.75, rel=1e-12)


def test_h_score_ignores_shifts_invertible_maps_and_redundant_features() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 40)
    features = rng.normal(size=(40, 4)) + 2.0 * np.eye(4)[labels]   # class means differ in the first three axes
    base = estimators.h_score(features, labels)
    assert 0 < base < 2   # at most (classes − 1)
    assert estimators.h_score(features + 5.0, labels) == pytest.approx(base, rel=1e-9)
    mixing = rng.normal(size=(4, 4))
    assert estimators.h_score(features @ mixing, labels) == pytest.approx(base, rel=1e-9)
    # a duplicated direction makes cov(f) singular: the pseudo-inverse must give the same score
    redundant = np.column_stack([features, features[:, 0] - features[:, 1]])
    assert estimators.h_score(redundant, labels) == pytest.approx(base, rel=1e-9)
    assert estimators.h_score(np.full((40, 3), 0.1), labels) == 0.0


# ---- LogME -----------------------------------------------------------------------------------------------

def _log_evidence(features: np.ndarray, target: np.ndarray, log_alpha: float, log_beta: float) -> float:
    """The paper's L(α, β)/n, written literally with A = αI + βFᵀF (no SVD)."""
    alpha, beta = math.exp(log_alpha), math.exp(log_beta)
    n, dim = features.shape
    a = alpha * np.eye(dim) + beta * features.T @ features
    m = beta * np.linalg.solve(a, features.T @ target)
    residual = features @ m - target
    return (n / 2 * log_beta + dim / 2 * log_alpha - n / 2 * math.log(2 * math.pi) - beta / 2 * residual @ residual
            - alpha / 2 * m @ m - 0.5 * np.linalg.slogdet(a)[1]) / n


def _brute_force_logme(features: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(grid maximum, refined maximum) of the mean over classes of max L/n: a log-grid, then Nelder-Mead."""
    grid = np.linspace(-8.0, 10.0, 73)
    on_grid, refined = [], []
    for k in np.unique(labels):
        target = (labels == k).astype(np.float64)
        values = np.array([[_log_evidence(features, target, a, b) for b in grid] for a in grid])
        i, j = np.unravel_index(values.argmax(), values.shape)
        best = minimize(lambda p: -_log_evidence(features, target, *p), [grid[i], grid[j]], method="Nelder-Mead",
                        options={"xatol": 1e-9, "fatol": 1e-13, "maxiter": 2000})
        on_grid.append(values.max())
        refined.append(-best.fun)
    return float(np.mean(on_grid)), float(np.mean(refined))


# (8, 12): n < D, so the thin SVD's missing eigenvalues are zeros, and class 0's supremum lies at β → ∞ (an exact
# fit): Nelder-Mead walks out to log β ≈ 22, and the fixed point must reach the same flattened-out value.
@pytest.mark.parametrize("n, dim", [(30, 3), (8, 12)])
def test_logme_reaches_the_brute_force_maximum_of_the_evidence(n: int, dim: int) -> None:
    rng = np.random.default_rng(2)
    labels = np.arange(n) % 3
    features = rng.normal(size=(n, dim))
    features[:, :3] += 1.5 * np.eye(3)[labels]   # informative: an interior optimum (α ≈ e^3.5, β ≈ e^1.6 at n = 30)
    on_grid, refined = _brute_force_logme(features, labels)
    value = estimators.logme(features, labels)
    assert value >= on_grid - 1e-9
    assert value == pytest.approx(refined, abs=1e-6)


def test_logme_ranks_predictive_features_above_random_ones() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 200)
    predictive = np.eye(4)[labels] + 0.3 * rng.normal(size=(200, 4))
    predictive = np.column_stack([predictive, rng.normal(size=(200, 12))])
    random = rng.normal(size=(200, 16))
    assert estimators.logme(predictive, labels) > estimators.logme(random, labels) + 0.3


# ---- scores, checks, and the forward pass ------------------------------------------------------------------

def test_scores_returns_the_four_estimates_in_order() -> None:
    rng = np.random.default_rng(4)
    labels = np.arange(30) % 3
    features = rng.normal(size=(30, 5))
    probs = rng.dirichlet(np.ones(7), size=30)
    result = estimators.scores(features, probs, labels, 3)
    assert tuple(result) == estimators.ESTIMATORS == ("leep", "nce", "h_score", "logme")
    assert result["leep"] == estimators.leep(probs, labels, 3)
    assert result["logme"] == estimators.logme(features, labels)
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.values())


def test_bad_inputs_are_refused_with_the_remedy() -> None:
    rng = np.random.default_rng(5)
    features, probs = rng.normal(size=(10, 3)), rng.dirichlet(np.ones(4), size=10)
    labels = np.arange(10) % 2
    with pytest.raises(XferError, match=r"10 examples .* but 9 target labels; pass the model's outputs and the labels"):
        estimators.scores(features, probs, labels[:9], 2)
    with pytest.raises(XferError, match=r"only class 1; .* at least two target classes"):
        estimators.h_score(features, np.ones(10, dtype=int))
    with pytest.raises(XferError, match=r"outside 0..1 for n_target_classes=2"):
        estimators.leep(probs, labels + 1, 2)
    with pytest.raises(XferError, match=r"pass the softmax of the source head's logits, not the logits"):
        estimators.nce(np.log(probs), labels, 2)
    with pytest.raises(XferError, match=r"integer class indices"):
        estimators.logme(features, labels.astype(float))
    diverged = features.copy()
    diverged[0, 1] = np.nan
    with pytest.raises(XferError, match=r"NaN or infinite values in 1 of 10 rows"):
        estimators.logme(diverged, labels)


def test_features_and_probs_runs_the_body_and_source_head_once_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = models.build("resnet_mini", (1, 28, 28), 10).train()
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    features, probs = estimators.features_and_probs(model, images, batch_size=2)
    assert features.shape == (5, 64) and features.dtype == np.float64
    assert probs.shape == (5, 10) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    assert model.training and model.body[1].training   # every module's flag restored
    with torch.no_grad():   # the same as the model's own eval-mode output on [0, 1] pixels, whatever the batching
        expected = torch.softmax(model.eval()(images.float() / 255), 1).double().numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    with pytest.raises(XferError, match=r"takes N×1×28×28 images but these are 5×3×28×28"):
        estimators.features_and_probs(model, images.expand(5, 3, 28, 28))
