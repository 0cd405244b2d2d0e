"""The `sweep` flow: a grid of runs, with early termination from training dynamics.

    lab sweep demo --grid training.learning_rate=1e-3,2e-3,5e-2 --probe-samples 800

Stages:
  1. probe   every run trains its first phase up to `probe_samples`, then pauses (its full
             training state is kept, so nothing is lost);
  2. rank    runs are ranked by the paper's early-dynamics rule (evaluation/dynamics.py:
             lowest median grad norm, ties to highest median loss); the worst
             `stop_fraction` are stopped; a run the watchdog stopped is stopped too;
  3. finish  the survivors resume and run the whole `finetune` (every phase, evaluation,
             selection); with `validate`, the stopped runs are finished as well, to check
             whether the early ranking agreed with the final scores (Spearman rho).
Compute is accounted in samples and training seconds: spent, planned, and saved by stopping.
"""

from __future__ import annotations

import itertools
import math
import os
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from evaluation import report
from evaluation.dynamics import EarlyDynamics, early_dynamics, rank_runs, spearman
from flows.finetune import finetune
from tasks.finetune import ModelRef, artifact_key, init_run, prepare_data, train_phase
from training import storage
from training.data import phase_conversations
from training.recipe import Recipe, resolve


class SweepRun(BaseModel):
    run_id: str
    overrides: dict[str, Any]
    status: Literal["finished", "stopped", "stopped+validated", "failed"] = "finished"
    reason: str = ""
    early: EarlyDynamics | None = None
    early_rank: int | None = None  # 1 = most promising
    final_objective: float | None = None  # the last phase's selected objective
    samples_trained: int = 0
    samples_planned: int = 0
    train_seconds: float = 0.0


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as override dicts, in a stable order."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=False)) for values in itertools.product(*(grid[k] for k in keys))]


def resolve_run(recipe: str, overrides: dict[str, Any], smoke: bool) -> Recipe:
    strategy = overrides.get("strategy")
    return resolve(recipe, strategy, {k: v for k, v in overrides.items() if k != "strategy"}, smoke)


@task(name="planned-samples")
def planned_samples(cfg: Recipe) -> int:
    """Samples a full run of the recipe trains: every phase's rows (and replay) x epochs."""
    total = 0
    for i, phase in enumerate(cfg.phases):
        conversations, replay_pool, _ = phase_conversations(cfg.phases, i)
        total += round((len(conversations) + round(phase.replay * len(replay_pool))) * cfg.training.epochs)
    return total


@task(name="read-run-metrics")
def run_metrics(run_uri: str, cfg: Recipe) -> list[list[dict[str, Any]]]:
    return [report.read_metrics(storage.join(run_uri, phase.name)) for phase in cfg.phases]


@flow(name="probe-run")
def probe(cfg: Recipe, run_uri: str, run_id: str, probe_samples: int) -> str:
    """Train the first phase up to probe_samples and pause; return '' or why it stopped.

    A re-run skips a probe already done (the sweep resumes like its runs do)."""
    manifest = init_run(run_uri, run_id, cfg)
    phase = cfg.phases[0]
    done = report.read_metrics(storage.join(run_uri, phase.name))
    if phase.name in manifest["phases"] or (done and done[-1].get("samples_seen", 0) >= probe_samples):
        return ""
    prepare_data(cfg, phase, run_uri)
    start = ModelRef(name="base", uri=cfg.model.name_or_path, samples=0)
    state = train_phase(cfg, phase, run_uri, run_id, start, stop_after_samples=probe_samples, return_state=True)
    return "" if state.is_completed() else f"probe failed: {state.message}"


