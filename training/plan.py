"""`lab plan`: what a recipe will cost before anything launches.

From the recipe and the model's `config.json` (no weights, no data needed) this computes the
batch arithmetic, a per-GPU memory estimate broken down by what holds it, a wall-time estimate
from a stated throughput, and the launch command with its generated config files (training.lab_plan
puts these together with the evaluation's placement, training.placement, which uses the shapes here).

The memory model, per GPU, for P parameters on N ranks (bytes; "masters" are float32 under
mixed precision, else the model dtype; see training.precision):

    backend     weights                    gradients            optimizer (AdamW m, v [+ fp32 master])
    cpu / ddp   P x master (+ 2P autocast  P x master (twice     2 x P x master
                copy of the weights)       with DDP's buckets)
    deepspeed   2P (ZeRO-2) / 2P/N +       4P/N                 12P/N (0 with offload_optimizer)
                two gathered layers (ZeRO-3)
    fsdp        4P/N + two gathered layers 4P/N + 4P (float32   8P/N
                                           grads accumulated unsharded between syncs)

DeepSpeed's communication buffers: with launch.overlap_comm, ~4.5x the reduce (and, ZeRO-2,
allgather) bucket sizes in the compute dtype (DeepSpeed's own figure: 9 GB at its 5e8 defaults);
without it, one of each.

Activations of one micro-batch of T tokens (the token budget, packed): without checkpointing
every layer keeps ~(17h + 3kv + 4i) values per token in the compute dtype (34h + 6kv + 8i bytes
in bf16: linear inputs / outputs, norms; h hidden, kv key/value width, i MLP width; attention by sdpa/flash keeps no T x T
matrix); with checkpointing only each layer's input (the residual stream: float32 under
autocast, else 2 bytes) plus one layer recomputed; `gradient_checkpointing: auto` turns it on
only when the estimate without it does not fit the GPU. Logits: the chunked loss holds one chunk's
logits (bf16 + float32 + float32 gradient, 10 bytes per entry); the plain loss the whole
micro-batch's (plus the float32 copies, 14 bytes per entry). These are estimates: the ratio to a
measured peak is checked on CPU (tests/test_plan.py) and on a GPU by bench/gpu_check.sh.

The rolling training state (checkpointing.rolling_state_minutes) costs, per save, the weights
(compute dtype under DeepSpeed, else the masters) plus the optimizer state (float32 master and
AdamW m, v: 12P under DeepSpeed; 2 x master x P otherwise): ~112 GB for an 8B model under ZeRO-2.
A save takes the busiest node's share over a stated write bandwidth; a preempted rank finishes
its step and then saves, so the grace period a scheduler must give (Kubernetes
terminationGracePeriodSeconds, Slurm --signal, torchrun's shutdown timeout) is one step plus one
save plus a margin.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from core.recipe import Recipe
from training.job import DEFAULT_GRACE_S
from training.kernels import training_kernel
from training.precision import is_mixed, weights_dtype

GIB = 2**30
CUDA_RUNTIME_BYTES = 2 * GIB  # CUDA context, cuBLAS / NCCL workspaces, allocator slack
OVERLAP_COMM_BUFFERS = 4.5  # DeepSpeed: overlap_comm holds ~4.5x the bucket sizes
H100_BF16_FLOPS = 989e12
GRACE_MARGIN_S = 60  # process exit, collective teardown, a slow file system's tail
ASSUMED_MFU = 0.4
DEFAULT_MEAN_TOKENS = 1024  # tokens per sample when the data is not at hand (`--mean-tokens`)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a transformers config.json (Llama-like decoders)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            intermediate=config["intermediate_size"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h, q = self.hidden, self.heads * self.head_dim
        attention = h * q + 2 * h * self.kv_width + q * h
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params + self.hidden

    def training_flops(self, sample_lengths: list[int]) -> float:
        """FLOPs of one forward + backward over packed samples of these lengths (MFU's numerator).

        6 x (N - input-embedding params) per token, N counting the output head once even when it
        is tied to the input embedding (the lookup is no compute, the head's matmul is), plus
        causal attention per sample: 6 x layers x (heads x head_dim) x L^2 (QK^T and AV, forward
        and backward, the unmasked half only), from each sample's own L, never the packed row's.
        Activation recomputation is not counted: it is overhead, not useful work.
        """
        matmul_params = self.layers * self.layer_params + self.hidden + self.vocab * self.hidden
        attention = 6 * self.layers * self.heads * self.head_dim * sum(n * n for n in sample_lengths)
        return 6 * matmul_params * sum(sample_lengths) + attention


def read_model_config(name_or_path: str) -> dict[str, Any]:
    """config.json of a local model directory, or of a hub model (only that file is fetched)."""
    local = Path(name_or_path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from training.preflight import model_config

    return model_config(name_or_path).to_dict()


@dataclass
class MemoryEstimate:
    """Bytes per GPU, by what holds them."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    logits: int
    runtime: int
    buffers: int = 0
    checkpointing: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.buffers
            + self.activations
            + self.logits
            + self.runtime
        )

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("communication buffers (ZeRO)", self.buffers),
            ("activations (as configured)", self.activations),
            ("logits / loss", self.logits),
            ("runtime (CUDA context, workspaces)", self.runtime),
            ("total", self.total),
        ]


