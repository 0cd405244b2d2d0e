"""Checkpoint evaluation: ours vs the naive sequence, measured in one run on the lab.

    .venv/bin/python bench/eval_throughput.py [--checkpoints 3] [--judge-latency 0.25]

Both sides score N checkpoints of the tiny lab model on the three lab lm-eval tasks and on
MT-Bench (answers generated with transformers, judged by the scripted OpenAI-compatible judge
of tests/judge_server.py over real HTTP, with a fixed latency per request like a hosted API).

  ours   one model load per checkpoint for all lm-eval tasks; every checkpoint's MT-Bench
         answers first, then one concurrent judging pass (judge cache starts empty)
  naive  one model load per lm-eval task; each checkpoint judged as it comes, one request
         at a time, no cache

The last line is one JSON object: both wall times and `speedup` (target >= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import mt_bench  # noqa: E402
from evaluation.lm_eval_runner import LAB_TASKS, evaluate_model, write_lab_tasks  # noqa: E402
from tests.judge_server import JudgeServer  # noqa: E402
from training.embedded import build_assets  # noqa: E402
from training.recipe import EvaluationConfig, MTBenchConfig  # noqa: E402

MT_BENCH_DATA = Path(__file__).resolve().parents[2] / "shared" / "mt_bench"


def answers_of(model_dir: Path, config: MTBenchConfig, data: mt_bench.MTBenchData) -> list[mt_bench.Answer]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return mt_bench.generate_answers(model, AutoTokenizer.from_pretrained(model_dir), data.questions, config)


def ours(
    checkpoints: list[Path], lm_eval: EvaluationConfig, task_dir: Path, config: MTBenchConfig, data, cache: Path
) -> None:
    for ckpt in checkpoints:
        evaluate_model(str(ckpt), lm_eval, task_dir)
    answers = {c.name: answers_of(c, config, data) for c in checkpoints}
    mt_bench.judge_answers(answers, data, config, cache_dir=cache)


def naive(
    checkpoints: list[Path], lm_eval: EvaluationConfig, task_dir: Path, config: MTBenchConfig, data, cache_root: Path
) -> None:
    sequential = config.model_copy(update={"concurrency": 1})
    for ckpt in checkpoints:
        for task in lm_eval.tasks:
            evaluate_model(str(ckpt), lm_eval.model_copy(update={"tasks": [task]}), task_dir)
        # No cache: a fresh directory every time, so nothing is ever reused.
        cache = Path(tempfile.mkdtemp(dir=cache_root))
        mt_bench.judge_answers({ckpt.name: answers_of(ckpt, config, data)}, data, sequential, cache_dir=cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--limit", type=int, default=50, help="lm-eval items per task")
    # A GPT-4-class judge takes seconds per single-answer judgment; 1 s is on the fast side.
    parser.add_argument("--judge-latency", type=float, default=1.0, help="seconds per judge request")
    args = parser.parse_args()

    assets = build_assets(progress=print)
    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    checkpoints = []
    for i in range(args.checkpoints):
        shutil.copytree(assets.base_model_dir, work / f"samples_{(i + 1) * 1000}")
        checkpoints.append(work / f"samples_{(i + 1) * 1000}")
    task_dir = write_lab_tasks(work / "tasks", assets.curriculum_dir, max_gen_tokens=16)
    lm_eval = EvaluationConfig(tasks=list(LAB_TASKS), limit=args.limit, batch_size=16)

    timings = {}
    with JudgeServer(api_key=None, latency_s=args.judge_latency) as judge:
        config = MTBenchConfig(
            question_file=str(MT_BENCH_DATA / "question.jsonl"),
            judge_prompt_file=str(MT_BENCH_DATA / "judge_prompts.jsonl"),
            reference_file=str(MT_BENCH_DATA / "reference_answer_gpt-4.jsonl"),
            judge_base_url=judge.base_url,
            judge_model="bench-judge",
            judge_api_key_env="RECIPE_LAB_BENCH_NO_KEY",
            question_limit=1,
            max_new_tokens=32,
        )
        data = mt_bench.load_mt_bench(config)
        # Untimed warm-up, so neither side pays for first-use costs (dataset cache, imports).
        evaluate_model(str(checkpoints[0]), lm_eval, task_dir)
        answers_of(checkpoints[0], config, data)
        for name, run in (("naive", naive), ("ours", ours)):
            t0 = time.perf_counter()
            run(checkpoints, lm_eval, task_dir, config, data, Path(tempfile.mkdtemp(dir=work)))
            timings[name] = round(time.perf_counter() - t0, 2)
            print(f"{name:>6}: {timings[name]:8.2f} s", flush=True)
        judged = len(judge.requests)  # both sides together
    shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "checkpoints": args.checkpoints,
                "lm_eval_tasks": len(LAB_TASKS),
                "lm_eval_limit": args.limit,
                "mt_bench_questions": len(data.questions),
                "judge_latency_s": args.judge_latency,
                "judge_requests": judged,
                "naive_s": timings["naive"],
                "ours_s": timings["ours"],
                "speedup": round(timings["naive"] / timings["ours"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
