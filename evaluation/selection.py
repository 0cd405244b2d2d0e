"""Best-checkpoint selection and the gate that lets the next phase start.

Objective: the weighted mean of the phase's metrics, sum(w_k * m_k) / sum(w_k), so it stays
on the metrics' own scale (lm-eval accuracies in [0, 1]) and `min_gain` reads as points of
that scale. Its standard error combines the metrics' recorded stderrs (lm-eval's, MT-Bench's)
as independent estimates: se = sqrt(sum((w_k / sum(w)) * se_k)^2); a metric without a stderr
counts as exact.

Noise-aware choice: scores on a few hundred items are estimates, and the maximum over dozens
of checkpoints is mostly the luckiest draw. A candidate is *significantly below* the best
when best - objective > z * sqrt(se_best^2 + se_candidate^2) (the stderr of the difference,
both scores treated as independent, z the two-sided normal quantile of `confidence`). Two
checkpoints scored on the same items are positively correlated, so this overstates the
difference's noise: the rule leans towards the cheaper checkpoint rather than claim an
improvement the data does not show. Among the eligible candidates that are not significantly
below the best, the one with the fewest samples wins (ties: the higher objective).

The phase's start model is a candidate (0 samples): when no checkpoint is significantly
better, the start is kept and the gate says so.

Forgetting guard: with `max_forgetting` set, a candidate is ineligible when any earlier
phase's objective metric fell by more than that below the best value the run reached for it
(`best_reached`: the highest score among the models the run carried forward), so losses
cannot add up phase after phase. If no candidate is eligible, the gate fails.

Gate: every `min_score` floor holds for the winner, and the winner beats the phase's starting
model by at least `min_gain`. The verdict says which metric missed and by how much.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

from pydantic import BaseModel, Field

from core.recipe import PhaseConfig


class CheckpointScore(BaseModel):
    checkpoint: str = Field(description="URI of the model directory.")
    name: str = Field(description="samples_<N>, avg_last<k>, or 'start ...' for the phase's starting model.")
    samples: int = Field(description="Samples seen in this phase when it was saved (0 for the start).")
    metrics: dict[str, float]
    stderr: dict[str, float] = Field(default_factory=dict)
    objective: float | None = None
    objective_stderr: float | None = None
    interval: tuple[float, float] | None = Field(None, description="objective -/+ z * objective_stderr.")
    below_best: bool | None = Field(None, description="Significantly below the best eligible candidate.")
    rejected: str | None = Field(None, description="Why the forgetting guard made it ineligible.")


class Gate(BaseModel):
    passed: bool
    reasons: list[str] = Field(description="One line per check, passed or failed.")


class Selection(BaseModel):
    phase: str
    objective: dict[str, float]
    confidence: float = 0.95
    start: CheckpointScore
    candidates: list[CheckpointScore]
    winner: CheckpointScore
    gate: Gate


class SelectionError(ValueError):
    pass


def objective_value(weights: dict[str, float], metrics: dict[str, float], label: str) -> float:
    missing = [k for k in weights if k not in metrics]
    if missing:
        raise SelectionError(f"{label}: objective needs {missing}, evaluation produced {sorted(metrics)}")
    return sum(w * metrics[k] for k, w in weights.items()) / sum(weights.values())


def objective_stderr(weights: dict[str, float], stderr: dict[str, float]) -> float:
    """Stderr of the weighted mean, the metrics' errors taken as independent (0 when unrecorded)."""
    total = sum(weights.values())
    return math.sqrt(sum((w / total * stderr.get(k, 0.0)) ** 2 for k, w in weights.items()))


def best_reached(keys: Sequence[str], scores: Sequence[CheckpointScore]) -> dict[str, float]:
    """For each key, the highest value among `scores` that have it (the forgetting guard's reference)."""
    return {k: max(s.metrics[k] for s in scores if k in s.metrics) for k in keys if any(k in s.metrics for s in scores)}


def forgetting(phase: PhaseConfig, reference: dict[str, float], candidate: CheckpointScore) -> str | None:
    """Why the candidate forgot too much of an earlier phase, or None."""
    if phase.max_forgetting is None:
        return None
    for key, best in reference.items():
        drop = best - candidate.metrics[key]
        if drop > phase.max_forgetting:
            return (
                f"{key} fell {drop:.4f} below the run's best ({best:.4f} -> {candidate.metrics[key]:.4f}) "
                f"> max_forgetting {phase.max_forgetting:.4f}"
            )
    return None


