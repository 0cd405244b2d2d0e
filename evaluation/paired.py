"""Paired comparisons: two models scored on the same items, compared item by item.

Two checkpoints of one run answer the same evaluation items, and most items they get both
right or both wrong. Their scores' difference is therefore far less noisy than two independent
scores' errors suggest: the paired difference keeps only the items where they differ.

Per metric k (the per-item records of core/items.py), on the items both models have:

    d_i = a_i - b_i,     mean(d_k),     var(d_k) = sample variance (ddof 1),     n_k = shared items

Items that only one model has are dropped and counted; below 95% overlap (shared / the larger
item count) the comparison is refused: the two were not scored on the same items.

On an objective with weights w_k (normalised to sum 1, negative for a lower-is-better metric,
see evaluation/selection.py), A - B is

    D = sum_k w_k * mean(d_k),     Var(D) = sum_k w_k^2 * var(d_k) / n_k

and its interval is the paired t interval D +- t(q, df) * sqrt(Var(D)), q = (1 + confidence) / 2,
df = n - 1 for one metric and Welch-Satterthwaite's df for a mix. That interval decides, wherever
this project compares two models (selection, the gate's min_gain, the forgetting guard). For a
binary metric (every value 0 or 1) McNemar's exact p-value (a two-sided binomial test on the
discordant items) is reported beside it, never used to decide.

`unpaired_halfwidth` is the interval two independent scores would give (their standard errors
combined as independent); it is what the paired one is measured against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from scipy import stats

MIN_OVERLAP = 0.95


class PairingError(ValueError):
    """Two models cannot be compared item by item (missing records, too few shared items)."""


class MetricDifference(BaseModel):
    metric: str
    n: int = Field(description="Items both models have: the ones compared.")
    dropped: int = Field(description="Items only one of the two has (left out, reported).")
    mean: float = Field(description="mean(a - b) over the shared items.")
    variance: float = Field(description="Sample variance of a - b (ddof 1; 0 for a single item).")
    discordant: int = Field(description="Shared items on which the two differ.")
    mcnemar_p: float | None = Field(None, description="Exact McNemar p-value for a 0/1 metric (reported only).")


class Difference(BaseModel):
    """A - B on an objective, paired on items, with its t interval at `confidence`."""

    value: float
    stderr: float
    df: float | None = Field(description="Degrees of freedom of the t quantile (None when the stderr is 0).")
    low: float
    high: float
    confidence: float
    metrics: list[MetricDifference]

    def __str__(self) -> str:
        return f"{self.value:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def per_metric(items: pd.DataFrame, metric: str, label: str) -> pd.Series:
    """One metric's values indexed by item id; a clear error when the records lack it or repeat an item."""
    values = items.loc[items["metric"] == metric].set_index("item")["value"]
    if values.empty:
        raise PairingError(f"{label}: no per-item records of {metric}")
    if values.index.has_duplicates:
        raise PairingError(
            f"{label}: item ids of {metric} repeat ({values.index[values.index.duplicated()][:3].tolist()})"
        )
    return values


def metric_difference(metric: str, a: pd.Series, b: pd.Series, label: str = "A vs B") -> MetricDifference:
    """mean and variance of a - b on the shared items of one metric (values indexed by item id)."""
    shared = a.index.intersection(b.index)
    larger = max(len(a), len(b))
    if len(shared) < MIN_OVERLAP * larger:
        raise PairingError(
            f"{label}: {metric} shares {len(shared)} of {larger} items ({len(shared) / larger:.0%}); "
            f"a paired comparison needs at least {MIN_OVERLAP:.0%}"
        )
    x, y = a.loc[shared].to_numpy(float), b.loc[shared].to_numpy(float)
    d = x - y
    binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    discordant = int(np.count_nonzero(d))
    p = None
    if binary:
        wins = int(np.count_nonzero(d > 0))
        p = float(stats.binomtest(wins, discordant, 0.5).pvalue) if discordant else 1.0
    return MetricDifference(
        metric=metric,
        n=len(shared),
        dropped=len(a) + len(b) - 2 * len(shared),
        mean=float(d.mean()),
        variance=float(d.var(ddof=1)) if len(d) > 1 else 0.0,
        discordant=discordant,
        mcnemar_p=p,
    )


def t_interval(parts: list[tuple[float, int]], confidence: float) -> tuple[float, float | None, float]:
    """(stderr, df, half-width) of a weighted sum of independent means, `parts` = [(w^2 var / n, n)]:
    a t quantile with Welch-Satterthwaite's degrees of freedom (n - 1 for a single part)."""
    variance = sum(v for v, _ in parts)
    if variance <= 0:
        return 0.0, None, 0.0
    df = variance**2 / sum(v**2 / (n - 1) for v, n in parts if v > 0)
    return math.sqrt(variance), df, float(stats.t.ppf((1 + confidence) / 2, df)) * math.sqrt(variance)


def difference(
    weights: Mapping[str, float],
    a: pd.DataFrame,
    b: pd.DataFrame,
    confidence: float = 0.95,
    label: str = "A vs B",
) -> Difference:
    """A - B on the objective `weights` (normalised, signed) from the two models' per-item records."""
    metrics = [metric_difference(k, per_metric(a, k, label), per_metric(b, k, label), f"{label}: {k}") for k in weights]
    value = sum(weights[m.metric] * m.mean for m in metrics)
    se, df, half = t_interval([(weights[m.metric] ** 2 * m.variance / m.n, m.n) for m in metrics], confidence)
    return Difference(
        value=value, stderr=se, df=df, low=value - half, high=value + half, confidence=confidence, metrics=metrics
    )


def unpaired_halfwidth(
    weights: Mapping[str, float], a: pd.DataFrame, b: pd.DataFrame, confidence: float = 0.95
) -> float:
    """Half-width of A - B's interval were the two scores independent: z * sqrt(se_A^2 + se_B^2),
    each se from its own items (sd / sqrt(n)), combined over the objective's metrics."""
    z = float(stats.norm.ppf((1 + confidence) / 2))
    variance = 0.0
    for k, w in weights.items():
        for items in (a, b):
            values = per_metric(items, k, "unpaired").to_numpy(float)
            variance += w**2 * values.var(ddof=1) / len(values)
    return z * math.sqrt(variance)
