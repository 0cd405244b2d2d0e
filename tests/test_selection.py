"""Checkpoint selection (pure logic on per-item files): paired intervals, policies, gates and the guard.

Expected values are computed here, with numpy, from the per-item files the fixtures write (never
by calling the code under test): d = a - b on the shared items, its mean, its sample sd (ddof 1)
and the paired t interval mean +- t(0.975, n - 1) * sd / sqrt(n); the unpaired half-width is
1.96 * sqrt(var(a) / n + var(b) / n).
"""

import math

import numpy as np
import pandas as pd
import pytest

from core.recipe import PhaseConfig, SelectionConfig
from evaluation.paired import PairingError
from evaluation.selection import CheckpointScore, SelectionError, best_reached, gate_markdown, select

T975 = {199: 1.971957, 99: 1.984217}  # Student's t, 97.5th percentile (printed tables)
METRIC = "k/acc"


@pytest.fixture
def model(tmp_path):
    """model(name, samples, {metric: per-item values}) -> a CheckpointScore whose per-item file is on disk."""

    def make(name: str, samples: int, values: dict[str, list[float]], averaged: bool = False, ids=None):
        rows = [
            {"task": key.split("/")[0], "metric": key, "item": str(i), "value": float(v)}
            for key, vs in values.items()
            for i, v in zip(ids or range(len(vs)), vs, strict=True)
        ]
        path = tmp_path / f"{name}.items.parquet"
        pd.DataFrame(rows).to_parquet(path)
        return CheckpointScore(
            checkpoint=str(tmp_path / name),
            name=name,
            samples=samples,
            metrics={k: float(np.mean(v)) for k, v in values.items()},
            items=[str(path)],
            averaged=averaged,
        )

    return make


def phase(**kw) -> PhaseConfig:
    return PhaseConfig(name="phase05", data=["x.jsonl"], objective=kw.pop("objective", {METRIC: 1.0}), **kw)


def policy(name: str, **kw) -> SelectionConfig:
    return SelectionConfig(policy=name, **kw)


def flips(base: np.ndarray, up: int = 0, down: int = 0) -> np.ndarray:
    """`base` with its first `up` zeros set to 1 and its first `down` ones set to 0."""
    out = base.copy()
    out[np.flatnonzero(base == 0)[:up]] = 1
    out[np.flatnonzero(base == 1)[:down]] = 0
    return out


def read(score: CheckpointScore) -> pd.Series:
    frame = pd.read_parquet(score.items[0])
    return frame[frame.metric == METRIC].set_index("item")["value"]


BASE = np.array([1.0] * 100 + [0.0] * 100)  # 200 items, half right


def test_paired_interval_of_two_checkpoints_and_narrower_than_unpaired(model):
    early = model("samples_100", 100, {METRIC: flips(BASE, up=6, down=4)})
    late = model("samples_200", 200, {METRIC: flips(BASE, up=16, down=2)})
    start = model("start", 0, {METRIC: BASE})
    selection = select(phase(), start, [early, late], config=policy("best"))
    assert selection.winner.name == "samples_200"

    a, b = read(early), read(late)
    d = (a - b).to_numpy()
    assert (a == b).mean() >= 0.8  # the fixture: the two agree on >= 80% of items
    half = T975[199] * d.std(ddof=1) / math.sqrt(len(d))
    versus = selection.candidates[0].vs_winner
    assert (versus.value, versus.low, versus.high) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
    assert versus.metrics[0].n == 200 and versus.metrics[0].dropped == 0
    unpaired = 1.959964 * math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert half < unpaired
    # McNemar's exact p on the discordant items, reported beside it (two-sided binomial, p = 1/2)
    wins, discordant = int((d > 0).sum()), int((d != 0).sum())
    tail = sum(math.comb(discordant, k) for k in range(min(wins, discordant - wins) + 1)) / 2**discordant
    assert versus.metrics[0].mcnemar_p == pytest.approx(min(1.0, 2 * tail))
    assert str(versus) in gate_markdown(selection)


