"""Where checkpoints are evaluated and what it costs: `lab plan`'s evaluation section, and the run's choice.

Placements (evaluation.placement) on a node of N GPUs (launch.num_processes):

    reserved       on evaluation.devices (k GPUs taken from training, which then runs N - k ranks with the
                   same effective batch), each checkpoint as it lands, beside training; when training ends
                   its GPUs take one queued checkpoint each
    data_parallel  after the phase's training, all N GPUs on one checkpoint at a time: one server
                   (`vllm serve --data-parallel-size N`); needs a server backend
    per_device     after the phase's training, one checkpoint per GPU (on CPU: per training process)

Estimates, per GPU of the H100 class (bf16 weights; the constants below are assumptions that
bench/gpu_eval.py measures for the HF path on a real GPU):

    HF (lm-eval's HFLM, batch evaluation.batch_size): the model loads at LOAD_BYTES_PER_S; a
      multiple-choice item costs choices x prompt tokens of forward pass at HF_MFU; a generation
      batch runs to its longest answer (3 x the mean, at most the cap) at one decode step per token,
      a step costing max(HF_STEP_S, weights / (HBM x HBM_EFFICIENCY)).
    vLLM server (continuous batching): SERVER_START_S + the load per checkpoint; generation at
      SERVER_BATCH sequences per decode step per GPU, bounded below by the longest answer's own
      decode; prompt tokens (and multiple-choice prompt logprobs, at half speed) at SERVER_MFU.

A phase's wall time is its training (the plan's throughput) plus what evaluation adds to it:
reserved slows training by N / (N - k) and adds the last checkpoint (or more when evaluation
cannot keep up); the others add their evaluation of all the phase's checkpoints. `auto` picks the
placement with the shortest whole phase, from the recipe alone (its data's sample count when
readable here, the default throughput and sample length), so that `lab plan` and `lab run` pick alike.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from core.recipe import Recipe
from training.plan import DTYPE_BYTES, H100_BF16_FLOPS, ModelShape

Placement = Literal["reserved", "data_parallel", "per_device"]
Backend = Literal["hf", "vllm", "transformers-serve"]

H100_HBM_BYTES_PER_S = 3.35e12
LOAD_BYTES_PER_S = 2e9  # safetensors from local disk / page cache to the GPU
HF_MFU = 0.3  # lm-eval's padded HF forward passes
HF_STEP_S = 0.03  # HF generate's per-token overhead at small models (python, kernel launches)
HBM_EFFICIENCY = 0.5
SERVER_START_S = 60.0  # vLLM: process start, profiling, CUDA graph capture (the load comes on top)
SERVER_MFU = 0.5
SERVER_BATCH = 256  # sequences decoded together per GPU
JUDGE_SECONDS_PER_REQUEST = 5.0  # a GPT-4-class judge, one single-answer judgment
MEAN_ANSWER_SHARE = 0.3  # lm-eval generation tasks with no table entry: mean answer = this x the cap


@dataclass(frozen=True)
class TaskSize:
    """An lm-eval task's shape for the estimate: items, and per item its prompt and answer tokens."""

    items: int
    kind: Literal["multiple_choice", "generation"]
    prompt_tokens: int
    choices: int = 1
    answer_tokens: int = 0  # generation: the mean answer
    max_answer_tokens: int = 0  # generation: the cap (0: evaluation.max_gen_tokens)


# Sizes of the standard tasks (test splits, lm-eval 0.4 defaults: gsm8k 5-shot, the others 0-shot).
TASK_SIZES = {
    "mmlu": TaskSize(14042, "multiple_choice", 200, choices=4),
    "arc_challenge": TaskSize(1172, "multiple_choice", 60, choices=4),
    "arc_easy": TaskSize(2376, "multiple_choice", 60, choices=4),
    "hellaswag": TaskSize(10042, "multiple_choice", 120, choices=4),
    "winogrande": TaskSize(1267, "multiple_choice", 40, choices=2),
    "truthfulqa_mc2": TaskSize(817, "multiple_choice", 80, choices=8),
    "gsm8k": TaskSize(1319, "generation", 900, answer_tokens=150, max_answer_tokens=256),
    "ifeval": TaskSize(541, "generation", 80, answer_tokens=350, max_answer_tokens=1280),
    "lab_instruction": TaskSize(200, "generation", 60, answer_tokens=20),
    "lab_knowledge": TaskSize(200, "multiple_choice", 60, choices=4),
    "lab_skills": TaskSize(200, "generation", 60, answer_tokens=10),
}
UNKNOWN_TASK = TaskSize(1000, "generation", 500, answer_tokens=200, max_answer_tokens=256)
MT_BENCH_TURNS = TaskSize(160, "generation", 400, answer_tokens=400)  # 80 questions x 2 turns


