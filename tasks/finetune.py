"""Prefect tasks of the finetune flow: thin, typed wrappers over training/ and evaluation/.

They pass URIs and small pydantic results, never tensors or datasets. Behaviour that belongs
to orchestration (retries, timeouts, artifacts, logging) lives here, not in the libraries.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectConcurrentFuture, PrefectFuture

from core import items, records, storage
from core.chat import apply_template
from core.recipe import MTBenchConfig, PhaseConfig, Recipe
from core.records import FINISHED, MANIFEST, TRAINED, Manifest, ModelRef, PhaseDone, PrepStats, ProgressEvent
from evaluation import mt_bench, report, worker
from evaluation.selection import CheckpointScore, Selection, gate_markdown, select
from evaluation.worker import EvalRequest, EvaluationWorkers
from training.averaging import average_checkpoints
from training.data import phase_conversations, prepare
from training.job import TrainJob
from training.launch.checkpoints import complete_checkpoints, keep_last_checkpoints, prune_checkpoints
from training.launch.devices import device_env, training_slots, visible_gpus
from training.launch.files import RunFiles, TrainingFailed
from training.launch.local import run_training
from training.plan import preemption_grace_seconds
from training.scheduler import run_scheduled

REPO = Path(__file__).resolve().parents[1]
WATCH_POLL_S = 0.5  # how often the watcher looks for a newly complete checkpoint


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


@task(name="init-run")
def init_run(run_uri: str, run_id: str, recipe: Recipe) -> Manifest:
    """Create or load the run journal (manifest.json). A re-run with the same run_id resumes."""
    uri = storage.join(run_uri, MANIFEST)
    manifest = records.read_manifest(run_uri)
    if manifest is not None:
        # Where the model is exported is not what the run trains: a finished run may be re-run to export it.
        trained = {k: v for k, v in manifest.recipe.items() if k != "export"}
        if trained != recipe.model_dump(mode="json", exclude={"export"}):
            raise ValueError(f"{uri}: run {run_id} exists with a different recipe; use a new run_id")
        get_run_logger().info(f"resuming run {run_id}: phases done {list(manifest.phases)}")
        return manifest
    manifest = Manifest(
        run_id=run_id,
        created=datetime.now(UTC).isoformat(),
        code_version=code_version(),
        recipe=recipe.model_dump(mode="json"),
    )
    storage.write_text(uri, records.dumps(manifest, indent=2) + "\n")
    return manifest


@task(name="mark-phase-done")
def mark_phase_done(run_uri: str, manifest: Manifest, selection: Selection, validation_ids: list[str]) -> Manifest:
    """The phase's winner in the run journal, with the ids of its held-out validation slice."""
    done = PhaseDone(
        selected=selection.winner.checkpoint,
        objective=selection.winner.objective,
        policy=selection.policy,
        validation_ids=validation_ids,
    )
    manifest = manifest.model_copy(update={"phases": {**manifest.phases, selection.phase: done}})
    storage.write_text(storage.join(run_uri, MANIFEST), records.dumps(manifest, indent=2) + "\n")
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


