"""Data preparation: ours vs the usual alternatives, measured in one run on the same data.

    .venv/bin/python bench/data_prep.py [--conversations 100000] [--workers 2]

Data: synthetic multi-turn conversations (a system prompt, 1-3 user/assistant exchanges, words
per message lognormal), seeded, in one JSONL file. One tokenizer: the lab's byte-level BPE
with ChatML special tokens and the bundled `chatml` template. Each contender runs in its own
process, from the JSONL file to tokens ready for training, and reports its wall time and peak
RSS (its own and its child processes'):

  ours        training.data: load_phase + prepare (assistant masks with end-of-turn, drop
              over-long, `--workers` threads, chunked Parquet output)
  trl         TRL SFTTrainer's dataset preparation with its defaults for conversational data
              (load_dataset json, then the trainer's constructor: chat template + tokenization,
              no assistant masks; a tiny model, whose setup is timed alone and subtracted)
  hf_map      load_dataset json + a plain `datasets.map` of `apply_chat_template(tokenize=True)`
              (no masks), as its users write it: one process

Then the trainer's view: bytes per token of the prepared data as training.train loads it
(numpy buffers) and the RSS that loading adds. The last line is one JSON object with
`ours_conv_per_s`, each peer's, `ratio_vs_best_peer` and `train_data_bytes_per_token`.
Timings vary with the machine and its load; the data and the token counts do not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {"ratio_vs_best_peer": 1.0}  # >= ; and train_data_bytes_per_token <= 12
MAX_BYTES_PER_TOKEN = 12
MAX_SEQ_LEN = 4096


def synthetic_conversations(n: int, seed: int, vocabulary: list[str]) -> list[dict]:
    """Multi-turn chats with a system prompt; words per message ~ lognormal (median 12 system,
    20 user, 60 assistant words; at most 600), drawn from `vocabulary`."""
    rng = random.Random(seed)

    def text(median_words: float) -> str:
        words = max(1, min(600, round(rng.lognormvariate(math.log(median_words), 0.8))))
        return " ".join(rng.choices(vocabulary, k=words)).capitalize() + "."

    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": text(12)}]
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": text(20)}, {"role": "assistant", "content": text(60)}]
        rows.append({"id": f"c{i}", "messages": messages})
    return rows


def words_of(tokenizer_dir: Path) -> list[str]:
    """Whole words of the tokenizer's vocabulary (one token each after a space), sorted."""
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower())


