"""Prefect tasks of the finetune flow: thin, typed wrappers over training/ and evaluation/.

They pass URIs and small pydantic results, never tensors or datasets. Behaviour that belongs
to orchestration (retries, timeouts, artifacts, logging) lives here, not in the libraries.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from core import items, records, storage
from core.chat import apply_template
from core.recipe import MTBenchConfig, PhaseConfig, Recipe
from core.records import FINISHED, TRAINED, ModelRef, PrepStats, ProgressEvent
from evaluation import mt_bench, report, worker
from evaluation.selection import CheckpointScore, Selection, gate_markdown, select
from evaluation.worker import BackgroundEvaluator, EvalRequest
from training.averaging import average_checkpoints
from training.data import phase_conversations, prepare
from training.job import TrainJob
from training.launch.checkpoints import complete_checkpoints, keep_last_checkpoints, prune_checkpoints
from training.launch.devices import device_env, training_slots, visible_gpus
from training.launch.files import TrainingFailed
from training.launch.local import run_training
from training.plan import preemption_grace_seconds
from training.scheduler import run_scheduled

REPO = Path(__file__).resolve().parents[1]


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        return sha.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def eval_uri(run_uri: str, phase: str, model_name: str, file: str = "lm_eval.json") -> str:
    """<run>/<phase>/eval/<model>/<file>: where a model's results of one suite live."""
    return storage.join(run_uri, phase, "eval", model_name, file)


@task(name="init-run")
def init_run(run_uri: str, run_id: str, recipe: Recipe) -> dict[str, Any]:
    """Create or load the run journal (manifest.json). A re-run with the same run_id resumes."""
    uri = storage.join(run_uri, "manifest.json")
    if storage.exists(uri):
        manifest = storage.read_json(uri)
        # Where the model is exported is not what the run trains: a finished run may be re-run to export it.
        trained = {k: v for k, v in manifest["recipe"].items() if k != "export"}
        if trained != recipe.model_dump(mode="json", exclude={"export"}):
            raise ValueError(f"{uri}: run {run_id} exists with a different recipe; use a new run_id")
        get_run_logger().info(f"resuming run {run_id}: phases done {list(manifest['phases'])}")
        return manifest
    manifest = {
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(),
        "code_version": code_version(),
        "recipe": recipe.model_dump(mode="json"),
        "phases": {},
    }
    storage.write_json(uri, manifest)
    return manifest


@task(name="mark-phase-done")
def mark_phase_done(
    run_uri: str, manifest: dict[str, Any], selection: Selection, validation_ids: list[str]
) -> dict[str, Any]:
    """The phase's winner in the run journal, with the ids of its held-out validation slice."""
    done = {
        "selected": selection.winner.checkpoint,
        "objective": selection.winner.objective,
        "policy": selection.policy,
        "validation_ids": validation_ids,
    }
    manifest = {**manifest, "phases": {**manifest["phases"], selection.phase: done}}
    storage.write_json(storage.join(run_uri, "manifest.json"), manifest)
    return manifest


@task(name="prepare-data")
def prepare_data(recipe: Recipe, phase: PhaseConfig, run_uri: str) -> PrepStats:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(storage.resolve_embedded(recipe.model.name_or_path))
    apply_template(tokenizer, recipe.model.chat_template, recipe.model.name_or_path)
    conversations, replay_pool, files = phase_conversations(recipe.phases, recipe.phases.index(phase))
    stats = prepare(
        conversations,
        tokenizer,
        storage.join(run_uri, "data", phase.name),
        recipe.training.max_seq_len,
        recipe.training.train_on_prompt,
        replay_pool=replay_pool,
        replay_fraction=phase.replay,
        seed=recipe.training.seed,
        files=files,
        system_message=recipe.model.system_message,
        validation_samples=recipe.training.validation_samples,
    )
    get_run_logger().info(
        f"{phase.name}: {stats.samples} samples ({stats.replayed} replayed from earlier phases), {stats.tokens} tokens "
        f"({stats.loss_tokens} with loss), dropped {stats.dropped_too_long} longer than {recipe.training.max_seq_len}; "
        f"{len(stats.validation_ids)} held out for validation/loss"
    )
    return stats


