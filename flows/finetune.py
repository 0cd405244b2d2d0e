"""The `finetune` flow: phased (or stacked) SFT with evaluation and gated checkpoint selection.

Control flow only; the work is in tasks/. Run it locally with `lab run demo`, or deployed:
`prefect deployment run finetune/phased-lab --params '{"smoke": true}'`.
"""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from core import storage
from core.recipe import PhaseConfig, Recipe, resolve
from evaluation.export import check_replaceable
from evaluation.report import PhaseSummary
from evaluation.selection import CheckpointScore, Selection, best_reached, with_validation
from tasks.export import export_model
from tasks.finetune import (
    ModelRef,
    PhaseEvaluations,
    RunEvaluation,
    average_last_checkpoints,
    init_run,
    mark_phase_done,
    prepare_data,
    prune_phase_checkpoints,
    select_checkpoint,
    train_phase,
    write_report,
)
from tasks.tracking import track_phase_results
from training import preflight
from training.launch.devices import visible_gpus
from training.placement import resolve_placement


class GateFailed(RuntimeError):
    """A phase's selected checkpoint missed its gate; selection.json says by how much."""


class RunResult(BaseModel):
    """A finished run: where it is, and its summary (<run>/report/summary.csv)."""

    run_id: str
    run_uri: str
    strategy: Literal["phased", "stacked"]
    base: PhaseSummary = Field(description="The recipe's base model's scores.")
    phases: list[PhaseSummary] = Field(description="Each phase's selected model, in order.")


def default_run_id(recipe: Recipe) -> str:
    return f"{recipe.name}-{recipe.strategy}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def train_and_evaluate(
    cfg: Recipe,
    phase: PhaseConfig,
    run_uri: str,
    run_id: str,
    start: ModelRef,
    evaluation: RunEvaluation,
    evaluate_start: bool,
) -> tuple[list[ModelRef], list[CheckpointScore]]:
    """Train a phase; score its models: the start model (with `evaluate_start`), every checkpoint
    and the average. Each model's evaluation is a task run of its own: with placement reserved it
    starts as the model appears, beside training (a failed one stops the training and fails the
    phase with its own error), else once training ends, on training's resources."""
    evaluations = PhaseEvaluations(cfg, phase.name, run_uri, evaluation)
    beside = cfg.evaluation.placement == "reserved"
    if beside and evaluate_start:
        evaluations.submit(start)
    evaluation.training_starts()
    local = storage.local_path(storage.join(run_uri, phase.name))
    with evaluations.watching(local) if beside else contextlib.nullcontext():
        try:
            checkpoints = train_phase(cfg, phase, run_uri, run_id, start, stop=evaluations.failed)
        except Exception:
            evaluations.raise_failure()  # the evaluation's error, not the stop it caused
            raise
    evaluation.training_ended()
    averaged = average_last_checkpoints(cfg, run_uri, phase.name, checkpoints)
    candidates = [*checkpoints, averaged] if averaged else checkpoints
    return checkpoints, evaluations.scores([start, *candidates] if evaluate_start else candidates)


@flow(name="finetune")
def finetune(
    recipe: str | Recipe = "demo",
    strategy: Literal["phased", "stacked"] | None = None,
    overrides: dict[str, Any] | None = None,
    storage_root: str = "./runs",
    smoke: bool = False,
    run_id: str | None = None,
) -> RunResult:
    """Fine-tune phase by phase; each phase starts from the previous phase's selected checkpoint.

    Args:
        recipe: a recipe name in recipes/ (lab, tulu, tulu-plus, demo), a YAML path, or a full recipe.
        strategy: override the recipe's strategy: phased, or stacked (all phases' data in one run).
        overrides: dotted keys to change, e.g. {"training.learning_rate": 1e-5}.
        storage_root: local directory or s3://bucket/prefix holding runs.
        smoke: shrink the recipe to a few CPU minutes on the embedded lab.
        run_id: reuse to resume a run: phases its manifest marks done are skipped.
    """
    # What the model's family needs on this run's device (training.preflight), one line per
    # setting changed, before any data is prepared; what cannot run at all fails here.
    logger = get_run_logger()
    cfg, settings = preflight.check(resolve(recipe, strategy, overrides, smoke))
    for line in settings:
        logger.info(line)
    if cfg.export.to:
        check_replaceable(cfg.export.to)  # refused now, not after the training
    run_id = run_id or default_run_id(cfg)
    root = os.path.abspath(storage_root) if storage.is_local(storage_root) else storage_root
    run_uri = storage.join(root, run_id)
    manifest = init_run(run_uri, run_id, cfg)
    run_cfg, placement = resolve_placement(cfg, cuda=bool(visible_gpus()))  # as `lab plan` decides it
    logger.info(
        f"evaluation: {placement.placement} ({placement.backend}) on {placement.devices}"
        f"{', beside training' if placement.beside_training else ', after each phase trains'}; {placement.reason}"
    )

    start = ModelRef(name="base", uri=cfg.model.name_or_path, samples=0)
    start_score = None  # the base model: evaluated beside the first training, or after it (so that fails fast)
    carried: list[CheckpointScore] = []  # each phase's winner: the forgetting guard's reference
    with RunEvaluation(run_cfg, logger.info) as evaluation:
        for i, phase in enumerate(cfg.phases):
            if phase.name in manifest.phases:
                selection = Selection.model_validate(
                    storage.read_json(storage.join(run_uri, phase.name, "selection.json"))
                )
            else:
                stats = prepare_data(cfg, phase, run_uri)
                checkpoints, scores = train_and_evaluate(
                    run_cfg, phase, run_uri, run_id, start, evaluation, evaluate_start=start_score is None
                )
                if start_score is None:
                    start_score, *scores = scores
                # validation/loss: the trainer's, on this phase's held-out slice (start and checkpoints)
                start_score = with_validation(start_score, run_uri, phase.name, "start")
                scores = [with_validation(s, run_uri, phase.name, s.name) for s in scores]
                reference = best_reached([key for earlier in cfg.phases[:i] for key in earlier.objective], carried)
                selection = select_checkpoint(cfg, phase, start_score, scores, reference, run_uri, run_id)
                track_phase_results(cfg, run_uri, run_id, selection)  # training.report_to: the phase's tracker runs
                if not selection.gate.passed:
                    write_report(run_uri, run_id, cfg, [p.name for p in cfg.phases[: i + 1]])  # what it reached
                    raise GateFailed(f"phase {phase.name}: gate failed\n" + "\n".join(selection.gate.reasons))
                manifest = mark_phase_done(run_uri, manifest, selection, stats.validation_ids)
                # None: the start model or the average won; no checkpoint of this phase is needed
                kept = (
                    selection.winner.checkpoint if selection.winner.checkpoint in {c.uri for c in checkpoints} else None
                )
                prune_phase_checkpoints(cfg, run_uri, phase.name, kept)
            winner = selection.winner
            carried.append(winner)
            if start_score is None or winner.checkpoint != start.uri:  # else the start is kept for the next phase
                start = ModelRef(name=winner.name, uri=winner.checkpoint, samples=winner.samples)
                start_score = winner.model_copy(update={"name": f"start ({phase.name}/{winner.name})", "samples": 0})

    summary = write_report(run_uri, run_id, cfg)
    if cfg.export.to or cfg.export.push_to_hub:
        export_model(run_uri, run_id, cfg)
    base, *phases = summary  # the report's first row is the base model
    return RunResult(run_id=run_id, run_uri=run_uri, strategy=cfg.strategy, base=base, phases=phases)
