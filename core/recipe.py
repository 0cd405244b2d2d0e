"""Recipe models: one YAML file = one recipe, validated here.

These pydantic models are also the Prefect flow parameters, so every field carries a
description (the Prefect UI renders it as a form) and closed choices are `Literal`s.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.chat import BUNDLED, template_text

EMBEDDED = "embedded://"  # prefix of references to the locally built lab assets


class Strict(BaseModel):
    """Unknown fields are errors: a typo in a recipe must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    name_or_path: str = Field(
        description="Hub id (e.g. ibm-granite/granite-3.0-8b-base), local directory, or "
        "'embedded://base-model' for the locally built tiny lab model."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16",
        description="Compute and checkpoint dtype: float32 on CPU for exactness, bfloat16 on GPUs. With "
        "training.mixed_precision the weights, gradients and AdamW state stay float32 (masters).",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa",
        description="sdpa (default), flash_attention_2 (the flash-attn extra) and flex_attention keep packed samples "
        "apart (training.packing); eager trains padded. Packed rows train on a varlen kernel on CUDA (sdpa: "
        "flash-attn when it imports, else flex_attention) and on sdpa per sample on CPU; checkpoints keep this value. "
        "sdpa cannot cap attention scores: a softcapping family (Gemma 2) gets eager on CPU and flex_attention on "
        "CUDA instead, said in the run's log.",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template applied to the tokenizer and saved with every checkpoint: a bundled "
        f"name ({', '.join(BUNDLED)}) or a Jinja file. None = the model's own "
        "(a base model without one must set this).",
    )
    system_message: Literal["as_is", "merge_into_first_user"] = Field(
        "as_is",
        description="as_is: system messages go to the template (one that rejects them, like Gemma's, "
        "fails naming the row); merge_into_first_user: a leading system message is prepended to the "
        "first user turn.",
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, setting: str | None) -> str | None:
        if setting is not None:
            template_text(setting)  # a bundled name or a readable file, else a clear error
        return setting


class PhaseData(Strict):
    """What a phase trains on: its files, optionally one length half of them, plus replay."""

    name: str = Field(description="Phase name; also its directory under the run (e.g. phase00).")
    data: list[str] = Field(
        min_length=1,
        description="Training files (JSONL/Parquet, local path or fsspec URL, or embedded://...). "
        "Formats: OpenAI `messages`, ShareGPT `conversations`, Alpaca instruction/input/output.",
    )
    length_split: Literal["short", "long"] | None = Field(
        None,
        description="Difficulty-based phases (paper A.6.1): keep only the bottom ('short') or top "
        "('long') 50% of this phase's data by response length. None = all of it.",
    )
    replay: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of every earlier phase's data mixed into this one (seeded sample): "
        "the usual guard against forgetting in phased training. 0 = none.",
    )


class PhaseConfig(PhaseData):
    objective: dict[str, float] = Field(
        min_length=1,
        description="Selection objective: weights of 'task/metric' keys, e.g. "
        "{'lab_knowledge/acc': 1.0}. The best checkpoint maximises the weighted sum.",
    )
    min_score: dict[str, float] = Field(
        default_factory=dict,
        description="Gate floors: the selected checkpoint must reach each 'task/metric' value.",
    )
    min_gain: float | None = Field(
        None,
        description="Gate: the objective must beat the phase's starting model by at least this much.",
    )
    max_forgetting: float | None = Field(
        None,
        ge=0,
        description="Forgetting guard: a checkpoint is ineligible if any earlier phase's objective "
        "metric fell by more than this below the best value the run reached for it (phased training only).",
    )
    stacked_from: list[PhaseData] = Field(
        default_factory=list,
        description="Set by stacked training (not by hand): the phases whose data this one phase mixes, "
        "each with its own length split; their replay is already in the mix (each sample once per epoch).",
    )

    @field_validator("objective", "min_score")
    @classmethod
    def _metric_keys(cls, weights: dict[str, float]) -> dict[str, float]:
        for key in weights:
            if key.count("/") != 1:
                raise ValueError(f"metric key {key!r} must look like 'task/metric'")
        return weights