def select(
    phase: PhaseConfig,
    start: CheckpointScore,
    candidates: list[CheckpointScore],
    best_reached: dict[str, float] | None = None,
    confidence: float = 0.95,
) -> Selection:
    """Pick the cheapest eligible candidate within noise of the best one, and judge the gate.

    `best_reached` maps each earlier phase's objective metric to the best value the run reached
    for it; the forgetting guard watches those. `start` competes with `candidates`.
    """
    if not candidates:
        raise SelectionError(f"phase {phase.name}: no complete checkpoint to select from")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    reference = best_reached or {}
    scored = []
    for c in [start, *candidates]:
        value = objective_value(phase.objective, c.metrics, c.name)
        se = objective_stderr(phase.objective, c.stderr)
        scored.append(
            c.model_copy(
                update={
                    "objective": value,
                    "objective_stderr": se,
                    "interval": (value - z * se, value + z * se),
                    "rejected": forgetting(phase, reference, c),
                }
            )
        )
    eligible = [c for c in scored if c.rejected is None]
    best = max(eligible or scored, key=lambda c: c.objective)
    scored = [
        c.model_copy(
            update={
                "below_best": best.objective - c.objective > z * math.hypot(best.objective_stderr, c.objective_stderr)
            }
        )
        for c in scored
    ]
    best = next(c for c in scored if c.checkpoint == best.checkpoint)
    start, candidates = scored[0], scored[1:]
    within_noise = [c for c in scored if c.rejected is None and not c.below_best]
    # With nothing eligible the best rejected one is reported as the winner and the gate fails.
    winner = min(within_noise or [best], key=lambda c: (c.samples, -c.objective))

    reasons, passed = [], True
    if not eligible:
        passed = False
        reasons.append(f"FAIL forgetting guard rejected every candidate; best: {winner.name}: {winner.rejected}")
    elif phase.max_forgetting is not None:
        rejected = [c.name for c in scored if c.rejected]
        reasons.append(
            f"PASS forgetting guard (max drop {phase.max_forgetting:.4f} below the run's best on {reference}); "
            f"rejected: {rejected or 'none'}"
        )
    if eligible:
        peers = [c.name for c in within_noise if c is not winner]
        reasons.append(
            f"{'NOTE start model kept' if winner is start else 'PASS winner ' + winner.name}: fewest samples within "
            f"noise of the best ({best.name} {best.objective:.4f}, {confidence:.0%} interval of the difference)"
            + (f"; also within noise: {peers}" if peers else "")
        )
    for key, floor in phase.min_score.items():
        value = winner.metrics.get(key)
        ok = value is not None and value >= floor
        passed &= ok
        shown = "missing" if value is None else f"{value:.4f}"
        reasons.append(
            f"{'PASS' if ok else 'FAIL'} {key} = {shown} vs floor {floor:.4f}"
            + ("" if ok or value is None else f" (missed by {floor - value:.4f})")
        )
    if phase.min_gain is not None:
        gain = winner.objective - start.objective
        ok = gain >= phase.min_gain
        passed &= ok
        reasons.append(
            f"{'PASS' if ok else 'FAIL'} gain over start = {gain:+.4f} ({start.objective:.4f} -> {winner.objective:.4f}) "
            f"vs minimum {phase.min_gain:+.4f}" + ("" if ok else f" (missed by {phase.min_gain - gain:.4f})")
        )
    return Selection(
        phase=phase.name,
        objective=phase.objective,
        confidence=confidence,
        start=start,
        candidates=candidates,
        winner=winner,
        gate=Gate(passed=passed, reasons=reasons),
    )


def gate_markdown(selection: Selection) -> str:
    """The gate decision and the score table, for a Prefect markdown artifact."""
    keys = sorted(selection.winner.metrics)
    header = f"| candidate | samples | objective | {selection.confidence:.0%} interval | " + " | ".join(keys) + " |"
    lines = [
        f"# Phase `{selection.phase}`: {'gate PASSED' if selection.gate.passed else 'gate FAILED'}",
        "",
        f"Winner: **{selection.winner.name}** (objective {selection.winner.objective:.4f}, "
        f"start {selection.start.objective:.4f}). Objective: weighted mean of {selection.objective}; the winner "
        "is the candidate with the fewest samples among those not significantly below the best.",
        "",
        *[f"- {reason}" for reason in selection.gate.reasons],
        "",
        header,
        "|" + " --- |" * (4 + len(keys)),
    ]
    for c in [selection.start, *selection.candidates]:
        mark = " **(winner)**" if c.checkpoint == selection.winner.checkpoint else ""
        note = f" (rejected: {c.rejected})" if c.rejected else " (below the best)" if c.below_best else ""
        low, high = c.interval
        cells = " | ".join(f"{c.metrics.get(k, float('nan')):.4f}" for k in keys)
        lines.append(f"| {c.name}{mark}{note} | {c.samples} | {c.objective:.4f} | [{low:.4f}, {high:.4f}] | {cells} |")
    return "\n".join(lines) + "\n"
