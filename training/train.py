"""One phase of supervised fine-tuning: the whole loop, readable in one sitting.

Launch (the Prefect task does this for you, with a generated accelerate config):

    accelerate launch --config_file accelerate.yaml -m training.train --config job.json

`job.json` is a `TrainJob`: the resolved recipe, the phase, the model to start from, the
prepared data and the output directory. Outputs, under `output_dir`:

    metrics.jsonl                       one line per optimizer step (rank 0)
    checkpoints/samples_<N>/            save_pretrained + tokenizer + meta.json (written last)

Batch arithmetic: each optimizer step takes exactly `effective_batch_size` samples, split
across ranks and into token-capped micro-batches by `training.sampler.plan_steps`. The loss
of a step is the mean over every unmasked token of the step (all micro-batches, all ranks),
so the number of micro-batches never changes the gradient.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from contextlib import nullcontext
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TextIO

import torch
import torch.nn.functional as F
from accelerate import Accelerator, InitProcessGroupKwargs
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.data import IGNORE_INDEX, TokenizedData, load_tokenized
from training.recipe import Recipe, TrainingConfig, WatchdogConfig, warmup_steps
from training.sampler import Step, plan_steps, save_points

EXIT_WATCHDOG = 3  # exit code of a run stopped by the watchdog (NaN/inf)


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
        description="Probe: pause after the first step at or past this many samples, saving the "
        "rolling state, so that a later launch of the same job continues exactly (sweeps).",
    )


def lr_multiplier(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Fraction of the peak rate used by optimizer step `step` (0-based).

    Warmup is linear and reaches the peak on its last step (step k of W runs at k/W), so
    warmup 0 starts at the peak. After warmup: constant, or linear / cosine decay towards 0.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def collate(data: TokenizedData, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and loss."""
    width = max(len(data.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        input_ids[row, :n] = torch.tensor(data.input_ids[i])
        labels[row, :n] = torch.tensor(data.labels[i])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def summed_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over unmasked tokens: the step divides once."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def backward_step(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    step_loss_tokens: int,
    world_size: int,
    weight: float = 1.0,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> torch.Tensor:
    """Accumulate one optimizer step's gradients over this rank's micro-batches.

    Returns this rank's summed token loss. Each micro-batch's summed loss is scaled by
    world_size / step_loss_tokens: DDP averages gradients over ranks, so the result is the
    gradient of the token mean over the whole step, however the samples were split.
    Gradients are synchronised once, on the last micro-batch (`no_sync` on the others).
    """
    loss_sum = torch.zeros((), dtype=torch.float64)
    for m, batch in enumerate(batches):
        last = m == len(batches) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            token_loss = summed_token_loss(model, batch) * weight
            backward(token_loss * world_size / step_loss_tokens)
        loss_sum += token_loss.detach().double().cpu()
    return loss_sum


def save_checkpoint(accelerator: Accelerator, model, tokenizer, job: TrainJob, step: Step, metrics: dict) -> None:
    """save_pretrained + tokenizer, then meta.json last: a directory without meta.json is
    incomplete by contract and is never evaluated or selected."""
    path = Path(job.output_dir) / "checkpoints" / f"samples_{step.samples_seen}"
    if accelerator.is_main_process:
        shutil.rmtree(path, ignore_errors=True)  # an incomplete leftover of a killed run
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(
        path, is_main_process=accelerator.is_main_process, save_function=accelerator.save, safe_serialization=True
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(path)
        meta = {
            "phase": job.phase,
            "run_id": job.run_id,
            "samples_seen": step.samples_seen,
            "step": step.index,
            "parent_checkpoint": job.parent_checkpoint,
            "code_version": job.code_version,
            "metrics": metrics,
            "recipe": job.recipe.model_dump(mode="json"),
        }
        (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    accelerator.wait_for_everyone()


def log(accelerator: Accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(message, flush=True)


def train(job: TrainJob) -> None:
    cfg: TrainingConfig = job.recipe.training
    dtype = getattr(torch, job.recipe.model.dtype)
    # Several CPU ranks (and DeepSpeed on CPU) need gloo named explicitly (NOTES.md); with one
    # process, naming a backend makes accelerate look for a process group that does not exist.
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else [])
    torch.manual_seed(cfg.seed)
    world, rank = accelerator.num_processes, accelerator.process_index

    tokenizer = AutoTokenizer.from_pretrained(job.model_path)
    model = AutoModelForCausalLM.from_pretrained(
        job.model_path, dtype=dtype, attn_implementation=job.recipe.model.attn_implementation
    )
    data = load_tokenized(job.data_dir)
    lengths, loss_tokens = data.lengths(), data.loss_tokens()
    steps = plan_steps(lengths, cfg.effective_batch_size, cfg.epochs, cfg.seed, world, cfg.max_tokens_per_micro_batch)
    total_steps = len(steps)
    warmup = warmup_steps(cfg, total_steps)
    every = job.recipe.checkpointing.save_every_samples
    saves = save_points(steps, len(data), every, job.recipe.checkpointing.save_every_epoch)

    log(accelerator, f"world_size={world} rank={rank}")
    log(
        accelerator,
        f"batch arithmetic: {len(data)} samples x {cfg.epochs} epochs = {steps[-1].samples_seen} samples; "
        f"EBS {cfg.effective_batch_size} samples/step -> {total_steps} optimizer steps; "
        f"{world} rank(s); micro-batches capped at {cfg.max_tokens_per_micro_batch} padded tokens; "
        f"warmup {warmup} steps, schedule {cfg.schedule}, peak lr {cfg.learning_rate:g}",
    )
    if every and every % cfg.effective_batch_size:
        log(accelerator, f"warning: save_every_samples={every} is not a multiple of EBS; saving at the first step past each multiple")

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, warmup, job.recipe.training.schedule)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / "state"
    accelerator.register_for_checkpointing(scheduler)  # not prepare()d: that would step it once per rank
    done_steps, tokens_seen = load_state(accelerator, state_dir)
    if done_steps:
        log(accelerator, f"resuming after step {done_steps} from {state_dir}")
    metrics_log = open_jsonl(out / "metrics.jsonl", done_steps) if accelerator.is_main_process else None
    # Each rank records the sample ids it trained on: proof of no repeats or gaps, and of disjoint ranks.
    samples_log = open_jsonl(out / "samples" / f"rank{rank}.jsonl", done_steps)
    watchdog = Watchdog(job.recipe.watchdog)
    started = time.perf_counter()
    for step in steps[done_steps:]:
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        step_loss_tokens = sum(loss_tokens[i] for i in step.samples)  # global, known from the plan
        mine = step.micro_batches[rank] or [[step.samples[0]]]  # a rank with no samples still joins the all-reduce
        batches = [{k: v.to(accelerator.device) for k, v in collate(data, mb, tokenizer.pad_token_id).items()} for mb in mine]
        loss_sum = backward_step(
            model, batches, step_loss_tokens, world, weight=1.0 if step.micro_batches[rank] else 0.0, backward=accelerator.backward
        ).to(accelerator.device)
        loss = accelerator.reduce(loss_sum, reduction="sum").item() / step_loss_tokens
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf")).item()
        if reason := watchdog.check(step.index, loss, grad_norm):  # before the update: a bad step never lands
            stop(accelerator, out, metrics_log, step, reason)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        step_tokens = sum(lengths[i] for i in step.samples)
        padded = sum(len(mb) * max(lengths[i] for i in mb) for per_rank in step.micro_batches for mb in per_rank)
        tokens_seen += step_tokens
        wall = time.perf_counter() - t0
        record = {
            "step": step.index,
            "epoch": round(step.epoch, 4),
            "samples_seen": step.samples_seen,
            "tokens_seen": tokens_seen,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": round(step_tokens / wall, 1),
            "padding_efficiency": round(step_tokens / padded, 4),
            "micro_batches": sum(len(per_rank) for per_rank in step.micro_batches),
            "wall_s": round(time.perf_counter() - started, 3),
        }
        samples_log.write(json.dumps({"step": step.index, "ids": [data.ids[i] for mb in step.micro_batches[rank] for i in mb]}) + "\n")
        samples_log.flush()
        if metrics_log:
            metrics_log.write(json.dumps(record) + "\n")
            metrics_log.flush()
        log(accelerator, f"step {step.index}/{total_steps} samples {step.samples_seen} loss {loss:.4f} grad_norm {grad_norm:.3f} lr {lr:.3g}")

        # Once in a while: checkpoint (for evaluation) and rolling state (for resume).
        if step.index in saves:
            save_checkpoint(accelerator, model, tokenizer, job, step, record)
            log(accelerator, f"checkpoint samples_{step.samples_seen}")
        state_every = job.recipe.checkpointing.state_every_steps
        probe_done = job.stop_after_samples is not None and step.samples_seen >= job.stop_after_samples
        if step.index < total_steps and (probe_done or (state_every and step.index % state_every == 0)):
            save_state(accelerator, state_dir, step.index, tokens_seen)
        if probe_done and step.index < total_steps:
            log(accelerator, f"paused after step {step.index} ({step.samples_seen} samples): probe done")
            break
    else:
        if accelerator.is_main_process:
            shutil.rmtree(state_dir, ignore_errors=True)  # finished: the full state is only for resume
    samples_log.close()
    if metrics_log:
        metrics_log.close()
    accelerator.end_training()


class Watchdog:
    """Stops a run whose loss or gradient norm is non-finite, or whose loss spikes above
    `loss_spike_factor` x the median of the last `window` steps."""

    def __init__(self, config: WatchdogConfig) -> None:
        self.config = config
        self.recent: list[float] = []

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            return f"non-finite {'loss' if not math.isfinite(loss) else 'grad_norm'} at step {step} (loss={loss}, grad_norm={grad_norm})"
        factor = self.config.loss_spike_factor
        if factor and len(self.recent) >= self.config.min_steps:
            median = statistics.median(self.recent[-self.config.window :])
            if loss > factor * median:
                return f"loss spike at step {step}: {loss:.4f} > {factor:g} x running median {median:.4f}"
        self.recent.append(loss)
        return None


def stop(accelerator: Accelerator, out: Path, metrics_log: TextIO | None, step: Step, reason: str) -> NoReturn:
    """End the run for the watchdog: the reason goes to metrics.jsonl and stopped.json."""
    if accelerator.is_main_process:
        assert metrics_log is not None
        metrics_log.write(json.dumps({"step": step.index, "samples_seen": step.samples_seen, "stopped": reason}) + "\n")
        metrics_log.close()
        (out / "stopped.json").write_text(json.dumps({"step": step.index, "samples_seen": step.samples_seen, "reason": reason}) + "\n")
    log(accelerator, f"watchdog: {reason}")
    sys.exit(EXIT_WATCHDOG)


def open_jsonl(path: Path, keep_through_step: int) -> TextIO:
    """Append to a per-step JSONL log, first dropping the steps after `keep_through_step`
    (a resumed run redoes them; a fresh run keeps nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if keep_through_step and path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= keep_through_step]
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


def save_state(accelerator: Accelerator, state_dir: Path, step: int, tokens_seen: int) -> None:
    """Full training state (model, optimizer, scheduler, RNG of every rank) after `step`.

    Written to state.tmp and swapped in, so a kill at any moment leaves one complete state.
    """
    tmp, old = state_dir.with_name("state.tmp"), state_dir.with_name("state.old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps({"step": step, "tokens_seen": tokens_seen}))
        if state_dir.exists():
            state_dir.rename(old)
        tmp.rename(state_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_state(accelerator: Accelerator, state_dir: Path) -> tuple[int, int]:
    """(steps done, tokens seen) of the saved state, loaded into the prepared objects; (0, 0) if none."""
    old = state_dir.with_name("state.old")
    source = state_dir if (state_dir / "progress.json").exists() else old  # killed mid-swap: the old one is whole
    if not (source / "progress.json").exists():
        return 0, 0
    accelerator.load_state(str(source))
    progress = json.loads((source / "progress.json").read_text())
    return progress["step"], progress["tokens_seen"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="Path to the TrainJob JSON.")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(TrainJob.model_validate_json(Path(args.config).read_text()))


if __name__ == "__main__":
    main()
