"""The `sweep` flow: a grid of runs, with multi-rung early stopping (successive halving).

    lab sweep demo --grid training.learning_rate=1e-3,2e-3,5e-2 --rungs 320,800 --eta 2

Stages:
  1. rungs   every live run trains its first phase up to the rung's samples, then pauses (a
             checkpoint and its full training state are kept, so nothing is lost); the pruner
             ranks the runs and the best ceil(n / eta) go on (evaluation/pruning.py); a run the
             watchdog stopped is dropped;
  2. finish  the survivors resume and run the whole `finetune` (every phase, evaluation,
             selection); with `validate_ranking`, no run is stopped: every run goes through every
             rung and finishes, and each pruner's halving is replayed against the final scores.
Compute is accounted in samples and training seconds: planned, trained, and saved by stopping.

Where the runs train: in this process, one after another (`lab sweep`), or with
`on_pool=True` each probe and each finish is its own flow run of the `sweep-probe/sweep-probe`
and `finetune/sweep-run` deployments, so N workers of the GPU pool train N runs at once. The
parent only waits, ranks and decides (deploy it on a pool without GPU slots, `lab-control`).
Flow runs are submitted with idempotency keys derived from the sweep id, so re-running a sweep
with the same id picks up the flow runs it started instead of starting them again.
"""

from __future__ import annotations

import itertools
import os
import time
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from core import records, storage
from core.recipe import Recipe, resolve
from core.records import StepMetrics, Stopped
from evaluation import report
from evaluation.dynamics import early_dynamics
from evaluation.pruning import PRUNERS, Pruner, PrunerValidation, RungResult, loss_slope, rank, survivors, validate
from evaluation.selection import objective_value
from flows.finetune import finetune
from tasks.finetune import (
    ModelRef,
    artifact_key,
    evaluate_checkpoint,
    evaluation_without_training,
    init_run,
    prepare_data,
    train_phase,
)
from training.data import phase_conversations, validation_slice

PROBE_DEPLOYMENT = "sweep-probe/sweep-probe"
FINISH_DEPLOYMENT = "finetune/sweep-run"
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class SweepRun(BaseModel):
    run_id: str
    overrides: dict[str, Any]
    status: Literal["finished", "stopped", "failed"] = "finished"
    reason: str = ""
    stopped_at_rung: int | None = None
    rung_ranks: list[int] = []  # the pruner's rank at each rung the run reached (1 = most promising)
    final_objective: float | None = None  # the last phase's selected objective
    samples_trained: int = 0
    samples_planned: int = 0
    train_seconds: float = 0.0


class SweepResult(BaseModel):
    """A sweep's outcome, as <root>/<sweep_id>/sweep.json holds it."""

    sweep_id: str
    pruner: str
    rungs: list[int]
    eta: float
    runs: list[SweepRun]
    samples_planned: int
    samples_trained: int
    samples_saved: int = Field(description="Of the runs stopped early: planned minus trained.")
    train_seconds: float
    train_seconds_saved: float = Field(description="The saved samples at each stopped run's own seconds per sample.")
    validation: list[PrunerValidation] = Field(description="With validate_ranking: each pruner against the finals.")
    winner: str | None = Field(None, description="The finished run with the best final objective.")


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as override dicts, in a stable order."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=False)) for values in itertools.product(*(grid[k] for k in keys))]


def resolve_run(recipe: str, overrides: dict[str, Any], smoke: bool) -> Recipe:
    strategy = overrides.get("strategy")
    return resolve(recipe, strategy, {k: v for k, v in overrides.items() if k != "strategy"}, smoke)


def absolute_root(storage_root: str) -> str:
    return os.path.abspath(storage_root) if storage.is_local(storage_root) else storage_root


def rung_uri(run_uri: str, rung: int) -> str:
    return storage.join(run_uri, "sweep", f"rung_{rung}.json")


@task(name="planned-samples")
def planned_samples(cfg: Recipe) -> int:
    """Samples a full run of the recipe trains: every phase's rows but its held-out validation slice
    (and replay) x epochs."""
    total = 0
    for i, phase in enumerate(cfg.phases):
        conversations, replay_pool, _ = phase_conversations(cfg.phases, i)
        trained, _ = validation_slice(conversations, cfg.training.validation_samples)
        total += round((len(trained) + round(phase.replay * len(replay_pool))) * cfg.training.epochs)
    return total


