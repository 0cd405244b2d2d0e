"""Findings across seeds: an arm's score as mean +- 95% CI, and verdicts by a stated rule.

One seed is not a finding: on two CPUs of the same kind, the same commit's single-seed lab
numbers moved by more than the differences the verdicts rested on (NOTES.md). So every arm of
`lab reproduce` runs with K seeds (data order and fine-tune initialisation), and a claim is
judged on the paired differences between arms (same seed, so shared noise cancels):

    d_k = score(A, seed k) - score(B, seed k),   CI95(d) = mean(d) +- t(0.975, K-1) * sd(d) / sqrt(K)

With one seed there is no spread to measure; the interval falls back to the evaluation's own
sampling error, mean(d) +- 1.96 * se_items, se_items being the stderr of A - B paired on the items
both were scored on (evaluation/paired.py), and says so. Pairing on items ignores seed-to-seed
variance, which is why it replaces only this fallback: with K >= 2 the seeds' spread decides.

Power: each estimate states its minimum detectable effect at 80% power (two-sided 5% test),
MDE = (t(0.975, K-1) + t(0.80, K-1)) * se (normal quantiles for one seed), and how many seeds
would bring the MDE down to 0.03 at the measured per-seed spread (none known with one seed).

Rules (the verdicts' wording is fixed, so that tables from different runs compare):
- "A beats B":         agree if CI95(d) > 0; disagree if CI95(d) < 0; else inconclusive.
- "A is not worse":    agree if the CI95(d) lower bound >= -margin; disagree if CI95(d) < 0
                       (A significantly worse); else inconclusive.
"""

from __future__ import annotations

import math
import statistics
from typing import Literal

from pydantic import BaseModel
from scipy import stats

Verdict = Literal["agree", "disagree", "inconclusive"]
NOT_WORSE_MARGIN = 0.02  # "as good as": at most 2 points of accuracy worse, with 95% confidence
RULES = {
    "beats": "agree if the 95% CI of the paired difference is above 0, disagree if below 0, else inconclusive",
    "not_worse": f"agree if the 95% CI of the paired difference lies above -{NOT_WORSE_MARGIN}, "
    "disagree if it lies below 0, else inconclusive",
}


POWER = 0.80
TARGET_EFFECT = 0.03  # the effect size whose seed count each finding states


class Estimate(BaseModel):
    mean: float
    low: float
    high: float
    n: int  # seeds
    source: Literal["seeds", "stderr"]  # what the interval measures
    se: float = 0.0  # standard error of the mean: sd / sqrt(K), or the one seed's evaluation stderr

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {(self.high - self.low) / 2:.3f}"

    def mde(self) -> float:
        """Minimum detectable effect at 80% power, two-sided 5%."""
        return _power_quantiles(self.n) * self.se

    def seeds_for(self, effect: float = TARGET_EFFECT) -> int | None:
        """Seeds for an MDE of `effect` at the measured per-seed spread (None: no spread measured)."""
        if self.source != "seeds":
            return None
        sd = self.se * math.sqrt(self.n)
        k = 2
        while _power_quantiles(k) * sd / math.sqrt(k) > effect and k < 100_000:
            k += 1
        return k


def _power_quantiles(n: int) -> float:
    if n >= 2:
        return float(stats.t.ppf(0.975, n - 1) + stats.t.ppf(POWER, n - 1))
    return float(stats.norm.ppf(0.975) + stats.norm.ppf(POWER))


def estimate(values: list[float], stderr: float | None = None) -> Estimate:
    """Mean and 95% CI over seeds (t interval); with one seed, +- 1.96 x `stderr` (0 if None)."""
    n, mean = len(values), statistics.fmean(values)
    if n >= 2:
        se = statistics.stdev(values) / math.sqrt(n)
        half = float(stats.t.ppf(0.975, n - 1)) * se
        return Estimate(mean=mean, low=mean - half, high=mean + half, n=n, source="seeds", se=se)
    half = 1.96 * (stderr or 0.0)
    return Estimate(mean=mean, low=mean - half, high=mean + half, n=1, source="stderr", se=stderr or 0.0)


def paired_difference(a: list[float], b: list[float], item_stderr: float = 0.0) -> Estimate:
    """CI of A - B over seeds paired by index; one seed: from `item_stderr`, the stderr of A - B
    paired on the items both were scored on."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired difference needs the same seeds on both arms, got {len(a)} and {len(b)}")
    return estimate([x - y for x, y in zip(a, b, strict=True)], item_stderr)


def beats(difference: Estimate) -> Verdict:
    if difference.low > 0:
        return "agree"
    return "disagree" if difference.high < 0 else "inconclusive"


def not_worse(difference: Estimate, margin: float = NOT_WORSE_MARGIN) -> Verdict:
    if difference.high < 0:
        return "disagree"
    return "agree" if difference.low >= -margin else "inconclusive"


def combine(*verdicts: Verdict) -> Verdict:
    """A claim with several parts: disagree if any part disagrees, agree if all agree."""
    if "disagree" in verdicts:
        return "disagree"
    return "agree" if all(v == "agree" for v in verdicts) else "inconclusive"


def consistent(holds: list[bool]) -> Verdict:
    """A yes/no observation per seed: agree if it held in every seed, disagree if in none."""
    if all(holds):
        return "agree"
    return "disagree" if not any(holds) else "inconclusive"


def regression_tolerance(per_seed: list[float], floor: float = 0.01) -> float:
    """Allowed nightly drop of a metric from its measured seed spread: a night differs from the
    last good one by two independent seeds' noise (sd x sqrt 2), and a one-sided 95% bound on that
    is 1.645 sd sqrt 2; never below `floor` (a spread of 0 from few seeds is not no noise)."""
    if len(per_seed) < 2:
        raise ValueError("a seed spread needs at least 2 seeds")
    return max(floor, round(1.645 * math.sqrt(2) * statistics.stdev(per_seed), 4))
