"""The training job: what the launcher writes as job.json and `training.train` reads (no torch here)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from core.recipe import Recipe

DEFAULT_GRACE_S = 600  # a run whose model config cannot be read (a scheduler's job rendered elsewhere)


class TrainJob(BaseModel):
    """What the training script needs; written as JSON by the launcher."""

    run_id: str
    phase: str
    recipe: Recipe
    model_path: str = Field(description="Local directory of the model (and tokenizer) to start from.")
    parent_checkpoint: str = Field(description="URI of the starting model, recorded in meta.json.")
    data_dir: str = Field(description="Directory with tokens.parquet from training.data.prepare.")
    output_dir: str = Field(description="Local phase directory: metrics.jsonl and checkpoints/.")
    code_version: str = "unknown"
    stop_after_samples: int | None = Field(
        None,
        description="Probe: pause after the first step at or past this many samples, saving a "
        "checkpoint and the rolling state, so that a later launch of the same job continues exactly (sweeps).",
    )
    grace_s: int = Field(
        DEFAULT_GRACE_S,
        description="Seconds a preempted rank gets between SIGTERM and SIGKILL to finish its step and save the "
        "rolling state (torchrun's shutdown timeout, Slurm --signal): training.plan.preemption_grace_seconds, "
        "set by the phase task and `lab plan`.",
    )
