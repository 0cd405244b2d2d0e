"""GPU check: a ~1B Llama-architecture model, bf16 with fp32 masters, packed, on one GPU.

    bash bench/gpu_check.sh            (on a machine with a CUDA GPU; see the script)
    python bench/gpu_check.py --tiny   (the same steps on CPU with a tiny model: checks the script)

Everything is offline and synthetic (random-init Llama 3.2 1B shape, word-level tokenizer,
lognormal sample lengths). Through the real training script (`training.train` under
`accelerate launch`, one process) it measures:

1. throughput: a few dozen optimizer steps, packed sdpa micro-batches, gradient checkpointing,
   chunked loss -> real tokens/s, MFU (6 x params x tokens/s / bf16 peak), peak GPU memory
   (max allocated) against `lab plan`'s estimate for the same recipe;
2. weight movement: 10 AdamW steps at lr 1e-5, bf16 with fp32 masters vs pure bf16 -> the
   fraction of weights (seen in bf16) each changed;
3. evaluation on the GPU: the saved checkpoint loaded by `evaluation.device.load_causal_lm`
   (device, dtype) and a batched greedy generation (new tokens/s).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[key] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

# Llama 3.2 1B's shape (1.24B parameters, tied embeddings); --tiny shrinks it for a CPU dry run.
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


def build_model(path: Path, shape: dict) -> dict:
    """Random-init Llama saved in bf16 with a word-level tokenizer; returns its config dict."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    vocab = shape["vocab_size"]
    words = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", eos_token="t1")
    # A minimal template (the training script requires one; the data here is pre-tokenized).
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    tokenizer.save_pretrained(path)
    del model
    return config.to_dict()


def write_data(path: Path, n: int, vocab: int, max_len: int) -> None:
    """tokens.parquet (what training.data.prepare writes): lognormal lengths, loss on every token."""
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    lengths = [int(min(max_len, max(32, rng.lognormvariate(6.0, 0.8)))) for _ in range(n)]
    samples = [torch.randint(2, vocab, (k,), generator=g).tolist() for k in lengths]
    path.mkdir(parents=True)
    table = pa.table(
        {
            "id": [str(i) for i in range(n)],
            "input_ids": pa.array(samples, type=pa.list_(pa.int32())),
            "labels": pa.array(samples, type=pa.list_(pa.int32())),
        }
    )
    pq.write_table(table, path / "tokens.parquet")