@task(name="read-run-metrics")
def run_metrics(run_uri: str, cfg: Recipe) -> list[list[StepMetrics]]:
    return [report.read_metrics(storage.join(run_uri, phase.name)) for phase in cfg.phases]


@flow(name="sweep-probe")
def probe(
    run_id: str,
    rung: int,
    recipe: str = "demo",
    overrides: dict[str, Any] | None = None,
    smoke: bool = False,
    storage_root: str = "./runs",
    previous_rung: int = 0,
    evaluate: bool = False,
) -> RungResult:
    """Train a sweep run's first phase up to `rung` samples and pause; write its RungResult to
    <run>/sweep/rung_<rung>.json (what every pruner ranks by) and return it.

    A probe already done is read back, not trained again (the sweep resumes like its runs do).
    With `evaluate`, the checkpoint saved at the pause is scored on the phase objective.
    """
    cfg = resolve_run(recipe, overrides or {}, smoke)
    run_uri = storage.join(absolute_root(storage_root), run_id)
    out = rung_uri(run_uri, rung)
    if storage.exists(out):
        done = RungResult.model_validate_json(storage.read_text(out))
        if done.stopped or not evaluate or done.eval_score is not None:
            return done
    init_run(run_uri, run_id, cfg)
    phase = cfg.phases[0]
    prepare_data(cfg, phase, run_uri)
    start = ModelRef(name="base", uri=cfg.model.name_or_path, samples=0)
    state = train_phase(cfg, phase, run_uri, run_id, start, stop_after_samples=rung, return_state=True)
    phase_uri = storage.join(run_uri, phase.name)
    steps = report.read_metrics(phase_uri)
    samples = steps[-1].samples_seen if steps else 0
    result = RungResult(run_id=run_id, rung=rung, samples=samples)
    if not state.is_completed():
        stopped = storage.join(phase_uri, records.STOPPED)
        result.stopped = (
            records.parse(Stopped, storage.read_text(stopped), stopped).reason
            if storage.exists(stopped)
            else str(state.message)
        )
    elif steps:
        result.dynamics = early_dynamics(run_id, steps, samples)
        result.loss_slope = loss_slope(steps, previous_rung, samples)
        if evaluate:
            checkpoint = next(c for c in state.result() if c.samples == samples)
            with evaluation_without_training(cfg) as evaluation:
                score = evaluate_checkpoint(cfg, phase.name, phase_uri, checkpoint, evaluation)
            result.eval_score = objective_value(phase.objective, score.metrics, f"{run_id} {checkpoint.name}")
    storage.write_json(out, result.model_dump(mode="json"))
    return result


def run_flows(
    flow_fn: Any, deployment: str, jobs: dict[str, dict[str, Any]], on_pool: bool, sweep_id: str, stage: str
) -> dict[str, str]:
    """Run one flow per job (run id -> parameters): in this process one after another, or as
    flow runs of `deployment` on its work pool, all submitted at once, then waited for.
    Returns run id -> "" when the flow run completed, else why not."""
    if not on_pool:
        states = {run_id: flow_fn(**params, return_state=True) for run_id, params in jobs.items()}
        return {run_id: "" if s.is_completed() else str(s.message) for run_id, s in states.items()}

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    submitted = {
        run_id: run_deployment(
            deployment, parameters=params, timeout=0, idempotency_key=f"{sweep_id}/{run_id}/{stage}"
        ).id
        for run_id, params in jobs.items()
    }
    get_run_logger().info(f"{stage}: {len(submitted)} flow runs of {deployment} submitted")
    outcome: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        while len(outcome) < len(submitted):
            for run_id, flow_run_id in submitted.items():
                state = client.read_flow_run(flow_run_id).state
                if run_id not in outcome and state is not None and state.type.value in FINAL_STATES:
                    outcome[run_id] = "" if state.is_completed() else f"{state.name}: {state.message}"
            time.sleep(2)
    return outcome


