"""Checkpoint selection, and the gate that lets the next phase start.

Objective: the weighted mean of the phase's metrics, sum(w_k * s_k * m_k) / sum(w_k), where s_k is
-1 for a lower-is-better metric (LOWER_IS_BETTER: `validation/loss`) and +1 otherwise. It is always
maximised and stays on the metrics' own scale (lm-eval accuracies in [0, 1]), so `min_gain` reads
as points of that scale; a validation loss enters negated.

Every comparison of two candidates is paired on the items both were scored on
(evaluation/paired.py: the paired t interval at `selection.confidence`), from the per-item records
each candidate lists (`CheckpointScore.items`). Two checkpoints of one run agree on most items, so
the paired interval is much narrower than two independent scores' errors combined.

Policies (`selection.policy`), among the eligible candidates:

    best                   the highest objective (ties: fewer samples)
    earliest_within_noise  the fewest samples among candidates whose paired interval (at
                           `within_noise_confidence`) to the best one includes 0 (not significantly
                           below it; ties: the higher objective)
    smoothed               the highest objective averaged over `smoothing_window` neighbouring
                           candidates in samples order (start, checkpoints; truncated at the ends):
                           the top of a smoothed curve is less the luckiest draw of one noisy score
                           (the winner's curse); the averaged checkpoint stands on its own score
    last                   the last saved checkpoint: no selection (InstructLab's multiphase example)
    lowest_val_loss        the saved checkpoint with the lowest validation/loss (training_hub's
                           save_best_val_loss)

The phase's start model (0 samples) and the averaged checkpoint (selection.average_last_k) are
candidates under best, earliest_within_noise and smoothed; last and lowest_val_loss choose among
the phase's saved checkpoints. Which policy is the default, and its parameters, was measured as
regret on a held-out test split over fresh seeds (bench/selection.py, README).

Forgetting guard: with `max_forgetting` set, a candidate is ineligible when an earlier phase's
objective metric fell, with confidence, by more than that below the model that reached the best
value the run carried for it (`best_reached`): the paired interval of the drop lies above
`max_forgetting`. A guard that shrinks the choice only on evidence: noise alone never rejects.
If no candidate is eligible, the gate fails.

Gate: every `min_score` floor holds for the winner, and the winner's gain over the phase's start
is shown, not just measured: the lower end of its paired interval reaches `min_gain` (a kept
start has a gain of exactly 0). The verdict says which check missed and by how much.
selection.json and the gate artifact give, per candidate, the objective, the paired difference
to the winner with its interval, and why it lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
from pydantic import BaseModel, Field

from core import storage
from core.items import SUFFIX, read_items
from core.recipe import PhaseConfig, SelectionConfig
from evaluation.paired import Difference, difference, per_metric, t_interval

LOWER_IS_BETTER = frozenset({"validation/loss"})


class CheckpointScore(BaseModel):
    checkpoint: str = Field(description="URI of the model directory.")
    name: str = Field(description="samples_<N>, avg_last<k>, or 'start ...' for the phase's starting model.")
    samples: int = Field(description="Samples seen in this phase when it was saved (0 for the start).")
    metrics: dict[str, float]
    stderr: dict[str, float] = Field(default_factory=dict)
    items: list[str] = Field(default_factory=list, description="URIs of its per-item records (core/items.py).")
    averaged: bool = Field(False, description="The weight average of the phase's last checkpoints.")
    objective: float | None = None
    objective_stderr: float | None = Field(None, description="From its per-item records: sqrt(sum w^2 var/n).")
    interval: tuple[float, float] | None = Field(None, description="The objective's t interval at the confidence.")
    smoothed: float | None = Field(None, description="Policy smoothed: the objective averaged over its neighbours.")
    within_noise: bool | None = Field(
        None, description="Policy earliest_within_noise: its paired interval to the best candidate includes 0."
    )
    vs_winner: Difference | None = Field(None, description="Paired difference of its objective to the winner's.")
    rejected: str | None = Field(None, description="Why the forgetting guard made it ineligible.")
    lost: str | None = Field(None, description="Why it is not the winner (None for the winner).")


class Gate(BaseModel):
    passed: bool
    reasons: list[str] = Field(description="One line per check, passed or failed.")


class Selection(BaseModel):
    phase: str
    objective: dict[str, float]
    policy: str = "lowest_val_loss"
    confidence: float = 0.95
    within_noise_confidence: float = 0.5
    smoothing_window: int = 5
    start: CheckpointScore
    candidates: list[CheckpointScore]
    winner: CheckpointScore
    gate: Gate


class SelectionError(ValueError):
    pass


def signed_weights(weights: dict[str, float]) -> dict[str, float]:
    """The objective's weights normalised to sum 1, negated for lower-is-better metrics."""
    total = sum(weights.values())
    return {k: (-w if k in LOWER_IS_BETTER else w) / total for k, w in weights.items()}