def train(model_dir: Path, data_dir: Path, out: Path, overrides: dict) -> tuple[list[dict], Path]:
    """One run of the real training script on a single device; (metrics, final checkpoint)."""
    from training.launch import run_training
    from training.recipe import load_recipe
    from training.train import TrainJob

    recipe = load_recipe("demo", overrides)
    job = TrainJob(
        run_id=out.name,
        phase="p",
        recipe=recipe,
        model_path=str(model_dir),
        parent_checkpoint="random-init",
        data_dir=str(data_dir),
        output_dir=str(out),
    )
    lines: list[str] = []
    checkpoints = run_training(job, on_line=lines.append)
    print("\n".join(line for line in lines if line.startswith(("batch arithmetic", "launch:"))), flush=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, checkpoints[-1]


def changed_fraction(checkpoint: Path, base: Path) -> float:
    from safetensors.torch import load_file

    before, after = load_file(base / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    changed = sum((after[k].bfloat16() != before[k].bfloat16()).sum().item() for k in before)
    return changed / sum(t.numel() for t in before.values())


def evaluate_on_device(checkpoint: Path, vocab: int, batch: int, new_tokens: int) -> dict:
    """Load as evaluation does and generate greedily for a batch of prompts."""
    from evaluation.device import load_causal_lm

    model = load_causal_lm(str(checkpoint), "auto")
    prompts = torch.randint(2, vocab, (batch, 128), generator=torch.Generator().manual_seed(1)).to(model.device)
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
    seconds = time.perf_counter() - start
    generated = (output.shape[1] - prompts.shape[1]) * batch
    return {
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "generated_tokens_per_s": round(generated / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with a tiny model")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the throughput run")
    parser.add_argument("--ebs", type=int, default=64, help="samples per optimizer step")
    parser.add_argument("--budget", type=int, default=16384, help="real tokens per packed micro-batch")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available() and not args.tiny
    if not on_gpu and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny for a CPU dry run of the script")
    shape = TINY if args.tiny else LLAMA_1B
    budget = 1024 if args.tiny else args.budget
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    t0 = time.perf_counter()
    config = build_model(work / "model", shape)
    write_data(work / "data", args.ebs * args.steps, shape["vocab_size"], max_len=min(budget, 4096))
    base = {
        "model.name_or_path": str(work / "model"),
        "model.dtype": "bfloat16",
        "model.attn_implementation": "sdpa",
        "training.effective_batch_size": args.ebs,
        "training.max_tokens_per_micro_batch": budget,
        "training.max_seq_len": 4096,
        "training.epochs": 1,
        "training.warmup_steps": 0,
        "training.learning_rate": 1e-5,
        "checkpointing.save_every_samples": None,
        "checkpointing.state_every_steps": None,
        "launch.backend": "ddp" if on_gpu else "cpu",
        "launch.num_processes": 1,
    }
    print(f"model and data built in {time.perf_counter() - t0:.0f} s ({work})", flush=True)

    # 1. Throughput, memory measured vs planned.
    from training.plan import GIB, ModelShape, estimate_memory
    from training.recipe import load_recipe

    run = base | {"training.gradient_checkpointing": True}
    metrics, checkpoint = train(work / "model", work / "data", work / "throughput", run)
    steady = metrics[2:] or metrics  # the first steps include allocator warm-up and kernel selection
    tokens_per_s = sum(m["tokens_per_s"] for m in steady) / len(steady)
    mfu = [m["mfu"] for m in steady if m["mfu"] is not None]
    measured = max(m["peak_memory_gb"] for m in metrics)
    planned = estimate_memory(load_recipe("demo", run), ModelShape.from_config(config), on_gpu=on_gpu)
    planned_gib = (planned.total - planned.runtime) / GIB  # max_memory_allocated excludes the CUDA context
    print(
        f"throughput: {tokens_per_s:,.0f} real tokens/s, MFU {sum(mfu) / len(mfu) if mfu else float('nan'):.3f}; "
        f"peak memory {measured:.2f} GiB measured vs {planned_gib:.2f} GiB planned (tensors, no runtime)",
        flush=True,
    )

    # 2. Weight movement: bf16 with fp32 masters vs pure bf16, 10 AdamW steps at lr 1e-5.
    ten_steps = {"training.epochs": 10 / args.steps}
    movement = {}
    for name, extra in (("fp32_masters", {}), ("pure_bf16", {"training.mixed_precision": False})):
        _, final = train(work / "model", work / "data", work / name, base | ten_steps | extra)
        movement[name] = round(changed_fraction(final, work / "model"), 4)
    print(f"weights changed in 10 steps at lr 1e-5 (seen in bf16): {movement}", flush=True)

    # 3. Evaluation on the accelerator.
    evaluation = evaluate_on_device(checkpoint, shape["vocab_size"], batch=16, new_tokens=8 if args.tiny else 128)
    print(f"evaluation: {evaluation}", flush=True)

    summary = {
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu (dry run)",
        "params": ModelShape.from_config(config).params,
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(sum(mfu) / len(mfu), 4) if mfu else None,
        "peak_memory_gib": measured,
        "planned_memory_gib": round(planned_gib, 3),
        "measured_over_planned": round(measured / planned_gib, 3),
        "weights_changed": movement,
        "evaluation": evaluation,
        "wall_s": round(time.perf_counter() - t0, 1),
        "targets_met": {"mfu_0.40": bool(mfu) and sum(mfu) / len(mfu) >= 0.40},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