@flow(name="sweep")
def sweep(
    recipe: str = "demo",
    grid: dict[str, list[Any]] | None = None,
    rungs: list[int] | None = None,
    eta: float = 2.0,
    pruner: Pruner = "eval",
    validate_ranking: bool = False,
    storage_root: str = "./runs",
    smoke: bool = False,
    sweep_id: str | None = None,
    on_pool: bool = False,
) -> SweepResult:
    """Run a grid of fine-tunes; with rungs, stop the runs the pruner ranks worst at each rung.

    Args:
        recipe: recipe name or YAML path.
        grid: dotted override keys to lists of values, e.g. {"training.learning_rate": [1e-5, 2e-5]};
            the key "strategy" sweeps phased vs stacked.
        rungs: samples of the first phase at which runs are ranked and halved; None = no early stopping.
        eta: at each rung the best ceil(n / eta) of the n runs go on (2 = halving).
        pruner: how runs are ranked at a rung: eval (the phase objective on the rung's checkpoint),
            dynamics (the paper's early grad norm and loss rule) or loss_slope.
        validate_ranking: stop nothing; finish every run and report, per pruner, whether the winner
            would have survived, Spearman rho of its first-rung ranking vs the final scores, and the
            samples it would have saved.
        storage_root: where the runs and the sweep report go.
        smoke: shrink every run to the embedded lab (values the grid sets are kept).
        sweep_id: names the sweep and prefixes its run ids; reuse it to resume a sweep.
        on_pool: run each probe and finish as a flow run of the sweep deployments on their work pool.
    """
    grid = grid or {"training.learning_rate": [1e-3, 2e-3, 4e-3]}
    rungs = sorted(rungs or [])
    if eta <= 1:
        raise ValueError(f"eta must be > 1 (got {eta}): it is the factor by which each rung cuts the runs")
    sweep_id = sweep_id or f"sweep-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    root = absolute_root(storage_root)
    runs = {
        f"{sweep_id}-{i:02d}": SweepRun(run_id=f"{sweep_id}-{i:02d}", overrides=o)
        for i, o in enumerate(expand_grid(grid))
    }
    configs = {run_id: resolve_run(recipe, r.overrides, smoke) for run_id, r in runs.items()}
    for run_id, r in runs.items():
        r.samples_planned = planned_samples(configs[run_id])
    common = {"recipe": recipe, "smoke": smoke, "storage_root": root}

    live = list(runs)
    history: list[list[RungResult]] = []
    for previous, rung in zip([0, *rungs], rungs, strict=False):
        jobs = {
            run_id: {
                **common,
                "overrides": runs[run_id].overrides,
                "run_id": run_id,
                "rung": rung,
                "previous_rung": previous,
                "evaluate": pruner == "eval" or validate_ranking,
            }
            for run_id in live
        }
        failed = run_flows(probe, PROBE_DEPLOYMENT, jobs, on_pool, sweep_id, f"rung-{rung}")
        results = []
        for run_id in live:
            uri = rung_uri(storage.join(root, run_id), rung)
            results.append(
                RungResult.model_validate(storage.read_json(uri))
                if storage.exists(uri)
                else RungResult(run_id=run_id, rung=rung, samples=0, stopped=f"probe failed: {failed[run_id]}")
            )
        history.append(results)
        order = rank(pruner, results)
        kept = [r.run_id for r in results if not r.stopped] if validate_ranking else survivors(pruner, results, eta)
        for r in results:
            runs[r.run_id].rung_ranks.append(order.index(r.run_id) + 1)
            if r.run_id not in kept:
                run = runs[r.run_id]
                run.status, run.stopped_at_rung = "stopped", rung
                run.reason = r.stopped or f"{pruner} rank {order.index(r.run_id) + 1}/{len(results)} at rung {rung}"
        live = kept

    finish = {run_id: {**common, "overrides": runs[run_id].overrides, "run_id": run_id} for run_id in live}
    failed = run_flows(finetune, FINISH_DEPLOYMENT, finish, on_pool, sweep_id, "finish")
    for run_id in live:
        manifest = records.read_manifest(storage.join(root, run_id))
        done = manifest.phases if manifest else {}
        last = configs[run_id].phases[-1].name
        if failed[run_id] or last not in done:  # one bad run (a failed gate) must not sink the sweep
            runs[run_id].status, runs[run_id].reason = "failed", failed[run_id]
        else:
            runs[run_id].final_objective = done[last].objective

    for run_id, r in runs.items():
        metrics = run_metrics(storage.join(root, run_id), configs[run_id])
        r.samples_trained = sum(max((m.samples_seen for m in phase), default=0) for phase in metrics)
        r.train_seconds = round(sum(report.training_seconds(m) for m in metrics), 2)
    validation = []
    if validate_ranking and history:
        finals = {run_id: r.final_objective for run_id, r in runs.items() if r.final_objective is not None}
        planned = {run_id: r.samples_planned for run_id, r in runs.items()}
        validation = [validate(p, history, eta, finals, planned) for p in PRUNERS]
    return write_sweep_report(
        root, sweep_id, list(runs.values()), pruner, rungs, eta, validation, configs[next(iter(runs))].phases[0].name
    )


