"""Multi-rung early stopping for sweeps: successive halving with pluggable pruners.

A sweep trains every live run of its grid to the first rung (a number of samples of the first
phase), ranks the runs with a pruner, keeps the best ceil(n / eta) of the n runs that reached
the rung (a run the watchdog stopped counts among the n and is always dropped first), and
moves the survivors on to the next rung. After the last rung the survivors finish.

Pruners (most promising first):
- `dynamics`: the paper's rule (evaluation/dynamics.py): low early grad norm, then high loss.
- `eval`: the phase objective of the checkpoint saved at the rung (an early evaluation).
- `loss_slope`: least-squares slope of the training loss against samples since the previous
  rung (most negative first: the run still learning fastest).

Validation: with every run trained to every rung and finished, each pruner's halving is
replayed on the recorded rungs, and compared with the final scores: did the winner survive,
Spearman's rho between the pruner's first-rung ranking and the final scores, and the samples
its stopping would have saved.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel
from scipy import stats

from core.records import StepMetrics
from evaluation.dynamics import EarlyDynamics, rank_runs

Pruner = Literal["dynamics", "eval", "loss_slope"]
PRUNERS: tuple[Pruner, ...] = ("dynamics", "eval", "loss_slope")


class RungResult(BaseModel):
    """One run at one rung: what every pruner needs, written by the run's probe."""

    run_id: str
    rung: int  # the rung's planned samples
    samples: int  # samples actually trained (the first optimizer step at or past the rung)
    stopped: str = ""  # why the watchdog stopped it ("" = it reached the rung)
    dynamics: EarlyDynamics | None = None
    loss_slope: float | None = None  # loss per 1,000 samples since the previous rung
    eval_score: float | None = None  # phase objective of the rung's checkpoint


def loss_slope(metrics: list[StepMetrics], since_samples: int, until_samples: int) -> float | None:
    """Slope of the loss against samples (per 1,000) over the steps in (since, until]; None
    with fewer than 2 steps. A run with a non-finite loss gets +inf (worst)."""
    window = [m for m in metrics if since_samples < m.samples_seen <= until_samples]
    if len(window) < 2:
        return None
    losses = [m.loss for m in window]
    if not all(math.isfinite(v) for v in losses):
        return math.inf
    return float(stats.linregress([m.samples_seen / 1000 for m in window], losses).slope)


def rank(pruner: Pruner, results: list[RungResult]) -> list[str]:
    """Run ids, most promising first. Runs the watchdog stopped come last; so do runs without
    the pruner's signal (a score it could not compute)."""
    alive = [r for r in results if not r.stopped]
    if pruner == "dynamics":
        ordered = [d.run_id for d in rank_runs([r.dynamics for r in alive if r.dynamics])]
    elif pruner == "eval":
        scored = [r for r in alive if r.eval_score is not None]
        ordered = [r.run_id for r in sorted(scored, key=lambda r: -r.eval_score)]
    else:
        sloped = [r for r in alive if r.loss_slope is not None]
        ordered = [r.run_id for r in sorted(sloped, key=lambda r: r.loss_slope)]
    return ordered + [r.run_id for r in results if r.run_id not in ordered]


def keep_count(n: int, eta: float) -> int:
    """Runs kept at a rung: the best ceil(n / eta), at least one."""
    return max(1, math.ceil(n / eta))


def survivors(pruner: Pruner, results: list[RungResult], eta: float) -> list[str]:
    """The runs that go on past this rung (never one the watchdog stopped)."""
    alive = {r.run_id for r in results if not r.stopped}
    return [run_id for run_id in rank(pruner, results)[: keep_count(len(results), eta)] if run_id in alive]


class PrunerValidation(BaseModel):
    pruner: Pruner
    survivors: list[str]  # the runs its halving would have finished
    stopped_at: dict[str, int]  # run -> rung (samples) where it would have been stopped
    winner_survived: bool | None
    spearman_first_rung: float | None  # its first-rung ranking vs the final scores
    samples_saved: int  # planned samples its stopping would not have trained


def validate(
    pruner: Pruner,
    rungs: list[list[RungResult]],
    eta: float,
    finals: dict[str, float],
    planned: dict[str, int],
) -> PrunerValidation:
    """Replay the pruner's successive halving on rungs where every run was recorded, and
    score it against the final objectives (runs without one are left out of rho)."""
    live = [r.run_id for r in rungs[0]]
    stopped_at: dict[str, int] = {}
    for results in rungs:
        at_rung = [r for r in results if r.run_id in live]
        kept = survivors(pruner, at_rung, eta)
        for r in at_rung:
            if r.run_id not in kept:
                stopped_at[r.run_id] = r.samples
        live = kept
    winner = max(finals, key=finals.get) if finals else None
    first = [run_id for run_id in rank(pruner, rungs[0]) if run_id in finals]
    rho = None
    if len(first) >= 2 and len(set(finals[r] for r in first)) > 1:
        # position 0 is the most promising: rank -position against the final score
        rho = float(stats.spearmanr([-i for i in range(len(first))], [finals[r] for r in first]).statistic)
    return PrunerValidation(
        pruner=pruner,
        survivors=live,
        stopped_at=stopped_at,
        winner_survived=None if winner is None else winner in live,
        spearman_first_rung=None if rho is None or math.isnan(rho) else round(rho, 4),
        samples_saved=sum(planned[r] - samples for r, samples in stopped_at.items()),
    )
