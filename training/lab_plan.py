"""`lab plan` as a whole: the training plan (training.plan: batch arithmetic, memory, wall time,
rolling state) of the ranks that train, once the evaluation's placement (training.placement) has
taken its GPUs, with the launch files as the run writes them and the evaluation's own section."""

from __future__ import annotations

from core.recipe import Recipe
from core.storage import resolve_embedded
from training.job import TrainJob
from training.launch.config import launch_files
from training.launch.devices import training_recipe
from training.placement import plan_evaluation, render_evaluation, resolve_placement, vllm_found
from training.plan import (
    DEFAULT_MEAN_TOKENS,
    Plan,
    count_samples,
    device_memory_bytes,
    make_plan,
    phase_samples,
    read_model_config,
    render,
)


def plan_recipe(
    recipe: Recipe,
    gpu_memory_gib: float | None = None,
    samples: int | None = None,
    mean_tokens: float = DEFAULT_MEAN_TOKENS,
    tokens_per_s_per_gpu: float | None = None,
) -> tuple[Plan, str]:
    """The plan of a resolved recipe and its rendering (what `lab plan` prints). The evaluation's
    placement is decided first, as `lab run` decides it: a GPU reserved for it trains no rank, so
    the memory, batch arithmetic and launch are those of the remaining ranks."""
    model_config = read_model_config(resolve_embedded(recipe.model.name_or_path))
    run, chosen = resolve_placement(recipe)
    plan = make_plan(
        training_recipe(run),
        model_config,
        device_memory_bytes(gpu_memory_gib),
        samples if samples is not None else count_samples(recipe),
        mean_tokens,
        tokens_per_s_per_gpu,
    )
    per_phase = (
        phase_samples(recipe) if samples is None else {p.name: samples // len(recipe.phases) for p in recipe.phases}
    )
    # every option again with this plan's numbers (--samples, --tokens-per-s, ...); the run's choice among them
    shown = plan_evaluation(recipe, plan.shape, per_phase, plan.tokens_per_s_per_gpu, mean_tokens, vllm_found(recipe))
    option = next(o for o in shown.alternatives if (o.placement, o.backend) == (chosen.placement, chosen.backend))
    plan.evaluation = shown.model_copy(update={**option.model_dump(), "reason": chosen.reason})
    if samples is not None:
        plan.evaluation.notes.append(f"--samples {samples}: split evenly across the {len(recipe.phases)} phase(s)")
    phase = recipe.phases[0].name
    k8s = recipe.launch.kubernetes if recipe.launch.scheduler == "kubernetes" else None
    root = f"{k8s.mount_path.rstrip('/')}/STORAGE_ROOT" if k8s else "STORAGE_ROOT"  # on the nodes' shared volume
    job = TrainJob(
        run_id="RUN_ID",
        phase=phase,
        recipe=run,
        model_path=recipe.model.name_or_path,
        parent_checkpoint=recipe.model.name_or_path,
        data_dir=f"{root}/RUN_ID/data/{phase}",
        output_dir=f"{root}/RUN_ID/{phase}",
        grace_s=plan.rolling_state.grace_seconds,
    )
    command, files = launch_files(job)
    plan.launch_command, plan.launch_files = command, {path.name: text for path, text in files.items()}
    shown_files = {
        str(path): text for path, text in files.items() if path.suffix != ".json" or "deepspeed" in path.name
    }
    text = render(plan, command, shown_files) + "\n\n" + render_evaluation(plan.evaluation)
    if recipe.launch.num_machines > 1 or recipe.launch.scheduler != "local":
        from training.scheduler import node_launches

        text += f"\n\n-- the phase on {recipe.launch.num_machines} node(s), scheduler {recipe.launch.scheduler}\n"
        text += node_launches(job)
    return plan, text