def objective_value(weights: dict[str, float], metrics: dict[str, float], label: str) -> float:
    missing = [k for k in weights if k not in metrics]
    if missing:
        raise SelectionError(f"{label}: objective needs {missing}, evaluation produced {sorted(metrics)}")
    return sum(w * metrics[k] for k, w in signed_weights(weights).items())


def best_reached(keys: Sequence[str], scores: Sequence[CheckpointScore]) -> dict[str, CheckpointScore]:
    """For each key, the model among `scores` with the highest value of it (the forgetting guard's
    reference). Validation losses are left out: each phase's is measured on its own slice."""
    return {
        k: max((s for s in scores if k in s.metrics), key=lambda s: s.metrics[k])
        for k in keys
        if k not in LOWER_IS_BETTER and any(k in s.metrics for s in scores)
    }


def with_validation(score: CheckpointScore, run_uri: str, phase: str, model: str) -> CheckpointScore:
    """`score` with this phase's validation/loss of the model (<phase>/validation/<model>.items.parquet,
    written by the trainer; `model` is "start" for the phase's start), in place of an earlier phase's,
    which was measured on another slice; without one, with none."""
    uri = storage.join(run_uri, phase, "validation", model + SUFFIX)
    kept = [u for u in score.items if u.rsplit("/", 2)[-2] != "validation"]  # <phase>/validation/<model>...
    metrics = {k: v for k, v in score.metrics.items() if k != "validation/loss"}
    if storage.exists(uri):
        kept.append(uri)
        metrics["validation/loss"] = float(read_items([uri])["value"].mean())
    return score.model_copy(update={"items": kept, "metrics": metrics})


class _Comparer:
    """Paired differences between models, from their per-item records (each file read once)."""

    def __init__(self, confidence: float) -> None:
        self.confidence = confidence
        self._records: dict[str, pd.DataFrame] = {}

    def records(self, score: CheckpointScore) -> pd.DataFrame:
        if not score.items:
            raise SelectionError(f"{score.name}: no per-item records to compare it with ({score.checkpoint})")
        key = "\n".join(score.items)  # a phase's start is its predecessor's winner with another validation file
        if key not in self._records:
            self._records[key] = read_items(score.items)
        return self._records[key]

    def difference(
        self, weights: dict[str, float], a: CheckpointScore, b: CheckpointScore, confidence: float | None = None
    ) -> Difference:
        """a - b on `weights` (normalised, signed), paired on items, at `confidence` (default: the selection's)."""
        level = confidence or self.confidence
        return difference(weights, self.records(a), self.records(b), level, f"{a.name} vs {b.name}")

    def own_interval(self, weights: dict[str, float], score: CheckpointScore) -> tuple[float, tuple[float, float]]:
        """The candidate's objective stderr and interval, from the spread of its own items."""
        parts = []
        for key, w in weights.items():
            values = per_metric(self.records(score), key, score.name)
            parts.append((w**2 * values.var(ddof=1) / len(values), len(values)))
        se, _, half = t_interval(parts, self.confidence)
        return se, (score.objective - half, score.objective + half)


def forgetting(
    phase: PhaseConfig, reference: dict[str, CheckpointScore], candidate: CheckpointScore, compare: _Comparer
) -> str | None:
    """Why the candidate forgot too much of an earlier phase (the drop's paired interval lies above
    max_forgetting), or None."""
    if phase.max_forgetting is None:
        return None
    for key, best in reference.items():
        drop = compare.difference({key: 1.0}, best, candidate)
        if drop.low > phase.max_forgetting:
            return (
                f"{key} fell {drop} below the run's best ({best.name}: {best.metrics[key]:.4f} -> "
                f"{candidate.metrics[key]:.4f}) > max_forgetting {phase.max_forgetting:.4f} "
                f"at {compare.confidence:.0%} confidence"
            )
    return None


def _fewest_samples(scores: list[CheckpointScore]) -> CheckpointScore:
    return min(scores, key=lambda c: (c.samples, -c.objective))


def _highest(scores: list[CheckpointScore], value: Callable[[CheckpointScore], float]) -> CheckpointScore:
    return max(scores, key=lambda c: (value(c), -c.samples))


