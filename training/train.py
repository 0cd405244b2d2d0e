"""One phase of supervised fine-tuning: the loop, readable in one sitting.

Launch (the phase task does this for you, with a generated accelerate config; training.launch):

    accelerate launch --config_file accelerate.yaml -m training.train --config job.json

`job.json` is a `training.job.TrainJob`: the resolved recipe, the phase, the model to start
from, the prepared data and the output directory. Each part of a run has its module:

    training/setup.py       accelerator, model, data and its step plan, optimizer, LR schedule
    training/step.py        micro-batches, the loss, backward with gradient accumulation, clipping
    training/logs.py        the per-step files and the lines people read
    training/checkpoint.py  checkpoints, the rolling state (resume) and preemption
    training/watchdog.py    stops a diverging run
    training/validation.py  validation/loss of the phase's held-out slice, at the start and every checkpoint
    core/records.py         the record of every file below

Outputs, under `output_dir`:

    metrics.jsonl, progress.jsonl       one line per optimizer step (rank 0); progress is what launchers report
    finished.json                       the last step is done (the rolling state/ is kept for the caller)
    stopped.json                        the watchdog stopped the run (exit EXIT_WATCHDOG)
    preempted.json                      a SIGTERM stopped the run after saving state/ (exit EXIT_PREEMPTED)
    samples/rank<r>.jsonl               the sample ids each rank trained on, per step
    saves/rank<r>.jsonl                 each save on each rank: what, why, seconds, host memory it took
    checkpoints/samples_<N>/            save_pretrained + tokenizer + meta.json (written last)
    validation/<model>.items.parquet    validation/loss per held-out sample, of "start" and each samples_<N>
    state/                              the rolling training state, for exact resume

Under DeepSpeed the loop tells the engine where each step ends (its own counter assumes a fixed
number of micro-batches per step) and `engine.step()` clips and updates in one go.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

from transformers.utils import logging as transformers_logging

from core import records
from core.records import Finished, ProgressEvent, StepMetrics
from training import tracking
from training.checkpoint import RollingState, load_state, preempted, recorded_save, save_checkpoint, save_state
from training.job import TrainJob
from training.lifetime import end_with_owner
from training.logs import RunLogs, log, peak_memory_bytes, write_line
from training.sampler import padded_tokens
from training.setup import Run, setup
from training.step import backward_step, clip_gradients, on_device, rank_micro_batches
from training.validation import score_validation
from training.watchdog import Watchdog, stop


def train(job: TrainJob) -> Run:
    """The phase's loop; returns the Run, which the caller keeps until the process ends (exit_without_teardown)."""
    run = setup(job)
    accelerator, model, optimizer, scheduler = run.accelerator, run.model, run.optimizer, run.scheduler
    cfg, out, state_dir = job.recipe.training, Path(job.output_dir), Path(job.output_dir) / "state"
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    deepspeed = job.recipe.launch.backend == "deepspeed"
    lengths, loss_tokens, total_steps = run.data.lengths(), run.data.loss_tokens(), len(run.steps)
    write_line(f"world_size={world} rank={rank}")  # every rank: proof that the run is really distributed
    for line in run.describe():  # the batch arithmetic, once
        log(accelerator, line)

    if accelerator.is_main_process:
        (out / records.FINISHED).unlink(missing_ok=True)  # this launch decides again
    accelerator.register_for_checkpointing(scheduler)  # not prepare()d: that would step it once per rank
    done_steps, tokens_seen = load_state(accelerator, state_dir)
    if done_steps:
        log(accelerator, f"resuming after step {done_steps} from {state_dir}")
    logs = RunLogs(out, rank, accelerator.is_main_process, done_steps)
    rolling, watchdog = RollingState(job.recipe.checkpointing, accelerator), Watchdog(job.recipe.watchdog)
    validation = run.validation
    if validation is not None and not done_steps:  # the start model: what the phase's checkpoints compete with
        score_validation(accelerator, model, validation, run.to_validation_batch, out, "start")
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in run.steps[done_steps:]:
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]

        # The step: this rank's micro-batches forward and backward, the loss the token mean over all ranks.
        step_loss_tokens = sum(loss_tokens[i] for i in step.samples)  # global, known from the plan
        micro_batches, weights = rank_micro_batches(step, rank, lengths, run.sharded)
        batches = [on_device(run.to_batch(mb), device) for mb in micro_batches]
        backward = model.backward if deepspeed else accelerator.backward
        loss_sum = backward_step(model, batches, step_loss_tokens, world, weights, backward).to(device)
        loss = accelerator.reduce(loss_sum, reduction="sum").item() / step_loss_tokens
        grad_norm = clip_gradients(accelerator, model, cfg.max_grad_norm, deepspeed)  # DeepSpeed: also the update
        # The watchdog, before the update (DDP, FSDP): a bad step never lands (DeepSpeed: never saved).
        if reason := watchdog.check(step.index, loss, grad_norm):
            stop(accelerator, out, logs, step, reason)
        optimizer.step()  # a no-op under DeepSpeed (accelerate's wrapper): the engine stepped above
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # Log: metrics.jsonl and progress.jsonl (rank 0), the sample ids of this rank, the trackers.
        step_tokens = sum(lengths[i] for i in step.samples)
        computed = sum(
            padded_tokens(mb, lengths, run.packed, run.row_multiple)
            for per_rank in step.micro_batches
            for mb in per_rank
        )
        tokens_seen += step_tokens
        wall = time.perf_counter() - t0
        flops = run.shape.training_flops([lengths[i] for i in step.samples]) if run.shape else None
        metrics = StepMetrics(
            step=step.index,
            epoch=round(step.epoch, 4),
            samples_seen=step.samples_seen,
            tokens_seen=tokens_seen,
            loss=loss,
            grad_norm=grad_norm,
            lr=lr,
            tokens_per_s=round(step_tokens / wall, 1),  # real tokens, padding excluded
            samples_per_s=round(len(step.samples) / wall, 2),
            mfu=round(flops / wall / (world * run.peak_flops), 4) if flops is not None else None,
            padding_efficiency=round(step_tokens / computed, 4),
            micro_batches=sum(len(per_rank) for per_rank in step.micro_batches),
            wall_s=round(time.perf_counter() - started, 3),
            cpu_s=round(time.process_time() - cpu_started, 3),  # this rank's CPU time: robust to a shared machine
            peak_memory_gb=round(peak_memory_bytes(device) / 2**30, 4),
            time=round(time.time(), 3),  # when the step ended (Unix time): concurrent runs can be told apart
        )
        progress = ProgressEvent(
            step=step.index,
            total_steps=total_steps,
            samples_seen=step.samples_seen,
            epoch=metrics.epoch,
            loss=loss,
            grad_norm=grad_norm,
            lr=lr,
        )
        ours = {i for mb in step.micro_batches[rank] for i in mb}  # in data-stream order: epochs can be told apart
        logs.step(metrics, progress, [run.data.ids[i] for i in step.samples if i in ours])
        accelerator.log(tracking.step_metrics(metrics), step=step.index)  # no-op without trackers
        if sys.stdout.isatty():  # a person watching a launch by hand; a launcher reports progress.jsonl
            log(accelerator, progress.line())

        # Checkpoint (for evaluation). A probe's pause also saves one: a sweep may rank its runs by it.
        probe_done = job.stop_after_samples is not None and step.samples_seen >= job.stop_after_samples
        if step.index in run.saves or probe_done:
            name, validation_loss = f"samples_{step.samples_seen}", None
            if validation is not None:  # validation/loss of the held-out slice, with the checkpoint
                validation_loss = score_validation(accelerator, model, validation, run.to_validation_batch, out, name)
                accelerator.log({"validation/loss": validation_loss}, step=step.index)
            with recorded_save(logs.saves, step.index, "checkpoint", "probe" if probe_done else "schedule"):
                save_checkpoint(accelerator, model, run.tokenizer, job, step, metrics, run.probe, validation_loss)
            log(accelerator, f"checkpoint {name}")

        # Rolling state (for resume): by time, by steps, at a probe's pause, or after a SIGTERM (then stop).
        reason = rolling.due(step.index)  # every rank, every step: they agree on the step
        if step.index < total_steps and (probe_done or reason):
            with recorded_save(logs.saves, step.index, "state", reason or "probe"):
                save_state(accelerator, state_dir, step.index, tokens_seen)
            rolling.saved()
            if reason == "sigterm":
                preempted(accelerator, out, step)
        if probe_done and step.index < total_steps:
            log(accelerator, f"paused after step {step.index} ({step.samples_seen} samples): probe done")
            break
    else:
        if accelerator.is_main_process:
            # The rolling state stays: the caller removes it once it has recorded the phase as
            # trained, so a kill before that record finds this file instead of retraining.
            finished = Finished(steps=total_steps, samples_seen=run.steps[-1].samples_seen)
            (out / records.FINISHED).write_text(records.dumps(finished) + "\n")
    logs.close()
    accelerator.end_training()
    return run


