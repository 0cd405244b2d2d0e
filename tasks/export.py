"""Prefect task of the finetune flow's last step: export the selected model (evaluation.export)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from core import storage
from core.recipe import Recipe
from evaluation.export import export_run
from tasks.finetune import artifact_key


@task(name="export-model")
def export_model(run_uri: str, run_id: str, recipe: Recipe) -> str:
    """The last phase's selected model to recipe.export.to (and/or its Hub repo), with the model
    card as a markdown artifact."""
    where = export_run(run_uri, recipe.export.to, push_to_hub=recipe.export.push_to_hub)
    if recipe.export.to:
        create_markdown_artifact(
            key=artifact_key(run_id, "model-card"),
            markdown=storage.read_text(storage.join(recipe.export.to, "README.md")),
            description=f"model card of the export at {recipe.export.to}",
        )
    get_run_logger().info(f"exported the selected model to {where}")
    return where