def zero_buffer_bytes(recipe: Recipe) -> int:
    """DeepSpeed's gradient reduce / allgather buffers (see the module docstring)."""
    launch = recipe.launch
    buckets = launch.bucket_elements * (2 if launch.zero_stage == 2 else 1) * DTYPE_BYTES[recipe.model.dtype]
    return int(buckets * (OVERLAP_COMM_BUFFERS if launch.overlap_comm else 1))


def estimate_memory(
    recipe: Recipe, shape: ModelShape, on_gpu: bool = True, device_bytes: int | None = None
) -> MemoryEstimate:
    """Per-GPU memory of one rank of the recipe (see the module docstring for the model).
    `device_bytes` decides `gradient_checkpointing: auto` (None: off)."""
    launch, cfg = recipe.launch, recipe.training
    n, p = launch.world_size, shape.params
    master = DTYPE_BYTES[weights_dtype(recipe)]
    compute = DTYPE_BYTES[recipe.model.dtype]
    gathered_layers = 2 * shape.layer_params * compute  # the layer computing and the one prefetched
    notes = []
    buffers = 0
    if launch.backend in ("cpu", "ddp"):
        weights = p * master + (p * compute if is_mixed(recipe) else 0)
        gradients = p * master * (2 if n > 1 else 1)  # DDP's reduction buckets are a second copy
        optimizer = 2 * p * master
    elif launch.backend == "deepspeed":
        if launch.zero_stage == 3:
            weights = (0 if launch.offload_params else p * compute // n) + gathered_layers
        else:
            weights = p * compute
        gradients = 4 * p // n
        buffers = zero_buffer_bytes(recipe)
        optimizer = 0 if launch.offload_optimizer else 12 * p // n
        if launch.offload_optimizer:
            notes.append(f"optimizer state on CPU: {12 * p / n / GIB:.1f} GiB of host memory per rank")
    else:  # fsdp
        weights = master * p // n + gathered_layers
        gradients = master * p // n + 4 * p
        optimizer = 2 * master * p // n
        notes.append("fsdp: gradients accumulate unsharded in float32 between syncs (one sync per step)")

    tokens = cfg.max_tokens_per_micro_batch
    h, kv, i = shape.hidden, shape.kv_width, shape.intermediate
    per_layer = (17 * h + 3 * kv + 4 * i) * compute  # bytes per token of one layer's saved activations
    residual = 4 if is_mixed(recipe) and launch.backend in ("cpu", "ddp") else compute
    without = tokens * (shape.layers * per_layer + residual * h)
    with_checkpointing = tokens * ((shape.layers + 1) * residual * h + per_layer)
    chunk = min(cfg.loss_chunk_tokens or tokens, tokens)
    logits = chunk * shape.vocab * (10 if cfg.loss_chunk_tokens else 14)
    estimate = MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=without,
        activations_without_checkpointing=without,
        activations_with_checkpointing=with_checkpointing,
        logits=logits,
        runtime=CUDA_RUNTIME_BYTES if on_gpu else 0,
        buffers=buffers,
        notes=notes,
    )
    if cfg.gradient_checkpointing == "auto":
        estimate.checkpointing = device_bytes is not None and estimate.total > device_bytes
        against = "no GPU memory known (--gpu-memory)" if device_bytes is None else f"{device_bytes / GIB:.0f} GiB"
        verdict = "on" if estimate.checkpointing else "off"
        notes.append(f"gradient_checkpointing auto: {verdict} ({estimate.total / GIB:.1f} GiB without it vs {against})")
    else:
        estimate.checkpointing = cfg.gradient_checkpointing
    if estimate.checkpointing:
        estimate.activations = with_checkpointing
    return estimate


