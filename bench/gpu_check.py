"""GPU check: our trainer against the peer on a 1B Llama, one GPU, one run, each measurement capped.

    bash bench/gpu_check.sh                      (on the device machine: wheels, versions, this, evaluation)
    python bench/gpu_check.py --dry-run          (CPU, tiny model: every path that can run on a CPU)

Offline and synthetic: a random-init Llama 3.2 1B shape, a word-level tokenizer, lognormal
sample lengths (median ~400, 32-4096 tokens), bf16 compute with float32 masters, packed. Each
measurement runs under its own time cap (and the whole under --budget-s) and is written to
--out as <name>.json the moment it ends; `--only a,b` reruns some of them.

- ours_<kernel>: the real `training.train` under `accelerate launch`, one process, for each
  packed-attention kernel this machine has (flex_attention always; flash_attention_2 when
  flash-attn imports), activation checkpointing as the plan decides for this GPU
  (`gradient_checkpointing: auto`), the chunked loss (Liger's when it imports);
- peer_<kernel>: transformers.Trainer as its users run padding-free: DataCollatorWithFlattening
  (with flash-attn's boundaries for flash_attention_2), bf16=True over float32 weights, the same
  kernel, the same checkpointing decision, micro-batches of ~the same tokens, the same samples per
  optimizer step;
- generation: the model loaded as evaluation loads it, batched greedy generation.

Per training run: real tokens/s and MFU over the steady steps (after WARMUP_STEPS: compilation,
allocator warm-up), peak memory (max allocated) and, for ours, the plan's estimate. MFU =
FLOPs / (seconds x peak), FLOPs = 6 x (N - input-embedding params) per token + causal attention
per sample from each sample's own length (training.plan.ModelShape.training_flops; recomputation
not counted), peak 989 TFLOP/s dense bf16 for an H100 SXM or an H200 (training.logs.PEAK_BF16_FLOPS).
A dry run has no GPU: its kernels are the CPU's (sdpa per sample; the peer on sdpa), no MFU, and
it says "no GPU at hand". The last line is the summary, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[key] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

# Llama 3.2 1B's shape (1.24B parameters, tied embeddings); --dry-run shrinks it.
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
    tie_word_embeddings=True,
)
WARMUP_STEPS = 3  # optimizer steps left out of tokens/s and MFU (compilation, allocator warm-up)
CAPS_S = {"ours": 90, "peer": 80, "generation": 20}  # per measurement, within --budget-s
PACKAGES = ("torch", "transformers", "accelerate", "pydantic", "liger-kernel", "flash-attn", "triton")


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found | {"python": platform.python_version(), "cuda": torch.version.cuda}


def build_model(path: Path, shape: dict, device: str) -> dict:
    """Random-init Llama saved in bf16 with a word-level tokenizer; returns its config dict."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    vocab = shape["vocab_size"]
    words = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", eos_token="t1")
    # A minimal template (the training script requires one; the data here is pre-tokenized).
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    tokenizer.save_pretrained(path)
    return config.to_dict()


def make_samples(n: int, vocab: int, max_len: int) -> list[list[int]]:
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    lengths = [int(min(max_len, max(32, rng.lognormvariate(6.0, 0.8)))) for _ in range(n)]
    return [torch.randint(2, vocab, (k,), generator=g).tolist() for k in lengths]


def write_data(path: Path, samples: list[list[int]]) -> None:
    """tokens.parquet as training.data.prepare writes it, loss on every token."""
    path.mkdir(parents=True)
    tokens = pa.array(samples, type=pa.list_(pa.int32()))
    pq.write_table(
        pa.table({"id": [str(i) for i in range(len(samples))], "input_ids": tokens, "labels": tokens}),
        path / "tokens.parquet",
    )


