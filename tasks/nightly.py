"""Prefect tasks of the nightly regression: compare a night's selected metrics with the last
good night, keep the history in the storage root, publish it, and raise the alarm.

History: <root>/nightly/<recipe>/history.jsonl, one JSON line per night (run id, recipe
fingerprint, metrics, verdict), and history.png next to it. A night is compared with the
last night that passed *with the same resolved recipe* (its fingerprint): a deliberate recipe
change starts a new baseline instead of reading as a regression.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from pydantic import BaseModel

from core import records, storage
from core.recipe import Recipe
from core.records import SeedSpread
from evaluation import report
from evaluation.report import PhaseSummary
from tasks.finetune import artifact_key

DEFAULT_TOLERANCE = 0.05  # absolute drop allowed for a metric without its own tolerance
REGRESSION_EVENT = "recipe-lab.nightly.regression"


class MetricCheck(BaseModel):
    metric: str  # <phase>/<metric>, e.g. phase05/lab_knowledge/acc
    value: float
    baseline: float | None
    tolerance: float

    @property
    def regressed(self) -> bool:
        return self.baseline is not None and self.value < self.baseline - self.tolerance


class Night(BaseModel):
    run_id: str
    recipe: str
    fingerprint: str
    date: str
    metrics: dict[str, float]
    baseline_run_id: str | None = None  # the last good night it was compared with
    checks: list[MetricCheck] = []

    @property
    def regressions(self) -> list[MetricCheck]:
        return [c for c in self.checks if c.regressed]

    @property
    def passed(self) -> bool:
        return not self.regressions


def fingerprint(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def tolerance_for(metric: str, tolerances: dict[str, float]) -> float:
    """The most specific tolerance: `<phase>/<metric>`, then `<metric>` (any phase), then
    `default`, then DEFAULT_TOLERANCE."""
    name = metric.split("/", 1)[1]
    return tolerances.get(metric, tolerances.get(name, tolerances.get("default", DEFAULT_TOLERANCE)))


def history_uri(root: str, recipe: Recipe) -> str:
    return storage.join(root, "nightly", artifact_key(recipe.name), "history.jsonl")


def read_history(uri: str) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]
        if storage.exists(uri)
        else []
    )


def selected_metrics(recipe: Recipe, phases: list[PhaseSummary]) -> dict[str, float]:
    """Each phase's winner on every phase's objective metrics: {"<phase>/<metric>": value}."""
    objectives = sorted({k for p in recipe.phases for k in p.objective})
    return {f"{row.phase}/{k}": row.metrics[k] for row in phases for k in objectives if k in row.metrics}


def spread_uri(history: str) -> str:
    """The recipe's measured seed spread lives beside its history."""
    return storage.join(history.rsplit("/", 1)[0], "seed_spread.json")


@task(name="measured-tolerances")
def measured_tolerances(history: str, recipe: Recipe) -> dict[str, float]:
    """Per-metric tolerances derived from the recipe's measured seed spread (`lab nightly-spread`),
    if one was measured with this very recipe; else {} (DEFAULT_TOLERANCE applies)."""
    uri = spread_uri(history)
    if not storage.exists(uri):
        return {}
    spread = records.parse(SeedSpread, storage.read_text(uri), uri)
    if spread.fingerprint != fingerprint(recipe):
        get_run_logger().warning(f"{uri}: measured for another recipe version; not used (measure it again)")
        return {}
    return {metric: m.tolerance for metric, m in spread.metrics.items()}