# Knobs tried in order, cumulatively, when a plan does not fit: the first ones cost least.
KNOBS: list[tuple[str, Any]] = [
    ("training.gradient_checkpointing", True),
    ("training.loss_chunk_tokens", 4096),
    ("launch.backend", "deepspeed"),
    ("launch.zero_stage", 3),
    ("training.max_tokens_per_micro_batch", "half"),
    ("launch.offload_optimizer", True),
]


def knobs_to_fit(recipe: Recipe, shape: ModelShape, device_bytes: int) -> dict[str, Any] | None:
    """Overrides (cumulative, in KNOBS order) that make the estimate fit; None if none do."""
    from core.recipe import load_recipe

    data = recipe.model_dump(mode="json")
    changes: dict[str, Any] = {}
    current = recipe
    for key, value in KNOBS:
        if estimate_memory(current, shape, device_bytes=device_bytes).total <= device_bytes:
            return changes
        if value == "half":
            while estimate_memory(current, shape, device_bytes=device_bytes).total > device_bytes:
                half = current.training.max_tokens_per_micro_batch // 2
                if half < current.training.max_seq_len:
                    break
                changes[key] = half
                current = load_recipe(data, changes)
            continue
        section, name = key.split(".")
        if getattr(getattr(current, section), name) == value:
            continue
        changes[key] = value
        current = load_recipe(data, changes)
    return changes if estimate_memory(current, shape, device_bytes=device_bytes).total <= device_bytes else None


@dataclass(frozen=True)
class RollingStateCost:
    """What the rolling training state costs (see the module docstring)."""

    every_minutes: float | None
    bytes_per_save: int  # all ranks together
    node_bytes_per_save: int  # the busiest node's share
    write_gib_per_s: float
    seconds_per_step: float

    @property
    def seconds_per_save(self) -> float:
        return self.node_bytes_per_save / (self.write_gib_per_s * GIB)

    @property
    def grace_seconds(self) -> int:
        """How long a preempted job needs between SIGTERM and SIGKILL: finish the step, save, exit."""
        return math.ceil(self.seconds_per_step + self.seconds_per_save) + GRACE_MARGIN_S

    def record(self) -> dict[str, Any]:
        return {
            "every_minutes": self.every_minutes,
            "gib_per_save": round(self.bytes_per_save / GIB, 2),
            "seconds_per_save": round(self.seconds_per_save, 1),
            "write_gib_per_s": self.write_gib_per_s,
            "seconds_per_step": round(self.seconds_per_step, 1),
            "grace_seconds": self.grace_seconds,
            "time_spent_saving": round(self.seconds_per_save / (60 * self.every_minutes), 4)
            if self.every_minutes
            else None,
        }