def smooth(scored: list[CheckpointScore], window: int) -> list[CheckpointScore]:
    """Each candidate with `smoothed` set: the mean objective of the `window` candidates centred on it
    in samples order (fewer at the ends); the averaged checkpoint keeps its own objective."""
    curve = sorted((c for c in scored if not c.averaged), key=lambda c: c.samples)
    half = window // 2
    smoothed = {
        c.checkpoint: sum(n.objective for n in curve[max(0, i - half) : i + half + 1])
        / len(curve[max(0, i - half) : i + half + 1])
        for i, c in enumerate(curve)
    }
    return [c.model_copy(update={"smoothed": smoothed.get(c.checkpoint, c.objective)}) for c in scored]


def choose(
    config: SelectionConfig,
    start: CheckpointScore,
    scored: list[CheckpointScore],
    weights: dict[str, float],
    compare: _Comparer,
) -> tuple[CheckpointScore, list[CheckpointScore], dict[str, str], str]:
    """(winner, the candidates as updated by the policy, why each other one lost, why the winner won)."""
    policy, window = config.policy, config.smoothing_window
    saved_only = policy in ("last", "lowest_val_loss")
    pool = [c for c in scored if not (saved_only and (c.averaged or c.checkpoint == start.checkpoint))]
    eligible = [c for c in pool if c.rejected is None]
    lost = {
        c.checkpoint: f"not a candidate under policy {policy} (it chooses among the phase's saved checkpoints)"
        for c in scored
        if c not in pool
    }
    lost |= {c.checkpoint: f"rejected by the forgetting guard: {c.rejected}" for c in pool if c.rejected}
    if not eligible:
        return _highest(pool, lambda c: c.objective), scored, lost, "every candidate was rejected"
    if policy == "best":
        winner = _highest(eligible, lambda c: c.objective)
        why = "the highest objective"
        for c in eligible:
            lost.setdefault(c.checkpoint, f"objective {c.objective:.4f} below the winner's {winner.objective:.4f}")
    elif policy == "earliest_within_noise":
        best = _highest(eligible, lambda c: c.objective)
        level = config.within_noise_confidence
        gaps = {c.checkpoint: compare.difference(weights, best, c, level) for c in eligible}
        scored = [
            c.model_copy(update={"within_noise": gaps[c.checkpoint].low <= 0}) if c.checkpoint in gaps else c
            for c in scored
        ]
        within = [c for c in scored if c.within_noise]
        winner = _fewest_samples(within)
        peers = [c.name for c in within if c.checkpoint != winner.checkpoint]
        why = (
            f"the fewest samples within noise of the best ({best.name} {best.objective:.4f}; paired "
            f"{level:.0%} interval of the difference includes 0)" + (f"; also within noise: {peers}" if peers else "")
        )
        for c in eligible:
            gap = gaps[c.checkpoint]
            lost.setdefault(
                c.checkpoint,
                f"within noise of the best, but {c.samples} samples vs the winner's {winner.samples}"
                if gap.low <= 0
                else f"significantly below the best {best.name}: best - this = {gap}",
            )
    elif policy == "smoothed":
        scored = smooth(scored, window)
        eligible = [c for c in scored if c.rejected is None]
        winner = _highest(eligible, lambda c: c.smoothed)
        why = f"the highest objective averaged over {window} neighbouring candidates"
        for c in eligible:
            lost.setdefault(
                c.checkpoint, f"smoothed objective {c.smoothed:.4f} below the winner's {winner.smoothed:.4f}"
            )
    elif policy == "last":
        winner = max(eligible, key=lambda c: c.samples)
        why = "the last saved checkpoint (no selection)"
        for c in eligible:
            lost.setdefault(c.checkpoint, f"saved at {c.samples} samples, before the last one")
    elif policy == "lowest_val_loss":
        missing = [c.name for c in eligible if "validation/loss" not in c.metrics]
        if missing:
            raise SelectionError(
                f"policy lowest_val_loss: no validation/loss for {missing} (training.validation_samples)"
            )
        winner = min(eligible, key=lambda c: (c.metrics["validation/loss"], c.samples))
        why = f"the lowest validation/loss ({winner.metrics['validation/loss']:.4f})"
        for c in eligible:
            lost.setdefault(c.checkpoint, f"validation/loss {c.metrics['validation/loss']:.4f} above the winner's")
    else:
        raise SelectionError(f"unknown selection policy {policy!r}")
    lost.pop(winner.checkpoint, None)
    winner = next(c for c in scored if c.checkpoint == winner.checkpoint)
    return winner, scored, lost, why


