"""A whole phase, training and evaluation: ours (evaluation beside training) vs sequential.

    .venv/bin/python bench/eval_throughput.py [--epochs 2] [--limit 40] [--judge-latency 1.0]

Both sides run the same phase of the lab (phase00, the demo recipe's training) under Prefect, and
score the start model and every checkpoint on the three lab lm-eval tasks and on MT-Bench, judged
by the scripted OpenAI-compatible judge of tests/judge_server.py over real HTTP with the same
fixed latency per request (like a hosted judge), each side with an empty judgment cache.

  sequential  the honest peer, what one does by hand: train (the same training task), then per
              model one lm-eval call with the whole task list (one model load) and its MT-Bench
              answers, in the flow's process (no worker to start), then one judging pass over all
              answers at 8 concurrent requests (FastChat's `gen_judgment.py --parallel 8`)
  ours        `finetune` with evaluation.devices = cpu:1: each model's evaluation is a task run,
              submitted as its checkpoint lands; a worker process on the second core evaluates it
              beside training, training's core takes queued models once training ends, and each
              model is judged (8 concurrent requests) as soon as its answers are written

The scores of both sides are compared (they must be identical). The last line is one JSON
object: both wall times and `speedup` (target >= 1.5 on 2 cores). Timings vary with the
machine and with whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow  # noqa: E402

import tasks.finetune  # noqa: E402
from core import storage  # noqa: E402
from core.recipe import resolve  # noqa: E402
from embedded import build_assets  # noqa: E402
from evaluation import worker  # noqa: E402
from tasks.finetune import ModelRef, init_run, judge_and_write, prepare_data, train_phase  # noqa: E402
from tests.judge_server import JudgeServer  # noqa: E402

MT_BENCH_DATA = Path(__file__).resolve().parents[2] / "shared" / "mt_bench"


def phase_overrides(args: argparse.Namespace, judge_url: str, devices: str | None) -> dict:
    return {
        "phases": [
            {
                "name": "phase00",
                "data": ["embedded://curriculum/phase00/train.jsonl"],
                "objective": {"lab_instruction/rule_acc": 1.0},
            }
        ],
        "training.epochs": args.epochs,
        "checkpointing.save_every_samples": args.save_every,
        "evaluation.limit": args.limit,
        "evaluation.devices": devices,
        "evaluation.mt_bench": {
            "question_file": str(MT_BENCH_DATA / "question.jsonl"),
            "judge_prompt_file": str(MT_BENCH_DATA / "judge_prompts.jsonl"),
            "reference_file": str(MT_BENCH_DATA / "reference_answer_gpt-4.jsonl"),
            "judge_base_url": judge_url,
            "judge_model": "bench-judge",
            "judge_api_key_env": "RECIPE_LAB_BENCH_NO_KEY",
            "question_limit": args.questions,
            "max_new_tokens": 32,
            "concurrency": 8,
        },
    }


@flow(name="sequential-peer")
def sequential_peer(overrides: dict, storage_root: str, run_id: str) -> None:
    """Train the phase; then each model's lm-eval tasks and MT-Bench answers here, one model after
    the other; then one judging pass over every model's answers."""
    cfg = resolve("demo", overrides=overrides)
    run_uri = storage.join(storage_root, run_id)
    init_run(run_uri, run_id, cfg)
    phase = cfg.phases[0]
    prepare_data(cfg, phase, run_uri)
    start = ModelRef(name="base", uri=cfg.model.name_or_path, samples=0)
    models = [start, *train_phase(cfg, phase, run_uri, run_id, start)]
    eval_dirs = {m.name: storage.join(run_uri, phase.name, "eval", m.name) for m in models}
    answers = {m.name: storage.join(eval_dirs[m.name], worker.MT_BENCH_ANSWERS_FILE) for m in models}
    for m in models:
        worker.run_lm_eval(cfg, m.uri, m.samples, storage.join(eval_dirs[m.name], worker.LM_EVAL_FILE))
        worker.run_mt_bench_answers(cfg, m.uri, answers[m.name])
    judge_and_write(cfg, answers, eval_dirs)


def scores(run: Path) -> dict[str, dict[str, float]]:
    out = {}
    for suite in ("lm_eval.json", "mt_bench.json"):
        for path in sorted((run / "phase00" / "eval").glob(f"*/{suite}")):
            out.setdefault(path.parent.name, {}).update(json.loads(path.read_text())["metrics"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--save-every", type=int, default=800, help="checkpoint every N samples")
    parser.add_argument("--limit", type=int, default=60, help="lm-eval items per task")
    parser.add_argument("--questions", type=int, default=1, help="MT-Bench questions per category")
    # A GPT-4-class judge takes seconds per single-answer judgment; 1 s is on the fast side.
    parser.add_argument("--judge-latency", type=float, default=1.0, help="seconds per judge request")
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from flows.finetune import finetune

    build_assets(progress=print)
    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    timings, results = {}, {}
    with (
        prefect_test_harness(server_startup_timeout=90),
        JudgeServer(api_key=None, latency_s=args.judge_latency) as judge,
    ):
        for side in ("sequential", "ours"):
            cache = work / side / "judgments"  # each side pays for its own judgments
            tasks.finetune.mt_bench_cache_dir = lambda cache=cache: cache
            t0 = time.perf_counter()
            if side == "sequential":
                sequential_peer(phase_overrides(args, judge.base_url, None), str(work / side), "bench")
            else:
                finetune(
                    recipe="demo",
                    overrides=phase_overrides(args, judge.base_url, "cpu:1"),
                    storage_root=str(work / side),
                    run_id="bench",
                )
            timings[side] = round(time.perf_counter() - t0, 2)
            results[side] = scores(work / side / "bench")
            print(f"{side:>10}: {timings[side]:8.2f} s ({len(results[side])} models)", flush=True)
        judged = len(judge.requests)
    identical = results["sequential"] == results["ours"]
    print(f"identical scores: {identical}")
    print(
        json.dumps(
            {
                "models": len(results["ours"]),
                "epochs": args.epochs,
                "lm_eval_limit": args.limit,
                "mt_bench_questions_per_category": args.questions,
                "judge_latency_s": args.judge_latency,
                "judge_requests": judged,
                "identical_scores": identical,
                "sequential_s": timings["sequential"],
                "ours_s": timings["ours"],
                "speedup": round(timings["sequential"] / timings["ours"], 2),
            }
        )
    )
    if not identical:
        sys.exit("scores differ between the two sides")


if __name__ == "__main__":
    main()