def assumed_tokens_per_s(shape: ModelShape, checkpointing: bool, mean_tokens: float = 1024) -> float:
    """Tokens/s per GPU at ASSUMED_MFU of an H100 (checkpointing: one more forward per step)."""
    recompute = 4 / 3 if checkpointing else 1.0
    flops_per_token = shape.training_flops([round(mean_tokens)]) / round(mean_tokens)
    return ASSUMED_MFU * H100_BF16_FLOPS / (flops_per_token * recompute)


def preemption_grace_seconds(recipe: Recipe, model_path: str) -> int:
    """The grace period a preempted run of `recipe` on the model at `model_path` needs (see
    rolling_state_cost); DEFAULT_GRACE_S when the model's config.json cannot be read."""
    try:
        shape = ModelShape.from_config(read_model_config(model_path))
    except (OSError, ValueError, KeyError):
        return DEFAULT_GRACE_S
    return rolling_state_cost(recipe, shape).grace_seconds


def rolling_state_cost(recipe: Recipe, shape: ModelShape) -> RollingStateCost:
    """What a save costs and how long a preempted run needs. Launch-time figures only (what the
    schedulers are given must not depend on `lab plan`'s flags): the recipe's write bandwidth, the
    assumed throughput with activation recomputation unless it is off, 1,024 tokens per sample."""
    launch, p = recipe.launch, shape.params
    if launch.backend == "deepspeed":  # the engine's module in the compute dtype, its fp32 master + AdamW m, v
        weights, optimizer = p * DTYPE_BYTES[recipe.model.dtype], 12 * p
    else:  # the (master) weights and AdamW m, v in the same dtype
        weights = p * DTYPE_BYTES[weights_dtype(recipe)]
        optimizer = 2 * weights
    sharded_optimizer = launch.backend in ("deepspeed", "fsdp")
    node_optimizer = optimizer * launch.num_processes // launch.world_size if sharded_optimizer else optimizer
    tokens_per_s = assumed_tokens_per_s(shape, recipe.training.gradient_checkpointing is not False)
    return RollingStateCost(
        every_minutes=recipe.checkpointing.rolling_state_minutes,
        bytes_per_save=weights + optimizer,
        node_bytes_per_save=weights + node_optimizer,  # rank 0 writes the weights
        write_gib_per_s=recipe.checkpointing.write_gib_per_s,
        seconds_per_step=recipe.training.effective_batch_size * 1024 / (tokens_per_s * launch.world_size),
    )


@dataclass
class Plan:
    recipe: Recipe
    shape: ModelShape
    memory: MemoryEstimate
    device_bytes: int | None
    samples: int | None
    mean_tokens: float
    tokens_per_s_per_gpu: float
    throughput_source: str
    rolling_state: RollingStateCost
    attention_kernel: str
    fix: dict[str, Any] | None = None
    launch_command: list[str] = field(default_factory=list)
    launch_files: dict[str, str] = field(default_factory=dict)  # file name -> text, as launch writes them
    evaluation: BaseModel | None = None  # where checkpoints are evaluated (training.placement.EvaluationPlan)

    @property
    def fits(self) -> bool:
        return self.device_bytes is None or self.memory.total <= self.device_bytes

    def record(self) -> dict[str, Any]:
        """`lab plan --json`: the plan as one JSON object. `accelerate` and `deepspeed` are the
        configs exactly as the launch writes them (parsed), `memory_gib` the table `lab plan` prints."""
        world = self.recipe.launch.world_size
        return {
            "recipe": self.recipe.name,
            "model": self.recipe.model.name_or_path,
            "params": self.shape.params,
            "world_size": world,
            "fits": self.fits,
            "device_gib": None if self.device_bytes is None else round(self.device_bytes / GIB, 3),
            "fix": self.fix,
            "memory_gib": {name: round(value / GIB, 3) for name, value in self.memory.rows()},
            "memory_notes": self.memory.notes,
            "gradient_checkpointing": self.memory.checkpointing,
            "attention_kernel": self.attention_kernel,
            "rolling_state": self.rolling_state.record(),
            "tokens_per_s_per_gpu": round(self.tokens_per_s_per_gpu, 1),
            "launch_command": self.launch_command,
            "accelerate": yaml.safe_load(self.launch_files["accelerate.yaml"]),
            "deepspeed": json.loads(self.launch_files["deepspeed.json"])
            if "deepspeed.json" in self.launch_files
            else None,
            "evaluation": None if self.evaluation is None else self.evaluation.model_dump(mode="json"),
        }

    def refusal(self) -> str:
        """Why `lab run` will not launch this plan, naming the knob(s) that would make it fit."""
        need, have = self.memory.total / GIB, (self.device_bytes or 0) / GIB
        head = f"plan does not fit: {need:.1f} GiB per GPU estimated > {have:.0f} GiB ({self.recipe.launch.backend})"
        if self.fix is None:
            return head + "; no single setting fixes it: use more GPUs (launch.num_processes / num_machines)"
        sets = " ".join(f"--set {k}={json.dumps(v)}" for k, v in self.fix.items())
        return f"{head}; it fits with: {sets}  (`lab plan` shows the breakdown)"


