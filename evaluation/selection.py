"""Best-checkpoint selection and the gate that lets the next phase start.

Objective: the weighted mean of the phase's metrics, sum(w_k * m_k) / sum(w_k), so it stays
on the metrics' own scale (lm-eval accuracies in [0, 1]) and `min_gain` reads as points of
that scale. The best objective wins; ties go to the checkpoint with fewer samples (cheaper,
and the paper's 'samples to peak').

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


def select(phase: PhaseConfig, start: CheckpointScore, candidates: list[CheckpointScore]) -> Selection:
    if not candidates:
        raise SelectionError(f"phase {phase.name}: no complete checkpoint to select from")
    scored = [
        c.model_copy(update={"objective": objective_value(phase.objective, c.metrics, c.name)})
        for c in [start, *candidates]
    ]
    start, candidates = scored[0], scored[1:]
    winner = min(candidates, key=lambda c: (-c.objective, c.samples))

    reasons, passed = [], True
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
        lines.append(f"| {c.name}{mark} | {c.samples} | {c.objective:.4f} | {cells} |")
    return "\n".join(lines) + "\n"