class TrainingConfig(Strict):
    effective_batch_size: int = Field(
        gt=0,
        description="Samples per optimizer step, exactly, across all ranks and micro-batches. "
        "The paper's main lever: LAB uses 3,840; TULU 128.",
    )
    max_tokens_per_micro_batch: int = Field(
        8192,
        gt=0,
        description="Token budget of one micro-batch on one rank (real tokens when packed, count x longest "
        "when padded). Bigger = fewer accumulation steps (and collectives) and more activation memory "
        "(`lab plan` shows how much); it never changes the maths of a step.",
    )
    packing: bool = Field(
        True,
        description="Padding-free micro-batches: samples concatenated in one row, position_ids restarting per "
        "sample (attention stays within each sample). Needs an attn_implementation that reads them "
        "(sdpa, flash_attention_2, flex_attention); otherwise micro-batches are padded.",
    )
    mixed_precision: bool = Field(
        True,
        description="With a bfloat16/float16 model.dtype: compute in that dtype but keep float32 master "
        "weights, AdamW state and gradient accumulation (checkpoints are saved in model.dtype); float16 "
        "adds loss scaling. false = everything in model.dtype: at SFT learning rates most bfloat16 "
        "updates round away (a negative control, not a recipe).",
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        False,
        description="Recompute each decoder layer's activations in the backward pass: activation memory "
        "drops from every layer's to one layer's (plus the layer inputs) for ~30% more compute. auto: on "
        "only when `lab plan`'s memory estimate without it does not fit the GPU (off on CPU).",
    )
    loss_chunk_tokens: int | None = Field(
        4096,
        gt=0,
        description="Cross-entropy over this many tokens at a time, each chunk's logits recomputed in "
        "backward: the full-vocabulary logits of a micro-batch never exist at once (Liger's fused "
        "linear cross-entropy instead when installed, on GPU). None = plain full-logits loss.",
    )
    learning_rate: float = Field(gt=0, description="Peak learning rate.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="After warmup: constant (LAB), linear decay to 0 (TULU), or cosine to 0.",
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warmup in optimizer steps (LAB: 25). Exclusive with warmup_ratio."
    )
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description="Linear warmup as a fraction of all steps (TULU: 0.03)."
    )
    epochs: float = Field(gt=0, description="Passes over the phase's data (may be fractional).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1 (paper: 0.9).")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2 (paper: 0.95).")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this; None disables clipping."
    )
    max_seq_len: int = Field(
        4096, gt=0, description="Samples longer than this (in tokens) are dropped and counted, never truncated."
    )
    train_on_prompt: bool = Field(
        False, description="Also put loss on user/system tokens (default: assistant tokens only)."
    )
    seed: int = Field(42, description="Seeds data order and initialisation.")
    validation_samples: int = Field(
        128,
        ge=0,
        description="Hold out this many of each phase's own samples (a fixed slice chosen by id, at most a "
        "tenth of the phase; never trained on in it, listed in the manifest); the trainer scores their loss at the "
        "start and at every checkpoint as `validation/loss` (a metric objectives and policy lowest_val_loss "
        "use; lower is better). More = a steadier loss, fewer samples to train on. 0 = none.",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers (accelerate's tracking API): every step's metrics, each checkpoint's "
        "scores, the selection and the recipe, one tracker run per phase grouped by run id. Where they write "
        "and their credentials come from the environment (MLFLOW_TRACKING_URI, WANDB_API_KEY, WANDB_MODE...); "
        "TensorBoard writes <phase>/tensorboard/. Empty = none.",
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainingConfig:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self


class CheckpointConfig(Strict):
    save_every_samples: int | None = Field(
        None,
        gt=0,
        description="Save a checkpoint every N samples (rounded to whole optimizer steps). "
        "Phased training evaluates each one, so this sets the resolution of the search.",
    )
    save_every_epoch: bool = Field(True, description="Also save at the end of every epoch.")
    rolling_state_minutes: float | None = Field(
        30.0,
        gt=0,
        description="Write the rolling full training state (model, optimizer, scheduler, RNG), for exact "
        "resume, every this many minutes of rank 0's clock (all ranks at the same step), and at once on "
        "SIGTERM (preemption). ~7x the bf16 model size per save (`lab plan` shows GiB and seconds): more "
        "often loses less work to a crash and spends more time writing. None: only on SIGTERM.",
    )
    write_gib_per_s: float = Field(
        1.0,
        gt=0,
        description="Assumed write bandwidth of one node to the storage root (GiB/s): sets `lab plan`'s save-time "
        "estimate and from it the grace period schedulers give a preempted run to save.",
    )
    state_every_steps: int | None = Field(
        None,
        gt=0,
        description="Also write the rolling state every K optimizer steps (None: by time only).",
    )
    keep_last_n: int | None = Field(
        None,
        ge=1,
        description="Disk during training: keep only the newest N complete checkpoints of a phase, "
        "deleting older ones (and their uploaded copies) as new ones are written. Bounds disk at N "
        "checkpoints, but selection can only choose among those N; None keeps every checkpoint.",
    )
    prune: Literal["none", "keep_selected"] = Field(
        "none",
        description="Disk after selection: keep_selected deletes a phase's complete checkpoints except "
        "the selected one (all are needed until every checkpoint is evaluated).",
    )


class WatchdogConfig(Strict):
    loss_spike_factor: float | None = Field(
        5.0,
        gt=1,
        description="Stop the run when a step's loss exceeds this multiple of the running median "
        "(non-finite loss or grad norm always stops it). None disables spike detection.",
    )
    window: int = Field(20, gt=0, description="Steps in the running median.")
    min_steps: int = Field(10, ge=1, description="Steps before spike detection starts.")


MTBenchCategory = Literal["writing", "roleplay", "extraction", "math", "coding", "reasoning", "stem", "humanities"]


class MTBenchConfig(Strict):
    """MT-Bench single-answer grading (FastChat llm_judge); evaluation.mt_bench runs it."""

    question_file: str | None = Field(
        None, description="FastChat's question.jsonl; None = download it once into $RECIPE_LAB_CACHE/mt_bench."
    )
    judge_prompt_file: str | None = Field(
        None, description="FastChat's judge_prompts.jsonl; None = download it once into $RECIPE_LAB_CACHE/mt_bench."
    )
    reference_file: str | None = Field(
        None,
        description="FastChat's reference_answer/gpt-4.jsonl (math, reasoning, coding); None = download "
        "it once into $RECIPE_LAB_CACHE/mt_bench.",
    )
    judge_base_url: str = Field(description="OpenAI-compatible judge endpoint, e.g. http://host:8000/v1 (vLLM).")
    judge_model: str = Field(description="Judge model name sent to the endpoint, e.g. gpt-4.")
    judge_api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the judge's API key (the key itself is "
        "never a parameter). Unset or empty = no Authorization header (a local vLLM).",
    )
    judge_api_key_secret: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding the judge's key; the evaluation task loads "
        "it into the judge_api_key_env variable. None = use the environment only.",
    )
    max_new_tokens: int = Field(1024, gt=0, description="Answer length cap per turn (FastChat: 1024).")
    generation_batch_size: int = Field(8, gt=0, description="Questions generated together (left padding).")
    seed: int = Field(0, description="Torch seed set before answer generation.")
    concurrency: int = Field(8, gt=0, description="Judge requests in flight at once.")
    max_retries: int = Field(
        6,
        ge=0,
        description="Retries per judge request on HTTP 408 / 409 / 429 / 5xx, timeouts and connection errors "
        "(the openai SDK's: backoff 0.5 s doubling to 8 s, Retry-After honoured up to 120 s).",
    )
    timeout_s: float = Field(120.0, gt=0, description="Timeout of one judge request, in seconds.")
    max_error_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Largest allowed fraction of failed judgments (no score parsed, or the request "
        "failed after retries) per checkpoint; above it the evaluation fails.",
    )
    question_limit: int | None = Field(
        None, gt=0, description="Smoke runs: keep the first N questions of EACH category (file order)."
    )
    categories: list[MTBenchCategory] | None = Field(None, description="Keep only these categories (None = all 8).")


