"""What a run saves: checkpoints (for evaluation) and the rolling training state (for resume).

    checkpoints/samples_<N>/   save_pretrained + tokenizer + meta.json (core.records.CheckpointMeta, written last)
    state/                     the full training state of every rank + progress.json (core.records.StateProgress)

A checkpoint directory without meta.json is incomplete by contract: never evaluated or selected.
The rolling state is swapped in whole (state.tmp -> state), so a kill at any moment leaves one
complete state; when to write it is `RollingState`'s call (time, steps, a SIGTERM).
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TextIO

import torch
from accelerate import Accelerator

from core import records
from core.recipe import CheckpointConfig, Recipe
from core.records import CheckpointMeta, Preempted, Probe, SaveLine, StateProgress, StepMetrics
from training.job import TrainJob
from training.logs import host_memory_bytes, log, reset_host_peak
from training.sampler import Step

EXIT_PREEMPTED = 4  # exit code of a run stopped by SIGTERM after saving its rolling state
PROBE_TOKENS = 64  # length of the logits probe recorded with each checkpoint


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor) -> list[float]:
    """Log-probability of each next token of one sequence: a compact fingerprint of the weights."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
    return torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, input_ids[0, 1:, None]).squeeze(-1).tolist()


def save_checkpoint(
    accelerator: Accelerator,
    model,
    tokenizer,
    job: TrainJob,
    step: Step,
    metrics: StepMetrics,
    probe: torch.Tensor,
    validation_loss: float | None = None,
) -> None:
    """save_pretrained + tokenizer, then meta.json last: a directory without meta.json is
    incomplete by contract and is never evaluated or selected.

    The directory loads with plain `from_pretrained`. Sharded weights (ZeRO-3 / FSDP) are
    gathered into one state dict on rank 0, a collective; replicated ones (DDP, ZeRO-1/2) are
    written by rank 0 from its own copy: no collective, and no copy at all on the other ranks
    (accelerate's get_state_dict would copy the whole model to CPU on every ZeRO-1/2 rank).
    meta.json records the in-training model's token log-probs on a fixed probe: a reload must
    reproduce them.
    """
    path = Path(job.output_dir) / "checkpoints" / f"samples_{step.samples_seen}"
    if accelerator.is_main_process:
        shutil.rmtree(path, ignore_errors=True)  # an incomplete leftover of a killed run
    accelerator.wait_for_everyone()
    model.eval()
    probe_logprobs = token_logprobs(model, probe)  # every rank: under ZeRO-3 / FSDP a forward is collective
    model.train()
    dtype = getattr(torch, job.recipe.model.dtype)  # float32 masters are saved in the model's dtype
    if weights_sharded(job.recipe):
        state_dict = accelerator.get_state_dict(model)  # collective: gathers the shards on rank 0
        if state_dict is not None:  # None on ranks that do not write
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        accelerator.unwrap_model(model).save_pretrained(
            path,
            is_main_process=accelerator.is_main_process,
            state_dict=state_dict,
            save_function=accelerator.save,
            safe_serialization=True,
        )
    elif accelerator.is_main_process:
        # A copy on the host: under DeepSpeed the weights are views of one flat buffer, which
        # safetensors would take for shared tensors.
        own = accelerator.unwrap_model(model)
        state_dict = {
            k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype, copy=True)
            for k, v in own.state_dict().items()
        }
        own.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    if accelerator.is_main_process:
        config_file = path / "config.json"  # save_pretrained records the in-memory (master) dtype
        config_file.write_text(
            json.dumps(json.loads(config_file.read_text()) | {"dtype": job.recipe.model.dtype}, indent=2) + "\n"
        )
        tokenizer.save_pretrained(path)
        meta = CheckpointMeta(
            phase=job.phase,
            run_id=job.run_id,
            samples_seen=step.samples_seen,
            step=step.index,
            parent_checkpoint=job.parent_checkpoint,
            code_version=job.code_version,
            metrics=metrics,
            validation_loss=validation_loss,
            probe=Probe(input_ids=probe[0].tolist(), token_logprobs=probe_logprobs),
            recipe=job.recipe.model_dump(mode="json"),
        )
        (path / records.META).write_text(records.dumps(meta, indent=2) + "\n")
    accelerator.wait_for_everyone()