@task(name="train-phase", task_run_name="train-{run_id}-{phase.name}")
def train_phase(
    recipe: Recipe,
    phase: PhaseConfig,
    run_uri: str,
    run_id: str,
    start: ModelRef,
    stop_after_samples: int | None = None,
    evaluate_start: bool = False,
) -> list[ModelRef]:
    """Run the phase's `accelerate launch`; stream rank-0 output to the log; return checkpoints.

    With `stop_after_samples` the run pauses there (a sweep's probe); the next call resumes it.
    Training writes into the phase's local directory (for a remote root, its mirror in the
    staging directory, which also keeps the rolling state for resume). Progress comes from
    progress.jsonl and each checkpoint from its meta.json (the run's files, not its output): with
    a remote root it is uploaded as soon as it is complete, and with `evaluation.devices` its
    evaluation starts in a worker process beside training (the start model's too, at launch,
    with `evaluate_start`); the task then returns when every evaluation is done, and fails with
    an evaluation's own error. A finished phase gets trained.json and is never trained again: a
    re-run only uploads what is missing.
    """
    phase_uri = storage.join(run_uri, phase.name)
    trained_uri = storage.join(phase_uri, TRAINED)
    if storage.exists(trained_uri):
        return records.parse(list[ModelRef], storage.read_text(trained_uri), trained_uri)
    logger = get_run_logger()
    local = storage.local_path(phase_uri)
    if (local / TRAINED).exists():
        logger.info(f"{phase.name}: trained before; uploading what is missing")
        return publish_phase(local, phase_uri)
    if (local / FINISHED).exists():
        logger.info(f"{phase.name}: training finished before the phase was recorded; recording it, not retraining")
        return record_trained(recipe, local, phase_uri)

    remote = not storage.is_local(phase_uri)
    progress = create_progress_artifact(
        progress=0.0, key=artifact_key(run_id, phase.name, "training"), description=f"training {phase.name}"
    )
    # Uploads and keep_last_n pruning run one at a time, in order, in a thread of their own, so
    # that a slow upload never stalls the run's file watching and nothing is deleted mid-upload.
    uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
    uploads = []
    # MT-Bench judging of each model evaluated beside training, as its answers land: one model at
    # a time (config.concurrency requests), so a remote judge's latency hides behind training.
    judge_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mt-bench-judge-early")
    judgings = []

    def judge_early(request: EvalRequest) -> None:
        answers = storage.join(request.eval_dir, worker.MT_BENCH_ANSWERS_FILE)
        try:
            judge_and_write(recipe, {request.name: answers}, {request.name: request.eval_dir})
        except (mt_bench.MTBenchError, mt_bench.JudgeEndpointError) as error:  # the judge task retries it
            logger.warning(f"{request.name}: judging beside training failed, left to judge-mt-bench: {error}")

    def judge_when_evaluated(request: EvalRequest) -> None:
        judgings.append(judge_pool.submit(judge_early, request))

    evaluator = background_evaluator(recipe, phase.name, local, stop_after_samples, logger.info)
    if evaluator is not None and recipe.evaluation.mt_bench is not None:
        expose_judge_key(recipe.evaluation.mt_bench)
        evaluator.on_evaluated = judge_when_evaluated

    def evaluate(model: ModelRef) -> None:
        if evaluator is not None:
            evaluator.submit(
                EvalRequest(
                    recipe=recipe,
                    name=model.name,
                    uri=model.uri,
                    samples=model.samples,
                    eval_dir=eval_uri(run_uri, phase.name, model.name, ""),
                )
            )

    def checkpoint_written(name: str) -> None:
        if remote:
            storage.upload_tree(local / "checkpoints" / name, storage.join(phase_uri, "checkpoints", name))
        keep_last_n(recipe, local, phase_uri, logger)

    shown = 0.0  # the progress artifact's value: updated per whole percent, not per step (an API call each)

    def on_progress(event: ProgressEvent) -> None:
        nonlocal shown
        logger.info(event.line(), extra={"progress": event})  # `lab` on a terminal draws it as a bar (flows.progress)
        percent = min(100.0, 100.0 * event.epoch / recipe.training.epochs)
        if int(percent) > int(shown):
            shown = percent
            update_progress_artifact(progress, progress=percent)
        if evaluator is not None:
            evaluator.raise_if_failed()  # fails the phase (and stops the training) at once

    def on_checkpoint(path: Path) -> None:
        uploads.append(uploader.submit(checkpoint_written, path.name))
        evaluate(ModelRef.checkpoint(storage.join(phase_uri, "checkpoints", path.name)))

    model_path = storage.local_checkpoint(start.uri)
    job = TrainJob(
        run_id=run_id,
        phase=phase.name,
        recipe=recipe,
        model_path=model_path,
        parent_checkpoint=start.uri,
        data_dir=storage.join(run_uri, "data", phase.name),
        output_dir=str(local),
        code_version=code_version(),
        stop_after_samples=stop_after_samples,
        grace_s=preemption_grace_seconds(recipe, model_path),
    )
    if evaluate_start:
        evaluate(start)
    try:
        launch = run_training if recipe.launch.scheduler == "local" else run_scheduled
        launch(job, on_line=logger.info, on_progress=on_progress, on_checkpoint=on_checkpoint)
        for upload in uploads:
            upload.result()  # an upload error fails the task (a retry resumes the upload)
        if evaluator is not None:
            # Training's share is free now: evaluate what is still queued on it too. The running
            # worker takes the next queued model; a new worker first pays its imports and model
            # load (~4 s on a CPU, about two lab evaluations), so one starts per model beyond that.
            for slot in training_slots(recipe.launch, recipe.evaluation.devices)[: max(0, evaluator.pending - 1)]:
                evaluator.add_worker({**os.environ, **slot})
            evaluator.wait()  # selection needs every score
            for judging in judgings:
                judging.result()
    except TrainingFailed:
        if evaluator is not None:
            evaluator.kill()
        publish_phase(local, phase_uri)  # the metrics and stopped.json say why; keep them with the run
        raise
    except BaseException:  # cancel, an evaluation's or upload's failure: no worker may outlive us
        if evaluator is not None:
            evaluator.kill()
        raise
    finally:
        uploader.shutdown(wait=False, cancel_futures=True)
        judge_pool.shutdown(wait=False, cancel_futures=True)
    if (local / FINISHED).exists():  # not a probe's pause, which keeps its state for the next call
        return record_trained(recipe, local, phase_uri)
    return publish_phase(local, phase_uri)