class ServerConfig(Strict):
    """An OpenAI-compatible server per checkpoint (evaluation.backend vllm / transformers-serve)."""

    vllm_executable: str = Field(
        "vllm",
        description="The `vllm` command of vLLM's own environment (it pins its own torch / transformers): "
        "create it with `uv tool install vllm==0.33.0`, or give the path of its bin/vllm.",
    )
    num_concurrent: int = Field(64, gt=0, description="Requests in flight at once (lm-eval and MT-Bench answers).")
    startup_timeout_s: float = Field(
        900.0, gt=0, description="Seconds the server may take to answer /health (weights load, CUDA graphs)."
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="More server arguments, e.g. ['--max-model-len', '8192', '--gpu-memory-utilization', '0.9'].",
    )


class EvaluationConfig(Strict):
    tasks: list[str] = Field(
        min_length=1,
        description="lm-eval task names run on every checkpoint (e.g. mmlu, gsm8k), or the lab's "
        "local tasks lab_instruction, lab_knowledge, lab_skills.",
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (None = task default).")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N items of each task.")
    batch_size: int = Field(16, gt=0, description="lm-eval batch size.")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="Where checkpoints are evaluated (lm-eval and MT-Bench answers), loaded in model.dtype: "
        "auto = cuda when available, else cpu (in float32 there: CPUs emulate bfloat16 slowly).",
    )
    apply_chat_template: bool = Field(
        True, description="Render prompts with the model's chat template (SFT models expect it)."
    )
    include_path: str | None = Field(None, description="Directory of extra lm-eval task YAMLs.")
    max_gen_tokens: int = Field(64, gt=0, description="Generation cap for generate_until tasks of the lab.")
    mt_bench: MTBenchConfig | None = Field(
        None, description="Also judge every checkpoint on MT-Bench (metrics mt_bench/overall, ...); None = skip."
    )
    devices: str | None = Field(
        None,
        pattern=r"^(cpu:[1-9][0-9]*|cuda:[0-9]+(,[0-9]+)*)$",
        description="Evaluate each checkpoint while training goes on, in a worker process of its own on these "
        "resources: 'cpu:N' (N CPU threads; the lab on 2 cores: 'cpu:1') or 'cuda:I[,J...]' (those of the node's "
        "launch.num_processes GPUs, taken away from training: 'cuda:7' of eight trains on 7 ranks, the effective "
        "batch unchanged; `device` still says cpu or cuda within that share). None = as `placement` decides.",
    )
    placement: Literal["auto", "reserved", "data_parallel", "per_device"] = Field(
        "auto",
        description="Where checkpoints are evaluated: reserved = on `devices` beside training (GPUs taken from "
        "training); data_parallel = after each phase's training, all its GPUs on one checkpoint at a time (a "
        "server backend); per_device = after training, one checkpoint per GPU (per training process on CPU). "
        "auto = `devices` set: reserved; else the fastest whole phase by `lab plan`'s estimate.",
    )
    backend: Literal["auto", "hf", "vllm", "transformers-serve"] = Field(
        "auto",
        description="hf = transformers in the evaluation worker; vllm = `vllm serve` (its own environment, "
        "server.vllm_executable) started per checkpoint, lm-eval and MT-Bench answers over its OpenAI API; "
        "transformers-serve = the same over `transformers serve` (runs anywhere, slow: for checks); "
        "multiple-choice tasks go to HF in the worker unless the server returns prompt logprobs (vllm). "
        "auto = vllm when its executable is found and there are GPUs, else hf.",
    )
    server: ServerConfig = Field(default_factory=ServerConfig, description="The server backends' settings.")

    @model_validator(mode="after")
    def _placement_matches_devices(self) -> EvaluationConfig:
        if self.devices is not None and self.placement in ("data_parallel", "per_device"):
            raise ValueError(
                f"evaluation.devices {self.devices!r} reserves resources beside training; placement "
                f"{self.placement} evaluates after training: unset one of them"
            )
        return self