def build_tokenizer(out_dir: Path) -> Path:
    """The lab's BPE with ChatML tokens and the bundled chatml template, saved to `out_dir`."""
    from core.chat import apply_template
    from embedded import build_assets
    from tests.zoo import FAMILIES, family_tokenizer

    tokenizer = family_tokenizer(build_assets().base_model_dir, FAMILIES["qwen2.5"])
    apply_template(tokenizer, "chatml")
    tokenizer.save_pretrained(out_dir)
    return out_dir


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory: this process's VmHWM, and the largest ru_maxrss of its finished
    children (a peer's worker processes; ours tokenizes in threads). ru_maxrss survives exec,
    so a child's figure is an upper bound that includes this process's size when it was started."""
    status = Path("/proc/self/status").read_text().splitlines()
    own = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"self": round(own / 1024, 1), "children_max": round(children / 1024, 1)}


def run_ours(data: Path, tokenizer_dir: Path, out: Path, workers: int) -> dict:
    from transformers import AutoTokenizer

    from training.data import load_phase, prepare

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    t0 = time.perf_counter()
    conversations, files = load_phase([str(data)])
    stats = prepare(conversations, tokenizer, str(out), MAX_SEQ_LEN, files=files, workers=workers)
    return {"seconds": time.perf_counter() - t0, "samples": stats.samples, "tokens": stats.tokens}


def run_hf_map(data: Path, tokenizer_dir: Path, out: Path, workers: int) -> dict:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    t0 = time.perf_counter()
    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(out / "cache"))
    dataset = dataset.map(
        lambda row: {"input_ids": tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)},
        remove_columns=dataset.column_names,
    )
    tokens = sum(len(x) for x in dataset["input_ids"])
    return {"seconds": time.perf_counter() - t0, "samples": len(dataset), "tokens": tokens}


def run_trl(data: Path, tokenizer_dir: Path, out: Path, workers: int) -> dict:
    from datasets import load_dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    config = SFTConfig(output_dir=str(out / "trl"), report_to=[], max_length=MAX_SEQ_LEN, use_cpu=True)

    def trainer(dataset):
        t0 = time.perf_counter()
        built = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        return built, time.perf_counter() - t0

    one = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    from datasets import Dataset

    _, setup = trainer(Dataset.from_list(one))  # the trainer's own setup, without data worth timing
    t0 = time.perf_counter()
    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(out / "cache"))
    load = time.perf_counter() - t0
    built, construct = trainer(dataset)
    prepared = built.train_dataset
    tokens = sum(len(x) for x in prepared["input_ids"])
    return {"seconds": load + construct - setup, "samples": len(prepared), "tokens": tokens, "setup_s": setup}


def run_loaded(data: Path, tokenizer_dir: Path, out: Path, workers: int) -> dict:
    """What training.train holds for the data: numpy buffers, and the RSS that loading adds."""
    import psutil

    from training.data import load_tokenized

    load_tokenized(str(out))  # a first load imports and warms what any load needs (then freed)
    before = psutil.Process().memory_info().rss
    loaded = load_tokenized(str(out))
    lengths = loaded.lengths()
    loss_tokens = loaded.loss_tokens()
    added = psutil.Process().memory_info().rss - before
    tokens = sum(lengths)
    return {
        "tokens": tokens,
        "loss_tokens": sum(loss_tokens),
        "bytes_per_token": loaded.nbytes() / tokens,
        "rss_added_per_token": added / tokens,
    }


CONTENDERS = {"ours": run_ours, "trl": run_trl, "hf_map": run_hf_map, "loaded": run_loaded}


def child(args: argparse.Namespace) -> None:
    result = CONTENDERS[args.child](Path(args.data), Path(args.tokenizer), Path(args.out), args.workers)
    print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))


def measure(name: str, data: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    command = [sys.executable, __file__, "--child", name, "--data", str(data), "--tokenizer", str(tokenizer)]
    command += ["--out", str(out), "--workers", str(workers)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2, help="our tokenization threads (2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers", default="trl,hf_map")
    parser.add_argument("--child", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="bench-data-prep-") as tmp:
        root = Path(tmp)
        tokenizer = build_tokenizer(root / "tokenizer")
        data = root / "chats.jsonl"
        with data.open("w") as f:
            for row in synthetic_conversations(args.conversations, args.seed, words_of(tokenizer)):
                f.write(json.dumps(row) + "\n")
        results = {"ours": measure("ours", data, tokenizer, root / "ours", args.workers)}
        results["loaded"] = measure("loaded", data, tokenizer, root / "ours", args.workers)
        for peer in args.peers.split(","):
            results[peer] = measure(peer, data, tokenizer, root / peer, args.workers)
        for name, result in results.items():
            print(f"{name}: {json.dumps(result)}")

    speed = {k: args.conversations / r["seconds"] for k, r in results.items() if "seconds" in r}
    peers = {k: v for k, v in speed.items() if k != "ours"}
    loaded = results["loaded"]
    summary = {
        "ours_conv_per_s": round(speed["ours"], 1),
        **{f"{k}_conv_per_s": round(v, 1) for k, v in peers.items()},
        "best_peer": max(peers, key=peers.get) if peers else None,
        "ratio_vs_best_peer": round(speed["ours"] / max(peers.values()), 3) if peers else None,
        "train_data_bytes_per_token": round(loaded["bytes_per_token"], 2),
        "train_data_rss_added_per_token": round(loaded["rss_added_per_token"], 2),
        "ours_peak_rss_mb": results["ours"]["peak_rss_mb"],
        **{
            f"{k}_peak_rss_mb": r["peak_rss_mb"]
            for k, r in results.items()
            if k not in ("ours", "loaded") and "peak_rss_mb" in r
        },
        "tokens": {k: r.get("tokens") for k, r in results.items()},
        "failed_peers": {k: r["error"] for k, r in results.items() if "error" in r},
        "setup": {
            "conversations": args.conversations,
            "our_workers": args.workers,
            "masks": "ours computes assistant masks (end-of-turn included); the peers compute none",
            "device": "cpu",
        },
    }
    summary["targets_met"] = {
        "ratio_vs_best_peer": summary["ratio_vs_best_peer"] is not None and summary["ratio_vs_best_peer"] >= 1.0,
        "train_data_bytes_per_token": summary["train_data_bytes_per_token"] <= MAX_BYTES_PER_TOKEN,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
