"""GPU check, evaluation part: one HF evaluation of one checkpoint of a ~1B Llama on one GPU, to
calibrate `lab plan`'s estimate of minutes per checkpoint (training/placement.py).

    python bench/gpu_eval.py --out DIR [--model DIR] [--budget-s 30]   (a CUDA machine; bench/gpu_check.sh
                                                                        runs it under a 70 s cap)
    python bench/gpu_eval.py --out DIR --dry-run                        (CPU, a tiny model: the script's paths)

The device machine has torch and transformers, but neither lm-eval nor a network, so this runs the
work lm-eval's HFLM does for a checkpoint, with the project's own loading and generation settings
(evaluation.device.load_causal_lm, core.chat.configure_generation), on synthetic token ids:

  1. load        the checkpoint (--model, else a random-init Llama 3.2 1B shape built here) onto the GPU
  2. choices     forward passes of evaluation.batch_size (prompt + choice) rows, log-probabilities of
                 the choice tokens: prompt tokens/s (lm-eval's multiple-choice work)
  3. generation  greedy batches of evaluation.batch_size prompts, each run to its cap: seconds per
                 decode step (random weights never stop early, so every batch runs to the cap)

From the measured rates it projects one checkpoint of the lab preset's suite (ifeval, mmlu, gsm8k)
on this model, every generation batch to its cap: an UPPER BOUND (a trained model stops early),
next to the estimate `lab plan` makes for the same model from its assumed rates (HF_MFU,
HF_STEP_S, LOAD_BYTES_PER_S); the ratios say how to recalibrate them. Each part stops at its share
of --budget-s (rates come from what was done; building and loading the model come on top, so the
default fits gpu_check.sh's 70 s cap); <--out>/gpu_eval.json is rewritten after every part, so a
kill keeps what was measured. The last line is the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[key] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from gpu_check import LLAMA_1B, TINY, build_model  # noqa: E402

CHOICE_PROMPT_TOKENS, CHOICES = 200, 4  # mmlu's shape in training.placement.TASK_SIZES
GENERATION_PROMPT_TOKENS, GENERATION_CAP = 900, 256  # gsm8k's


class Report:
    """The JSON summary, rewritten to `path` after each part."""

    def __init__(self, path: Path, **fields: object) -> None:
        self.path, self.data = path, dict(fields)

    def add(self, **fields: object) -> None:
        self.data.update(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")
        print(json.dumps(fields), flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fits_another(start: float, done: int, budget_s: float) -> bool:
    """Whether one more batch, as long as the mean one so far, ends within the budget (no overrun of a cap)."""
    elapsed = time.perf_counter() - start
    return elapsed * (done + 1) / done <= budget_s


def choice_rate(model: torch.nn.Module, vocab: int, batch: int, prompt: int, budget_s: float) -> dict:
    """Prompt tokens/s of lm-eval's loglikelihood batches: (prompt + 1 choice token) rows."""
    g = torch.Generator().manual_seed(2)
    rows, start = 0, time.perf_counter()
    with torch.no_grad():
        while rows == 0 or fits_another(start, rows // batch, budget_s):
            ids = torch.randint(2, vocab, (batch, prompt + 1), generator=g).to(model.device)
            logits = model(ids).logits[:, -2, :].float()
            torch.log_softmax(logits, dim=-1).gather(-1, ids[:, -1:]).sum().item()
            rows += batch
    synchronize(model.device)
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": round(seconds, 2), "prefill_tokens_per_s": round(rows * (prompt + 1) / seconds, 1)}


def generation_rate(model: torch.nn.Module, vocab: int, batch: int, prompt: int, cap: int, budget_s: float) -> dict:
    """Seconds per decode step of greedy batched generation to the cap (the model's own generation config)."""
    g = torch.Generator().manual_seed(3)
    batches, start = 0, time.perf_counter()
    with torch.no_grad():
        while batches == 0 or fits_another(start, batches, budget_s):
            ids = torch.randint(2, vocab, (batch, prompt), generator=g).to(model.device)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cap, min_new_tokens=cap)
            batches += 1
    synchronize(model.device)
    seconds = time.perf_counter() - start
    return {"batches": batches, "seconds": round(seconds, 2), "step_s": round(seconds / (batches * cap), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model: the script's paths without a GPU")
    parser.add_argument("--model", type=Path, help="a saved checkpoint (default: a random 1B built here)")
    parser.add_argument(
        "--budget-s", type=float, help="seconds for the measurements, build and load excluded (30; dry run 8)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="directory for gpu_eval.json"
    )
    args = parser.parse_args()
    on_gpu = not args.dry_run
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU dry run of the script")
    budget_s = args.budget_s or (30.0 if on_gpu else 8.0)

    from core.chat import configure_generation
    from core.recipe import load_recipe
    from evaluation.device import load_causal_lm
    from training.placement import HFRates, hf_checkpoint_s, suite
    from training.plan import ModelShape

    t0 = time.perf_counter()
    model_dir = args.model
    if model_dir is None:
        model_dir = Path(tempfile.mkdtemp(prefix="gpu-eval-")) / "model"
        build_model(model_dir, LLAMA_1B if on_gpu else TINY, "cuda" if on_gpu else "cpu")
    batch = 16 if on_gpu else 4  # the lab preset's evaluation.batch_size
    recipe = load_recipe(
        "lab", {"model.name_or_path": str(model_dir), "launch.num_processes": 1, "evaluation.batch_size": batch}
    )
    prompt, cap = (GENERATION_PROMPT_TOKENS, GENERATION_CAP) if on_gpu else (32, 8)
    config = json.loads((model_dir / "config.json").read_text())
    shape = ModelShape.from_config(config)
    report = Report(
        args.out / "gpu_eval.json",
        device=torch.cuda.get_device_name(0) if on_gpu else "cpu (dry run)",
        params=shape.params,
        batch_size=batch,
        upper_bound=True,
        note="random weights generate to every cap: the projection is an upper bound for this model",
    )

    from transformers import AutoTokenizer

    start = time.perf_counter()
    model = load_causal_lm(str(model_dir), "auto")
    configure_generation(model, AutoTokenizer.from_pretrained(model_dir))
    synchronize(model.device)
    report.add(load_s=round(time.perf_counter() - start, 2), dtype=str(model.dtype).removeprefix("torch."))

    vocab = config["vocab_size"]
    choices = choice_rate(model, vocab, batch, CHOICE_PROMPT_TOKENS if on_gpu else 16, 0.35 * budget_s)
    report.add(choices=choices)
    generation = generation_rate(model, vocab, batch, prompt, cap, 0.6 * budget_s)
    report.add(generation=generation)

    measured = HFRates(report.data["load_s"], choices["prefill_tokens_per_s"], generation["step_s"])
    assumed = HFRates.assumed(recipe, shape)
    tasks, _ = suite(recipe)
    projected = hf_checkpoint_s(recipe, shape, tasks, measured, to_cap=True)
    estimated = hf_checkpoint_s(recipe, shape, tasks, assumed, to_cap=True)
    report.add(
        suite=list(recipe.evaluation.tasks),
        projected_minutes_per_checkpoint_upper_bound=round(projected / 60, 2),
        estimated_minutes_per_checkpoint_to_cap=round(estimated / 60, 2),
        measured_over_assumed={
            name: float(f"{getattr(measured, name) / getattr(assumed, name):.3g}")
            for name in ("load_s", "prefill_tokens_per_s", "step_s")
        },
        wall_s=round(time.perf_counter() - t0, 1),
    )
    print(json.dumps(report.data))


if __name__ == "__main__":
    main()