def test_a_higher_mean_on_shared_items_whose_paired_interval_excludes_0_is_not_within_noise(model):
    start = model("start", 0, {METRIC: flips(BASE, down=40)})
    early = model("samples_100", 100, {METRIC: BASE})
    late = model("samples_200", 200, {METRIC: flips(BASE, up=12)})  # +0.06, every discordant item its way
    a, b = read(late), read(early)
    d = (a - b).to_numpy()
    low = d.mean() - T975[199] * d.std(ddof=1) / math.sqrt(len(d))
    unpaired = 1.959964 * math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert d.mean() > 0 and low > 0  # the premise: paired, the gap excludes 0 ...
    assert d.mean() < unpaired  # ... though the unpaired band would call it noise
    selection = select(
        phase(), start, [early, late], config=policy("earliest_within_noise", within_noise_confidence=0.95)
    )
    flags = {c.name: c.within_noise for c in [selection.start, *selection.candidates]}
    assert flags == {"start": False, "samples_100": False, "samples_200": True}
    assert selection.winner.name == "samples_200"
    assert "significantly below the best samples_200" in selection.candidates[0].lost


def test_earliest_within_noise_keeps_the_cheaper_checkpoint_when_the_gap_is_noise(model):
    start = model("start", 0, {METRIC: flips(BASE, down=40)})
    early = model("samples_100", 100, {METRIC: BASE})
    late = model("samples_200", 200, {METRIC: flips(BASE, up=8, down=5)})  # +0.015 over 13 discordant items
    selection = select(
        phase(), start, [early, late], config=policy("earliest_within_noise", within_noise_confidence=0.95)
    )
    assert selection.winner.name == "samples_100"
    assert "within noise of the best, but 200 samples" in selection.candidates[1].lost
    assert select(phase(), start, [early, late], config=policy("best")).winner.name == "samples_200"


def test_policies_smoothed_last_and_lowest_val_loss(model):
    objective = {METRIC: 1.0}
    # objectives 0.50, 0.60, 0.52, 0.58, 0.59; window 3: 0.55, 0.54, 0.5667, 0.5633, 0.585
    curve = [flips(BASE), flips(BASE, up=20), flips(BASE, up=4), flips(BASE, up=16), flips(BASE, up=18)]
    losses = [2.0, 1.5, 1.4, 1.45, 1.6]
    names, samples = ["start", "s100", "s200", "s300", "s400"], [0, 100, 200, 300, 400]
    scores = [
        model(n, s, {METRIC: c}).model_copy(update={"metrics": {METRIC: float(np.mean(c)), "validation/loss": loss}})
        for n, s, c, loss in zip(names, samples, curve, losses, strict=True)
    ]
    averaged = model("avg_last2", 400, {METRIC: flips(BASE, up=10)}, averaged=True)  # 0.55
    start, rest = scores[0], [*scores[1:], averaged]
    means = [float(np.mean(c)) for c in curve]
    smoothed = [np.mean(means[max(0, i - 1) : i + 2]) for i in range(5)]
    assert int(np.argmax(smoothed)) == 4 and int(np.argmax(means)) == 1
    picks = {
        p: select(phase(objective=objective), start, rest, config=policy(p, smoothing_window=3)).winner.name
        for p in ("best", "smoothed", "last", "lowest_val_loss")
    }
    assert picks == {"best": "s100", "smoothed": "s400", "last": "s400", "lowest_val_loss": "s200"}
    s = select(phase(), start, rest, config=policy("smoothed", smoothing_window=3))
    assert [c.smoothed for c in [s.start, *s.candidates]] == pytest.approx([*smoothed, 0.55])
    last = select(phase(), start, rest, config=policy("last"))
    assert "not a candidate under policy last" in last.start.lost
    assert "not a candidate" in next(c for c in last.candidates if c.averaged).lost
    # The averaged checkpoint is a candidate under best: a clearly better average wins.
    better = model("avg_last3", 400, {METRIC: flips(BASE, up=40)}, averaged=True)
    assert select(phase(), start, [*scores[1:], better], config=policy("best")).winner.name == "avg_last3"


def test_lower_is_better_enters_the_objective_negated(model):
    start = model("start", 0, {"validation/loss": np.full(50, 2.0)})
    a = model("s100", 100, {"validation/loss": np.linspace(1.0, 1.4, 50)})  # mean 1.2
    b = model("s200", 200, {"validation/loss": np.linspace(1.1, 1.7, 50)})  # mean 1.4
    selection = select(phase(objective={"validation/loss": 1.0}), start, [a, b], config=policy("best"))
    assert selection.winner.name == "s100" and selection.winner.objective == pytest.approx(-1.2)