def throughput(step_lengths: list[list[int]], step_seconds: list[float], config: dict, peak: float | None) -> dict:
    """Real tokens/s and MFU over the steps after WARMUP_STEPS (all of them if there are too few)."""
    from training.plan import ModelShape

    steady = slice(WARMUP_STEPS, None) if len(step_seconds) > WARMUP_STEPS + 1 else slice(None)
    lengths, seconds = step_lengths[steady], sum(step_seconds[steady])
    flops = sum(ModelShape.from_config(config).training_flops(step) for step in lengths)
    return {
        "steps_measured": len(lengths),
        "tokens_per_s": round(sum(map(sum, lengths)) / seconds, 1),
        "mfu": round(flops / seconds / peak, 4) if peak else None,
    }


def run_recipe(model_dir: str, kernel: str, ebs: int, budget: int, dry_run: bool):
    """The recipe of the runs: bf16 over float32 masters, packed, checkpointing as the plan says."""
    from core.recipe import load_recipe

    overrides = {
        "model.name_or_path": model_dir,
        "model.dtype": "bfloat16",
        "model.attn_implementation": "sdpa" if dry_run else kernel,
        "training.effective_batch_size": ebs,
        "training.max_tokens_per_micro_batch": budget,
        "training.gradient_checkpointing": "auto",
        "training.max_seq_len": 4096,
        "training.epochs": 1,
        "training.warmup_steps": 0,
        "training.learning_rate": 1e-5,
        "checkpointing.save_every_samples": None,
        "checkpointing.rolling_state_minutes": None,
        "launch.backend": "cpu" if dry_run else "ddp",
        "launch.num_processes": 1,
    }
    return load_recipe("demo", overrides)


def memory_plan(recipe, config: dict, on_gpu: bool):
    """The plan's memory estimate for this GPU (it also decides `gradient_checkpointing: auto`)."""
    from training.plan import ModelShape, estimate_memory

    device_bytes = torch.cuda.get_device_properties(0).total_memory if on_gpu else None
    return estimate_memory(recipe, ModelShape.from_config(config), on_gpu=on_gpu, device_bytes=device_bytes)


def ours(kernel: str, work: Path, model_dir: Path, config: dict, samples: list, args: argparse.Namespace, cap: float):
    """Our trainer through the real launch, stopped at `cap` seconds if not done."""
    from core import records
    from core.records import SamplesLine, StepMetrics
    from training.job import TrainJob
    from training.launch.local import run_training
    from training.plan import GIB

    on_gpu = not args.dry_run
    recipe = run_recipe(str(model_dir), kernel, args.ebs, args.budget, args.dry_run)
    out = work / f"ours_{kernel}"
    job = TrainJob(
        run_id=out.name,
        phase="p",
        recipe=recipe,
        model_path=str(model_dir),
        parent_checkpoint="random-init",
        data_dir=str(work / "data"),
        output_dir=str(out),
    )
    lines: list[str] = []
    capped = False
    try:
        run_training(job, on_line=lines.append, timeout_s=cap)
    except subprocess.TimeoutExpired:
        capped = True
    metrics = records.read_lines(StepMetrics, out / records.METRICS)
    steps = [line.ids for line in records.read_lines(SamplesLine, out / "samples" / "rank0.jsonl")]
    walls = [m.wall_s for m in metrics]
    step_seconds = [b - a for a, b in zip([0.0, *walls], walls, strict=False)]
    planned = memory_plan(recipe, config, on_gpu)
    planned_tensors = (planned.total - planned.runtime) / GIB  # max_memory_allocated excludes the CUDA context
    measured = max(m.peak_memory_gb for m in metrics)
    attention_line = next((line for line in lines if line.startswith("attention: ")), "")  # what the run used
    return {
        "system": "ours",
        "kernel": attention_line.split()[1] if attention_line else None,
        "log": [line for line in lines if line.startswith(("attention: ", "batch arithmetic"))],
        "steps": len(metrics),
        "capped": capped,
        **throughput(
            [[len(samples[int(i)]) for i in ids] for ids in steps[: len(metrics)]], step_seconds, config, peak_flops()
        ),
        "gradient_checkpointing": "activation checkpointing on" in attention_line,
        "peak_memory_gib": measured,
        "planned_memory_gib": round(planned_tensors, 3),
        "measured_over_planned": round(measured / planned_tensors, 3),
    }


