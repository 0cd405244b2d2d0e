"""Best-checkpoint selection: objective, intervals, noise-aware choice, gates and the forgetting guard (pure logic).

Expected values are computed here from the definitions: objective = weighted mean, its stderr
= sqrt(sum((w/W * se)^2)), z = 1.959964 (two-sided 95% normal quantile), and "significantly
below the best" = gap > z * sqrt(se_best^2 + se^2).
"""

import math

import pytest

from core.recipe import PhaseConfig
from evaluation.selection import CheckpointScore, SelectionError, best_reached, gate_markdown, select

Z95 = 1.959964


def score(name: str, samples: int, se: dict[str, float] | None = None, **metrics: float) -> CheckpointScore:
    return CheckpointScore(
        checkpoint=f"/run/p/checkpoints/{name}",
        name=name,
        samples=samples,
        metrics={k.replace("__", "/"): v for k, v in metrics.items()},
        stderr=se or {},
    )


def phase(**kw) -> PhaseConfig:
    return PhaseConfig(name="phase05", data=["x.jsonl"], objective=kw.pop("objective", {"k/acc": 1.0}), **kw)


def test_weighted_objective_picks_the_best_mix():
    p = phase(objective={"k/acc": 3.0, "s/em": 1.0})
    start = score("start", 0, k__acc=0.2, s__em=0.2)
    a = score("samples_100", 100, k__acc=0.5, s__em=0.9)  # (1.5 + 0.9) / 4 = 0.600
    b = score("samples_200", 200, k__acc=0.7, s__em=0.1)  # (2.1 + 0.1) / 4 = 0.550
    selection = select(p, start, [a, b])
    assert selection.winner.name == "samples_100"
    assert selection.winner.objective == pytest.approx(0.6)
    assert selection.start.objective == pytest.approx(0.2)


def test_objective_interval_combines_the_metrics_stderrs():
    p = phase(objective={"k/acc": 3.0, "s/em": 1.0})
    c = score("samples_100", 100, se={"k/acc": 0.04, "s/em": 0.08}, k__acc=0.5, s__em=0.9)
    selection = select(p, score("start", 0, k__acc=0.1, s__em=0.1), [c])
    se = math.sqrt((0.75 * 0.04) ** 2 + (0.25 * 0.08) ** 2)
    winner = selection.winner
    assert winner.objective_stderr == pytest.approx(se)
    assert winner.interval == pytest.approx((0.6 - Z95 * se, 0.6 + Z95 * se), abs=1e-5)
    assert f"[{0.6 - Z95 * se:.4f}, {0.6 + Z95 * se:.4f}]" in gate_markdown(selection)


def test_ties_go_to_fewer_samples():
    selection = select(
        phase(),
        score("start", 0, k__acc=0.1),
        [
            score("samples_300", 300, k__acc=0.5),
            score("samples_100", 100, k__acc=0.5),
            score("samples_200", 200, k__acc=0.4),
        ],
    )
    assert selection.winner.name == "samples_100"


def test_a_checkpoint_within_noise_of_the_best_with_fewer_samples_wins():
    start = score("start", 0, se={"k/acc": 0.03}, k__acc=0.2)
    early = score("samples_100", 100, se={"k/acc": 0.035}, k__acc=0.60)
    best = score("samples_200", 200, se={"k/acc": 0.034}, k__acc=0.64)
    assert 0.64 - 0.60 < Z95 * math.hypot(0.034, 0.035)  # the premise: a gap inside the noise
    selection = select(phase(), start, [early, best])
    assert selection.winner.name == "samples_100"
    flags = {c.name: c.below_best for c in [selection.start, *selection.candidates]}
    assert flags == {"start": True, "samples_100": False, "samples_200": False}
    assert "within noise: ['samples_200']" in selection.gate.reasons[0]


def test_a_clearly_better_checkpoint_wins():
    start = score("start", 0, se={"k/acc": 0.03}, k__acc=0.2)
    early = score("samples_100", 100, se={"k/acc": 0.035}, k__acc=0.45)
    best = score("samples_200", 200, se={"k/acc": 0.034}, k__acc=0.64)
    assert 0.64 - 0.45 > Z95 * math.hypot(0.034, 0.035)
    selection = select(phase(), start, [early, best])
    assert selection.winner.name == "samples_200"
    assert [c.below_best for c in selection.candidates] == [True, False]


def test_the_start_model_wins_when_no_checkpoint_is_significantly_better():
    start = score("start", 0, se={"k/acc": 0.035}, k__acc=0.50)
    trained = [score("samples_100", 100, se={"k/acc": 0.035}, k__acc=0.53)]
    kept = select(phase(min_gain=0.0), start, trained)
    assert kept.winner.name == "start" and kept.winner.checkpoint == start.checkpoint
    assert kept.gate.passed and kept.gate.reasons[0].startswith("NOTE start model kept")
    assert "start **(winner)**" in gate_markdown(kept)
    # A gate that asks for a gain fails, and says the start was kept.
    strict = select(phase(min_gain=0.02), start, trained)
    assert not strict.gate.passed
    assert "FAIL gain over start = +0.0000" in strict.gate.reasons[-1]