def main(argv: list[str] | None = None) -> Run:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="Path to the TrainJob JSON.")
    args = parser.parse_args(argv)
    end_with_owner()  # a rank outlives no killed run (training.lifetime)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers_logging.disable_progress_bar()  # load/save bars would reach the run log as lines; steps are logged
    return train(TrainJob.model_validate_json(Path(args.config).read_text()))


def exit_without_teardown(argv: list[str] | None = None) -> NoReturn:
    """main(), then exit without freeing the run's objects. Why: freeing DDP's reducer frees its
    gloo process group, which joins its worker threads while holding the GIL; a worker still
    freeing the last collective's tensor waits for the GIL, and the rank never exits (seen with 2
    CPU ranks under load: the main thread in ~ProcessGroupGloo, a pt_gloo_runloop thread in
    gil_scoped_acquire). So nothing is freed: on return the Run stays referenced, on an exception
    its traceback keeps the frames, until os._exit. Every file the run writes is closed by then;
    the watchdog's and a preemption's exit codes are kept."""
    try:
        _run = main(argv)  # held, not used: referenced until os._exit
    except SystemExit as exc:  # argparse's, the watchdog's and a preemption's exit codes
        exit_now(exc.code or 0)
    except BaseException:
        traceback.print_exc()
        exit_now(1)
    exit_now(0)


def exit_now(code: int) -> NoReturn:
    """os._exit after flushing stdout and stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown()