@task(name="train-phase", task_run_name="train-{run_id}-{phase.name}", cache_policy=NO_CACHE)
def train_phase(
    recipe: Recipe,
    phase: PhaseConfig,
    run_uri: str,
    run_id: str,
    start: ModelRef,
    stop_after_samples: int | None = None,
    stop: threading.Event | None = None,
) -> list[ModelRef]:
    """Run the phase's `accelerate launch`; stream rank-0 output to the log; return checkpoints.

    With `stop_after_samples` the run pauses there (a sweep's probe); the next call resumes it.
    Training writes into the phase's local directory (for a remote root, its mirror in the
    staging directory, which also keeps the rolling state for resume). Progress comes from
    progress.jsonl and each checkpoint from its meta.json (the run's files, not its output): with
    a remote root it is uploaded as soon as it is complete. Setting `stop` (an evaluation beside
    training failed) kills the training. A finished phase gets trained.json and is never trained
    again: a re-run only uploads what is missing.
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

    def on_checkpoint(path: Path) -> None:
        uploads.append(uploader.submit(checkpoint_written, path.name))

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
    try:
        launch = run_training if recipe.launch.scheduler == "local" else run_scheduled
        launch(job, on_line=logger.info, on_progress=on_progress, on_checkpoint=on_checkpoint, stop=stop)
        for upload in uploads:
            upload.result()  # an upload error fails the task (a retry resumes the upload)
    except TrainingFailed:
        publish_phase(local, phase_uri)  # the metrics and stopped.json say why; keep them with the run
        raise
    finally:
        uploader.shutdown(wait=False, cancel_futures=True)
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
    storage.write_text(str(local / TRAINED), records.dumps(checkpoint_refs(local, phase_uri), indent=2) + "\n")
    shutil.rmtree(local / "state", ignore_errors=True)
    return publish_phase(local, phase_uri)


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


class RunEvaluation:
    """What a flow run's evaluation task runs share: the one owner of the run's evaluation
    processes (started and stopped by the flow run: a context manager that kills them all on
    exit) and one MT-Bench judging at a time (a prompt that several models' identical answers
    share is then asked once: the judgment cache holds it for the next model).

    `recipe` is the run's resolved recipe (training.placement.resolve_placement): with placement
    reserved its evaluation.devices are a slot from the start; when a phase's training ends its
    resources become slots too (per_device: one per GPU or training process; data_parallel: one
    with all its GPUs), taken back before the next phase trains."""

    def __init__(self, recipe: Recipe, log: Callable[[str], None]) -> None:
        self.recipe = recipe
        self.workers = EvaluationWorkers(log)
        self.judging = threading.Lock()

    def __enter__(self) -> RunEvaluation:
        devices = self.recipe.evaluation.devices
        if self.recipe.evaluation.placement == "reserved" and devices:
            self.workers.open_slots("reserved", [device_env(devices, visible_gpus())[1]])
        return self

    def __exit__(self, *exc: object) -> None:
        self.workers.kill()

    def training_ended(self) -> None:
        slots = training_slots(self.recipe, visible_gpus())
        if self.recipe.evaluation.placement == "data_parallel":
            slots = [{"CUDA_VISIBLE_DEVICES": ",".join(slot["CUDA_VISIBLE_DEVICES"] for slot in slots)}]
        self.workers.open_slots("training", slots)

    def training_starts(self) -> None:
        self.workers.close_slots("training")


def evaluation_without_training(recipe: Recipe) -> RunEvaluation:
    """The owner of a flow run's evaluation processes when it trains nothing: the whole machine is
    free, as after a phase's training (`lab eval`, a sweep's probe)."""
    from training.placement import resolve_placement

    run_recipe, _ = resolve_placement(recipe, cuda=bool(visible_gpus()))
    evaluation = RunEvaluation(run_recipe, get_run_logger().info)
    evaluation.training_ended()
    return evaluation


@task(
    name="evaluate-checkpoint",
    task_run_name="evaluate-{phase}-{model.name}",
    retries=1,
    retry_delay_seconds=5,
    cache_policy=NO_CACHE,
)
def evaluate_checkpoint(
    recipe: Recipe, phase: str, phase_uri: str, model: ModelRef, evaluation: RunEvaluation
) -> CheckpointScore:
    """One model's evaluation into <phase_uri>/eval/<model>/: lm-eval and MT-Bench answers in an
    evaluation worker (through a server of the model with a server backend), then MT-Bench judging
    here; its score. What an earlier attempt or run wrote is reused, so a retry pays only for what
    is missing. The worker's log and <phase>/evaluations.jsonl are in the phase's local directory."""
    logger = get_run_logger()
    eval_dir = storage.join(phase_uri, "eval", model.name, "")
    lm_eval_out = storage.join(eval_dir, worker.LM_EVAL_FILE)
    answers_out = storage.join(eval_dir, worker.MT_BENCH_ANSWERS_FILE)
    config = recipe.evaluation
    if storage.exists(lm_eval_out) and (config.mt_bench is None or storage.exists(answers_out)):
        logger.info(f"{model.name}: reusing {eval_dir}")
    else:
        request = EvalRequest(recipe=recipe, name=model.name, uri=model.uri, samples=model.samples, eval_dir=eval_dir)
        record = evaluation.workers.evaluate(request, storage.local_path(phase_uri))
        logger.info(f"{model.name}: evaluated in {record.seconds:.1f}s by worker {record.pid} ({record.slot})")
    result = storage.read_json(lm_eval_out)
    metrics = result["metrics"]
    item_files = [items.items_uri(lm_eval_out)]  # per-item records, written before the result files
    if config.mt_bench is not None:
        metrics = {**metrics, **judge_mt_bench(recipe, model.name, answers_out, eval_dir, evaluation.judging)}
        item_files.append(items.items_uri(storage.join(eval_dir, mt_bench.RESULT_FILE)))
    logger.info(f"{model.name}: {metrics}")
    return CheckpointScore(
        checkpoint=model.uri,
        name=model.name,
        samples=model.samples,
        metrics=metrics,
        stderr=result["stderr"],
        items=item_files,
        averaged=model.averaged,
    )


def judge_mt_bench(recipe: Recipe, name: str, answers: str, eval_dir: str, judging: threading.Lock) -> dict[str, float]:
    """MT-Bench metrics of one model: its mt_bench.json, else its answers judged now (judgments are
    cached, so a retry or re-run only pays for what is missing)."""
    result_uri = storage.join(eval_dir, mt_bench.RESULT_FILE)
    if storage.exists(result_uri):
        return storage.read_json(result_uri)["metrics"]
    expose_judge_key(recipe.evaluation.mt_bench)
    with judging:
        scores = judge_and_write(recipe, {name: answers}, {name: eval_dir})[name]
    get_run_logger().info(
        f"{name}: MT-Bench overall {scores.overall} (errors {scores.error_rate:.1%}, judge calls {scores.judge_calls})"
    )
    return scores.metrics()


class PhaseEvaluations:
    """A phase's evaluation task runs, one per model, submitted as the models appear: `submit`
    from the flow, and, within `watching`, each checkpoint whose meta.json lands, from a watcher
    thread that carries the flow run's context (a task submitted outside it would belong to no
    run). `failed` is set as soon as one fails for good (its retries spent): the training beside
    it stops. `scores` waits on them."""

    def __init__(self, recipe: Recipe, phase: str, run_uri: str, evaluation: RunEvaluation) -> None:
        self.recipe, self.phase, self.run_uri, self.evaluation = recipe, phase, run_uri, evaluation
        self.failed = threading.Event()
        self._failure: PrefectFuture[CheckpointScore] | None = None
        self._futures: dict[str, PrefectFuture[CheckpointScore]] = {}
        self._lock = threading.Lock()

    def submit(self, model: ModelRef) -> None:
        with self._lock:
            if model.name in self._futures:
                return
            phase_uri = storage.join(self.run_uri, self.phase)
            future = evaluate_checkpoint.submit(self.recipe, self.phase, phase_uri, model, self.evaluation)
            self._futures[model.name] = future
        future.add_done_callback(self._done)

    def _done(self, future: PrefectConcurrentFuture[CheckpointScore]) -> None:
        # The final state is the task runner's result (the API may not have recorded it yet).
        done = future.wrapped_future
        if done.cancelled() or done.exception() is not None or not done.result().is_completed():
            self._failure = self._failure or future
            self.failed.set()

    @contextlib.contextmanager
    def watching(self, local: Path) -> Iterator[None]:
        """Submit each checkpoint completed under `local` (the phase's training directory) while the block runs."""
        phase_uri = storage.join(self.run_uri, self.phase)
        files, done = RunFiles(local), threading.Event()

        def watch() -> None:
            while not done.wait(WATCH_POLL_S):
                for path in files.new_checkpoints():
                    self.submit(ModelRef.checkpoint(storage.join(phase_uri, "checkpoints", path.name)))

        watcher = threading.Thread(target=contextvars.copy_context().run, args=(watch,), daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()

    def raise_failure(self) -> None:
        """The first failed evaluation's own error, if one failed."""
        if self._failure is not None:
            self._failure.result()  # raises the task's exception

    def scores(self, models: list[ModelRef]) -> list[CheckpointScore]:
        """Each model's score, in order (submitting those not submitted yet); an evaluation's failure
        raises its error. With a remote root, the phase's evaluation records and worker logs follow."""
        for model in models:
            self.submit(model)
        scores = [self._futures[m.name].result() for m in models]
        phase_uri = storage.join(self.run_uri, self.phase)
        if not storage.is_local(phase_uri):
            storage.upload_tree(
                storage.local_path(phase_uri), phase_uri, skip=("checkpoints/", "state"), last=(TRAINED,)
            )
        return scores


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
def write_report(
    run_uri: str, run_id: str, recipe: Recipe, phases: list[str] | None = None
) -> list[report.PhaseSummary]:
    """The run's report over `phases` (default: every phase of the recipe; a run stopped by a
    gate reports the phases it reached)."""
    metrics = sorted({k for p in recipe.phases for k in p.objective})
    summary, table, tidy = report.write_run_report(run_uri, phases or [p.name for p in recipe.phases], metrics)
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
    return summary
