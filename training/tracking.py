"""Experiment trackers (recipe `training.report_to`: tensorboard, mlflow, wandb) through
accelerate's tracking API.

One tracker run per phase, grouped by the run id. The trainer opens the phase's runs (the
recipe as parameters, then every optimizer step's metrics under `train/`); the flow reopens
them after evaluation to add each checkpoint's scores (`eval/`, at the checkpoint's step) and
the selection (`selection/`). `<phase>/trackers.json` keeps the ids that reopen the same runs,
also when training resumes after a crash.

Where each tracker writes and its credentials come from the environment only, as each tool
documents it; nothing here takes or logs them:
- tensorboard: event files under `<phase>/tensorboard/` (uploaded with the phase on S3).
- mlflow: MLFLOW_TRACKING_URI (a server, or a local path), MLFLOW_EXPERIMENT_NAME (default:
  the recipe name); the run is named `<run_id>/<phase>` and tagged with both.
- wandb: WANDB_API_KEY, WANDB_ENTITY, WANDB_PROJECT (default: the recipe name), WANDB_MODE
  (offline writes under `<phase>/wandb/`); run id `<run_id>-<phase>`, group `<run_id>`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.recipe import Recipe
from core.records import StepMetrics

if TYPE_CHECKING:
    from accelerate.tracking import GeneralTracker

TRACKERS_FILE = "trackers.json"  # the phase's tracker run ids, to reopen the same runs
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class TrackerUnavailable(RuntimeError):
    """A tracker named in training.report_to is not installed."""


def missing_trackers(recipe: Recipe) -> list[str]:
    """The trackers in training.report_to whose package is not installed here."""
    return [name for name in recipe.training.report_to if importlib.util.find_spec(PACKAGES[name]) is None]


def phase_trackers(recipe: Recipe, run_id: str, phase: str, phase_dir: Path) -> list[GeneralTracker]:
    """The phase's trackers, not started (accelerate starts them); runs recorded in
    `phase_dir/trackers.json` are reopened rather than created again."""
    ids = json.loads((phase_dir / TRACKERS_FILE).read_text()) if (phase_dir / TRACKERS_FILE).exists() else {}
    if missing := missing_trackers(recipe):
        raise TrackerUnavailable(
            f"training.report_to names {missing}, not installed here: pip install {' '.join(missing)} "
            "(or the project's `trackers` extra)"
        )
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker  # torch: only where trackers run

    trackers: list[GeneralTracker] = []
    for name in recipe.training.report_to:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", phase_dir))
        elif name == "mlflow":
            trackers.append(
                MLflowTracker(
                    experiment_name=recipe.name,
                    run_id=ids.get("mlflow"),
                    run_name=f"{run_id}/{phase}",
                    tags={"recipe_lab.run_id": run_id, "recipe_lab.phase": phase},
                )
            )
        else:
            trackers.append(
                WandBTracker(
                    os.environ.get("WANDB_PROJECT", recipe.name),
                    id=re.sub(r"[^A-Za-z0-9_-]+", "-", f"{run_id}-{phase}")[:64],
                    name=f"{run_id}/{phase}",
                    group=run_id,
                    resume="allow",
                    dir=str(phase_dir),
                )
            )
    return trackers


def save_run_ids(phase_dir: Path, trackers: list[GeneralTracker]) -> None:
    """trackers.json: the ids that reopen these (started) tracker runs."""
    ids = {}
    for tracker in trackers:
        if tracker.name == "mlflow":
            ids["mlflow"] = tracker.tracker.info.run_id
        elif tracker.name == "wandb":
            ids["wandb"] = tracker.tracker.id
    (phase_dir / TRACKERS_FILE).write_text(json.dumps(ids) + "\n")


def recipe_params(recipe: Recipe, run_id: str, phase: str) -> dict[str, str | int | float | bool]:
    """The resolved recipe as flat parameters ("training.learning_rate": 2e-5, ...), lists as
    JSON: what every tracker accepts as hyperparameters."""
    params: dict[str, Any] = {"run_id": run_id, "phase": phase}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif isinstance(value, list):
            params[prefix] = json.dumps(value)
        else:
            params[prefix] = "" if value is None else value

    walk("", recipe.model_dump(mode="json"))
    return params


def step_metrics(record: StepMetrics) -> dict[str, float]:
    """One metrics.jsonl line as tracker scalars: every number but the step itself (the x axis)."""
    return {
        f"train/{key}": value
        for key, value in record.model_dump().items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }
