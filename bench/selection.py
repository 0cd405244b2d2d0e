"""Checkpoint selection policies measured as regret on held-out truth, over fresh seeds.

    .venv/bin/python bench/selection.py [--fresh-seeds 5] [--jobs 2] [--root <cache>/bench-selection]

Each seed trains the lab's skills phase (phase10's data, the demo recipe's schedule, from the
base model; training.seed = the seed) with a checkpoint every 640 samples, the average of the
last 3 checkpoints and the trainer's validation/loss. Every candidate (the start model, each
checkpoint, the average) is scored on the phase's selection split (lab_skills, 1,100 items);
every policy picks from those scores alone and the picks are written (picks.json); only then is
every candidate scored on the test split (lab_skills_test, 2,200 items, disjoint, never read by
a policy). Per seed and policy:

    regret   = test score of the test-oracle candidate - test score of the pick
    optimism = the pick's selection-split score - its test score

Seeds 0-4 fix each policy's parameter (earliest_within_noise's within_noise_confidence, smoothed's window:
the lowest mean regret) and the default (the policy with the lowest mean regret, ties in the
order of POLICIES). The fresh seeds (5, 6, ...) then measure every policy with those settings,
and for every other policy P the per-seed paired difference regret(default) - regret(P) with
its 95% t interval. The split's precision: for adjacent checkpoints (start, checkpoints in
samples order), q = the share of items they disagree on, and the 95% half-width of their
difference paired on items against unpaired (their standard errors combined as independent).

Seeds run `--jobs` at a time (each one training process, then evaluation, one thread each).
Everything a seed finished is kept under --root: a rerun resumes (a finished seed is read
back). The last line is one JSON object:
{"fresh_seeds", "default_policy", "policies": {NAME: {"mean_regret", "regret_stderr",
"mean_samples", "optimism"}}, "vs_default": {P: {"mean_diff", "upper95"}},
"paired_halfwidth", "unpaired_halfwidth"} (half-widths: medians over adjacent pairs of the
fresh seeds). Regrets depend on the seed and the CPU kind (floating point differs between CPUs),
not on the machine's load; the wall time depends on both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# Offline, one torch thread per process (as the Makefile sets them), unless the caller set them.
for variable, value in {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(variable, value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POLICIES = ("earliest_within_noise", "best", "smoothed", "last", "lowest_val_loss")
PARAMETERS: dict[str, list[dict[str, Any]]] = {
    "earliest_within_noise": [{"within_noise_confidence": c} for c in (0.5, 0.8, 0.95)],
    "smoothed": [{"smoothing_window": w} for w in (3, 5)],
}
TUNING_SEEDS = range(5)
SELECT, TEST = "lab_skills/exact_match", "lab_skills_test/exact_match"
PHASE = {
    "name": "skills",
    "data": ["embedded://curriculum/phase10/train.jsonl"],
    "objective": {SELECT: 1.0},
}


def settings(policy: str) -> list[dict[str, Any]]:
    return PARAMETERS.get(policy, [{}])


def label(policy: str, params: dict[str, Any]) -> str:
    return policy + "".join(f" {k}={v}" for k, v in params.items())


def recipe(seed: int, tasks: list[str]) -> Any:
    from core.recipe import resolve

    overrides = {
        "phases": [PHASE],
        "training.seed": seed,
        "checkpointing.save_every_samples": 640,
        "selection.average_last_k": 3,
        "evaluation.tasks": tasks,
        "evaluation.devices": None,
        "evaluation.limit": None,  # every item of both splits
    }
    return resolve("demo", overrides=overrides)


def score(cfg: Any, name: str, uri: str, samples: int, out: Path, averaged: bool = False) -> Any:
    """The model's scores on cfg's tasks, from <out> (lm-eval run once, then read back)."""
    from core import storage
    from core.items import items_uri
    from evaluation.selection import CheckpointScore
    from evaluation.worker import run_lm_eval

    result = storage.read_json(str(out)) if out.exists() else run_lm_eval(cfg, uri, samples, str(out))
    return CheckpointScore(
        checkpoint=uri,
        name=name,
        samples=samples,
        metrics=result["metrics"],
        stderr=result["stderr"],
        items=[items_uri(str(out))],
        averaged=averaged,
    )


def scores_and_picks(cfg: Any, models: list[tuple[str, str, int, bool]], work: Path) -> list[Any]:
    """Score (name, uri, samples, averaged) models on the selection split into <work>/eval/, write
    every policy's pick to <work>/picks.json, return the scores. Nothing here reads a test split."""
    from core import storage
    from core.recipe import SelectionConfig
    from evaluation.selection import select, with_validation

    scores = [score(cfg, n, u, s, work / "eval" / n / "lm_eval.json", a) for n, u, s, a in models]
    scores = [with_validation(s, str(work), "phase", s.name) for s in scores]  # the trainer's validation/loss
    picks = {}
    for policy in POLICIES:
        for params in settings(policy):
            config = SelectionConfig(policy=policy, **params)
            chosen = select(cfg.phases[0], scores[0], scores[1:], config=config).winner
            picks[label(policy, params)] = {"name": chosen.name, "samples": chosen.samples}
    storage.write_json(str(work / "picks.json"), picks)
    return scores