class PlacementEstimate(BaseModel):
    """One way to evaluate a phase's checkpoints, with what it costs (None: not estimable)."""

    placement: Placement
    backend: Backend
    devices: str = Field(description="The evaluation's share: 'cuda:7' beside training, 'cuda:0,...,7' after it.")
    training_ranks: int
    minutes_per_checkpoint: float | None = Field(description="One checkpoint, on the GPUs that evaluate it.")
    minutes_per_interval: float | None = Field(
        None,
        description="Steady state: wall minutes per checkpointing.save_every_samples of training, with evaluation.",
    )
    phase_minutes: dict[str, float] | None = Field(
        None, description="Per phase: wall minutes of training and its evaluation (None: the data's size is unknown)."
    )


class EvaluationPlan(PlacementEstimate):
    """`lab plan --json`'s `evaluation`: the placement the run uses, its estimate, and the alternatives."""

    beside_training: bool
    checkpoints_per_phase: dict[str, int] | None = Field(description="Models each phase evaluates.")
    reason: str = Field(description="Why this placement.")
    alternatives: list[PlacementEstimate]
    notes: list[str] = Field(default_factory=list)


def vllm_found(recipe: Recipe) -> bool:
    executable = recipe.evaluation.server.vllm_executable
    return shutil.which(executable) is not None or Path(executable).is_file()


def node_gpus(recipe: Recipe, cuda: bool = True) -> int:
    """The GPUs of the node evaluation may use: launch.num_processes on a GPU backend where there
    is CUDA (`lab plan` plans for a GPU node; a GPU backend also runs on CPU, over gloo), else none."""
    return recipe.launch.num_processes if cuda and recipe.launch.backend != "cpu" else 0


def suite(recipe: Recipe) -> tuple[list[TaskSize], list[str]]:
    """The per-checkpoint work: each lm-eval task (evaluation.limit applied) and MT-Bench's turns."""
    config, notes, tasks = recipe.evaluation, [], []
    for name in config.tasks:
        size = TASK_SIZES.get(name)
        if size is None:
            size = UNKNOWN_TASK
            notes.append(f"task {name}: size unknown to the estimate, assumed {size.items} generations")
        cap = size.max_answer_tokens or config.max_gen_tokens
        tasks.append(
            TaskSize(
                min(size.items, config.limit or size.items),
                size.kind,
                size.prompt_tokens,
                size.choices,
                min(size.answer_tokens or int(MEAN_ANSWER_SHARE * cap), cap),
                cap,
            )
        )
    if config.mt_bench is not None:
        cap = config.mt_bench.max_new_tokens
        tasks.append(TaskSize(MT_BENCH_TURNS.items, "generation", MT_BENCH_TURNS.prompt_tokens, 1, min(400, cap), cap))
    return tasks, notes


def weight_bytes(recipe: Recipe, shape: ModelShape) -> int:
    return shape.params * DTYPE_BYTES[recipe.model.dtype]


def decode_step_s(recipe: Recipe, shape: ModelShape) -> float:
    return weight_bytes(recipe, shape) / (H100_HBM_BYTES_PER_S * HBM_EFFICIENCY)


@dataclass(frozen=True)
class HFRates:
    """What one GPU does with HF: seconds to load the model, prompt tokens/s, seconds per decode step."""

    load_s: float
    prefill_tokens_per_s: float
    step_s: float

    @classmethod
    def assumed(cls, recipe: Recipe, shape: ModelShape) -> HFRates:
        return cls(
            load_s=weight_bytes(recipe, shape) / LOAD_BYTES_PER_S,
            prefill_tokens_per_s=HF_MFU * H100_BF16_FLOPS / (2 * shape.params),
            step_s=max(HF_STEP_S, decode_step_s(recipe, shape)),
        )


