"""Best-checkpoint selection and the gate that lets the next phase start.

Objective: the weighted mean of the phase's metrics, sum(w_k * m_k) / sum(w_k), so it stays
on the metrics' own scale (lm-eval accuracies in [0, 1]) and `min_gain` reads as points of
that scale. The best objective wins; ties go to the checkpoint with fewer samples (cheaper,
and the paper's 'samples to peak').

Forgetting guard: with `max_forgetting` set, a checkpoint whose score on any earlier phase's
objective metric fell by more than that below the phase's starting model is ineligible; if
no checkpoint is eligible, the gate fails.

Gate: every `min_score` floor holds for the winner, and the winner beats the phase's starting
model by at least `min_gain`. The verdict says which metric missed and by how much.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from training.recipe import PhaseConfig


class CheckpointScore(BaseModel):
    checkpoint: str = Field(description="URI of the model directory.")
    name: str = Field(description="samples_<N>, or 'start' for the phase's starting model.")
    samples: int = Field(description="Samples seen in this phase when it was saved (0 for the start).")
    metrics: dict[str, float]
    stderr: dict[str, float] = Field(default_factory=dict)
    objective: float | None = None
    rejected: str | None = Field(None, description="Why the forgetting guard made it ineligible.")


class Gate(BaseModel):
    passed: bool
    reasons: list[str] = Field(description="One line per check, passed or failed.")


class Selection(BaseModel):
    phase: str
    objective: dict[str, float]
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


def forgetting(
    phase: PhaseConfig, start: CheckpointScore, candidate: CheckpointScore, guarded: list[str]
) -> str | None:
    """Why the candidate forgot too much of an earlier phase, or None."""
    if phase.max_forgetting is None:
        return None
    for key in guarded:
        drop = start.metrics[key] - candidate.metrics[key]
        if drop > phase.max_forgetting:
            return f"{key} fell {drop:.4f} ({start.metrics[key]:.4f} -> {candidate.metrics[key]:.4f}) > max_forgetting {phase.max_forgetting:.4f}"
    return None


def select(
    phase: PhaseConfig, start: CheckpointScore, candidates: list[CheckpointScore], guarded: list[str] = ()
) -> Selection:
    """Pick the best eligible checkpoint and judge the gate.

    `guarded` are the earlier phases' objective metrics that the forgetting guard watches.
    """
    if not candidates:
        raise SelectionError(f"phase {phase.name}: no complete checkpoint to select from")
    scored = [
        c.model_copy(update={"objective": objective_value(phase.objective, c.metrics, c.name)})
        for c in [start, *candidates]
    ]
    start = scored[0]
    candidates = [c.model_copy(update={"rejected": forgetting(phase, start, c, list(guarded))}) for c in scored[1:]]
    eligible = [c for c in candidates if c.rejected is None]
    # With nothing eligible the best rejected one is reported as the winner and the gate fails.
    winner = min(eligible or candidates, key=lambda c: (-c.objective, c.samples))

    reasons, passed = [], True
    if not eligible:
        passed = False
        reasons.append(f"FAIL forgetting guard rejected every checkpoint; best: {winner.name}: {winner.rejected}")
    elif phase.max_forgetting is not None:
        rejected = [c.name for c in candidates if c.rejected]
        reasons.append(
            f"PASS forgetting guard (max drop {phase.max_forgetting:.4f} on {list(guarded)}); rejected: {rejected or 'none'}"
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
    if not reasons:
        reasons.append("PASS no gate configured")
    return Selection(
        phase=phase.name,
        objective=phase.objective,
        start=start,
        candidates=candidates,
        winner=winner,
        gate=Gate(passed=passed, reasons=reasons),
    )


def gate_markdown(selection: Selection) -> str:
    """The gate decision and the score table, for a Prefect markdown artifact."""
    keys = sorted(selection.winner.metrics)
    header = "| checkpoint | samples | objective | " + " | ".join(keys) + " |"
    lines = [
        f"# Phase `{selection.phase}`: {'gate PASSED' if selection.gate.passed else 'gate FAILED'}",
        "",
        f"Winner: **{selection.winner.name}** (objective {selection.winner.objective:.4f}, "
        f"start {selection.start.objective:.4f}). Objective: weighted mean of {selection.objective}; ties go to fewer samples.",
        "",
        *[f"- {reason}" for reason in selection.gate.reasons],
        "",
        header,
        "|" + " --- |" * (3 + len(keys)),
    ]
    for c in [selection.start, *selection.candidates]:
        mark = " **(winner)**" if c.checkpoint == selection.winner.checkpoint else ""
        cells = " | ".join(f"{c.metrics.get(k, float('nan')):.4f}" for k in keys)
        note = f" (rejected: {c.rejected})" if c.rejected else ""
        lines.append(f"| {c.name}{mark}{note} | {c.samples} | {c.objective:.4f} | {cells} |")
    return "\n".join(lines) + "\n"