def weights_sharded(recipe: Recipe) -> bool:
    """Whether each rank holds only a shard of the weights (ZeRO-3, FSDP); else every rank has them all."""
    launch = recipe.launch
    return launch.backend == "fsdp" or (launch.backend == "deepspeed" and launch.zero_stage == 3)


class RollingState:
    """When the ranks write the rolling training state: every `rolling_state_minutes` of rank 0's
    clock, every `state_every_steps` steps, and at once after a SIGTERM (a preemption: the run
    then stops with EXIT_PREEMPTED). Every rank asks at the end of every step, and one small
    all-reduce (max) hands rank 0's time verdict and any rank's SIGTERM to all of them, so all
    ranks save at the same step. SIGINT is left alone: it stops without a save (a user's cancel,
    training.launch.local.kill_group)."""

    def __init__(self, config: CheckpointConfig, accelerator: Accelerator) -> None:
        self.minutes, self.every_steps = config.rolling_state_minutes, config.state_every_steps
        self.accelerator = accelerator
        self.last_save = time.monotonic()
        self.sigterm = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.sigterm = True  # acted on at the end of the step: a save needs the step's update done

    def due(self, step: int) -> str | None:
        """Why to save after `step` ("sigterm", "time", "steps"), or None. Collective."""
        timed = (
            self.accelerator.is_main_process
            and self.minutes is not None
            and time.monotonic() - self.last_save >= 60 * self.minutes
        )
        sigterm = self.sigterm
        if self.accelerator.num_processes > 1:
            flags = torch.tensor([timed, sigterm], dtype=torch.int32, device=self.accelerator.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            timed, sigterm = (bool(flag) for flag in flags.tolist())
        if sigterm:
            return "sigterm"
        if timed:
            return "time"
        return "steps" if self.every_steps and step % self.every_steps == 0 else None

    def saved(self) -> None:
        self.last_save = time.monotonic()


def preempted(accelerator: Accelerator, out: Path, step: Step) -> NoReturn:
    """End the run after the save a SIGTERM asked for; preempted.json says where it stopped."""
    if accelerator.is_main_process:
        (out / records.PREEMPTED).write_text(
            records.dumps(Preempted(step=step.index, samples_seen=step.samples_seen)) + "\n"
        )
    log(accelerator, f"preempted (SIGTERM): rolling state saved after step {step.index}; a relaunch resumes there")
    accelerator.end_training()
    sys.exit(EXIT_PREEMPTED)


@contextmanager
def recorded_save(saves_log: TextIO, step: int, what: str, reason: str) -> Iterator[None]:
    """One line per save in this rank's saves log: what, why, how long, and how much the
    process's peak host memory rose above its memory at the start (None where Linux's peak
    reset is unavailable): a save must not copy the model into every rank's memory."""
    measured = reset_host_peak()
    before = host_memory_bytes("VmHWM")  # the memory at the reset
    started = time.perf_counter()
    yield
    growth = host_memory_bytes("VmHWM") - before if measured else None
    line = SaveLine(
        step=step,
        what=what,
        reason=reason,
        seconds=round(time.perf_counter() - started, 3),
        host_peak_growth_bytes=growth,
    )
    saves_log.write(records.dumps(line) + "\n")
    saves_log.flush()


def save_state(accelerator: Accelerator, state_dir: Path, step: int, tokens_seen: int) -> None:
    """Full training state (model, optimizer, scheduler, RNG of every rank) after `step`.

    Written to state.tmp and swapped in, so a kill at any moment leaves one complete state.
    """
    tmp, old = state_dir.with_name("state.tmp"), state_dir.with_name("state.old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()  # every rank writes its own files (RNG, ZeRO shards) before the swap
    if accelerator.is_main_process:
        (tmp / records.STATE_PROGRESS).write_text(records.dumps(StateProgress(step=step, tokens_seen=tokens_seen)))
        if state_dir.exists():
            state_dir.rename(old)
        tmp.rename(state_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_state(accelerator: Accelerator, state_dir: Path) -> tuple[int, int]:
    """(steps done, tokens seen) of the saved state, loaded into the prepared objects; (0, 0) if none."""
    old = state_dir.with_name("state.old")
    # Killed mid-swap: the old one is whole.
    source = state_dir if (state_dir / records.STATE_PROGRESS).exists() else old
    if not (source / records.STATE_PROGRESS).exists():
        return 0, 0
    accelerator.load_state(str(source))
    progress = records.read(StateProgress, source / records.STATE_PROGRESS)
    return progress.step, progress.tokens_seen