def hf_checkpoint_s(
    recipe: Recipe, shape: ModelShape, tasks: list[TaskSize], rates: HFRates | None = None, to_cap: bool = False
) -> float:
    """One checkpoint on one GPU with HF: load, forward passes, batched generation (each batch to its
    longest answer; `to_cap`: every batch to the cap, as random weights do)."""
    rates = rates or HFRates.assumed(recipe, shape)
    batch = recipe.evaluation.batch_size
    seconds = rates.load_s
    for t in tasks:
        if t.kind == "multiple_choice":
            seconds += t.items * t.choices * t.prompt_tokens / rates.prefill_tokens_per_s
        else:
            longest = t.max_answer_tokens if to_cap else min(t.max_answer_tokens, 3 * t.answer_tokens)
            seconds += math.ceil(t.items / batch) * longest * rates.step_s
            seconds += t.items * t.prompt_tokens / rates.prefill_tokens_per_s
    return seconds


def server_checkpoint_s(recipe: Recipe, shape: ModelShape, tasks: list[TaskSize], gpus: int) -> float:
    """One checkpoint on `gpus` GPUs through one vLLM server (data parallel): start, load, serve."""
    prefill = gpus * SERVER_MFU * H100_BF16_FLOPS / (2 * shape.params)
    step = decode_step_s(recipe, shape)
    seconds = SERVER_START_S + weight_bytes(recipe, shape) / LOAD_BYTES_PER_S
    for t in tasks:
        if t.kind == "multiple_choice":
            seconds += 2 * t.items * t.choices * t.prompt_tokens / prefill  # prompt logprobs: half speed
        else:
            throughput = t.items * t.answer_tokens * step / (gpus * SERVER_BATCH)
            seconds += max(throughput, min(t.max_answer_tokens, 3 * t.answer_tokens) * step)
            seconds += t.items * t.prompt_tokens / prefill
    return seconds


def judging_s(recipe: Recipe) -> float:
    """MT-Bench judging of one checkpoint (a remote judge: its latency, at its concurrency)."""
    config = recipe.evaluation.mt_bench
    return 0.0 if config is None else MT_BENCH_TURNS.items * JUDGE_SECONDS_PER_REQUEST / config.concurrency


