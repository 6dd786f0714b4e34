"""Verdict logic on constructed per-seed differences whose answer is known: no MLflow, no runs.

A wrong interval (too narrow, wrong quantile, pairs counted as seeds) turns noise into "supported"; each test
below plants an answer a wrong implementation would miss.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from reports.verdicts import INSUFFICIENT, METHOD, t_interval, verdict_rows

CLAIM = "finetune_beats_scratch"


def _pairs(per_seed: list[float], pairs_per_seed: int = 1) -> pd.DataFrame:
    """`pairs_per_seed` identical pairs per seed, seeds 0..n-1, one scope."""
    return pd.DataFrame({"seed": np.repeat(np.arange(len(per_seed)), pairs_per_seed),
                         "diff": np.repeat(per_seed, pairs_per_seed), "size": 100})


def _verdict(per_seed: list[float], pairs_per_seed: int = 1) -> dict:
    [row] = verdict_rows(_pairs(per_seed, pairs_per_seed), CLAIM, ["size"])
    return row


def test_t_interval_is_mean_plus_minus_t_times_standard_error() -> None:
    values = np.array([0.02, 0.05, 0.08])
    mean, low, high = t_interval(values)
    half = stats.t.ppf(0.975, 2) * values.std(ddof=1) / np.sqrt(3)   # t_{0.975, 2} = 4.303
    assert (mean, low, high) == pytest.approx((0.05, 0.05 - half, 0.05 + half))
    assert half == pytest.approx(4.303 * 0.03 / np.sqrt(3), rel=1e-3)


def test_a_clear_effect_is_supported() -> None:
    row = _verdict([0.10, 0.12, 0.09, 0.11, 0.10])
    assert row["verdict"] == "supported" and 0 < row["ci_low"] < row["effect"] < row["ci_high"]
    assert row["effect"] == pytest.approx(0.104)
    assert METHOD in row["line"] and "over 5 seeds" in row["line"]


def test_a_clear_opposite_effect_is_contradicted() -> None:
    row = _verdict([-0.10, -0.12, -0.09])
    assert row["verdict"] == "contradicted" and row["ci_high"] < 0


def test_noise_around_zero_is_inconclusive() -> None:
    row = _verdict([0.01, -0.02, 0.005, 0.02, -0.015])
    assert row["verdict"] == "inconclusive" and row["ci_low"] < 0 < row["ci_high"]


def test_an_effect_the_bootstrap_would_call_is_inconclusive_with_three_seeds() -> None:
    # Three seeds all favour the claim, but one barely: t_{0.975,2} = 4.3 standard errors reach below 0. The
    # percentile bootstrap of the same three values has its lower end at their smallest mean-of-resamples, > 0.
    values = [0.01, 0.06, 0.11]
    row = _verdict(values)
    assert row["verdict"] == "inconclusive" and row["ci_low"] < 0
    assert _bootstrap(np.array(values))[0] > 0


def test_three_seeds_give_a_wider_interval_than_the_percentile_bootstrap() -> None:
    for values in ([0.02, 0.05, 0.08], [0.1, 0.3, 0.2], [-0.05, 0.0, 0.4]):
        _, low, high = t_interval(np.array(values))
        boot_low, boot_high = _bootstrap(np.array(values))
        assert low < boot_low and high > boot_high, values
        assert (high - low) > 2 * (boot_high - boot_low)


def test_two_seeds_are_insufficient_however_many_pairs_each_holds() -> None:
    row = _verdict([0.5, 0.5], pairs_per_seed=20)   # 40 pairs, but two replicates
    assert row["verdict"] == INSUFFICIENT and row["n_seeds"] == 2
    assert np.isnan(row["effect"]) and np.isnan(row["ci_low"]) and np.isnan(row["ci_high"])
    assert "no effect estimated" in row["line"]


def test_pairs_are_averaged_within_a_seed_before_the_interval() -> None:
    # seed 0 holds two pairs (0.0 and 0.2): one replicate with mean 0.1, not two values
    pairs = pd.DataFrame({"seed": [0, 0, 1, 2], "diff": [0.0, 0.2, 0.1, 0.1], "size": 100})
    [row] = verdict_rows(pairs, CLAIM, ["size"])
    assert row["n_seeds"] == 3 and row["effect"] == pytest.approx(0.1)
    assert row["ci_low"] == pytest.approx(0.1) and row["ci_high"] == pytest.approx(0.1)


@pytest.mark.parametrize(("value", "verdict"), [(0.03, "supported"), (-0.03, "contradicted"), (0.0, "inconclusive")])
def test_identical_differences_give_a_zero_width_interval_decided_by_the_sign(value: float, verdict: str) -> None:
    row = _verdict([value] * 4)
    assert row["verdict"] == verdict
    assert row["ci_low"] == pytest.approx(value) and row["ci_high"] == pytest.approx(value)


def _bootstrap(values: np.ndarray, draws: int = 10_000) -> tuple[float, float]:
    """The percentile bootstrap the report used before (seeded): its 95% interval of the mean."""
    means = values[np.random.default_rng(0).integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)