def keep_last_n(recipe: Recipe, local: Path, phase_uri: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """checkpointing.keep_last_n: delete all but the newest N complete checkpoints, local and uploaded.
    (The logger is passed in: this also runs on the upload thread, outside the task's context.)"""
    for old in keep_last_checkpoints(local, recipe.checkpointing.keep_last_n):
        if not storage.is_local(phase_uri):  # the local copies are the staging mirror: the bucket's go too
            storage.remove_tree(storage.join(phase_uri, "checkpoints", old.name))
        logger.info(f"{local.name}: keep_last_n={recipe.checkpointing.keep_last_n} deleted {old.name}")


def record_trained(recipe: Recipe, local: Path, phase_uri: str) -> list[ModelRef]:
    """A finished phase: trained.json, then the rolling state goes (it is needed until the phase is
    recorded: a kill before this point resumes here, not from step 0), then the upload."""
    keep_last_n(recipe, local, phase_uri, get_run_logger())  # again: a kill may have cut the last pruning short
    storage.write_json(str(local / TRAINED), [c.model_dump() for c in checkpoint_refs(local, phase_uri)])
    shutil.rmtree(local / "state", ignore_errors=True)
    return publish_phase(local, phase_uri)


def background_evaluator(
    recipe: Recipe, phase: str, local: Path, stop_after_samples: int | None, log: Callable[[str], None]
) -> BackgroundEvaluator | None:
    """The evaluator beside this phase's training, or None (evaluation after training); logs the plan."""
    launch, devices = recipe.launch, recipe.evaluation.devices
    training = f"training: {launch.backend} x{launch.world_size}"
    if devices is None or stop_after_samples is not None or recipe.checkpointing.keep_last_n:
        why = (
            "evaluation.devices is unset"
            if devices is None
            else "a probe run"
            if stop_after_samples is not None
            else "keep_last_n may delete a checkpoint mid-evaluation"
        )
        log(f"{phase}: plan: {training}; evaluation after training, one model at a time ({why})")
        return None
    log(
        f"{phase}: plan: {training}; evaluation of each checkpoint as its meta.json lands, in a worker "
        f"process beside training on {devices} (evaluation.devices; the previous phase's when it is still "
        "idle); once training ends, one more worker per training rank on its resources"
    )
    evaluator = BackgroundEvaluator(local, log)
    evaluator.add_worker({**os.environ, **device_env(devices, visible_gpus())[1]}, reusable=True)
    return evaluator


@task(name="average-checkpoints")
def average_last_checkpoints(recipe: Recipe, run_uri: str, phase: str, checkpoints: list[ModelRef]) -> ModelRef | None:
    """selection.average_last_k: the uniform weight average of the phase's last k checkpoints,
    saved as <phase>/averaged/avg_last<k> and returned as one more candidate (None when off, or
    with fewer than 2 checkpoints). Its samples are the newest averaged checkpoint's."""
    k = recipe.selection.average_last_k
    if k is None or len(checkpoints) < 2:
        return None
    last = checkpoints[-k:]
    name = f"avg_last{len(last)}"
    phase_uri = storage.join(run_uri, phase)
    uri = storage.join(phase_uri, "averaged", name)
    local = storage.local_path(phase_uri) / "averaged" / name
    if not (local / "meta.json").exists():
        average_checkpoints([Path(storage.local_checkpoint(c.uri)) for c in last], local)
        get_run_logger().info(f"{phase}: {name} = uniform average of {[c.name for c in last]}")
    if not storage.is_local(uri):
        storage.upload_tree(local, uri)
    return ModelRef(name=name, uri=uri, samples=last[-1].samples, averaged=True)


def checkpoint_refs(local: Path, phase_uri: str) -> list[ModelRef]:
    """The complete checkpoints of a phase trained in `local`, addressed under `phase_uri`."""
    return [ModelRef.checkpoint(storage.join(phase_uri, "checkpoints", p.name)) for p in complete_checkpoints(local)]


def publish_phase(local: Path, phase_uri: str) -> list[ModelRef]:
    """Copy a phase trained in `local` to its remote `phase_uri` (nothing to do for a local
    root); return its complete checkpoints. Order: each checkpoint (files, then meta.json), then
    metrics and logs, then trained.json. The rolling state stays local."""
    checkpoints = checkpoint_refs(local, phase_uri)
    if not storage.is_local(phase_uri):
        for checkpoint in checkpoints:
            storage.upload_tree(local / "checkpoints" / checkpoint.name, checkpoint.uri)
        storage.upload_tree(local, phase_uri, skip=("checkpoints/", "state"), last=(TRAINED,))
    return checkpoints


@task(name="evaluate-model")
def evaluate_model(recipe: Recipe, model: ModelRef, out: str) -> CheckpointScore:
    """lm-eval on one model (one load for all tasks) into `out`; reused when it already exists
    (e.g. written by the evaluation beside training)."""
    if storage.exists(out):
        result = storage.read_json(out)
        get_run_logger().info(f"{model.name}: reusing {out}")
    else:
        t0 = time.perf_counter()
        result = worker.run_lm_eval(recipe, model.uri, model.samples, out)
        get_run_logger().info(f"{model.name}: {result['metrics']} ({time.perf_counter() - t0:.1f}s)")
    return CheckpointScore(
        checkpoint=model.uri,
        name=model.name,
        samples=model.samples,
        metrics=result["metrics"],
        stderr=result["stderr"],
        items=[items.items_uri(out)],
        averaged=model.averaged,
    )


@task(name="generate-mt-bench-answers")
def generate_mt_bench_answers(recipe: Recipe, model: ModelRef, out: str) -> str:
    """MT-Bench answers of one model (both turns) into `out` (JSONL); reused when present."""
    if storage.exists(out):
        return out
    count = worker.run_mt_bench_answers(recipe, model.uri, out)
    get_run_logger().info(f"{model.name}: {count} MT-Bench answers -> {out}")
    return out


@task(name="judge-mt-bench", retries=1, retry_delay_seconds=30)
def judge_mt_bench(recipe: Recipe, answers: dict[str, str], eval_dirs: dict[str, str]) -> dict[str, dict[str, float]]:
    """Judge the answers of every model without an mt_bench.json (those evaluated beside training
    were judged there) at once; judgments are cached, so a retry or re-run only pays for what is
    missing. Returns mt_bench/* metrics per model."""
    logger = get_run_logger()
    metrics, todo = {}, {}
    for name, uri in answers.items():
        result_uri = storage.join(eval_dirs[name], mt_bench.RESULT_FILE)
        if storage.exists(result_uri):
            metrics[name] = storage.read_json(result_uri)["metrics"]
            logger.info(f"{name}: reusing {result_uri}")
        else:
            todo[name] = uri
    if todo:
        expose_judge_key(recipe.evaluation.mt_bench)
        for name, scores in judge_and_write(recipe, todo, eval_dirs).items():
            logger.info(
                f"{name}: MT-Bench overall {scores.overall} (errors {scores.error_rate:.1%}, judge calls {scores.judge_calls})"
            )
            metrics[name] = scores.metrics()
    return metrics


def expose_judge_key(config: MTBenchConfig) -> None:
    """A Prefect Secret block's judge key goes to the client only via its env var (never a parameter or log)."""
    if config.judge_api_key_secret:
        from prefect.blocks.system import Secret

        os.environ[config.judge_api_key_env] = Secret.load(config.judge_api_key_secret).get()


def judge_and_write(
    recipe: Recipe, answers: dict[str, str], eval_dirs: dict[str, str]
) -> dict[str, mt_bench.CheckpointMTBench]:
    """Judge these models' answers together and write each one's <eval>/mt_bench.json."""
    config = recipe.evaluation.mt_bench
    result = mt_bench.judge_answers(
        {name: mt_bench.read_answers(uri) for name, uri in answers.items()},
        mt_bench.load_mt_bench(config),
        config,
        cache_dir=mt_bench_cache_dir(),
    )
    mt_bench.write_results(result, {name: eval_dirs[name] for name in answers})
    return result.checkpoints


def mt_bench_cache_dir() -> Path:
    from embedded import default_cache_dir

    return default_cache_dir() / "mt_bench" / "judgments"


@task(name="select-checkpoint")
def select_checkpoint(
    recipe: Recipe,
    phase: PhaseConfig,
    start: CheckpointScore,
    candidates: list[CheckpointScore],
    best_reached: dict[str, CheckpointScore],
    run_uri: str,
    run_id: str,
) -> Selection:
    """Pick the phase's checkpoint (or keep its start), judge the gate, write selection.json and artifacts."""
    selection = select(phase, start, candidates, best_reached, recipe.selection)
    storage.write_json(storage.join(run_uri, phase.name, "selection.json"), selection.model_dump(mode="json"))
    create_table_artifact(
        key=artifact_key(run_id, phase.name, "scores"),
        table=[
            {
                "candidate": c.name,
                "samples": c.samples,
                "objective": round(c.objective, 4),
                "interval": f"[{c.interval[0]:.4f}, {c.interval[1]:.4f}]",
                "minus_winner": "-" if c.vs_winner is None else str(c.vs_winner),
                "winner": c.checkpoint == selection.winner.checkpoint,
                "why_it_lost": c.lost or "-",
                **{k: round(v, 4) for k, v in c.metrics.items()},
            }
            for c in [selection.start, *selection.candidates]
        ],
        description=f"{phase.name}: every candidate's score with its {selection.confidence:.0%} interval, its paired "
        f"difference to the winner and why it lost (policy {selection.policy})",
    )
    create_markdown_artifact(
        key=artifact_key(run_id, phase.name, "gate"),
        markdown=gate_markdown(selection),
        description=f"{phase.name}: gate decision",
    )
    get_run_logger().info("\n".join([f"{phase.name}: winner {selection.winner.name}", *selection.gate.reasons]))
    return selection


@task(name="prune-checkpoints")
def prune_phase_checkpoints(recipe: Recipe, run_uri: str, phase: str, winner: str | None) -> list[str]:
    """checkpointing.prune = keep_selected: delete the phase's checkpoints except the winner
    (None: the start model won; their eval results stay). Runs after the gate passed."""
    phase_uri = storage.join(run_uri, phase)
    removed = prune_checkpoints(storage.local_path(phase_uri), winner, recipe.checkpointing.prune)
    if not storage.is_local(phase_uri):  # the local copies were the staging mirror: the bucket's go too
        for path in removed:
            storage.remove_tree(storage.join(phase_uri, "checkpoints", path.name))
    if removed:
        get_run_logger().info(f"{phase}: pruned {len(removed)} checkpoints, kept {winner}")
    return [str(p) for p in removed]


@task(name="write-report")
def write_report(run_uri: str, run_id: str, recipe: Recipe, phases: list[str] | None = None) -> list[dict[str, Any]]:
    """The run's report over `phases` (default: every phase of the recipe; a run stopped by a
    gate reports the phases it reached)."""
    metrics = sorted({k for p in recipe.phases for k in p.objective})
    table, tidy = report.write_run_report(run_uri, phases or [p.name for p in recipe.phases], metrics)
    create_table_artifact(
        key=artifact_key(run_id, "results"),
        table=tidy.to_dict(orient="records"),
        description="every evaluation result (run, phase, checkpoint, samples, suite, task, metric, value, stderr)",
    )
    create_markdown_artifact(
        key=artifact_key(run_id, "report"),
        markdown=f"# Run `{run_id}`\n\n{table.to_markdown(index=False)}\n\nReport files: `{storage.join(run_uri, 'report')}`\n",
        description="per-phase summary",
    )
    return table.to_dict(orient="records")
