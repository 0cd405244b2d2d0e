"""Findings across seeds: intervals, the verdict rules, and tolerances from a seed spread."""

import math

import pytest

from evaluation.findings import (
    beats,
    combine,
    consistent,
    estimate,
    not_worse,
    paired_difference,
    regression_tolerance,
)

T_975_DF2 = 4.302653  # Student's t, 97.5th percentile, 2 degrees of freedom (printed tables)


def test_three_seeds_give_a_t_interval_and_one_seed_falls_back_to_the_evaluation_stderr():
    three = estimate([0.5, 0.6, 0.7])  # mean 0.6, sd 0.1
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert (three.mean, three.low, three.high, three.n, three.source) == pytest.approx(
        (0.6, 0.6 - half, 0.6 + half, 3, "seeds")
    )
    one = estimate([0.6], stderr=0.02)
    assert (one.low, one.high, one.source) == pytest.approx((0.6 - 0.0392, 0.6 + 0.0392, "stderr"))


def test_paired_differences_cancel_what_the_seeds_share():
    # A is 0.03 better than B in every seed, though both move by 0.2 across seeds
    a, b = [0.53, 0.73, 0.43], [0.50, 0.70, 0.40]
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(0.03) and d.high - d.low == pytest.approx(0, abs=1e-9)
    assert beats(d) == "agree"
    # unpaired, the arms' intervals overlap widely: the pairing is what makes it a finding
    assert estimate(a).low < estimate(b).high
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([0.1, 0.2], [0.1])
    one = paired_difference([0.55], [0.50], 0.05)  # 1 seed: 1.96 x the item-paired stderr of A - B = 0.098
    assert (one.low, one.high) == pytest.approx((0.05 - 0.098, 0.05 + 0.098))
    assert beats(one) == "inconclusive"


T_80_DF2 = 1.060660  # Student's t, 80th percentile, 2 degrees of freedom (printed tables)


def test_minimum_detectable_effect_at_80_percent_power_and_seeds_for_0_03():
    three = estimate([0.50, 0.56, 0.62])  # sd 0.06, se 0.06 / sqrt 3
    assert three.mde() == pytest.approx((T_975_DF2 + T_80_DF2) * 0.06 / math.sqrt(3), rel=1e-5)
    # seeds for an MDE of 0.03 at sd 0.06: the smallest K with (t(.975, K-1) + t(.8, K-1)) * 0.06 / sqrt K <= 0.03;
    # K = 34: (2.034515 + 0.852649) * 0.06 / sqrt 34 = 0.02971; K = 33: (2.036933 + 0.852998) * 0.06 / sqrt 33 = 0.03018
    assert three.seeds_for(0.03) == 34
    one = paired_difference([0.55], [0.50], 0.01)  # one seed: normal quantiles on the item-paired stderr
    assert one.mde() == pytest.approx((1.959964 + 0.841621) * 0.01, rel=1e-5)
    assert one.seeds_for() is None  # no seed spread measured


@pytest.mark.parametrize(
    ("differences", "beats_verdict", "not_worse_verdict"),
    [
        ([0.05, 0.06, 0.07], "agree", "agree"),  # clearly better
        ([-0.05, -0.06, -0.07], "disagree", "disagree"),  # clearly worse
        ([-0.005, 0.0, 0.005], "inconclusive", "agree"),  # a tie: CI [-0.012, 0.012], within the margin
        ([-0.2, 0.0, 0.1], "inconclusive", "inconclusive"),  # noise wider than the margin
    ],
)
def test_verdict_rules(differences, beats_verdict, not_worse_verdict):
    d = estimate(differences)
    assert beats(d) == beats_verdict and not_worse(d) == not_worse_verdict


def test_claims_with_several_parts_and_per_seed_observations():
    assert combine("agree", "agree") == "agree"
    assert combine("agree", "inconclusive") == "inconclusive"
    assert combine("inconclusive", "disagree") == "disagree"
    assert consistent([True, True, True]) == "agree"
    assert consistent([False, False]) == "disagree"
    assert consistent([True, False, True]) == "inconclusive"


def test_nightly_tolerance_from_the_seed_spread():
    # sd 0.04: a night vs the last good one differs by two seeds' noise, sd 0.04 * sqrt(2);
    # its one-sided 95% bound is 1.645 of those
    assert regression_tolerance([0.40, 0.44, 0.48]) == pytest.approx(round(1.645 * 0.04 * math.sqrt(2), 4))
    assert regression_tolerance([0.5, 0.5, 0.5]) == 0.01  # no measured spread is not no noise
    with pytest.raises(ValueError, match="at least 2 seeds"):
        regression_tolerance([0.5])