SelectionPolicy = Literal["best", "earliest_within_noise", "smoothed", "last", "lowest_val_loss"]


class SelectionConfig(Strict):
    policy: SelectionPolicy = Field(
        "lowest_val_loss",
        description="How a phase's model is chosen (evaluation/selection.py): lowest_val_loss = the saved "
        "checkpoint with the lowest validation/loss; best = highest objective; earliest_within_noise = fewest "
        "samples among candidates not significantly below the best (paired interval); smoothed = highest "
        "objective averaged over neighbouring candidates; last = the last saved checkpoint (no selection). "
        "The default had the lowest regret on a held-out test split (bench/selection.py, seeds 0-4) and held "
        "up on fresh seeds.",
    )
    confidence: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="Level of the paired intervals that gate: the gate's min_gain (their lower end must reach "
        "it) and the forgetting guard (a drop counts when its interval lies above max_forgetting); also the "
        "intervals selection.json shows. Higher = a stricter gate and a laxer guard.",
    )
    within_noise_confidence: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Policy earliest_within_noise: the level of 'not significantly below the best'. Higher = "
        "a wider band = earlier (cheaper, worse) picks; 0.5 had the lowest regret of 0.5 / 0.8 / 0.95 on "
        "bench/selection.py's tuning seeds.",
    )
    smoothing_window: int = Field(
        5,
        ge=1,
        description="Policy smoothed: how many neighbouring candidates (samples order) each average spans. "
        "Wider = steadier against one lucky score, blunter at a short peak; 5 beat 3 on the bench's tuning seeds.",
    )
    average_last_k: int | None = Field(
        None,
        ge=2,
        description="Also evaluate the uniform weight average of the phase's last k checkpoints as a "
        "candidate (saved as checkpoints/avg_last<k>); None = no averaged candidate.",
    )


