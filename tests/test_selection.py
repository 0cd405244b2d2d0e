"""Best-checkpoint selection: objective, ties, gates and the forgetting guard (pure logic)."""

import pytest

from evaluation.selection import CheckpointScore, SelectionError, gate_markdown, select
from training.recipe import PhaseConfig


def score(name: str, samples: int, **metrics: float) -> CheckpointScore:
    return CheckpointScore(
        checkpoint=f"/run/p/checkpoints/{name}",
        name=name,
        samples=samples,
        metrics={k.replace("__", "/"): v for k, v in metrics.items()},
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
    selection = select(p, start, [kept, forgot], guarded=["i/rule"])
    assert selection.winner.name == "samples_100"
    assert selection.gate.passed
    rejected = {c.name: c.rejected for c in selection.candidates}
    assert rejected["samples_100"] is None and "i/rule fell 0.2000" in rejected["samples_200"]
    assert "rejected: i/rule fell" in gate_markdown(selection)

    all_forgot = select(p, start, [forgot], guarded=["i/rule"])
    assert not all_forgot.gate.passed and "forgetting guard rejected every checkpoint" in all_forgot.gate.reasons[0]
    # Without the guard the forgetful checkpoint would have won.
    assert select(phase(), start, [kept, forgot]).winner.name == "samples_200"


def test_missing_objective_metric_is_a_clear_error():
    with pytest.raises(SelectionError, match="objective needs \\['k/acc'\\]"):
        select(phase(), score("start", 0, other__x=1.0), [score("samples_1", 1, other__x=1.0)])