def test_the_gates_min_gain_uses_the_paired_interval(model):
    start = model("start", 0, {METRIC: BASE})
    slight = model("samples_100", 100, {METRIC: flips(BASE, up=10, down=4)})  # +0.03, but 14 discordant items
    a, b = read(slight), read(start)
    d = (a - b).to_numpy()
    low = d.mean() - T975[199] * d.std(ddof=1) / math.sqrt(len(d))
    assert d.mean() >= 0.02 > low  # the raw point gain meets the minimum; its paired interval does not
    failed = select(phase(min_gain=0.02), start, [slight], config=policy("best"))
    assert not failed.gate.passed
    line = failed.gate.reasons[-1]
    assert line.startswith("FAIL gain over start = +0.0300") and f"missed by {0.02 - low:.4f}" in line
    clear = model("samples_200", 200, {METRIC: flips(BASE, up=30)})  # +0.15, every flip its way
    assert select(phase(min_gain=0.02), start, [clear], config=policy("best")).gate.passed
    # A kept start gains exactly 0: it passes min_gain 0, fails any positive minimum.
    kept = select(
        phase(min_gain=0.0), start, [slight], config=policy("earliest_within_noise", within_noise_confidence=0.95)
    )
    assert kept.winner.name == "start" and kept.gate.passed and kept.gate.reasons[0].startswith("NOTE start model kept")


def test_forgetting_guard_rejects_only_a_drop_shown_beyond_the_limit(model):
    both = {METRIC: BASE, "i/rule": BASE}
    reference = model("phase00-winner", 300, both)
    start = model("start", 0, {METRIC: flips(BASE, down=40), "i/rule": BASE})
    forgot = model("samples_200", 200, {METRIC: flips(BASE, up=40), "i/rule": flips(BASE, down=40)})  # -0.2
    noisy = model("samples_100", 100, {METRIC: flips(BASE, up=20), "i/rule": flips(BASE, up=6, down=14)})  # -0.04
    p = phase(max_forgetting=0.05)
    reached = best_reached(["i/rule"], [reference])
    assert reached == {"i/rule": reference}
    selection = select(p, start, [noisy, forgot], best_reached=reached, config=policy("best"))
    assert selection.winner.name == "samples_100" and selection.gate.passed
    rejected = {c.name: c.rejected for c in selection.candidates}
    assert rejected["samples_100"] is None
    d = (
        pd.read_parquet(reference.items[0]).query("metric == 'i/rule'")["value"].to_numpy()
        - pd.read_parquet(forgot.items[0]).query("metric == 'i/rule'")["value"].to_numpy()
    )
    low = d.mean() - T975[199] * d.std(ddof=1) / math.sqrt(len(d))
    assert low > 0.05 and f"i/rule fell +{d.mean():.4f} [+{low:.4f}" in rejected["samples_200"]
    assert "rejected by the forgetting guard" in selection.candidates[1].lost
    start_forgot = model("start-forgot", 0, {METRIC: BASE, "i/rule": flips(BASE, down=30)})
    none_left = select(p, start_forgot, [forgot], best_reached=reached, config=policy("best"))
    assert not none_left.gate.passed and "forgetting guard rejected every candidate" in none_left.gate.reasons[0]


def test_pairing_refuses_below_95_percent_overlap_and_reports_drops(model):
    start = model("start", 0, {METRIC: BASE})
    most = model("samples_100", 100, {METRIC: BASE[:195]}, ids=list(range(195)))  # 195 of 200 shared: allowed
    selection = select(phase(), start, [most], config=policy("best"))
    assert selection.winner.name == "samples_100" and selection.start.vs_winner.metrics[0].dropped == 5
    few = model("samples_200", 200, {METRIC: BASE[:180]}, ids=list(range(180)))
    with pytest.raises(PairingError, match="shares 180 of 200 items"):
        select(phase(), start, [few], config=policy("best"))


def test_missing_objective_metric_and_records_are_clear_errors(model):
    start = model("start", 0, {"other/x": BASE})
    with pytest.raises(SelectionError, match="objective needs \\['k/acc'\\]"):
        select(phase(), start, [model("samples_1", 1, {"other/x": BASE})])
    bare = CheckpointScore(checkpoint="/x", name="samples_2", samples=2, metrics={METRIC: 0.5})
    with pytest.raises(SelectionError, match="samples_2: no per-item records"):
        select(phase(), model("start", 0, {METRIC: BASE}), [bare])
