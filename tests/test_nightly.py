"""The nightly regression: a night within tolerance of the last good night passes; a drop
beyond tolerance fails the run, emits the regression event (read back from the Prefect API),
and both land in the history, its table artifact and its plot."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from tests.waiting import poll

pytestmark = pytest.mark.slow

# One short phase on the embedded lab: the comparison is tested, not the learning.
OVERRIDES = {
    "phases": [
        {
            "name": "phase00",
            "data": ["embedded://curriculum/phase00/train.jsonl"],
            "objective": {"lab_instruction/rule_acc": 1.0},
        }
    ],
    "training.epochs": 0.25,
    "checkpointing.save_every_samples": 256,
    "evaluation.limit": 10,
}
METRIC = "phase00/lab_instruction/rule_acc"


def regression_events(since) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
    from prefect.events.worker import EventsWorker

    from tasks.nightly import REGRESSION_EVENT

    EventsWorker.drain_all()
    wanted = EventFilter(event=EventNameFilter(name=[REGRESSION_EVENT]), occurred=EventOccurredFilter(since=since))
    with get_client(sync_client=True) as client:
        # The server stores events in batches. The client's default limit, 100, is over the server's maximum, 50.
        return poll(lambda: client.read_events(wanted, limit=10).events, timeout_s=30, interval_s=1) or []


def test_nightly_passes_within_tolerance_and_fails_with_an_event_beyond_it(tmp_path, prefect_server, assets):
    from prefect.client.orchestration import get_client

    from flows.nightly import nightly
    from tasks.nightly import DEFAULT_TOLERANCE

    history = tmp_path / "nightly" / "demo" / "history.jsonl"
    args = {"recipe": "demo", "overrides": OVERRIDES, "smoke": False, "storage_root": str(tmp_path), "run_id": "night"}

    first = nightly(**args)  # no earlier night: the baseline
    assert first.passed and first.baseline_run_id is None
    (baseline,) = [json.loads(line) for line in history.read_text().splitlines()]
    value = baseline["metrics"][METRIC]

    def inject_last_good(score: float) -> None:
        """A last good night (same recipe) scoring `score`; the re-run reuses the same run's results."""
        lines = history.read_text().splitlines()
        good = {**baseline, "run_id": "injected", "metrics": {**baseline["metrics"], METRIC: score}}
        history.write_text("\n".join([*lines, json.dumps(good)]) + "\n")

    inject_last_good(value + DEFAULT_TOLERANCE / 2)  # tonight is a little worse: within tolerance
    within = nightly(**args)
    assert within.passed and within.baseline_run_id == "injected"

    since = datetime.now(UTC)
    inject_last_good(value + 0.2)  # tonight dropped by 0.2 > 0.05
    state = nightly(**args, return_state=True)
    assert state.is_failed() and METRIC in str(state.message)

    nights = [json.loads(line) for line in history.read_text().splitlines()]
    assert [n["passed"] for n in nights] == [True, True, True, True, False]
    assert nights[-1]["regressions"] == [METRIC] and nights[-1]["baseline_run_id"] == "injected"

    (event,) = regression_events(since)
    assert event.resource.id == "recipe-lab.nightly.demo"
    assert event.payload["run_id"] == "night" and event.payload["regressions"][0]["metric"] == METRIC

    with get_client(sync_client=True) as client:
        table = client.read_latest_artifacts()  # one per key: the newest version of the history table
    (artifact,) = [a for a in table if a.key == "nightly-demo-history"]
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert len(rows) == 5 and rows[-1]["passed"] is False
    assert (tmp_path / "nightly" / "demo" / "history.png").read_bytes()[:4] == b"\x89PNG"

    # Tolerances from the recipe's measured seed spread: the same 0.2 drop is seed noise for a
    # recipe whose selected metric moved 0.2 .. 0.8 across seeds (tolerance 1.645 x sqrt2 x 0.3).
    from core.recipe import resolve
    from evaluation.findings import regression_tolerance
    from tasks.nightly import fingerprint

    spread = history.parent / "seed_spread.json"
    wide = regression_tolerance([0.2, 0.5, 0.8])
    assert wide == pytest.approx(1.645 * 2**0.5 * 0.3, abs=1e-4)
    measured = {"recipe": "demo", "seeds": 3, "metrics": {METRIC: {"values": [0.2, 0.5, 0.8], "tolerance": wide}}}
    spread.write_text(json.dumps({**measured, "fingerprint": "another-recipe"}))
    assert nightly(**args, return_state=True).is_failed()  # measured for another recipe: not used
    spread.write_text(json.dumps({**measured, "fingerprint": fingerprint(resolve("demo", None, OVERRIDES, False))}))
    assert nightly(**args, tolerances={"default": 0.05}, return_state=True).is_failed()  # explicit ones win
    derived = nightly(**args)
    assert derived.passed and derived.baseline_run_id == "injected"
