"""Verdict logic and the claims table on constructed tables whose answer is known: no MLflow, no runs.

A wrong interval (too narrow, wrong quantile, pairs counted as seeds) turns noise into "supported", and a wrong
pairing (another recipe, another checkpoint, another arch) moves an effect; each test below plants an answer a
wrong implementation would miss.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from reports.schema import SCHEMAS
from reports.tables import Tables, adder_frame, at_chance, chance_runs, recipe_of, recipe_text, transfer_frame
from reports.verdicts import (ADDER_CLAIM, BY_KEY, CLAIMS, DESCRIPTIVE, INSUFFICIENT, METHOD, NO_RUNS, NO_SPREAD,
                              all_verdicts, claim_adder, claim_finetune_vs_scratch, claim_freezing, claim_head_lr,
                              claim_lenet, claim_parent_examples, claim_unfreeze, claims_doc, claims_table, confirm,
                              holm, per_seed, seeds_for_power, t_interval, verdict_row)
from xfer import names

CLAIM = BY_KEY["finetune_beats_scratch"]
NOISE = (0.004, -0.006, 0.002, 0.005, -0.005)   # per-seed noise with a spread; the first 3 and all 5 sum to 0


def _pairs(per_seed: list[float], pairs_per_seed: int = 1) -> pd.DataFrame:
    """`pairs_per_seed` identical pairs per seed, seeds 0..n-1, one scope."""
    return pd.DataFrame({"seed": np.repeat(np.arange(len(per_seed)), pairs_per_seed),
                         "diff": np.repeat(per_seed, pairs_per_seed), "size": 100})


def _verdict(values: list[float], pairs_per_seed: int = 1) -> dict:
    return verdict_row(CLAIM, "size=100", per_seed(_pairs(values, pairs_per_seed), []))


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
    row = verdict_row(CLAIM, "size=100", per_seed(pairs, []))
    assert row["n_seeds"] == 3 and row["effect"] == pytest.approx(0.1) and row["seed_effects"] == pytest.approx([0.1] * 3)


@pytest.mark.parametrize("value", [0.03, -0.03, 0.0])
def test_identical_differences_have_no_spread_and_get_no_verdict(value: float) -> None:
    # Four seeds agreeing to the last digit is a fixed test set and a deterministic effect, not certainty: sd 0 gives
    # a zero-width interval, which would call any sign "decided".
    row = _verdict([value] * 4)
    assert row["verdict"] == NO_SPREAD and row["effect"] == pytest.approx(value)
    assert np.isnan(row["ci_low"]) and np.isnan(row["ci_high"]) and np.isnan(row["p_value"])
    assert "no spread to make an interval from" in row["why"] and "no interval" in row["line"]


def test_p_value_and_power_are_the_paired_t_tests() -> None:
    values = np.array([0.02, 0.05, 0.08, 0.03])
    row = _verdict(list(values))
    assert row["p_value"] == pytest.approx(stats.ttest_1samp(values, 0.0).pvalue)
    assert f"p = {row['p_value']:.2g}" in row["line"] and row["inference"] == DESCRIPTIVE
    # Power: d = 0.045 / 0.0265 = 1.7; a two-sided paired t at 0.05 reaches 80% at n = 5 (4: 0.67, 5: 0.83 by noncentral t).
    assert seeds_for_power(values) == 5
    assert seeds_for_power(np.array([0.01, -0.01, 0.02])) > 20   # a small effect in its noise needs many seeds
    assert np.isnan(seeds_for_power(np.array([0.1, 0.1, 0.1])))
    # A large effect (d = 6.8): 3 seeds give 99.9% power (2 give 54%). scipy's noncentral t returns nan for the far
    # lower tail here, which once read as "not enough" and gave 4.
    assert seeds_for_power(np.array([0.1, 0.12, 0.09])) == 3


def test_holm_adjusts_step_down_and_keeps_the_order() -> None:
    p = np.array([0.01, np.nan, 0.04, 0.03, 0.005])
    # sorted: 0.005 (x4), 0.01 (x3), 0.03 (x2), 0.04 (x1), each at least the one before
    assert holm(p) == pytest.approx([0.03, np.nan, 0.06, 0.06, 0.02], nan_ok=True)
    assert holm(np.array([np.nan])) == pytest.approx([np.nan], nan_ok=True)


def test_a_headline_decided_alone_is_inconclusive_after_holm_and_says_why() -> None:
    # Four headlines: claim 7 clearly contradicted, claim 5 clearly supported, claim 1 supported on its own at p ~ 0.03,
    # claim 6 noise. Holm multiplies claim 1's p by 2 (two headlines have larger p): ~0.07, no longer decided.
    def headline(key: str, values: list[float]) -> dict:
        return verdict_row(BY_KEY[key], "all", per_seed(_pairs(values), []), headline=True)

    strong = headline("lenet5_vs_resnet_mini", [-0.4, -0.41, -0.42])
    middle = headline("head10x_sgd_helps", [0.05, 0.06, 0.045, 0.07])
    weak = headline("finetune_beats_scratch", [0.015, 0.05, 0.03, 0.02])
    noise = headline("unfreeze_helps", [0.01, -0.02, 0.005, 0.02])
    sub = verdict_row(CLAIM, "size=500", per_seed(_pairs([0.015, 0.05, 0.03, 0.02]), []))
    assert weak["verdict"] == sub["verdict"] == "supported" and 0.025 < weak["p_value"] < 0.05
    rows = confirm([weak, sub, strong, middle, noise])
    assert rows == [weak, sub, strong, middle, noise]
    assert weak["p_holm"] == pytest.approx(2 * weak["p_value"]) and noise["p_holm"] == pytest.approx(noise["p_value"])
    assert strong["p_holm"] == pytest.approx(4 * strong["p_value"]) and middle["p_holm"] == pytest.approx(3 * middle["p_value"])
    assert weak["verdict"] == "inconclusive" and "Holm-adjusted p over 4 headlines is 0.0" in weak["why"]
    assert weak["line"].startswith("fine-tuning a pretrained model beats training from scratch when target data is "
                                   "scarce (all): inconclusive (its own interval excludes 0")
    assert strong["verdict"] == "contradicted" and middle["verdict"] == "supported" and noise["verdict"] == "inconclusive"
    assert weak["inference"] == "confirmatory: Holm over 4 headline(s)"
    # The sub-row keeps its own interval's verdict, as a descriptive row.
    assert sub["verdict"] == "supported" and sub["inference"].startswith(DESCRIPTIVE) and np.isnan(sub["p_holm"])
    # Claim 6's noise (d = 0.23) would need ~150 seeds to be told from 0: the headline says it is underpowered.
    assert np.isnan(noise["seeds_for_power"]) and "underpowered: over 100 seeds for 80% power" in noise["why"]
    assert "underpowered" not in (middle["why"] or "")


def test_a_pooled_headline_weighs_every_scope_equally_within_a_seed() -> None:
    # seed 0: source a has 3 pairs at 0.3, source b one at 0.1; pooled, seed 0 is (0.3 + 0.1) / 2, not 0.25
    pairs = pd.DataFrame({"seed": [0, 0, 0, 0], "source": ["a", "a", "a", "b"], "diff": [0.3, 0.3, 0.3, 0.1]})
    assert per_seed(pairs, ["source"]).loc[0, "diff"] == pytest.approx(0.2)


# ---- the claims table on constructed report tables ----------------------------------------------------

def _table(name: str, rows: list[dict]) -> pd.DataFrame:
    """A report table with its documented columns (absent ones null), as tables.collect returns it."""
    return pd.DataFrame(rows).reindex(columns=[c.name for c in SCHEMAS[name]])


def _finetune(seed: int, size: int, error: float, scratch: float | None = None, *, source: str = "kmnist",
              arch: str = "resnet_mini", freeze: int = 0, optimizer: str = "adamw", head: float = 1.0,
              unfreeze: int | None = None, body: bool = True, lr: float = 1e-3, checkpoint: str = "") -> dict:
    return dict(run_id=f"ft-{source}-{arch}-{size}-{freeze}-{optimizer}-{head}-{unfreeze}-{body}-{lr}-{seed}",
                pretrain_run_id=checkpoint or f"pre-{source}-{arch}-{seed}", source=source, target="mnist5k", arch=arch,
                size=size, freeze_depth=freeze, lr=lr, seed=seed, optimizer=optimizer, head_lr_mult=head, epochs=10,
                unfreeze_epoch=unfreeze, unfreeze_body=body, test_error=error,
                scratch_run_id=None if scratch is None else f"scratch-{arch}-{size}-{seed}", scratch_test_error=scratch)


def _headline(rows: list[dict]) -> dict:
    [headline] = [r for r in rows if r["headline"]]
    assert rows[0] is headline   # the headline comes first, the narrower scopes beneath it
    return headline


def _row(rows: list[dict], scope: str) -> dict:
    [row] = [r for r in rows if r["scope"] == scope]
    return row


def test_claim_1_fine_tuning_beats_scratch_at_the_smallest_size_and_the_gap_shrinks() -> None:
    rows = []
    for seed in range(3):
        rows.append(_finetune(seed, 100, 0.10 + NOISE[seed], scratch=0.30))      # +20 pp at n=100
        rows.append(_finetune(seed, 0, 0.05, scratch=0.06 + NOISE[seed]))        # +1 pp on the whole pool
        # neither a frozen body nor another recipe is "fine-tuning" in claim 1: if pooled, they would sink it
        rows.append(_finetune(seed, 100, 0.90, scratch=0.30, freeze=20))
        rows.append(_finetune(seed, 100, 0.90, scratch=0.30, optimizer="sgd", head=10.0))
    rows += [_finetune(seed, 50, 0.5, scratch=0.1) for seed in range(2)]         # smaller, but only 2 seeds
    result = claim_finetune_vs_scratch(_table("finetune", rows), _table("scratch", [{"run_id": "s"}]))
    headline = _headline(result)
    assert headline["scope"] == "size=100" and headline["verdict"] == "supported"
    assert headline["effect"] == pytest.approx(0.20) and headline["n_seeds"] == 3
    assert headline["treated_mean"] == pytest.approx(0.10) and headline["control_mean"] == pytest.approx(0.30)
    assert headline["figure"] == "figures/claim_1.png" and headline["seed_doc"] == "000"
    assert _row(result, "size=50")["verdict"] == INSUFFICIENT
    assert _row(result, "size=all")["effect"] == pytest.approx(0.01)
    trend = _row(result, "trend: size=100 minus size=all")
    assert trend["verdict"] == "supported" and trend["effect"] == pytest.approx(0.19)
    assert "gap shrinks" in trend["measure"]
    cell = _row(result, "target=mnist5k source=kmnist arch=resnet_mini size=100")
    assert cell["effect"] == pytest.approx(0.20)
    # sizes ascend with the whole pool last
    assert [r["scope"] for r in result][1:3] == ["size=50", "size=all"]


def test_claim_1_without_scratch_cells_says_so() -> None:
    finetune = _table("finetune", [_finetune(seed, 100, 0.1) for seed in range(3)])
    [row] = claim_finetune_vs_scratch(finetune, _table("scratch", []))
    assert row["verdict"] == NO_RUNS and row["why"] == "no scratch cells in this grid" and row["headline"]
    assert row["figure"] is None and np.isnan(row["effect"])


def test_claim_2_freezing_is_paired_with_full_fine_tuning_from_the_same_checkpoint() -> None:
    rows = []
    for seed in range(3):
        rows.append(_finetune(seed, 100, 0.10 + NOISE[seed]))
        rows.append(_finetune(seed, 100, 0.15, freeze=20))                       # freezing hurts by 5 pp
        rows.append(_finetune(seed, 100, 0.00, freeze=23, checkpoint="other"))   # another checkpoint: no pair
        rows.append(_finetune(seed, 1000, 0.05))
        rows.append(_finetune(seed, 1000, 0.05 + NOISE[seed], freeze=20))
    result = claim_freezing(_table("finetune", rows))
    headline = _headline(result)
    assert headline["scope"] == "size=100" and headline["verdict"] == "contradicted"
    assert headline["effect"] == pytest.approx(-0.05)
    assert _row(result, "arch=resnet_mini freeze_depth=20 size=1000")["verdict"] == "inconclusive"
    assert not any("freeze_depth=23" in r["scope"] for r in result)


def test_claim_2_carries_seed_000s_own_contrast_freeze_20_against_23() -> None:
    # The replicate preset's shape: no full fine-tuning at 10,000 (so no headline pair), but depths 20 and 23 from the
    # same checkpoint; seed 000 found 20 better by 0.82 pp. Here 23 is 1 pp worse in every seed, give or take noise.
    rows = []
    for seed in range(3):
        rows.append(_finetune(seed, 10000, 0.05, freeze=20, source="fashion_mnist"))
        rows.append(_finetune(seed, 10000, 0.06 + NOISE[seed] / 2, freeze=23, source="fashion_mnist"))
        rows.append(_finetune(seed, 0, 0.01, source="fashion_mnist"))
    result = claim_freezing(_table("finetune", rows))
    assert result[0]["headline"] and result[0]["verdict"] == NO_RUNS
    [seed_row] = result[1:]
    assert seed_row["scope"] == "seed 000's contrast: freeze 20 vs 23, arch=resnet_mini size=10000"
    assert seed_row["effect"] == pytest.approx(0.01) and seed_row["verdict"] == "supported" and not seed_row["headline"]
    assert seed_row["measure"].startswith("resnet_mini test_error frozen 23 - frozen 20 tensors")


def test_claim_3_parent_examples_against_another_source_of_the_same_arch() -> None:
    rows = []
    for seed in range(3):
        target = f"C{seed}"
        for attack in ("fgsm", "pgd"):
            common = dict(target_run_id=target, target_seed=seed, target_arch="resnet_mini", target_source="kmnist",
                          attack=attack, eps=0.3)
            rows.append(dict(common, surrogate_stage=names.PRETRAIN, surrogate_arch="resnet_mini", is_parent=True,
                             same_source=True, success_rate=0.8 + NOISE[seed], whitebox_success=0.99))
            rows.append(dict(common, surrogate_stage=names.PRETRAIN, surrogate_arch="resnet_mini", is_parent=False,
                             same_source=False, success_rate=0.3, whitebox_success=0.97))
            # B of another arch, and C attacked on itself: neither is the claim's B
            rows.append(dict(common, surrogate_stage=names.PRETRAIN, surrogate_arch="alexnet_mini", is_parent=False,
                             same_source=False, success_rate=0.0, whitebox_success=0.9))
            rows.append(dict(common, surrogate_stage=names.FINETUNE, surrogate_arch="resnet_mini", is_parent=False,
                             same_source=True, success_rate=1.0, whitebox_success=1.0))
    result = claim_parent_examples(_table("transfer", rows))
    headline = _headline(result)
    assert headline["scope"] == "2 attack settings pooled" and headline["verdict"] == "supported"
    assert headline["effect"] == pytest.approx(0.5) and headline["ceiling"] == pytest.approx(0.99)
    assert headline["control_mean"] == pytest.approx(0.3) and "white-box ceiling 99.0%" in headline["line"]
    assert {r["scope"] for r in result[1:]} == {"attack=fgsm eps=0.3", "attack=pgd eps=0.3"}


def test_claim_3_pairs_b_by_seed_and_sets_a_prime_beside_both() -> None:
    # C of seed s: its parent A (0.8), B of seed s (0.3) and B of another seed (0.6, which averaged in would make B
    # 0.45), and A' of the two other seeds (0.5 and 0.7: 0.6 with noise). A' of C's source is not B: it shares C's
    # source data, not its weights, so it sits between A and B.
    def rows_of(seed: int, with_own_b: bool = True) -> list[dict]:
        common = dict(target_run_id=f"C{seed}", target_seed=seed, target_arch="resnet_mini", target_source="kmnist",
                      attack="pgd", eps=0.3, surrogate_stage=names.PRETRAIN, surrogate_arch="resnet_mini",
                      whitebox_success=0.99)
        other, another = (seed + 1) % 3, (seed + 2) % 3
        rows = [dict(common, is_parent=True, same_source=True, surrogate_seed=seed, success_rate=0.8 + NOISE[seed]),
                dict(common, is_parent=False, same_source=False, surrogate_seed=other, success_rate=0.6),
                dict(common, is_parent=False, same_source=True, surrogate_seed=other, success_rate=0.5 + NOISE[seed]),
                dict(common, is_parent=False, same_source=True, surrogate_seed=another, success_rate=0.7),
                dict(common, is_parent=False, same_source=False, surrogate_seed=seed, surrogate_arch="alexnet_mini",
                     success_rate=0.0)]   # B of another arch: not the claim's B
        return rows + ([dict(common, is_parent=False, same_source=False, surrogate_seed=seed, success_rate=0.3)]
                       if with_own_b else [])

    result = claim_parent_examples(_table("transfer", [r for seed in range(3) for r in rows_of(seed)]))
    headline = _headline(result)
    assert headline["scope"] == "attack=pgd eps=0.3" and headline["effect"] == pytest.approx(0.5)
    assert headline["control_mean"] == pytest.approx(0.3) and headline["ceiling"] == pytest.approx(0.99)
    assert headline["why"] is None   # every C had a B of its own seed
    a_prime = _row(result, "A' vs B (same source data, unrelated weights), attack=pgd eps=0.3")
    assert a_prime["effect"] == pytest.approx(0.3) and a_prime["treated_mean"] == pytest.approx(0.6)
    assert a_prime["control_mean"] == pytest.approx(0.3) and np.isnan(a_prime["ceiling"]) and not a_prime["headline"]
    parent = _row(result, "A vs A' (the parent's own weights against the same source's other seeds), "
                          "attack=pgd eps=0.3")
    assert parent["effect"] == pytest.approx(0.2) and parent["seed_effects"] == pytest.approx(
        [0.2 + NOISE[seed] / 2 for seed in range(3)])
    assert len(result) == 3   # one attack setting: no per-setting rows
    # Without a B of C's seed, B's seeds are averaged (0.6 here), and the headline says so.
    fallback = claim_parent_examples(_table("transfer", [r for seed in range(3) for r in rows_of(seed, False)]))
    assert _headline(fallback)["effect"] == pytest.approx(0.2)
    assert _headline(fallback)["why"] == "the grid has no B of C's seed for 3 of 3 fine-tuned model(s) C: their B's " \
                                        "seeds are averaged"
    # Without A', the rows beneath it are not made.
    no_prime = [r for seed in range(3) for r in rows_of(seed) if not (r["same_source"] and not r["is_parent"])]
    assert len(claim_parent_examples(_table("transfer", no_prime))) == 1


def test_claim_4_headline_is_transfer_features_with_the_seeds_transfer_arm_and_its_classifier_floor_beneath() -> None:
    def run(variant: str, size: int, seed: int, error: float, scratch: float) -> dict:
        return dict(run_id=f"{variant}-{size}-{seed}", variant=variant, size=size, seed=seed, test_error=error,
                    scratch_run_id=f"scratch-{size}-{seed}", scratch_test_error=scratch,
                    pretrain_run_id=f"digits-{seed}", classifier_test_error=0.01 * (seed + 1))   # mean 0.02

    rows = []
    for seed in range(3):
        rows.append(run(names.VARIANT_TRANSFER, 5000, seed, 0.50 + NOISE[seed], 0.10))   # the README's measurement
        rows.append(run(names.VARIANT_TRANSFER_FEATURES, 5000, seed, 0.05 + NOISE[seed], 0.10))
        rows.append(run(names.VARIANT_TRANSFER, 200, seed, 0.60 + NOISE[seed], 0.80))
    result = claim_adder(_table("adder", rows))
    headline = _headline(result)
    assert headline["scope"] == "arm=transfer_features size=5000" and headline["verdict"] == "supported"
    assert headline["effect"] == pytest.approx(0.05)
    # A sum is wrong whenever either digit is: 98% digits give about 1 - 0.98^2 = 3.96% error at best.
    floor = "digit classifier: 98.00% mean test accuracy over 3 run(s), so the transfer arm's error floor is about " \
            "1 - (1 - 0.0200)^2 = 3.96%"
    assert headline["why"].startswith(floor)
    seeds_arm = result[1]   # the seed's transfer arm at the headline's size comes next
    assert seeds_arm["scope"] == "size=5000" and seeds_arm["verdict"] == "contradicted"
    assert seeds_arm["effect"] == pytest.approx(-0.40) and seeds_arm["why"].startswith(floor)
    assert _row(result, "size=200")["verdict"] == "supported" and _row(result, "size=200")["why"] is None
    assert {r["claim"] for r in result} == {ADDER_CLAIM}
    # Without transfer_features the seed's arm is the headline, as before.
    seeds_only = claim_adder(_table("adder", [r for r in rows if r["variant"] == names.VARIANT_TRANSFER]))
    assert _headline(seeds_only)["scope"] == "size=5000" and _headline(seeds_only)["effect"] == pytest.approx(-0.40)


def test_claim_4_with_one_seed_keeps_the_line_sweeps_adder_prints() -> None:
    adder = _table("adder", [dict(run_id="t", variant=names.VARIANT_TRANSFER, size=200, seed=0, test_error=0.5,
                                  scratch_run_id="s", scratch_test_error=0.4)])
    [row] = claim_adder(adder)
    assert row["line"] == (f"adder: transfer beats scratch (size=200): {INSUFFICIENT} (1 paired, need 3); "
                           "no effect estimated.")


def test_claim_5_head10x_sgd_against_sgd_of_the_same_cell() -> None:
    rows = []
    for seed in range(5):
        rows.append(_finetune(seed, 100, 0.20, optimizer="sgd"))
        rows.append(_finetune(seed, 100, 0.17 + NOISE[seed], optimizer="sgd", head=10.0))   # 3 pp better
        rows.append(_finetune(seed, 100, 0.50))   # AdamW at one lr: not the seed's baseline
    headline = _headline(claim_head_lr(_table("finetune", rows)))
    assert headline["verdict"] == "supported" and headline["effect"] == pytest.approx(0.03)
    assert headline["n_seeds"] == 5


def test_claim_5_sets_every_layer_at_10x_beneath_and_never_as_the_one_lr_baseline() -> None:
    # lr 3e-4: the lr10x_sgd cell's lr, 3e-3, is not 10 x 3e-4 (0.0030000000000000005) to the last bit.
    rows = []
    for seed in range(5):
        rows.append(_finetune(seed, 100, 0.20, optimizer="sgd", lr=3e-4))
        rows.append(_finetune(seed, 100, 0.17 + NOISE[seed], optimizer="sgd", head=10.0, lr=3e-4))
        rows.append(_finetune(seed, 100, 0.25, optimizer="sgd", lr=3e-3))                  # lr10x_sgd: 8 pp worse
        rows.append(_finetune(seed, 100, 0.01, optimizer="sgd", lr=3e-3, checkpoint="x"))  # another checkpoint
    result = claim_head_lr(_table("finetune", rows))
    headline = _headline(result)
    assert headline["effect"] == pytest.approx(0.03) and headline["control_mean"] == pytest.approx(0.20)
    everyone = result[1]
    assert everyone["scope"] == "against every layer at 10x (lr10x_sgd)" and not everyone["headline"]
    assert everyone["effect"] == pytest.approx(0.08) and everyone["control_mean"] == pytest.approx(0.25)
    assert everyone["verdict"] == "supported" and "lr10x_sgd" in everyone["measure"]


def test_claim_6_unfreeze_against_the_frozen_cell_of_the_same_depth_and_against_full_fine_tuning() -> None:
    rows = []
    for seed in range(3):
        rows.append(_finetune(seed, 100, 0.20, freeze=20))
        rows.append(_finetune(seed, 100, 0.16 + NOISE[seed], freeze=20, unfreeze=3))   # 4 pp better than frozen
        rows.append(_finetune(seed, 100, 0.00, freeze=23))                             # another depth: no pair
        rows.append(_finetune(seed, 100, 0.10))                                        # full fine-tuning, 6 pp better
    result = claim_unfreeze(_table("finetune", rows))
    headline = _headline(result)
    assert headline["verdict"] == "supported" and headline["effect"] == pytest.approx(0.04)
    # No unfreeze_control cells: the frozen cell is the headline's control, and the headline says what else differs.
    assert headline["why"].startswith("no unfreeze_control cells in this grid: against the frozen cells never "
                                      "unfrozen instead, whose schedule differs")
    assert headline["measure"].startswith("test_error of a frozen-body cell")
    [full] = [r for r in result if r["scope"].startswith("against full fine-tuning")]
    assert full["verdict"] == "contradicted" and full["effect"] == pytest.approx(-0.06)


def test_claim_6_pairs_unfreeze_with_its_same_schedule_control() -> None:
    # Against the frozen cell (another schedule) unfreezing gains 4 pp; against unfreeze_control (the same lr drop on
    # the same plateau schedule, body kept frozen) only 2: the other 2 were the schedule's.
    rows = []
    for seed in range(3):
        rows.append(_finetune(seed, 100, 0.20, freeze=20))
        rows.append(_finetune(seed, 100, 0.16 + NOISE[seed], freeze=20, unfreeze=3))
        rows.append(_finetune(seed, 100, 0.18, freeze=20, unfreeze=3, body=False))   # unfreeze_control
        rows.append(_finetune(seed, 100, 0.00, freeze=20, unfreeze=4, body=False))   # another switch epoch: no pair
        rows.append(_finetune(seed, 100, 0.10))
    result = claim_unfreeze(_table("finetune", rows))
    headline = _headline(result)
    assert headline["effect"] == pytest.approx(0.02) and headline["control_mean"] == pytest.approx(0.18)
    assert headline["why"] is None and headline["measure"].startswith("test_error of the unfreeze_control cell")
    # The control cells are never on the unfreezing side: with them, these two would be 0.03 and -0.07.
    frozen = _row(result, "against the frozen cell never unfrozen (another schedule)")
    assert frozen["effect"] == pytest.approx(0.04) and frozen["measure"].startswith("test_error of a frozen-body cell")
    [full] = [r for r in result if r["scope"].startswith("against full fine-tuning")]
    assert full["effect"] == pytest.approx(-0.06) and len(result) == 3


def test_claim_7_lenet5_against_resnet_mini_from_scratch_at_the_largest_size() -> None:
    def scratch(arch: str, size: int, seed: int, error: float) -> dict:
        return dict(run_id=f"{arch}-{size}-{seed}", target="mnist5k", arch=arch, size=size, lr=1e-3, seed=seed,
                    optimizer="adamw", epochs=10, test_error=error)

    rows = []
    for seed in range(3):
        rows += [scratch("lenet5", 1000, seed, 0.08 + NOISE[seed]), scratch("resnet_mini", 1000, seed, 0.03),
                 scratch("lenet5", 100, seed, 0.30), scratch("resnet_mini", 100, seed, 0.40 + NOISE[seed])]
    result = claim_lenet(_table("scratch", rows), _table("finetune", []))
    headline = _headline(result)
    assert headline["scope"] == "scratch size=1000" and headline["verdict"] == "contradicted"
    assert headline["effect"] == pytest.approx(-0.05 + 0.02)   # 5 pp worse: 3 pp beyond the 2 pp margin
    assert headline["why"].startswith("the LeNet-5 is xfer's lenet5 (average-pooled), not seed 003's max-pool one")
    assert _row(result, "stage=scratch target=mnist5k size=100 budget=epochs=10")["verdict"] == "supported"


def test_claim_7_is_non_inferiority_within_2_pp_on_the_seeds_max_pool_lenet() -> None:
    def scratch(arch: str, seed: int, error: float, epoch_steps: int = 288) -> dict:
        return dict(run_id=f"{arch}-{seed}-{epoch_steps}", target="mnist5k", arch=arch, size=1000, lr=1e-3, seed=seed,
                    optimizer="adam", epochs=4, epoch_steps=epoch_steps, test_error=error)

    rows = []
    for seed in range(3):   # LeNet-5 1 pp worse than resnet_mini: within the margin by 1 pp
        rows += [scratch("resnet_mini", seed, 0.05), scratch("lenet5_maxpool", seed, 0.06 + NOISE[seed]),
                 scratch("lenet5", seed, 0.50)]   # xfer's avg-pool LeNet: not the seed's when the seed's is there
        # A smaller step budget at the same size and epochs (a steps axis): its own row beneath, never paired with
        # the larger budget's cells, never in the headline.
        rows += [scratch("resnet_mini", seed, 0.04, epoch_steps=50), scratch("lenet5_maxpool", seed, 0.56, epoch_steps=50)]
    result = claim_lenet(_table("scratch", rows), _table("finetune", []))
    headline = _headline(result)
    assert headline["scope"] == "scratch size=1000 steps=4x288"
    assert _row(result, "stage=scratch target=mnist5k size=1000 budget=steps=4x50")["effect"] == pytest.approx(-0.50)
    assert headline["effect"] == pytest.approx(0.01)
    assert headline["seed_effects"] == pytest.approx([0.01 - NOISE[seed] for seed in range(3)])
    assert headline["treated_mean"] == pytest.approx(0.06) and headline["control_mean"] == pytest.approx(0.05)
    assert headline["why"] is None and "within 2 pp" in headline["text"]


def test_cells_at_chance_are_left_out_of_every_verdict() -> None:
    # Two of five seeds' LeNet-5 cells diverged to chance (90% error on 10 classes): pooled, they would drag the
    # headline to -0.42; left out, the three seeds that learnt give -0.12, and the report names the two.
    def scratch(arch: str, seed: int, error: float) -> dict:
        return dict(run_id=f"{arch}-{seed}", target="mnist", arch=arch, size=1000, lr=1e-3, seed=seed,
                    optimizer="adamw", epochs=10, test_error=error, test_acc=1 - error, at_chance=bool(1 - error <= 0.15))

    rows = []
    for seed in range(5):
        rows += [scratch("lenet5", seed, 0.14 + NOISE[seed] if seed < 3 else 0.90), scratch("resnet_mini", seed, 0.02)]
    empty = {name: _table(name, []) for name in ("runs", "pretrain", "finetune", "adder", "curves", "transfer")}
    found = Tables(**empty, scratch=_table("scratch", rows), params=[], without_curve=[])
    assert chance_runs(found)["run_id"].tolist() == ["lenet5-3", "lenet5-4"]
    headline = claims_table(all_verdicts(found)).set_index("claim_id").loc[7]
    assert headline["effect"] == pytest.approx(-0.12 + 0.02) and headline["n_seeds"] == 3
    pooled = claim_lenet(_table("scratch", rows), _table("finetune", []))
    assert _headline(pooled)["effect"] == pytest.approx((3 * -0.12 + 2 * -0.88) / 5 + 0.02)   # what pooling chance gave


def test_claim_7_reads_adam_cells_only_as_seed_003_trains() -> None:
    # The audit's case: SGD at an lr where sigmoid LeNet cannot learn would make the headline about an optimiser.
    def scratch(arch: str, seed: int, error: float, optimizer: str) -> dict:
        return dict(run_id=f"{arch}-{optimizer}-{seed}", target="mnist5k", arch=arch, size=1000, lr=2e-3, seed=seed,
                    optimizer=optimizer, epochs=10, test_error=error)

    rows = [scratch(arch, seed, error + NOISE[seed], optimizer) for seed in range(3) for arch, error, optimizer in
            (("lenet5", 0.146, "adamw"), ("resnet_mini", 0.019, "adamw"), ("lenet5", 0.80, "sgd"),
             ("resnet_mini", 0.221, "sgd"))]
    headline = _headline(claim_lenet(_table("scratch", rows), _table("finetune", [])))
    assert headline["effect"] == pytest.approx(-0.127 + 0.02) and headline["verdict"] == "contradicted"
    only_sgd = claim_lenet(_table("scratch", [r for r in rows if r["optimizer"] == "sgd"]), _table("finetune", []))
    assert only_sgd[0]["verdict"] == NO_RUNS and only_sgd[0]["why"] == "no Adam or AdamW lenet5 or resnet_mini runs in this grid"


def test_chance_is_one_over_the_target_classes_plus_a_margin(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setenv("XFER_RUNS", str(tmp_path))
    (tmp_path / "datasets.json").write_text(json.dumps({"glyph_letters|/x|skip_bad_images=False": {
        "info": {"name": "glyph_letters", "num_classes": 26}, "signature": "s"}}))
    runs = pd.DataFrame({"stage": ["finetune", "scratch", "scratch", "adder", "pretrain", "finetune"],
                         "target": ["mnist", "mnist", "glyph_letters", "mnist", "mnist", "imagefolder:/somewhere"],
                         "test_acc": [0.149, 0.151, 0.088, 0.10, 0.10, 0.5]})
    assert at_chance(runs).tolist() == [True, False, True, True, pd.NA, pd.NA]   # 1/10, 1/26 and 1/19 (sums) + 5 pp


def test_every_claim_has_exactly_one_headline_even_with_no_runs() -> None:
    empty = Tables(**{name: _table(name, []) for name in ("runs", "pretrain", "finetune", "scratch", "adder",
                                                           "curves", "transfer")}, params=[], without_curve=[])
    claims = claims_table(all_verdicts(empty))
    assert list(claims["claim_id"]) == [1, 2, 3, 4, 5, 6, 7]
    assert claims["verdict"].eq(NO_RUNS).all() and claims["why"].str.len().gt(0).all()
    assert list(claims["seed_doc"]) == ["000", "000", "000", "002", "004", "001", "003"]
    assert claims.loc[claims["claim_id"] == 7, "why"].item() == "no Adam or AdamW lenet5 or resnet_mini runs in this grid"


def test_unfreeze_control_cells_are_a_recipe_of_their_own() -> None:
    assert recipe_of({"train.unfreeze_epoch": "3", "train.unfreeze_body": "false"})["unfreeze_body"] is False
    assert recipe_of({"train.unfreeze_body": "True"})["unfreeze_body"] is True
    assert recipe_of({})["unfreeze_body"] is True   # recorded before the field: the body unfroze
    cell = {"optimizer": "adamw", "head_lr_mult": 1.0, "unfreeze_epoch": 3}
    assert recipe_text(pd.Series(cell | {"unfreeze_body": True})) == "/unfreeze@3"
    assert recipe_text(pd.Series(cell | {"unfreeze_body": False})) == "/unfreeze_control@3"


def test_adder_table_carries_its_digit_classifier_and_transfer_its_surrogate_seed() -> None:
    def run(run_id: str, stage: str, **values) -> dict:
        return dict(run_id=run_id, stage=stage, start_time=pd.Timestamp("2026-01-01", tz="UTC"), **values)

    finished = _table("runs", [
        run("digits-1", names.PRETRAIN, source="mnist5k", arch="digit_cnn", seed=1, test_error=0.015),
        run("t", names.ADDER, variant=names.VARIANT_TRANSFER, size=200, seed=1, pretrain_run_id="digits-1",
            test_error=0.5),
        run("s", names.ADDER, variant=names.VARIANT_SCRATCH, size=200, seed=1, test_error=0.4),
        run("C", names.FINETUNE, source="mnist5k", target="mnist", arch="digit_cnn", size=100, freeze_depth=0,
            seed=4, pretrain_run_id="digits-1"),
        run("set", names.ATTACK, whitebox_success=0.9)])
    [row] = adder_frame(finished).to_dict("records")
    assert (row["pretrain_run_id"], row["classifier_test_error"], row["scratch_test_error"]) == ("digits-1", 0.015, 0.4)
    scored = pd.DataFrame([{"set_run_id": "set", "surrogate_run_id": "digits-1", "target_run_id": "C", "attack": "pgd",
                            "eps": 0.3, names.TAG_SAME_SOURCE: True, names.TAG_IS_PARENT: True}])
    [scores] = transfer_frame(finished, scored).to_dict("records")
    assert (scores["surrogate_seed"], scores["target_seed"]) == (1, 4)


def _bootstrap(values: np.ndarray, draws: int = 10_000) -> tuple[float, float]:
    """The percentile bootstrap the report used before (seeded): its 95% interval of the mean."""
    means = values[np.random.default_rng(0).integers(0, len(values), size=(draws, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def test_every_claim_names_the_seed_words_it_tests() -> None:
    # Each claim cites where its seed says it (section and line of ../shared/seeds/), and SCHEMA.md carries it.
    doc = claims_doc()
    for claim in CLAIMS:
        assert claim.where.startswith(("seed " + claim.seed_doc, "no sentence of seed " + claim.seed_doc))
        assert f"Source: {claim.where}." in doc
    assert "解冻后几个epoch即可达到之前cnn训练20轮的效果" in BY_KEY["unfreeze_helps"].where
