"""Prefect task that adds a phase's evaluation to its experiment-tracker runs (training.tracking).

The trainer opened the runs and logged every step; after selection this reopens them (ids in
`<phase>/trackers.json`) and logs each checkpoint's scores at its optimizer step and the
selection. Nothing happens for a recipe without `training.report_to`.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from core import storage
from core.recipe import Recipe
from evaluation import report
from evaluation.selection import Selection
from training import tracking


@task(name="track-phase-results")
def track_phase_results(recipe: Recipe, run_uri: str, run_id: str, selection: Selection) -> None:
    """`eval/<task>/<metric>` and `eval/objective` of every scored model at the step it was saved
    (the start model at 0), `selection/*` at the winner's step, the winner's name as a parameter."""
    if not recipe.training.report_to:
        return
    phase_uri = storage.join(run_uri, selection.phase)
    local = storage.local_path(phase_uri)
    ids_uri = storage.join(phase_uri, tracking.TRACKERS_FILE)
    if not (local / tracking.TRACKERS_FILE).exists() and storage.exists(ids_uri):  # trained on another machine
        storage.write_text(str(local / tracking.TRACKERS_FILE), storage.read_text(ids_uri))
    steps = {0: 0} | {m.samples_seen: m.step for m in report.read_metrics(phase_uri)}
    trackers = tracking.phase_trackers(recipe, run_id, selection.phase, local)
    for tracker in trackers:
        tracker.start()
    scored = {score.name: score for score in [selection.start, *selection.candidates]}
    for score in scored.values():
        if score.samples not in steps:  # not a point of this phase's training (none today)
            get_run_logger().warning(f"{score.name}: no training step saw {score.samples} samples; not tracked")
            continue
        values = {f"eval/{key}": value for key, value in score.metrics.items()} | {"eval/objective": score.objective}
        if score.objective_stderr is not None:
            values["eval/objective_stderr"] = score.objective_stderr
        for tracker in trackers:
            tracker.log(values, step=steps[score.samples])
    winner = selection.winner
    for tracker in trackers:
        tracker.log(
            {
                "selection/objective": winner.objective,
                "selection/samples": winner.samples,
                "selection/gate_passed": int(selection.gate.passed),
            },
            step=steps.get(winner.samples, 0),
        )
        tracker.store_init_configuration({"selection.winner": winner.name, "selection.checkpoint": winner.checkpoint})
        tracker.finish()
    if "tensorboard" in recipe.training.report_to and not storage.is_local(phase_uri):
        storage.upload_tree(local / "tensorboard", storage.join(phase_uri, "tensorboard"), last=())
    get_run_logger().info(f"{selection.phase}: scores and selection sent to {', '.join(recipe.training.report_to)}")
