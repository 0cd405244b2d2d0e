"""The `nightly-regression` flow: a small recipe every night, compared with the last good night.

Deployed as `nightly-regression/nightly-regression` (cron in deployments/prefect.yaml). A
drop beyond a metric's tolerance fails the run and emits the `recipe-lab.nightly.regression`
event; the history table artifact (`nightly-<recipe>-history`) and
<root>/nightly/<recipe>/history.png show every night.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from pydantic import BaseModel, Field

from core import records, storage
from core.recipe import resolve
from core.records import MetricSpread, SeedSpread
from evaluation.findings import regression_tolerance
from flows.finetune import finetune
from tasks.nightly import (
    alert_regression,
    compare_with_last_good,
    fingerprint,
    history_uri,
    measured_tolerances,
    publish_history,
    record_night,
    selected_metrics,
    spread_uri,
)


class NightlyRegression(RuntimeError):
    """Tonight's selected metrics dropped beyond tolerance against the last good night."""


class NightlyResult(BaseModel):
    """A night that passed (one that regressed raises NightlyRegression)."""

    run_id: str
    passed: bool
    baseline_run_id: str | None = Field(description="The last good night compared with; None on the first night.")
    history: str = Field(description="The recipe's history.jsonl.")
    plot: str = Field(description="Its history.png.")


@flow(name="nightly-regression")
def nightly(
    recipe: str = "demo",
    tolerances: dict[str, float] | None = None,
    overrides: dict[str, Any] | None = None,
    storage_root: str = "./runs",
    smoke: bool = True,
    run_id: str | None = None,
) -> NightlyResult:
    """Run `finetune` on a small recipe and compare its selected metrics with the last good night.

    Args:
        recipe: recipe name or YAML path (small: it runs every night).
        tolerances: allowed absolute drop per metric: "<phase>/<metric>", "<metric>" (any
            phase) or "default"; 0.05 otherwise. None: derived from the recipe's measured seed
            spread (`nightly_seed_spread`, <root>/nightly/<recipe>/seed_spread.json) when there is one.
        overrides: dotted keys to change, as for `finetune`.
        storage_root: local directory or s3://bucket/prefix; the history lives in <root>/nightly/.
        smoke: shrink the recipe to the embedded lab (the default for a nightly check).
        run_id: the night's run id (default nightly-<recipe>-<UTC time>); reuse to resume.
    """
    cfg = resolve(recipe, None, overrides, smoke)
    root = os.path.abspath(storage_root) if storage.is_local(storage_root) else storage_root
    run_id = run_id or f"nightly-{cfg.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    result = finetune(recipe=recipe, overrides=overrides, storage_root=root, smoke=smoke, run_id=run_id)
    uri = history_uri(root, cfg)
    if tolerances is None:
        tolerances = measured_tolerances(uri, cfg)
    night = compare_with_last_good(uri, run_id, cfg, result.phases, tolerances)
    history = record_night(uri, night)
    plot = publish_history(uri, night, history)
    if not night.passed:
        alert_regression(night)
        raise NightlyRegression(
            f"{cfg.name}: "
            + "; ".join(
                f"{c.metric} {c.value:.4f} < last good {c.baseline:.4f} - {c.tolerance}" for c in night.regressions
            )
        )
    return NightlyResult(run_id=run_id, passed=True, baseline_run_id=night.baseline_run_id, history=uri, plot=plot)


@flow(name="nightly-seed-spread")
def nightly_seed_spread(
    recipe: str = "demo",
    seeds: int = 3,
    overrides: dict[str, Any] | None = None,
    storage_root: str = "./runs",
    smoke: bool = True,
) -> SeedSpread:
    """Measure how much the nightly recipe's selected metrics move with the seed alone, and
    derive each metric's regression tolerance from it (evaluation/findings.py:
    regression_tolerance); the nightly uses them when it is given no tolerances.

    Args:
        recipe, overrides, storage_root, smoke: as for the nightly (the same recipe is measured).
        seeds: runs with training.seed = 0 .. seeds-1 (at least 2).
    """
    if seeds < 2:
        raise ValueError(f"a seed spread needs at least 2 seeds, got {seeds}")
    cfg = resolve(recipe, None, overrides, smoke)
    root = os.path.abspath(storage_root) if storage.is_local(storage_root) else storage_root
    per_seed: dict[str, list[float]] = {}
    for seed in range(seeds):
        result = finetune(
            recipe=recipe,
            overrides={**(overrides or {}), "training.seed": seed},
            storage_root=root,
            smoke=smoke,
            run_id=f"nightly-{cfg.name}-spread-seed{seed}",
        )
        for metric, value in selected_metrics(cfg, result.phases).items():
            per_seed.setdefault(metric, []).append(value)
    spread = SeedSpread(
        recipe=cfg.name,
        fingerprint=fingerprint(cfg),
        seeds=seeds,
        metrics={m: MetricSpread(values=v, tolerance=regression_tolerance(v)) for m, v in per_seed.items()},
    )
    storage.write_text(spread_uri(history_uri(root, cfg)), records.dumps(spread, indent=2) + "\n")
    return spread