@task(name="write-sweep-report")
def write_sweep_report(
    root: str,
    sweep_id: str,
    runs: list[SweepRun],
    pruner: str,
    rungs: list[int],
    eta: float,
    validation: list[PrunerValidation],
    first_phase: str,
) -> SweepResult:
    """Compute planned / trained / saved, the validation table, and the sweep table (json/csv/md + artifacts)."""
    saved_samples = saved_seconds = 0.0
    for r in runs:
        if r.status == "stopped":
            seconds_per_sample = r.train_seconds / max(1, r.samples_trained)
            saved_samples += r.samples_planned - r.samples_trained
            saved_seconds += (r.samples_planned - r.samples_trained) * seconds_per_sample
    finished = [r for r in runs if r.final_objective is not None]
    summary = SweepResult(
        sweep_id=sweep_id,
        pruner=pruner,
        rungs=rungs,
        eta=eta,
        runs=runs,
        samples_planned=sum(r.samples_planned for r in runs),
        samples_trained=sum(r.samples_trained for r in runs),
        samples_saved=round(saved_samples),
        train_seconds=round(sum(r.train_seconds for r in runs), 2),
        train_seconds_saved=round(saved_seconds, 2),
        validation=validation,
        winner=max(finished, key=lambda r: r.final_objective).run_id if finished else None,
    )

    out = storage.join(root, sweep_id)
    storage.write_json(storage.join(out, "sweep.json"), summary.model_dump(mode="json"))
    rows = [
        {
            "run": r.run_id,
            **r.overrides,
            "status": r.status,
            "stopped_at_rung": r.stopped_at_rung,
            "rung_ranks": ",".join(map(str, r.rung_ranks)),
            "final_objective": r.final_objective,
            "samples_trained": r.samples_trained,
            "samples_planned": r.samples_planned,
            "train_seconds": r.train_seconds,
            "reason": r.reason,
        }
        for r in runs
    ]
    report.write_table(out, "sweep", rows)
    validation_rows = [
        {
            "pruner": v.pruner,
            "winner_survived": v.winner_survived,
            "spearman_first_rung": v.spearman_first_rung,
            "samples_saved": v.samples_saved,
            "survivors": ",".join(v.survivors),
        }
        for v in validation
    ]
    report.plot_sweep(
        {r.run_id: report.read_metrics(storage.join(root, r.run_id, first_phase)) for r in runs},
        {r.run_id for r in runs if r.status == "stopped"},
        storage.join(out, "sweep.png"),
    )
    create_table_artifact(key=artifact_key(sweep_id, "sweep"), table=rows, description="sweep runs")
    markdown = (
        f"# Sweep `{sweep_id}`\n\npruner `{pruner}`, rungs {rungs}, eta {eta}; winner `{summary.winner}`; "
        f"samples trained {summary.samples_trained} of {summary.samples_planned} planned; "
        f"saved {summary.samples_saved} samples, {summary.train_seconds_saved} s of training\n"
    )
    if validation_rows:
        markdown += "\n## Pruners, validated against the final scores\n\n"
        markdown += report.write_table(out, "validation", validation_rows).to_markdown(index=False) + "\n"
    create_markdown_artifact(
        key=artifact_key(sweep_id, "sweep-summary"), markdown=markdown, description="sweep summary"
    )
    return summary