@flow(name="sweep")
def sweep(
    recipe: str = "demo",
    grid: dict[str, list[Any]] | None = None,
    probe_samples: int | None = None,
    stop_fraction: float = 0.34,
    validate_ranking: bool = False,
    storage_root: str = "./runs",
    smoke: bool = False,
    sweep_id: str | None = None,
) -> dict[str, Any]:
    """Run a grid of fine-tunes; with probe_samples, stop the runs the early dynamics condemn.

    Args:
        recipe: recipe name or YAML path.
        grid: dotted override keys to lists of values, e.g. {"training.learning_rate": [1e-5, 2e-5]};
            the key "strategy" sweeps phased vs stacked.
        probe_samples: probe window in samples of the first phase; None = no early termination.
        stop_fraction: fraction of the runs (rounded down) stopped after the probe.
        validate_ranking: also finish the stopped runs and report whether the early ranking was right.
        storage_root: where the runs and the sweep report go.
        smoke: shrink every run to the embedded lab.
        sweep_id: names the sweep and prefixes its run ids.
    """
    grid = grid or {"training.learning_rate": [1e-3, 2e-3, 4e-3]}
    sweep_id = sweep_id or f"sweep-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    root = os.path.abspath(storage_root) if storage.is_local(storage_root) else storage_root
    runs = [SweepRun(run_id=f"{sweep_id}-{i:02d}", overrides=o) for i, o in enumerate(expand_grid(grid))]
    configs = {r.run_id: resolve_run(recipe, r.overrides, smoke) for r in runs}
    for r in runs:
        r.samples_planned = planned_samples(configs[r.run_id])

    stopped: set[str] = set()
    if probe_samples:
        for r in runs:
            r.reason = probe(configs[r.run_id], storage.join(root, r.run_id), r.run_id, probe_samples)
            first_phase = run_metrics(storage.join(root, r.run_id), configs[r.run_id])[0]
            r.early = (
                early_dynamics(r.run_id, first_phase, probe_samples) if any("loss" in m for m in first_phase) else None
            )
        ranking = rank_runs([r.early for r in runs if not r.reason])
        for position, dynamics in enumerate(ranking, start=1):
            next(r for r in runs if r.run_id == dynamics.run_id).early_rank = position
        # Runs the watchdog already stopped count towards the stopped fraction.
        to_stop = max(0, math.floor(stop_fraction * len(runs)) - sum(1 for r in runs if r.reason))
        condemned = [d.run_id for d in ranking[len(ranking) - to_stop :]] if to_stop else []
        for r in runs:
            if r.reason or r.run_id in condemned:
                stopped.add(r.run_id)
                r.status = "stopped"
                r.reason = (
                    r.reason
                    or f"early dynamics rank {r.early_rank}/{len(ranking)} (median grad norm {r.early.grad_norm:.3f}, loss {r.early.loss:.3f})"
                )

    for r in runs:
        if r.run_id in stopped and not (validate_ranking and not r.reason.startswith("probe failed")):
            continue
        state = finetune(
            recipe=recipe,
            strategy=r.overrides.get("strategy"),
            overrides={k: v for k, v in r.overrides.items() if k != "strategy"},
            storage_root=root,
            smoke=smoke,
            run_id=r.run_id,
            return_state=True,
        )
        if state.is_failed():  # one bad run (e.g. a failed gate) must not sink the sweep
            r.status, r.reason = "failed", str(state.message)
            continue
        r.final_objective = state.result()["phases"][-1]["objective"]
        if r.run_id in stopped:
            r.status = "stopped+validated"

    for r in runs:
        metrics = run_metrics(storage.join(root, r.run_id), configs[r.run_id])
        r.samples_trained = sum(m[-1]["samples_seen"] for m in metrics if m and "samples_seen" in m[-1])
        r.train_seconds = round(sum(report.training_seconds(m) for m in metrics), 2)
    return write_sweep_report(
        root, sweep_id, runs, stopped, validate_ranking, next(iter(configs.values())).phases[0].name
    )


@task(name="write-sweep-report")
def write_sweep_report(
    root: str, sweep_id: str, runs: list[SweepRun], stopped: set[str], validate: bool, first_phase: str
) -> dict[str, Any]:
    """Compute spent and saved, the validation verdict, and the sweep table (json/csv/md + artifacts)."""
    saved_samples = saved_seconds = 0.0
    for r in runs:
        if r.run_id in stopped:
            # Without validation a stopped run's remaining samples were never trained; with it,
            # they were (to check the ranking), so we report what stopping *would* save.
            spent = r.early.samples if r.early else 0
            seconds_per_sample = r.train_seconds / max(1, r.samples_trained)
            saved_samples += r.samples_planned - spent
            saved_seconds += (r.samples_planned - spent) * seconds_per_sample
    summary: dict[str, Any] = {
        "sweep_id": sweep_id,
        "runs": [r.model_dump(mode="json") for r in runs],
        "samples_planned": sum(r.samples_planned for r in runs),
        "samples_trained": sum(r.samples_trained for r in runs),
        "samples_saved": round(saved_samples),
        "train_seconds": round(sum(r.train_seconds for r in runs), 2),
        "train_seconds_saved": round(saved_seconds, 2),
    }
    finished = [r for r in runs if r.final_objective is not None]
    if finished:
        best = max(finished, key=lambda r: r.final_objective)
        summary["winner"] = best.run_id
        summary["winner_survived"] = best.run_id not in stopped
    if validate:
        ranked = [r for r in finished if r.early_rank is not None]
        summary["spearman_early_vs_final"] = spearman(
            [-r.early_rank for r in ranked], [r.final_objective for r in ranked]
        )

    out = storage.join(root, sweep_id)
    storage.write_json(storage.join(out, "sweep.json"), summary)
    rows = [
        {
            "run": r.run_id,
            **{k: v for k, v in r.overrides.items()},
            "status": r.status,
            "early_rank": r.early_rank,
            "early_grad_norm": r.early and round(r.early.grad_norm, 4),
            "early_loss": r.early and round(r.early.loss, 4),
            "final_objective": r.final_objective,
            "samples_trained": r.samples_trained,
            "samples_planned": r.samples_planned,
            "train_seconds": r.train_seconds,
            "reason": r.reason,
        }
        for r in runs
    ]
    report.write_table(out, "sweep", rows)
    report.plot_sweep(
        {r.run_id: report.read_metrics(storage.join(root, r.run_id, first_phase)) for r in runs},
        stopped,
        storage.join(out, "sweep.png"),
    )
    create_table_artifact(key=artifact_key(sweep_id, "sweep"), table=rows, description="sweep runs")
    create_markdown_artifact(
        key=artifact_key(sweep_id, "sweep-summary"),
        markdown=(
            f"# Sweep `{sweep_id}`\n\nwinner: `{summary.get('winner')}` (survived: {summary.get('winner_survived')}); "
            f"samples trained {summary['samples_trained']} of {summary['samples_planned']} planned; "
            f"saved {summary['samples_saved']} samples, {summary['train_seconds_saved']} s of training"
            + (f"; Spearman(early, final) = {summary.get('spearman_early_vs_final')}" if validate else "")
            + "\n"
        ),
        description="sweep summary",
    )
    return summary