def run_seed(seed: int, root: Path) -> dict[str, Any]:
    """One seed: train, score on the selection split, write every policy's picks, then score on the
    test split; returns (and keeps in <root>/seed<k>/result.json) what the report needs."""
    from transformers import AutoTokenizer

    from core import storage
    from core.chat import apply_template
    from core.items import read_items
    from core.records import FINISHED
    from evaluation import paired
    from training.averaging import average_checkpoints
    from training.data import phase_conversations, prepare
    from training.job import TrainJob
    from training.launch.checkpoints import complete_checkpoints
    from training.launch.local import run_training

    work = root / f"seed{seed}"
    if (work / "result.json").exists():
        return json.loads((work / "result.json").read_text())
    started = time.perf_counter()
    cfg = recipe(seed, ["lab_skills"])
    base = storage.resolve_embedded(cfg.model.name_or_path)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "phase" / FINISHED).exists():
        tokenizer = apply_template(AutoTokenizer.from_pretrained(base), cfg.model.chat_template)
        conversations, _, files = phase_conversations(cfg.phases, 0)
        prepare(
            conversations,
            tokenizer,
            str(work / "data"),
            cfg.training.max_seq_len,
            seed=seed,
            files=files,
            validation_samples=cfg.training.validation_samples,
        )
        job = TrainJob(
            run_id=f"bench-seed{seed}",
            phase="skills",
            recipe=cfg,
            model_path=base,
            parent_checkpoint=base,
            data_dir=str(work / "data"),
            output_dir=str(work / "phase"),
        )
        with open(work / "train.log", "a") as log:
            run_training(job, on_line=lambda line: print(line, file=log, flush=True))
    checkpoints = complete_checkpoints(work / "phase")
    averaged = work / "phase" / "averaged" / "avg_last3"
    if not (averaged / "meta.json").exists():
        average_checkpoints(checkpoints[-3:], averaged)
    models = [
        ("start", base, 0, False),
        *[(p.name, str(p), int(p.name.removeprefix("samples_")), False) for p in checkpoints],
        ("avg_last3", str(averaged), int(checkpoints[-1].name.removeprefix("samples_")), True),
    ]
    selection_scores = scores_and_picks(cfg, models, work)  # writes picks.json before any test-split score
    picks = json.loads((work / "picks.json").read_text())

    test_cfg = recipe(seed, ["lab_skills_test"])
    tests = {n: score(test_cfg, n, u, s, work / "eval" / n / "test.json").metrics[TEST] for n, u, s, _ in models}
    curve = selection_scores[:-1]  # start and checkpoints in samples order
    pairs = []
    for a, b in zip(curve, curve[1:], strict=False):
        x, y = read_items(a.items), read_items(b.items)
        diff = paired.difference({SELECT: 1.0}, y, x)
        shared = paired.per_metric(x, SELECT, a.name).align(paired.per_metric(y, SELECT, b.name), join="inner")
        pairs.append(
            {
                "pair": f"{a.name}->{b.name}",
                "q": float((shared[0] != shared[1]).mean()),
                "paired_halfwidth": (diff.high - diff.low) / 2,
                "unpaired_halfwidth": paired.unpaired_halfwidth({SELECT: 1.0}, y, x),
            }
        )
    result = {
        "seed": seed,
        "selection": {s.name: s.metrics[SELECT] for s in selection_scores},
        "test": tests,
        "picks": picks,
        "pairs": pairs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    storage.write_json(str(work / "result.json"), result)
    return result


def regrets(result: dict[str, Any], policy: str) -> dict[str, float]:
    """regret, optimism and samples of the policy's pick in one seed."""
    pick = result["picks"][policy]
    test = result["test"][pick["name"]]
    return {
        "regret": max(result["test"].values()) - test,
        "optimism": result["selection"][pick["name"]] - test,
        "samples": pick["samples"],
    }


def mean_of(results: list[dict[str, Any]], policy: str, key: str) -> float:
    return statistics.fmean(regrets(r, policy)[key] for r in results)


def t_upper(values: list[float]) -> float:
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.fmean(values) + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh-seeds", type=int, default=5, help="seeds after the 5 tuning seeds (K >= 5)")
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at once (one core each)")
    parser.add_argument("--root", type=Path, default=None, help="where seeds are kept (resumable)")
    args = parser.parse_args()
    if args.fresh_seeds < 2:
        parser.error("--fresh-seeds must be at least 2 (a paired interval needs a spread)")
    from core.recipe import SelectionConfig
    from embedded import build_assets, default_cache_dir

    started = time.perf_counter()
    build_assets(progress=print)
    root = args.root or default_cache_dir() / "bench-selection"
    seeds = [*TUNING_SEEDS, *range(len(TUNING_SEEDS), len(TUNING_SEEDS) + args.fresh_seeds)]
    results = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {seed: pool.submit(run_seed, seed, root) for seed in seeds}
        for seed, future in futures.items():
            try:
                results[seed] = future.result()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # fail now, not after every queued seed
                raise
            r = results[seed]
            print(
                f"seed {seed}: {len(r['test'])} candidates, test oracle {max(r['test'].values()):.3f} ({r['seconds']} s)",
                flush=True,
            )
    tuning = [results[s] for s in TUNING_SEEDS]
    fresh = [results[s] for s in seeds[len(TUNING_SEEDS) :]]

    chosen = {
        p: label(p, min(settings(p), key=lambda params: mean_of(tuning, label(p, params), "regret"))) for p in POLICIES
    }
    print("\ntuning seeds 0-4: mean regret per setting")
    for p in POLICIES:
        for params in settings(p):
            name = label(p, params)
            print(f"  {name:<52} {mean_of(tuning, name, 'regret'):.4f}{'  <- chosen' if chosen[p] == name else ''}")
    default = min(POLICIES, key=lambda p: mean_of(tuning, chosen[p], "regret"))
    print(f"default policy (lowest mean regret on seeds 0-4): {chosen[default]}")
    shipped = SelectionConfig()
    if label(shipped.policy, {k: getattr(shipped, k) for k in settings(shipped.policy)[0]}) != chosen[default]:
        print(f"WARNING: selection.policy's default in core/recipe.py differs: {shipped.policy}")

    policies, versus = {}, {}
    print(f"\nfresh seeds {seeds[len(TUNING_SEEDS)]}-{seeds[-1]} (K = {len(fresh)})")
    print(
        f"  {'policy':<52} {'mean regret':>11} {'stderr':>7} {'samples':>8} {'optimism':>9}   vs default: mean, upper95"
    )
    for p in POLICIES:
        per_seed = [regrets(r, chosen[p])["regret"] for r in fresh]
        policies[p] = {
            "mean_regret": round(statistics.fmean(per_seed), 4),
            "regret_stderr": round(statistics.stdev(per_seed) / math.sqrt(len(per_seed)), 4),
            "mean_samples": round(mean_of(fresh, chosen[p], "samples"), 1),
            "optimism": round(mean_of(fresh, chosen[p], "optimism"), 4),
        }
        line = f"  {chosen[p]:<52} {policies[p]['mean_regret']:>11.4f} {policies[p]['regret_stderr']:>7.4f} "
        line += f"{policies[p]['mean_samples']:>8.0f} {policies[p]['optimism']:>9.4f}"
        if p != default:
            diffs = [regrets(r, chosen[default])["regret"] - regrets(r, chosen[p])["regret"] for r in fresh]
            versus[p] = {"mean_diff": round(statistics.fmean(diffs), 4), "upper95": round(t_upper(diffs), 4)}
            line += f"   {versus[p]['mean_diff']:+.4f}, {versus[p]['upper95']:+.4f}"
        print(line)

    pairs = [pair for r in fresh for pair in r["pairs"]]
    paired_w = [p["paired_halfwidth"] for p in pairs]
    unpaired_w = [p["unpaired_halfwidth"] for p in pairs]
    q = statistics.median(p["q"] for p in pairs)
    print(
        f"\nadjacent checkpoints ({len(pairs)} pairs): median q {q:.3f} (n = 4268 q = {4268 * q:.0f} items for a "
        f"0.03 half-width); 95% half-width paired median {statistics.median(paired_w):.4f} max {max(paired_w):.4f}, "
        f"unpaired median {statistics.median(unpaired_w):.4f} max {max(unpaired_w):.4f}"
    )
    print(f"wall time {time.perf_counter() - started:.0f} s ({args.jobs} jobs)")
    print(
        json.dumps(
            {
                "fresh_seeds": len(fresh),
                "default_policy": default,
                "policies": policies,
                "vs_default": versus,
                "paired_halfwidth": round(statistics.median(paired_w), 4),
                "unpaired_halfwidth": round(statistics.median(unpaired_w), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