def make_plan(
    recipe: Recipe,
    model_config: dict[str, Any],
    device_bytes: int | None,
    samples: int | None = None,
    mean_tokens: float = 1024,
    tokens_per_s_per_gpu: float | None = None,
) -> Plan:
    shape = ModelShape.from_config(model_config)
    memory = estimate_memory(recipe, shape, device_bytes=device_bytes)
    if tokens_per_s_per_gpu is None:
        tokens_per_s_per_gpu = assumed_tokens_per_s(shape, memory.checkpointing, mean_tokens)
        source = f"assumed: {ASSUMED_MFU:.0%} MFU of an H100's 989 TFLOP/s bf16; pass --tokens-per-s"
    else:
        source = "stated"
    requested = recipe.model.attn_implementation
    plan = Plan(
        recipe,
        shape,
        memory,
        device_bytes,
        samples,
        mean_tokens,
        tokens_per_s_per_gpu,
        source,
        rolling_state_cost(recipe, shape),
        training_kernel(requested, "cuda", model_config) if recipe.training.packing else requested,
    )
    timeout_s = recipe.launch.collective_timeout_minutes * 60
    if plan.rolling_state.seconds_per_save >= timeout_s:
        memory.notes.append(
            f"launch.collective_timeout_minutes ({timeout_s / 60:g}) is shorter than a rolling-state save "
            f"(~{plan.rolling_state.seconds_per_save / 60:.1f} min): ranks waiting for rank 0 would time out"
        )
    if not plan.fits:
        plan.fix = knobs_to_fit(recipe, shape, device_bytes)
    return plan