class KubernetesConfig(Strict):
    """One Kubeflow Trainer TrainJob per phase (launch.scheduler: kubernetes)."""

    image: str = Field(description="Container image with recipe-lab installed (its working directory the repo).")
    namespace: str = Field("default", description="Namespace of the TrainJob.")
    runtime: str = Field(
        "torch-distributed", description="ClusterTrainingRuntime the TrainJob refers to (it injects PET_NODE_RANK...)."
    )
    volume_claim: str = Field(
        description="PersistentVolumeClaim holding the storage root, mounted on every node at `mount_path`."
    )
    mount_path: str = Field(
        description="Where the claim is mounted; the run's storage root (a local path) must lie under it, "
        "so that every node sees the prepared data, the launch files and the checkpoints at the same paths."
    )
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of one GPU.")


class SlurmConfig(Strict):
    """One sbatch job per phase, srun starting the launch on every node (launch.scheduler: slurm)."""

    partition: str | None = Field(None, description="#SBATCH --partition (None: the cluster's default).")
    time: str = Field("2-00:00:00", description="#SBATCH --time, the job's wall-clock limit.")
    sbatch_options: list[str] = Field(
        default_factory=list, description="More #SBATCH lines, e.g. ['--account=ml', '--exclusive']."
    )


class LaunchConfig(Strict):
    backend: Literal["cpu", "ddp", "deepspeed", "fsdp"] = Field(
        "cpu",
        description="cpu: processes on CPU over gloo; ddp: one process per GPU over nccl; "
        "deepspeed: ZeRO-2/3 (GPU, or CPU over gloo); fsdp: FSDP2 full sharding (GPU).",
    )
    num_processes: int = Field(1, gt=0, description="Processes (ranks) per machine.")
    zero_stage: Literal[2, 3] = Field(
        2, description="deepspeed: ZeRO stage. 2 shards optimizer state and gradients; 3 also the weights."
    )
    offload_optimizer: bool = Field(
        False, description="deepspeed: optimizer state and step on CPU (DeepSpeed's cpu_adam)."
    )
    offload_params: bool = Field(False, description="deepspeed ZeRO-3: weights on CPU between uses.")
    overlap_comm: bool = Field(
        True,
        description="deepspeed: reduce gradients while backward still runs (DeepSpeed enables it by default "
        "for ZeRO-3 only). Faster steps for ~4.5x the bucket sizes in buffers (`lab plan` counts them).",
    )
    bucket_elements: int = Field(
        500_000_000,
        gt=0,
        description="deepspeed: elements per gradient reduce bucket (and ZeRO-2 allgather bucket). Bigger: "
        "fewer, larger collectives; smaller: less buffer memory.",
    )
    collective_timeout_minutes: float = Field(
        60.0,
        gt=0,
        description="How long a rank waits in a collective (NCCL / gloo) before the run fails. It must cover "
        "the longest wait: the other ranks wait for rank 0 while it writes a save (`lab plan` warns when the "
        "estimated save is longer); lower finds a hung rank sooner.",
    )
    num_machines: int = Field(1, gt=0, description="Machines (nodes) in the job.")
    machine_rank: int = Field(
        0, ge=0, description="This machine's rank; under a scheduler pass it per node (e.g. $SLURM_NODEID)."
    )
    main_process_ip: str | None = Field(None, description="Address of machine 0 (needed for num_machines > 1).")
    main_process_port: int = Field(29500, gt=0, lt=65536, description="Rendezvous port on machine 0.")
    scheduler: Literal["local", "kubernetes", "slurm"] = Field(
        "local",
        description="local: this machine launches (one node, or this node of a job started by hand); "
        "kubernetes / slurm: each phase is one cluster job of num_machines nodes x num_processes GPUs, "
        "every node running the same accelerate launch with its node rank from the scheduler.",
    )
    kubernetes: KubernetesConfig | None = Field(None, description="Needed for scheduler: kubernetes.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="Used by scheduler: slurm.")

    @model_validator(mode="after")
    def _consistent(self) -> LaunchConfig:
        if self.backend != "deepspeed" and (self.offload_optimizer or self.offload_params):
            raise ValueError("offload_optimizer / offload_params need backend: deepspeed")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3 (ZeRO-2 does not shard the weights)")
        if self.num_machines > 1 and not self.main_process_ip and self.scheduler == "local":
            raise ValueError("num_machines > 1 needs main_process_ip (the address of machine 0)")
        if self.scheduler == "kubernetes" and self.kubernetes is None:
            raise ValueError("scheduler: kubernetes needs a kubernetes section (image, volume_claim, mount_path)")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank {self.machine_rank} must be < num_machines {self.num_machines}")
        return self

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines


class ExportConfig(Strict):
    to: str | None = Field(
        None,
        description="At the end of a finetune run, export the last phase's selected model here (directory or "
        "s3://...): safetensors in the training dtype, tokenizer with chat template, generation config, model "
        "card. An earlier export there is replaced. None = no export (`lab export` does it any time).",
    )
    push_to_hub: str | None = Field(
        None, description="Also push the export to this Hugging Face Hub repo (token from HF_TOKEN, never here)."
    )


class Recipe(Strict):
    name: str = Field(description="Recipe name, used in run ids and reports.")
    description: str = Field("", description="What this recipe is for.")
    strategy: Literal["phased", "stacked"] = Field(
        "phased",
        description="phased: one training run per phase, each starting from the previous phase's "
        "selected checkpoint; stacked: all phases' data mixed into one run.",
    )
    model: ModelConfig
    phases: list[PhaseConfig] = Field(min_length=1, description="Phases in training order.")
    training: TrainingConfig
    checkpointing: CheckpointConfig = Field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _unique_phase_names(self) -> Recipe:
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _reserved_gpus_are_on_the_training_node(self) -> Recipe:
        devices, launch = self.evaluation.devices, self.launch
        if devices and devices.startswith("cuda:") and (launch.num_machines > 1 or launch.scheduler != "local"):
            raise ValueError(
                f"evaluation.devices {devices!r} reserves GPUs of a single local training node; with "
                f"launch.num_machines {launch.num_machines} / scheduler {launch.scheduler} evaluate after training "
                "(unset evaluation.devices)"
            )
        return self

    @model_validator(mode="after")
    def _float16_has_loss_scaling(self) -> Recipe:
        # Pure float16 gradients underflow without loss scaling, which only the mixed-precision path has.
        if self.model.dtype == "float16" and not self.training.mixed_precision:
            raise ValueError(
                "model.dtype float16 needs training.mixed_precision: true (float32 masters and loss scaling); "
                "or use bfloat16"
            )
        return self

    @model_validator(mode="after")
    def _validation_loss_is_measured(self) -> Recipe:
        # validation/loss comes from the trainer, at its checkpoints: an averaged model has none.
        uses = [p.name for p in self.phases if "validation/loss" in {*p.objective, *p.min_score}]
        if uses and not self.training.validation_samples:
            raise ValueError(f"phases {uses} use validation/loss: set training.validation_samples > 0")
        if uses and self.selection.average_last_k:
            raise ValueError(
                f"phases {uses} use validation/loss, which an averaged checkpoint has not: "
                "unset selection.average_last_k"
            )
        if self.selection.policy == "lowest_val_loss" and not self.training.validation_samples:
            raise ValueError("selection.policy lowest_val_loss needs training.validation_samples > 0")
        return self

    def stacked(self) -> Recipe:
        """The single phase of stacked training: every phase's data, objective = sum of the phases'.

        Each phase keeps its length split, so a difficulty-split recipe (one file, short then
        long half) trains every sample once per epoch. Replay is not repeated: a stacked run
        already trains every earlier phase's data in full, so replayed copies would only make
        some samples count twice.
        """
        objective: dict[str, float] = {}
        for phase in self.phases:
            for key, weight in phase.objective.items():
                objective[key] = objective.get(key, 0.0) + weight
        phase = PhaseConfig(
            name="stacked",
            data=[path for p in self.phases for path in p.data],
            objective=objective,
            stacked_from=[
                PhaseData.model_validate(part.model_dump(include=set(PhaseData.model_fields)))
                for p in self.phases
                for part in (p.stacked_from or [p])  # stacking a stacked recipe keeps its parts
            ],
        )
        return self.model_copy(update={"phases": [phase], "strategy": "stacked"})


class RecipeError(ValueError):
    """A recipe that does not validate; the message names the file and the fields."""


def format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid recipe"]
    for err in error.errors():
        field = ".".join(str(part) for part in err["loc"]) or "<root>"
        lines.append(f"  {field}: {err['msg']}")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `data` with dotted keys set: {"training.learning_rate": 1e-5}.

    A list index is a number: {"phases.0.data": [...]}. Unknown keys are left for validation
    to reject, so a typo in an override is reported like a typo in the YAML.
    """
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
    return data


def load_recipe(source: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
    """Load a recipe from a YAML path, a name in recipes/, or a dict; apply overrides; validate."""
    if isinstance(source, dict):
        label, data = "<recipe>", source
    else:
        path = resolve_recipe_path(source)
        label = str(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise RecipeError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(apply_overrides(data, overrides or {}))
    except ValidationError as exc:
        raise RecipeError(format_validation_error(label, exc)) from None


RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def resolve_recipe_path(source: str | Path) -> Path:
    """A path to a YAML file, or the bare name of one in recipes/ ('lab', 'demo')."""
    path = Path(source)
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{source}.yaml"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise RecipeError(f"recipe {source!r}: no such file, and not one of recipes/ ({known})")


def smoke(recipe: Recipe) -> Recipe:
    """Shrink any recipe to a few CPU minutes on the embedded lab, keeping its shape.

    A recipe for a real model has its phases mapped in order onto the lab's three phases; the
    lab tasks replace its evaluation tasks. A recipe already on the embedded lab keeps its
    phases. Gates are dropped either way (a smoke run checks the pipeline, not quality). Batch arithmetic,
    schedule and strategy are kept so a smoke run exercises the same code paths.
    """
    lab_phases = ["phase00", "phase05", "phase10"]
    lab_objectives = ["lab_instruction/rule_acc", "lab_knowledge/acc", "lab_skills/exact_match"]
    phases = [
        PhaseConfig(
            name=phase.name,
            data=[f"{EMBEDDED}curriculum/{lab_phases[i % 3]}/train.jsonl"],
            objective={lab_objectives[i % 3]: 1.0},
        )
        for i, phase in enumerate(recipe.phases)
    ]
    if recipe.model.name_or_path.startswith(EMBEDDED):
        # Already a lab recipe: keep its data and objectives. Gates are dropped in every smoke
        # run: a few CPU minutes check the pipeline, they cannot meet a real recipe's bar.
        phases = [
            p.model_copy(update={"min_score": {}, "min_gain": None, "max_forgetting": None}) for p in recipe.phases
        ]
    training = recipe.training.model_copy(
        update={
            "effective_batch_size": 32,
            "max_tokens_per_micro_batch": 2048,
            "epochs": 1.0,
            "max_seq_len": 256,
            "learning_rate": 2e-3,
            "warmup_steps": None if recipe.training.warmup_ratio is not None else 2,
        }
    )
    return recipe.model_copy(
        update={
            "model": ModelConfig(name_or_path=f"{EMBEDDED}base-model", dtype="float32"),
            "phases": phases,
            "training": training,
            "checkpointing": CheckpointConfig(save_every_samples=1024, save_every_epoch=True),
            "evaluation": EvaluationConfig(
                tasks=["lab_instruction", "lab_knowledge", "lab_skills"], limit=40, batch_size=32, devices="cpu:1"
            ),
            "launch": LaunchConfig(backend="cpu", num_processes=1),
        }
    )


def warmup_steps(training: TrainingConfig, total_steps: int) -> int:
    if training.warmup_steps is not None:
        return training.warmup_steps
    if training.warmup_ratio is not None:
        return math.ceil(training.warmup_ratio * total_steps)
    return 0


def resolve(
    recipe: str | Recipe | dict[str, Any],
    strategy: Literal["phased", "stacked"] | None = None,
    overrides: dict[str, Any] | None = None,
    smoke_run: bool = False,
) -> Recipe:
    """The recipe a run trains with: loaded, overridden, shrunk for smoke, stacked if asked.

    A stacked recipe has a single phase holding every phase's data (see Recipe.stacked).
    Smoke never overwrites what the user set: the overrides are applied again on top of the
    shrunk recipe (a sweep's grid over the learning rate must train each run at its own rate).
    """
    source = recipe.model_dump(mode="json") if isinstance(recipe, Recipe) else recipe
    resolved = load_recipe(source, overrides)
    if strategy is not None:
        resolved = resolved.model_copy(update={"strategy": strategy})
    if smoke_run:
        resolved = load_recipe(smoke(resolved).model_dump(mode="json"), overrides)
    return resolved.stacked() if resolved.strategy == "stacked" else resolved
