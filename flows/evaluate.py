"""The `evaluate` flow (`lab eval`): score checkpoints or whole runs outside training.

A run (a directory or bucket prefix with manifest.json) is evaluated with its own recipe's
suites: every complete checkpoint of every phase, reusing results that already exist. Any
other target is one model (a directory or hub id), evaluated with the given recipe's suites
into <storage_root>/eval/<name>/.
"""

from __future__ import annotations

import os
import re
from typing import Any

from prefect import flow

from core import records, storage
from core.recipe import load_recipe, resolve
from tasks.finetune import ModelRef, evaluate_checkpoint, evaluation_without_training


@flow(name="evaluate")
def evaluate(
    targets: list[str],
    recipe: str | None = None,
    overrides: dict[str, Any] | None = None,
    storage_root: str = "./runs",
) -> list[dict[str, Any]]:
    """Evaluate run directories or single models; return one row per evaluated model."""
    rows = []
    for target in targets:
        manifest = records.read_manifest(target)
        if manifest is not None:
            cfg = load_recipe(manifest.recipe, overrides) if recipe is None else resolve(recipe, overrides=overrides)
            with evaluation_without_training(cfg) as evaluation:
                submitted = []  # every model at once: as many evaluate together as there are slots
                for phase in cfg.phases:
                    phase_uri = storage.join(target, phase.name)
                    for uri in storage.complete_checkpoints(phase_uri):
                        model = ModelRef.checkpoint(uri)
                        future = evaluate_checkpoint.submit(cfg, phase.name, phase_uri, model, evaluation)
                        submitted.append((phase.name, model.name, future))
                for phase_name, name, future in submitted:
                    rows.append({"target": target, "phase": phase_name, "checkpoint": name, **future.result().metrics})
        else:
            cfg = resolve(recipe or "demo", overrides=overrides)
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", target.rstrip("/").rsplit("/", 1)[-1])
            root = os.path.abspath(storage_root) if storage.is_local(storage_root) else storage_root
            with evaluation_without_training(cfg) as evaluation:
                score = evaluate_checkpoint(cfg, "eval", root, ModelRef(name=name, uri=target, samples=0), evaluation)
            rows.append({"target": target, "phase": None, "checkpoint": name, **score.metrics})
    return rows