def peer(kernel: str, work: Path, model_dir: Path, config: dict, args: argparse.Namespace, cap: float) -> dict:
    """The peer in its own process (its own CUDA context and memory peak), killed at `cap` seconds."""
    spec = work / f"peer_{kernel}.spec.json"
    result = work / f"peer_{kernel}.result.json"
    settings = {"dry_run": args.dry_run, "ebs": args.ebs, "budget": args.budget}
    spec.write_text(
        json.dumps({"kernel": kernel, "work": str(work), "model": str(model_dir), "config": config} | settings)
    )
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--peer-worker", str(spec), "--result", str(result)],
            capture_output=True,
            text=True,
            timeout=cap,
        )
    except subprocess.TimeoutExpired:
        return {"system": "peer", "kernel": kernel, "error": f"capped: not finished after {cap:.0f} s"}
    if proc.returncode != 0:
        return {"system": "peer", "kernel": kernel, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:400]}
    return json.loads(result.read_text())


def peer_worker(spec_file: Path, result: Path) -> None:
    """transformers.Trainer, padding-free with DataCollatorWithFlattening, as its users run it."""
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from training.plan import GIB

    spec = json.loads(spec_file.read_text())
    on_gpu, kernel = not spec["dry_run"], spec["kernel"]
    samples = [json.loads(line) for line in (Path(spec["work"]) / "samples.jsonl").read_text().splitlines()]
    mean = sum(map(len, samples)) / len(samples)
    batch = max(1, min(spec["ebs"], int(spec["budget"] // mean)))  # ~the tokens of one of our micro-batches
    accumulation = max(1, spec["ebs"] // batch)
    # The same activation-checkpointing decision as ours: the plan's, for this GPU.
    recipe = run_recipe(spec["model"], kernel, spec["ebs"], spec["budget"], spec["dry_run"])
    checkpointing = memory_plan(recipe, spec["config"], on_gpu).checkpointing
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation=kernel)
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=kernel == "flash_attention_2")
    micro_lengths: list[int] = []
    steps: list[tuple[float, list[int]]] = []

    def counting(features: list[dict]) -> dict:
        micro_lengths.extend(len(f["input_ids"]) for f in features)
        return collator(features)

    class Clock(TrainerCallback):
        """A step's wall time runs from the previous step's end (its micro-batches are collated
        before on_step_begin), as ours counts it."""

        def on_train_begin(self, *a, **k):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            now = time.perf_counter()
            steps.append((now - self.last, list(micro_lengths)))
            micro_lengths.clear()
            self.last = now

    train_args = TrainingArguments(
        output_dir=str(Path(spec["work"]) / f"peer_{kernel}"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=1,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        adam_beta2=0.95,
        max_grad_norm=1.0,
        bf16=True,  # autocast over the float32 weights, as ours (the dry run too)
        use_cpu=not on_gpu,
        gradient_checkpointing=checkpointing,
        save_strategy="no",
        report_to=[],
        logging_steps=10_000,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
    )
    dataset = [{"input_ids": s, "labels": s} for s in samples]
    trainer = Trainer(model=model, args=train_args, train_dataset=dataset, data_collator=counting, callbacks=[Clock()])
    trainer.train()
    record = {
        "system": "peer",
        "kernel": model.config._attn_implementation,
        "steps": len(steps),
        "ran_with": {
            "batch": batch,
            "accumulation": accumulation,
            "bf16": train_args.bf16,
            "gradient_checkpointing": checkpointing,
        },
        **throughput(
            [lengths for _, lengths in steps], [seconds for seconds, _ in steps], spec["config"], peak_flops()
        ),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 4) if on_gpu else None,
    }
    result.write_text(json.dumps(record))


def peak_flops() -> float | None:
    from training.logs import peak_bf16_flops

    return peak_bf16_flops(torch.device("cuda")) if torch.cuda.is_available() else None


def generation(checkpoint: Path, vocab: int, new_tokens: int) -> dict:
    """Load as evaluation does and generate greedily for a batch of 16 prompts."""
    from evaluation.device import load_causal_lm

    model = load_causal_lm(str(checkpoint), "auto")
    prompts = torch.randint(2, vocab, (16, 128), generator=torch.Generator().manual_seed(1)).to(model.device)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    generated = (output.shape[1] - prompts.shape[1]) * prompts.shape[0]
    return {
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "generated_tokens_per_s": round(generated / (time.perf_counter() - start), 1),
    }


def kernels(dry_run: bool) -> list[str]:
    """The packed-attention kernels this machine can train with (the dry run: the CPU's one)."""
    from training import kernels

    if dry_run:
        return [kernels.SDPA_PER_SAMPLE]
    return ["flex_attention"] + (["flash_attention_2"] if kernels.flash_attn_imports() else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model: the script's paths without a GPU")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON files (default: a temp dir)")
    parser.add_argument("--budget-s", type=float, default=205, help="all measurements together stop by then")
    parser.add_argument("--only", default=None, help="comma-separated measurement names (ours_flex_attention, ...)")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per training run (if not capped first)")
    parser.add_argument("--ebs", type=int, default=64, help="samples per optimizer step")
    parser.add_argument("--budget", type=int, default=16384, help="real tokens per packed micro-batch")
    parser.add_argument("--peer-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_worker:
        return peer_worker(args.peer_worker, args.result)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU dry run of the script")
    if args.dry_run:
        args.budget, args.ebs, args.steps = 1024, 8, 6
    from training.plan import ModelShape

    started = time.monotonic()
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
    shape = TINY if args.dry_run else LLAMA_1B
    config = build_model(work / "model", shape, "cpu" if args.dry_run else "cuda")
    samples = make_samples(args.ebs * args.steps, shape["vocab_size"], max_len=min(args.budget, 4096))
    write_data(work / "data", samples)
    (work / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    setup = {
        "device": torch.cuda.get_device_name(0) if not args.dry_run else "cpu (dry run): no GPU at hand",
        "versions": versions(),
        "params": ModelShape.from_config(config).params,
        "samples": len(samples),
        "real_tokens": sum(map(len, samples)),
        "ebs": args.ebs,
        "micro_batch_tokens": args.budget,
        "peak_flops": peak_flops(),
        "setup_s": round(time.monotonic() - started, 1),
    }
    (out / "setup.json").write_text(json.dumps(setup, indent=1))
    print(json.dumps(setup), flush=True)

    # The dry run's peer attends with sdpa (transformers' own, masked from the position_ids).
    pairs = [(kernel, "sdpa" if args.dry_run else kernel) for kernel in kernels(args.dry_run)]
    measurements = [
        m for ours_k, peer_k in pairs for m in ((f"ours_{ours_k}", "ours", ours_k), (f"peer_{peer_k}", "peer", peer_k))
    ]
    measurements.append(("generation", "generation", None))
    only = set(args.only.split(",")) if args.only else None
    results = {}
    for name, kind, kernel in measurements:
        if only and name not in only:
            continue
        left = args.budget_s - (time.monotonic() - started)
        cap = min(CAPS_S[kind], left)
        if cap < 15:
            results[name] = {"skipped": f"budget: {left:.0f} s left"}
            continue
        t0 = time.monotonic()
        if kind == "ours":
            result = ours(kernel, work, work / "model", config, samples, args, cap)
        elif kind == "peer":
            result = peer(kernel, work, work / "model", config, args, cap)
        else:
            result = generation(work / "model", shape["vocab_size"], 8 if args.dry_run else 128)
        result["seconds"] = round(time.monotonic() - t0, 1)
        results[name] = result
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(f"{name}: {json.dumps(result)}", flush=True)

    ratios = {}
    for ours_k, peer_k in pairs:
        a, b = results.get(f"ours_{ours_k}", {}), results.get(f"peer_{peer_k}", {})
        if a.get("tokens_per_s") and b.get("tokens_per_s"):
            ratios[f"ours_{ours_k}_over_peer_{peer_k}"] = round(a["tokens_per_s"] / b["tokens_per_s"], 3)
    summary = {**setup, "results": results, "ratios": ratios, "wall_s": round(time.monotonic() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