def select(
    phase: PhaseConfig,
    start: CheckpointScore,
    candidates: list[CheckpointScore],
    best_reached: dict[str, CheckpointScore] | None = None,
    config: SelectionConfig | None = None,
) -> Selection:
    """Pick the phase's model by `config.policy`, and judge the gate.

    `best_reached` maps each earlier phase's objective metric to the model that reached the
    run's best value for it (the forgetting guard's reference). `start` competes with `candidates`.
    """
    if not candidates:
        raise SelectionError(f"phase {phase.name}: no complete checkpoint to select from")
    config = config or SelectionConfig()
    compare = _Comparer(config.confidence)
    weights = signed_weights(phase.objective)
    reference = best_reached or {}
    scored = []
    for c in [start, *candidates]:
        c = c.model_copy(update={"objective": objective_value(phase.objective, c.metrics, c.name)})
        se, interval = compare.own_interval(weights, c)
        scored.append(
            c.model_copy(
                update={
                    "objective_stderr": se,
                    "interval": interval,
                    "rejected": forgetting(phase, reference, c, compare),
                }
            )
        )
    winner, scored, lost, why = choose(config, scored[0], scored, weights, compare)
    scored = [
        c.model_copy(
            update={
                "lost": lost.get(c.checkpoint),
                "vs_winner": None if c.checkpoint == winner.checkpoint else compare.difference(weights, c, winner),
            }
        )
        for c in scored
    ]
    start, candidates = scored[0], scored[1:]
    winner = next(c for c in scored if c.checkpoint == winner.checkpoint)

    reasons, passed = [], True
    if winner.rejected is not None:
        passed = False
        reasons.append(f"FAIL forgetting guard rejected every candidate; best: {winner.name}: {winner.rejected}")
    else:
        if phase.max_forgetting is not None:
            rejected = [c.name for c in scored if c.rejected]
            shown = {k: f"{m.name} {m.metrics[k]:.4f}" for k, m in reference.items()}
            reasons.append(
                f"PASS forgetting guard (no drop of more than {phase.max_forgetting:.4f} below the run's best "
                f"{shown}, at {config.confidence:.0%} confidence); rejected: {rejected or 'none'}"
            )
        kept = winner.checkpoint == start.checkpoint
        reasons.append(
            f"{'NOTE start model kept' if kept else 'PASS winner ' + winner.name}: policy {config.policy}, {why}"
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
        gain = compare.difference(weights, winner, start)
        ok = gain.low >= phase.min_gain
        passed &= ok
        reasons.append(
            f"{'PASS' if ok else 'FAIL'} gain over start = {gain} (paired {config.confidence:.0%} interval; "
            f"{start.objective:.4f} -> {winner.objective:.4f}): its lower end vs minimum {phase.min_gain:+.4f}"
            + ("" if ok else f" (missed by {phase.min_gain - gain.low:.4f})")
        )
    return Selection(
        phase=phase.name,
        objective=phase.objective,
        policy=config.policy,
        confidence=config.confidence,
        within_noise_confidence=config.within_noise_confidence,
        smoothing_window=config.smoothing_window,
        start=start,
        candidates=candidates,
        winner=winner,
        gate=Gate(passed=passed, reasons=reasons),
    )


def gate_markdown(selection: Selection) -> str:
    """The gate decision and the score table, for a Prefect markdown artifact."""
    keys = sorted(selection.winner.metrics)
    level = f"{selection.confidence:.0%}"
    header = (
        f"| candidate | samples | objective | {level} interval | minus the winner (paired, {level}) | why it lost | "
        + " | ".join(keys)
        + " |"
    )
    lines = [
        f"# Phase `{selection.phase}`: {'gate PASSED' if selection.gate.passed else 'gate FAILED'}",
        "",
        f"Winner: **{selection.winner.name}** (objective {selection.winner.objective:.4f}, "
        f"start {selection.start.objective:.4f}). Objective: weighted mean of {selection.objective}; "
        f"policy `{selection.policy}`. Differences are paired on the items both models were scored on.",
        "",
        *[f"- {reason}" for reason in selection.gate.reasons],
        "",
        header,
        "|" + " --- |" * (6 + len(keys)),
    ]
    for c in [selection.start, *selection.candidates]:
        mark = " **(winner)**" if c.checkpoint == selection.winner.checkpoint else ""
        low, high = c.interval
        cells = " | ".join(f"{c.metrics.get(k, float('nan')):.4f}" for k in keys)
        versus = "-" if c.vs_winner is None else str(c.vs_winner)
        lines.append(
            f"| {c.name}{mark} | {c.samples} | {c.objective:.4f} | [{low:.4f}, {high:.4f}] | {versus} | "
            f"{c.lost or '-'} | {cells} |"
        )
    return "\n".join(lines) + "\n"