@task(name="compare-with-last-good")
def compare_with_last_good(
    uri: str, run_id: str, recipe: Recipe, phases: list[PhaseSummary], tolerances: dict[str, float]
) -> Night:
    """The night's selected metrics (each phase's winner, on every phase's objective metrics)
    checked against the last good night of the same recipe."""
    metrics = selected_metrics(recipe, phases)
    current = fingerprint(recipe)
    good = [h for h in read_history(uri) if h["passed"] and h["fingerprint"] == current]
    baseline = good[-1] if good else None
    checks = [
        MetricCheck(
            metric=m,
            value=v,
            baseline=baseline["metrics"].get(m) if baseline else None,
            tolerance=tolerance_for(m, tolerances),
        )
        for m, v in metrics.items()
    ]
    night = Night(
        run_id=run_id,
        recipe=recipe.name,
        fingerprint=current,
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        metrics=metrics,
        baseline_run_id=baseline["run_id"] if baseline else None,
        checks=checks,
    )
    logger = get_run_logger()
    if baseline is None:
        logger.info(f"no earlier good night of recipe {recipe.name} ({current}): this night is the baseline")
    for c in checks:
        logger.info(
            f"{c.metric}: {c.value:.4f} vs {c.baseline} (tolerance {c.tolerance}){'  REGRESSION' if c.regressed else ''}"
        )
    return night


@task(name="record-night")
def record_night(uri: str, night: Night) -> list[dict[str, Any]]:
    """Append the night to the history (rewritten whole: object stores have no append)."""
    entry = {
        **night.model_dump(mode="json", exclude={"checks"}),
        "passed": night.passed,
        "regressions": [c.metric for c in night.regressions],
    }
    history = [*read_history(uri), entry]
    storage.write_text(uri, "".join(json.dumps(h) + "\n" for h in history))
    return history


@task(name="publish-history")
def publish_history(uri: str, night: Night, history: list[dict[str, Any]]) -> str:
    """History table artifact (key nightly-<recipe>-history), the night's comparison, and
    history.png (every metric over the nights, failed nights marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = artifact_key("nightly", night.recipe)
    metrics = sorted({m for h in history for m in h["metrics"]})
    create_table_artifact(
        key=f"{key}-history",
        table=[
            {
                "date": h["date"],
                "run_id": h["run_id"],
                "passed": h["passed"],
                **{m: h["metrics"].get(m) for m in metrics},
            }
            for h in history
        ],
        description=f"nightly regression history of {night.recipe} ({uri})",
    )
    rows = "\n".join(
        f"| {c.metric} | {c.value:.4f} | {'-' if c.baseline is None else f'{c.baseline:.4f}'} | {c.tolerance} | {'**regression**' if c.regressed else 'ok'} |"
        for c in night.checks
    )
    verdict = "PASSED" if night.passed else f"FAILED: {', '.join(c.metric for c in night.regressions)}"
    create_markdown_artifact(
        key=f"{key}-verdict",
        markdown=f"# Nightly {night.recipe}: {verdict}\n\nRun `{night.run_id}` vs last good night `{night.baseline_run_id}`\n\n"
        f"| metric | tonight | last good | tolerance | |\n|---|---|---|---|---|\n{rows}\n\nHistory: `{uri}`\n",
        description=f"nightly {night.recipe}: comparison with the last good night",
    )
    fig, ax = plt.subplots(figsize=(8, 4))
    for m in metrics:
        points = [(i, h["metrics"][m]) for i, h in enumerate(history) if m in h["metrics"]]
        ax.plot([i for i, _ in points], [v for _, v in points], marker="o", label=m)
        failed = [(i, v) for i, v in points if m in history[i]["regressions"]]
        ax.scatter([i for i, _ in failed], [v for _, v in failed], marker="x", s=80, color="red", zorder=3)
    ax.set_xticks(range(len(history)), [h["date"][:16].replace("T", " ") for h in history], rotation=45, ha="right")
    ax.set_ylabel("score")
    ax.set_title(f"nightly {night.recipe} (x = regression)")
    ax.legend(fontsize=7)
    png = storage.join(uri.rsplit("/", 1)[0], "history.png")
    report.save_png(fig, png)
    return png


@task(name="alert-regression")
def alert_regression(night: Night) -> None:
    """A Prefect event that automations turn into notifications (mail, Slack, a page)."""
    emit_event(
        event=REGRESSION_EVENT,
        resource={
            "prefect.resource.id": f"recipe-lab.nightly.{artifact_key(night.recipe)}",
            "prefect.resource.name": night.recipe,
        },
        payload={
            "run_id": night.run_id,
            "baseline_run_id": night.baseline_run_id,
            "regressions": [c.model_dump() for c in night.regressions],
        },
    )