def test_an_averaged_candidate_is_selectable_like_any_checkpoint():
    start = score("start", 0, se={"k/acc": 0.02}, k__acc=0.2)
    last = score("samples_300", 300, se={"k/acc": 0.02}, k__acc=0.50)
    averaged = score("avg_last3", 300, se={"k/acc": 0.02}, k__acc=0.62)  # costs the newest checkpoint's samples
    assert 0.62 - 0.50 > Z95 * math.hypot(0.02, 0.02)
    selection = select(phase(), start, [score("samples_100", 100, se={"k/acc": 0.02}, k__acc=0.3), last, averaged])
    assert selection.winner.name == "avg_last3"


def test_gate_floors_and_min_gain_say_what_missed_by_how_much():
    p = phase(min_score={"k/acc": 0.6}, min_gain=0.3)
    selection = select(p, score("start", 0, k__acc=0.4), [score("samples_100", 100, k__acc=0.55)])
    assert not selection.gate.passed
    assert "FAIL k/acc = 0.5500 vs floor 0.6000 (missed by 0.0500)" in selection.gate.reasons
    assert any(
        r.startswith("FAIL gain over start = +0.1500") and "missed by 0.1500" in r for r in selection.gate.reasons
    )
    ok = select(
        phase(min_score={"k/acc": 0.5}, min_gain=0.1),
        score("start", 0, k__acc=0.4),
        [score("samples_100", 100, k__acc=0.55)],
    )
    assert ok.gate.passed and all(r.startswith("PASS") for r in ok.gate.reasons)


def test_forgetting_guard_rejects_a_checkpoint_that_forgot_an_earlier_phase():
    p = phase(objective={"k/acc": 1.0}, max_forgetting=0.05)
    start = score("start", 0, k__acc=0.3, i__rule=0.9)
    forgot = score("samples_200", 200, k__acc=0.8, i__rule=0.7)  # best objective, but i/rule fell 0.2
    kept = score("samples_100", 100, k__acc=0.6, i__rule=0.88)  # fell 0.02: allowed
    selection = select(p, start, [kept, forgot], best_reached={"i/rule": 0.9})
    assert selection.winner.name == "samples_100"
    assert selection.gate.passed
    rejected = {c.name: c.rejected for c in selection.candidates}
    assert rejected["samples_100"] is None and "i/rule fell 0.2000" in rejected["samples_200"]
    assert "rejected: i/rule fell" in gate_markdown(selection)

    all_forgot = select(p, score("start", 0, k__acc=0.3, i__rule=0.6), [forgot], best_reached={"i/rule": 0.9})
    assert not all_forgot.gate.passed and "forgetting guard rejected every candidate" in all_forgot.gate.reasons[0]
    # Without the guard the forgetful checkpoint would have won.
    assert select(phase(), start, [kept, forgot]).winner.name == "samples_200"


def test_forgetting_guard_is_cumulative_over_the_run():
    # phase00's winner reached i/rule 0.90; phase05 kept 0.86 (a 0.04 drop, allowed); in phase10 a
    # checkpoint at 0.82 is only 0.04 below its start but 0.08 below the run's best: rejected.
    carried = [score("samples_300", 300, i__rule=0.90, k__acc=0.2), score("samples_500", 500, i__rule=0.86, k__acc=0.7)]
    reference = best_reached(["i/rule", "k/acc"], carried)
    assert reference == {"i/rule": 0.90, "k/acc": 0.7}
    p = PhaseConfig(name="phase10", data=["x.jsonl"], objective={"s/em": 1.0}, max_forgetting=0.05)
    start = score("start", 0, s__em=0.1, i__rule=0.86, k__acc=0.7)
    drifted = score("samples_100", 100, s__em=0.6, i__rule=0.82, k__acc=0.7)
    careful = score("samples_200", 200, s__em=0.5, i__rule=0.87, k__acc=0.69)
    selection = select(p, start, [drifted, careful], best_reached=reference)
    assert selection.winner.name == "samples_200"
    assert "i/rule fell 0.0800 below the run's best" in selection.candidates[0].rejected
    # Compared with the phase's start only (the old rule), the drift would have passed.
    assert select(p, start, [drifted, careful], best_reached={"i/rule": 0.86}).winner.name == "samples_100"


def test_missing_objective_metric_is_a_clear_error():
    with pytest.raises(SelectionError, match="objective needs \\['k/acc'\\]"):
        select(phase(), score("start", 0, other__x=1.0), [score("samples_1", 1, other__x=1.0)])