def checkpoints_per_phase(recipe: Recipe, samples: dict[str, int]) -> dict[str, int]:
    """Models each phase evaluates: its checkpoints (every save_every_samples, every epoch), the
    averaged one, and the base model in the first phase."""
    ckpt, epochs = recipe.checkpointing, recipe.training.epochs
    out = {}
    for i, phase in enumerate(recipe.phases):
        seen = samples[phase.name] * epochs
        count = int(seen // ckpt.save_every_samples) if ckpt.save_every_samples else 0
        count += math.ceil(epochs) if ckpt.save_every_epoch else 0
        if recipe.selection.average_last_k and count >= 2:
            count += 1
        out[phase.name] = max(1, count) + (1 if i == 0 else 0)
    return out


def estimate(
    recipe: Recipe,
    shape: ModelShape | None,
    placement: Placement,
    backend: Backend,
    devices: str,
    samples: dict[str, int] | None,
    tokens_per_s_per_gpu: float,
    mean_tokens: float,
    n: int,
) -> PlacementEstimate:
    """One option's minutes per checkpoint, per checkpoint interval and per phase, on a node of `n` GPUs."""
    on_gpus = placement == "reserved" and n and devices.startswith("cuda:")
    reserved = len(devices.removeprefix("cuda:").split(",")) if on_gpus else 0  # GPUs taken from training
    ranks = n - reserved if n else recipe.launch.num_processes
    if not reserved and placement == "reserved" or not n or shape is None:  # on CPU: bench/eval_throughput.py
        return PlacementEstimate(
            placement=placement, backend=backend, devices=devices, training_ranks=ranks, minutes_per_checkpoint=None
        )
    tasks, _ = suite(recipe)
    if backend == "hf":
        seconds = hf_checkpoint_s(recipe, shape, tasks)
    else:
        seconds = server_checkpoint_s(
            recipe, shape, tasks, {"data_parallel": n, "reserved": reserved}.get(placement, 1)
        )
    seconds += judging_s(recipe)
    # checkpoints evaluated at once: each reserved GPU (HF) or one server on all of them; per_device: one per GPU
    at_once = {"reserved": reserved if backend == "hf" else 1, "data_parallel": 1, "per_device": n}[placement]

    def wall(training_gpu_s: float, checkpoints: int) -> float:
        """Seconds of a stretch of training that saves `checkpoints`, with their evaluation."""
        if placement == "reserved":  # beside training; the last one after it
            return max(training_gpu_s / ranks, (checkpoints - 1) * seconds / at_once) + seconds
        return training_gpu_s / n + math.ceil(checkpoints / at_once) * seconds

    every = recipe.checkpointing.save_every_samples
    interval = None
    if every:  # steady state: one interval's training and one checkpoint's share of evaluation
        training = every * mean_tokens / tokens_per_s_per_gpu
        if placement == "reserved":
            interval = round(max(training / ranks, seconds / at_once) / 60, 1)
        else:
            interval = round((training / n + seconds / at_once) / 60, 1)
    phases = None
    if samples is not None:
        phases = {
            name: round(
                wall(samples[name] * recipe.training.epochs * mean_tokens / tokens_per_s_per_gpu, count) / 60, 1
            )
            for name, count in checkpoints_per_phase(recipe, samples).items()
        }
    return PlacementEstimate(
        placement=placement,
        backend=backend,
        devices=devices,
        training_ranks=ranks,
        minutes_per_checkpoint=round(seconds / 60, 1),
        minutes_per_interval=interval,
        phase_minutes=phases,
    )


def plan_evaluation(
    recipe: Recipe,
    shape: ModelShape | None,
    samples: dict[str, int] | None,
    tokens_per_s_per_gpu: float,
    mean_tokens: float,
    vllm_available: bool,
    cuda: bool = True,
) -> EvaluationPlan:
    """Every placement the recipe allows, estimated, and the one it runs: the recipe's own when it
    names one (placement or devices), else the shortest whole phase. `cuda`: GPUs are at hand (the
    run) or planned for (`lab plan`)."""
    config, n = recipe.evaluation, node_gpus(recipe, cuda)
    notes = suite(recipe)[1]
    if config.backend != "auto":
        backends: list[Backend] = [config.backend]
    elif n and vllm_available:
        backends = ["hf", "vllm"]
    else:
        backends = ["hf"]
        if n:
            notes.append(
                f"backend auto: hf, vLLM's executable {config.server.vllm_executable!r} is not found here "
                "(`uv tool install vllm==0.33.0` creates its environment)"
            )
    all_gpus = ",".join(str(i) for i in range(n))
    candidates: list[tuple[Placement, Backend, str]] = []
    for backend in backends:
        if n:
            reserve = config.devices or f"cuda:{n - 1}"
            if n > 1:
                candidates.append(("reserved", backend, reserve))
            if backend != "hf":
                candidates.append(("data_parallel", backend, f"cuda:{all_gpus}"))
            candidates.append(("per_device", backend, f"cuda:{all_gpus}"))
        else:
            candidates.append(("reserved", backend, config.devices or "cpu:1"))
            candidates.append(("per_device", backend, "cpu"))
    options = [estimate(recipe, shape, *c, samples, tokens_per_s_per_gpu, mean_tokens, n) for c in candidates]
    if recipe.checkpointing.keep_last_n and (config.devices or config.placement == "reserved"):
        notes.append("checkpointing.keep_last_n may delete a checkpoint mid-evaluation: evaluated after training")
    chosen, reason = choose(recipe, options, n)
    return EvaluationPlan(
        **chosen.model_dump(),
        beside_training=chosen.placement == "reserved",
        checkpoints_per_phase=None if samples is None else checkpoints_per_phase(recipe, samples),
        reason=reason,
        alternatives=options,
        notes=notes,
    )


def choose(recipe: Recipe, options: list[PlacementEstimate], n: int) -> tuple[PlacementEstimate, str]:
    """The recipe's own placement when it names one, else the shortest whole phase, else (the data's
    size unknown) the least wall time per checkpoint interval, else the least evaluation time."""
    config = recipe.evaluation
    wanted = "reserved" if config.devices and config.placement == "auto" else config.placement
    if recipe.checkpointing.keep_last_n and wanted == "reserved":
        wanted = "per_device"  # a checkpoint may be deleted mid-evaluation: after training
    if wanted != "auto":
        named = [o for o in options if o.placement == wanted]
        if not named:
            raise ValueError(f"evaluation.placement {wanted}: not possible with backend {config.backend} here")
        return named[0], "the recipe names it (evaluation.devices / placement)"
    if recipe.checkpointing.keep_last_n:
        options = [o for o in options if o.placement != "reserved"]
    if options[0].phase_minutes is not None:
        return min(options, key=lambda o: sum(o.phase_minutes.values())), "auto: the shortest whole phases"
    if options[0].minutes_per_interval is not None:
        return (
            min(options, key=lambda o: o.minutes_per_interval),
            "auto: the data's size is unknown here; the least wall time per checkpoint interval",
        )
    if options[0].minutes_per_checkpoint is not None:
        between = [o for o in options if o.placement != "reserved"]
        best = min(between, key=lambda o: o.minutes_per_checkpoint / (n if o.placement == "per_device" else 1))
        return best, "auto: the data's size is unknown here; the least evaluation time per checkpoint"
    per_device = next(o for o in options if o.placement == "per_device")
    return per_device, "auto on CPU: after training, one model per training process"


def with_placement(recipe: Recipe, plan: EvaluationPlan) -> Recipe:
    """The recipe as the run evaluates it: placement and backend decided, devices set when reserved."""
    evaluation = recipe.evaluation.model_copy(
        update={
            "placement": plan.placement,
            "backend": plan.backend,
            "devices": plan.devices if plan.placement == "reserved" else None,
        }
    )
    return recipe.model_copy(update={"evaluation": evaluation})


def resolve_placement(recipe: Recipe, cuda: bool = True) -> tuple[Recipe, EvaluationPlan]:
    """The placement a run uses, decided alike by `lab plan` (cuda: planned for) and `lab run` (cuda:
    whether this machine has GPUs), from the recipe and the defaults (throughput, sample length)."""
    from core.storage import resolve_embedded
    from training.plan import DEFAULT_MEAN_TOKENS, assumed_tokens_per_s, phase_samples, read_model_config

    shape, samples, tokens_per_s = None, None, 0.0
    if node_gpus(recipe, cuda):  # on CPU there is nothing to estimate
        shape = ModelShape.from_config(read_model_config(resolve_embedded(recipe.model.name_or_path)))
        checkpointing = recipe.training.gradient_checkpointing is not False  # auto: as if on (launch-time figures)
        samples = phase_samples(recipe)
        tokens_per_s = assumed_tokens_per_s(shape, checkpointing, DEFAULT_MEAN_TOKENS)
    plan = plan_evaluation(recipe, shape, samples, tokens_per_s, DEFAULT_MEAN_TOKENS, vllm_found(recipe), cuda)
    return with_placement(recipe, plan), plan


def render_evaluation(evaluation: EvaluationPlan) -> str:
    """The evaluation section of `lab plan`: the placement chosen, its minutes, the alternatives."""

    def minutes(option: PlacementEstimate) -> str:
        if option.minutes_per_checkpoint is None:
            return "not estimated on CPU (bench/eval_throughput.py measures it)"
        text = f"~{option.minutes_per_checkpoint:g} min per checkpoint"
        if option.minutes_per_interval is not None:
            text += f", ~{option.minutes_per_interval:g} min per checkpoint interval with training"
        if option.phase_minutes:
            text += "; phases " + ", ".join(f"{k} ~{v:g} min" for k, v in option.phase_minutes.items())
        return text

    where = "beside training" if evaluation.beside_training else "after each phase's training"
    lines = [
        "-- evaluation (estimate)",
        f"{evaluation.placement} ({evaluation.backend}) on {evaluation.devices}, {where}; training on "
        f"{evaluation.training_ranks} rank(s); {minutes(evaluation)}",
        f"why: {evaluation.reason}",
    ]
    if evaluation.checkpoints_per_phase:
        lines.append(
            "models evaluated per phase: " + ", ".join(f"{k} {v}" for k, v in evaluation.checkpoints_per_phase.items())
        )
    chosen = (evaluation.placement, evaluation.backend)
    lines += [
        f"  or {o.placement} ({o.backend}) on {o.devices}: {minutes(o)}"
        for o in evaluation.alternatives
        if (o.placement, o.backend) != chosen
    ]
    lines += [f"note: {note}" for note in evaluation.notes]
    return "\n".join(lines)
