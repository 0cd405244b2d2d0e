"""Early training dynamics as predictors of final performance (paper §3.7, A.6.9).

The paper's finding: runs with lower gradient norms and higher loss early in training end
better. The exact statistic we use, over the probe window (every optimizer step up to
`probe_samples` samples):

    G = median gradient norm (before clipping),  L = median training loss.

The paper's rule compares runs that are learning, so a run first has to be: one whose L is
not below the loss of its first step is *diverging* and ranks last (the more its loss rose,
the lower). Measured on the lab, a learning rate 250x too high drove the loss from 12.4 to
16-37 while clipping kept its gradient norm *below* the sane runs': "higher loss, lower grad
norm" taken literally would have ranked it first.

Learning runs are ranked by G, lowest first; runs whose G lie within `tie_ratio` of each
other (log-spaced buckets) are ordered by L, highest first. Both signals agree for sane
settings (a lower learning rate or a larger batch gives a lower G and a higher L). Medians
make one spiky step (the first steps of a run always have large gradients) count for little.
"""

from __future__ import annotations

import math
import statistics

from pydantic import BaseModel

from core.records import StepMetrics


class EarlyDynamics(BaseModel):
    run_id: str
    grad_norm: float  # median over the probe window
    loss: float  # median over the probe window
    steps: int
    samples: int  # samples seen at the end of the window
    first_loss: float  # loss of the first step

    @property
    def diverging(self) -> bool:
        return not self.loss < self.first_loss


def early_dynamics(run_id: str, metrics: list[StepMetrics], probe_samples: int) -> EarlyDynamics:
    window = [m for m in metrics if m.samples_seen <= probe_samples] or metrics[:1]
    if not window:
        raise ValueError(f"{run_id}: no training steps logged")
    return EarlyDynamics(
        run_id=run_id,
        grad_norm=statistics.median(m.grad_norm for m in window),
        loss=statistics.median(m.loss for m in window),
        steps=len(window),
        samples=window[-1].samples_seen,
        first_loss=window[0].loss,
    )


def rank_runs(runs: list[EarlyDynamics], tie_ratio: float = 1.05) -> list[EarlyDynamics]:
    """Most promising first (see the module docstring for the rule)."""

    def key(run: EarlyDynamics) -> tuple[bool, float, float]:
        if run.diverging or not math.isfinite(run.grad_norm):
            rise = run.loss / run.first_loss if math.isfinite(run.loss) else math.inf
            return True, rise, 0.0
        bucket = math.floor(math.log(max(run.grad_norm, 1e-12)) / math.log(tie_ratio))
        return False, bucket, -run.loss

    return sorted(runs, key=key)