def render(plan: Plan, launch_command: list[str], files: dict[str, str]) -> str:
    """The plan as `lab plan` prints it."""
    r, cfg, launch = plan.recipe, plan.recipe.training, plan.recipe.launch
    world = launch.world_size
    lines = [f"== plan: {r.name} ({r.strategy}, {len(r.phases)} phase(s)) on {world} GPU(s), backend {launch.backend}"]
    lines.append(
        f"model: {r.model.name_or_path}: {plan.shape.params / 1e9:.2f}B params, {plan.shape.layers} layers, "
        f"hidden {plan.shape.hidden}, vocab {plan.shape.vocab}; compute {r.model.dtype}, weights {weights_dtype(r)}"
    )
    lines.append("\n-- batch arithmetic")
    per_rank_tokens = cfg.effective_batch_size / world * plan.mean_tokens
    micro = max(1, math.ceil(per_rank_tokens / cfg.max_tokens_per_micro_batch))
    lines.append(
        f"EBS {cfg.effective_batch_size} samples/step = {cfg.effective_batch_size / world:.1f} samples per rank x {world} "
        f"ranks; ~{micro} micro-batch(es) per rank per step of <= {cfg.max_tokens_per_micro_batch} tokens "
        f"({'packed' if cfg.packing else 'padded'}; {plan.mean_tokens:.0f} tokens per sample assumed)"
    )
    if plan.samples:
        steps = math.ceil(plan.samples * cfg.epochs / cfg.effective_batch_size)
        tokens = plan.samples * cfg.epochs * plan.mean_tokens
        hours = tokens / (plan.tokens_per_s_per_gpu * world) / 3600
        lines.append(
            f"{plan.samples} samples x {cfg.epochs:g} epochs = {steps} optimizer steps, {tokens / 1e9:.2f}B tokens"
        )
        lines.append(
            f"wall time: ~{hours:.1f} h at {plan.tokens_per_s_per_gpu:,.0f} tokens/s per GPU ({plan.throughput_source})"
        )
    else:
        lines.append("samples unknown (data not reachable): pass --samples N for steps and wall time")
    m = plan.memory
    lines.append("\n-- memory per GPU (estimate)")
    lines += [f"{name:<38} {value / GIB:>8.2f} GiB" for name, value in m.rows()]
    lines.append(
        f"{'  activations without checkpointing':<38} {m.activations_without_checkpointing / GIB:>8.2f} GiB"
        f"   with: {m.activations_with_checkpointing / GIB:.2f} GiB (training.gradient_checkpointing="
        f"{str(cfg.gradient_checkpointing).lower()})"
    )
    lines += [f"note: {note}" for note in m.notes]
    lines.append(
        f"attention on CUDA: {plan.attention_kernel} (model.attn_implementation {r.model.attn_implementation}; "
        "training.kernels.training_kernel)"
    )
    cost = plan.rolling_state
    every = f"every {cost.every_minutes:g} min and on SIGTERM" if cost.every_minutes else "on SIGTERM only"
    lines.append(
        f"rolling state: {every}; {cost.bytes_per_save / GIB:.1f} GiB per save, ~{cost.seconds_per_save:.0f} s at "
        f"{cost.write_gib_per_s:g} GiB/s per node (checkpointing.write_gib_per_s); preemption grace "
        f"{cost.grace_seconds} s (a ~{cost.seconds_per_step:.0f} s step at the assumed MFU + the save + {GRACE_MARGIN_S} s)"
    )
    if plan.device_bytes is not None:
        verdict = "fits" if plan.fits else plan.refusal()
        lines.append(f"device: {plan.device_bytes / GIB:.0f} GiB per GPU -> {verdict}")
    lines.append("\n-- launch (per phase; on every node with its machine_rank)")
    lines.append(" ".join(launch_command))
    for name, text in files.items():
        lines.append(f"\n# {name}\n{text.rstrip()}")
    return "\n".join(lines)


def count_samples(recipe: Recipe) -> int | None:
    """Samples in the recipe's data (all phases) when every file is reachable here as a local or
    embedded JSONL / Parquet file; None otherwise (the presets point at the user's own files)."""
    per_phase = phase_samples(recipe)
    return None if per_phase is None else sum(per_phase.values())


def phase_samples(recipe: Recipe) -> dict[str, int] | None:
    """Samples of each phase's own data (replay not counted), when every file is readable here."""
    from core.storage import resolve_embedded

    counts = {}
    for phase in recipe.phases:
        counts[phase.name] = 0
        for uri in phase.data:
            path = Path(resolve_embedded(uri)) if "://" not in uri or uri.startswith("embedded://") else None
            if path is None or not path.is_file():
                return None
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                counts[phase.name] += pq.ParquetFile(path).metadata.num_rows
            else:
                counts[phase.name] += sum(1 for line in path.open() if line.strip())
    return counts


def device_memory_bytes(gpu_memory_gib: float | None) -> int | None:
    """The stated GPU memory, else the memory of this machine's first GPU, else None (unknown)."""
    if gpu_memory_gib is not None:
        return int(gpu_memory_gib * GIB)
    from training.launch.devices import cuda_device_count

    if not cuda_device_count():
        return None
    import torch

    return torch.cuda.get_device_properties(0).total_memory
