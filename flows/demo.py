"""The `demo` flow: the embedded lab end to end, phased and stacked, and their comparison."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from prefect import flow, task
from pydantic import BaseModel, Field

from core import storage
from core.recipe import resolve
from evaluation import report
from flows.finetune import GateFailed, RunResult, finetune


class ArmResult(RunResult):
    """One arm of the comparison; an arm stopped by a gate has the phases it reached."""

    gate_failed: str | None = Field(None, description="The gate's reasons, when a phase's gate stopped the arm.")


class DemoResult(BaseModel):
    demo_id: str
    report: str = Field(description="The comparison's directory: comparison.md, .csv, .png.")
    runs: dict[str, ArmResult] = Field(description="phased and stacked.")
    comparison: list[dict[str, Any]] = Field(description="The comparison table's rows (report.write_comparison).")


@task(name="build-embedded-assets")
def build_embedded_assets() -> str:
    from embedded import build_assets

    return str(build_assets(progress=print).root)


@task(name="write-comparison")
def write_comparison(out_uri: str, runs: dict[str, RunResult], metrics: list[str]) -> list[dict[str, Any]]:
    table = report.write_comparison(
        out_uri,
        {label: r.run_uri for label, r in runs.items()},
        {label: [p.phase for p in r.phases] for label, r in runs.items()},
        metrics,
    )
    return table.to_dict(orient="records")


@task(name="run-arm", task_run_name="{strategy}")
def run_arm(recipe: str, strategy: str, storage_root: str, run_id: str) -> ArmResult:
    """One arm of the comparison: a `finetune` subflow. An arm stopped by a phase's gate is a
    result of the comparison, not a crash of the demo: it is reported up to that phase, with
    the gate's reasons (`gate_failed`); its finetune flow run stays Failed."""
    try:
        result = finetune(recipe=recipe, strategy=strategy, storage_root=storage_root, run_id=run_id)
        return ArmResult(**result.model_dump())
    except GateFailed as failed:
        run_uri = storage.join(storage_root, run_id)
        reached = [
            p.name
            for p in resolve(recipe, strategy).phases
            if storage.exists(storage.join(run_uri, p.name, "selection.json"))
        ]
        base, *phases = report.phase_rows(run_uri, reached)[0]  # as the run's own report has them
        return ArmResult(
            run_id=run_id, run_uri=run_uri, strategy=strategy, base=base, phases=phases, gate_failed=str(failed)
        )


@flow(name="demo")
def demo(recipe: str = "demo", storage_root: str = "./runs", demo_id: str | None = None) -> DemoResult:
    """Build the embedded assets, run `finetune` phased and stacked, and compare them.

    The two arms are independent runs. On CPU they train side by side (each training process
    takes one thread, so on 2 cores the second core no longer waits through the whole phased
    chain); on GPUs one after the other, because each arm's launch takes every GPU of the node.
    Writes <storage_root>/<demo_id>-phased/, <demo_id>-stacked/ and <demo_id>/report/.
    """
    demo_id = demo_id or f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    root = os.path.abspath(storage_root) if storage.is_local(storage_root) else storage_root
    build_embedded_assets()
    phased = resolve(recipe, "phased")
    if phased.launch.backend == "cpu":
        arms = {s: run_arm.submit(recipe, s, root, f"{demo_id}-{s}") for s in ("phased", "stacked")}
        runs = {strategy: arm.result() for strategy, arm in arms.items()}
    else:
        runs = {s: run_arm(recipe, s, root, f"{demo_id}-{s}") for s in ("phased", "stacked")}
    metrics = [k for p in phased.phases for k in p.objective]
    out_uri = storage.join(root, demo_id, "report")
    table = write_comparison(out_uri, runs, metrics)
    return DemoResult(demo_id=demo_id, report=out_uri, runs=runs, comparison=table)
