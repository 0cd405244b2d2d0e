"""The `reproduce` flow (`lab reproduce`): the paper's comparisons, scaled down to the lab.

Each experiment is a `finetune` (or `sweep`) with a fixed run id under <root>/reproduce/, so
a re-run resumes: finished runs are read back, not trained again. The hyperparameter
experiments train one phase (the lab's knowledge phase, 2,076 samples, 2 epochs, scored by
multiple-choice accuracy on its 200-question selection split) so that they fit a laptop CPU; stacked vs
phased uses the full `demo` recipe.

Every arm runs with `seeds` seeds (training.seed = 0 .. K-1: data order and fine-tune
initialisation), paired across arms; each arm is reported as mean +- 95% CI and each claim
gets agree / disagree / inconclusive by the stated rule of evaluation/findings.py. The LR
sweep also scores every pruner (evaluation/pruning.py) on every seed.

CPU budget: about 16 minutes per seed on 2 cores (one seed measured 16m22s; see README).
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from pydantic import BaseModel, Field

from core import storage
from core.items import read_items
from evaluation import findings as rules
from evaluation import paired, report
from evaluation.pruning import PRUNERS
from evaluation.selection import Selection
from flows.finetune import finetune
from flows.sweep import sweep

KNOWLEDGE = {
    "phases": [
        {
            "name": "knowledge",
            "data": ["embedded://curriculum/phase05/train.jsonl"],
            "objective": {"lab_knowledge/acc": 1.0},
        }
    ],
    "training.epochs": 2,
    "checkpointing.save_every_samples": 800,
    "evaluation.tasks": ["lab_knowledge"],
}
METRIC = "lab_knowledge/acc"
LAB_METRICS = ["lab_instruction/rule_acc", "lab_knowledge/acc", "lab_skills/exact_match"]
LR_GRID = [5e-4, 1e-3, 2e-3, 4e-3]


@task(name="read-winner")
def read_winner(run_uri: str, phases: list[str]) -> dict[str, Any]:
    """The final phase's winner: objective, metrics, stderr, per-item records and cumulative samples to reach it."""
    offset = 0
    for phase in phases:
        selection = Selection.model_validate(storage.read_json(storage.join(run_uri, phase, "selection.json")))
        samples_before, offset = offset, offset + report.read_metrics(storage.join(run_uri, phase))[-1].samples_seen
    w = selection.winner
    return {
        "objective": w.objective,
        "metrics": w.metrics,
        "stderr": w.stderr,
        "items": w.items,
        "samples_to_peak": samples_before + w.samples,
    }


def knowledge_runs(name: str, root: str, overrides: dict[str, Any], seeds: list[int]) -> list[dict[str, Any]]:
    """One arm of a hyperparameter experiment: the knowledge phase, once per seed."""
    winners = []
    for seed in seeds:
        run_id = f"reproduce-{name}-seed{seed}"
        finetune(
            recipe="demo", overrides={**KNOWLEDGE, **overrides, "training.seed": seed}, storage_root=root, run_id=run_id
        )
        winners.append(read_winner(storage.join(root, run_id), ["knowledge"]))
    return winners


def scores(runs: list[dict[str, Any]], metric: str = METRIC) -> list[float]:
    return [r["metrics"][metric] for r in runs]


def item_stderr(a: list[dict[str, Any]], b: list[dict[str, Any]], weights: dict[str, float]) -> float:
    """With one seed, the stderr of A - B paired on the items both winners were scored on (the
    interval's fallback); with more, 0: the seeds' spread decides."""
    if len(a) > 1:
        return 0.0
    return paired.difference(weights, read_items(a[0]["items"]), read_items(b[0]["items"])).stderr


def power(e: rules.Estimate) -> dict[str, str]:
    """A finding's minimum detectable effect at 80% power, and the seeds an MDE of 0.03 needs."""
    if e.source == "stderr" and not e.se:
        return {"mde_80": "n/a", "seeds_for_0.03": "n/a (1 seed)"}
    seeds = e.seeds_for()
    return {"mde_80": f"{e.mde():.3f}", "seeds_for_0.03": str(seeds) if seeds else "n/a (1 seed)"}


def compare(claim: str, rule: str, names: tuple[str, str], a: list[float], b: list[float], se: float) -> dict[str, Any]:
    """A finding row for "A beats B" or "A is not worse than B" over paired seeds (`se`: the
    item-paired stderr of A - B, for one seed)."""
    difference = rules.paired_difference(a, b, se)
    verdict = rules.beats(difference) if rule == "beats" else rules.not_worse(difference)
    return {
        "claim": claim,
        "measured": f"{names[0]} {rules.estimate(a)} vs {names[1]} {rules.estimate(b)}; "
        f"difference {difference} (95% CI [{difference.low:.3f}, {difference.high:.3f}], {describe(difference)})",
        "rule": rules.RULES[rule],
        "verdict": verdict,
        **power(difference),
    }


def describe(e: rules.Estimate) -> str:
    return f"{e.n} seeds" if e.source == "seeds" else "1 seed: the evaluation's item-paired stderr only"


class ReproduceResult(BaseModel):
    findings: list[dict[str, Any]] = Field(
        description="Rows of claim, measured, rule, verdict, mde_80, seeds_for_0.03."
    )
    pruners: list[dict[str, Any]] = Field(description="Each pruner validated on the LR sweep across seeds.")


@flow(name="reproduce")
def reproduce(storage_root: str = "./runs", seeds: int = 1) -> ReproduceResult:
    """Run the scaled-down comparisons with `seeds` seeds per arm; return the findings table
    (claim, measured, rule, verdict) and the pruners' validation across seeds."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    root = storage.join(os.path.abspath(storage_root) if storage.is_local(storage_root) else storage_root, "reproduce")
    progress = create_progress_artifact(progress=0.0, key="reproduce-progress", description="lab reproduce")
    seed_list = list(range(seeds))
    findings = []

    # 1. Stacked vs phased (paper 3.1): similar scores, stacked reaches its peak with fewer samples.
    runs: dict[str, list[dict[str, Any]]] = {"phased": [], "stacked": []}
    for seed in seed_list:
        for strategy in runs:
            run_id = f"reproduce-{strategy}-seed{seed}"
            result = finetune(
                recipe="demo", strategy=strategy, overrides={"training.seed": seed}, storage_root=root, run_id=run_id
            )
            runs[strategy].append(read_winner(storage.join(root, run_id), [p.phase for p in result.phases]))
    mean = {s: [sum(r["metrics"][m] for m in LAB_METRICS) / 3 for r in rs] for s, rs in runs.items()}
    row = compare(
        "stacked scores like phased (or better) and needs fewer samples to peak",
        "not_worse",
        ("stacked", "phased"),
        mean["stacked"],
        mean["phased"],
        item_stderr(runs["stacked"], runs["phased"], {m: 1 / 3 for m in LAB_METRICS}),
    )
    fewer = [s["samples_to_peak"] < p["samples_to_peak"] for s, p in zip(runs["stacked"], runs["phased"], strict=True)]
    row["measured"] = (
        "mean of 3 lab metrics: " + row["measured"] + f"; fewer samples to peak in {sum(fewer)}/{seeds} seeds"
    )
    row["rule"] += "; and fewer samples to peak in every seed (none: disagree)"
    row["verdict"] = rules.combine(row["verdict"], rules.consistent(fewer))
    findings.append(row)
    update_progress_artifact(progress, progress=35.0)

    # 2. Batch size (paper 3.2): larger effective batches give better final scores.
    small = knowledge_runs("ebs16", root, {"training.effective_batch_size": 16}, seed_list)
    large = knowledge_runs("ebs128", root, {"training.effective_batch_size": 128}, seed_list)
    findings.append(
        compare(
            "a larger effective batch gives a better final score",
            "beats",
            ("EBS 128", "EBS 16"),
            scores(large),
            scores(small),
            item_stderr(large, small, {METRIC: 1.0}),
        )
    )
    update_progress_artifact(progress, progress=50.0)

    # 3. Learning rate sweep (paper 3.7): the early ranking predicts the final one; every pruner validated.
    sweeps = [
        sweep(
            recipe="demo",
            grid={**{k: [v] for k, v in KNOWLEDGE.items()}, "training.seed": [seed], "training.learning_rate": LR_GRID},
            rungs=[480],
            eta=2,
            pruner="dynamics",
            validate_ranking=True,
            storage_root=root,
            sweep_id=f"reproduce-lr-seed{seed}",
        )
        for seed in seed_list
    ]
    pruners = []
    for pruner in PRUNERS:
        checks = [next(v for v in s.validation if v.pruner == pruner) for s in sweeps]
        rhos = [c.spearman_first_rung for c in checks if c.spearman_first_rung is not None]
        pruners.append(
            {
                "pruner": pruner,
                "spearman_first_rung": str(rules.estimate(rhos)) if rhos else "undefined",
                "winner_survived": f"{sum(bool(c.winner_survived) for c in checks)}/{seeds}",
                "samples_saved": round(sum(c.samples_saved for c in checks) / seeds),
                "rho_per_seed": ", ".join(f"{r:.3f}" for r in rhos),
            }
        )
    paper = next(p for p in pruners if p["pruner"] == "dynamics")
    paper_checks = [next(v for v in s.validation if v.pruner == "dynamics") for s in sweeps]
    paper_rhos = [c.spearman_first_rung for c in paper_checks if c.spearman_first_rung is not None]
    findings.append(
        {
            "claim": "lower grad norm and higher loss early predict the better final run",
            "measured": f"Spearman(early rank, final score) = {paper['spearman_first_rung']} over {len(LR_GRID)} LRs "
            f"({paper['rho_per_seed']}); winner survived early stopping in {paper['winner_survived']} seeds",
            "rule": "agree if the 95% CI of rho is above 0 and the winner survived in every seed; disagree if the "
            "CI is below 0 or the winner never survived; else inconclusive",
            "verdict": rules.combine(
                rules.beats(rules.estimate(paper_rhos)) if paper_rhos else "inconclusive",
                rules.consistent([bool(c.winner_survived) for c in paper_checks]),
            ),
            **(power(rules.estimate(paper_rhos)) if paper_rhos else {"mde_80": "n/a", "seeds_for_0.03": "n/a"}),
        }
    )
    finals = [{r.overrides["training.learning_rate"]: r.final_objective for r in s.runs} for s in sweeps]
    best = [max(f, key=f.get) for f in finals]
    lower_half = sorted(LR_GRID)[: len(LR_GRID) // 2]
    # the effect behind it: per seed, the best lower-half LR's final score minus the best upper-half one's
    lower_minus_upper = [
        max(f[lr] for lr in lower_half) - max(v for lr, v in f.items() if lr not in lower_half) for f in finals
    ]
    findings.append(
        {
            "claim": "lower learning rates end better (among stable ones)",
            "measured": "best LR per seed: " + ", ".join(f"{lr:g}" for lr in best),
            "rule": "agree if the best LR is in the lower half of the grid in every seed, disagree if in none, "
            "else inconclusive",
            "verdict": rules.consistent([lr in lower_half for lr in best]),
            **power(rules.estimate(lower_minus_upper)),
        }
    )
    update_progress_artifact(progress, progress=75.0)

    # 4. Schedule (paper 3.5): constant is as good as cosine decay.
    constant = knowledge_runs("constant", root, {"training.schedule": "constant"}, seed_list)
    cosine = knowledge_runs("cosine", root, {"training.schedule": "cosine"}, seed_list)
    findings.append(
        compare(
            "a constant LR does not compromise the final score vs cosine decay",
            "not_worse",
            ("constant", "cosine"),
            scores(constant),
            scores(cosine),
            item_stderr(constant, cosine, {METRIC: 1.0}),
        )
    )
    update_progress_artifact(progress, progress=85.0)

    # 5. Warmup (paper 3.6): no warmup is as good as 25 or 100 steps (scaled: 5 and 20 steps of 32).
    warm = {
        steps: knowledge_runs(f"warmup{steps}", root, {"training.warmup_steps": steps}, seed_list)
        for steps in (0, 5, 20)
    }
    better_warm = [
        a if a["metrics"][METRIC] >= b["metrics"][METRIC] else b for a, b in zip(warm[5], warm[20], strict=True)
    ]
    findings.append(
        compare(
            "no warmup is as good as a warmup (paper: 0 vs 25 vs 100 steps)",
            "not_worse",
            ("warmup 0", "the better of warmup 5 / 20"),
            scores(warm[0]),
            scores(better_warm),
            item_stderr(warm[0], better_warm, {METRIC: 1.0}),
        )
    )
    update_progress_artifact(progress, progress=95.0)

    # 6. Checkpoint averaging (not a paper claim): the uniform weight average of a run's last 3
    #    checkpoints against the best single checkpoint of the same run (its max is the luckiest
    #    draw, so the comparison leans towards the single checkpoint).
    averaged, single = [], []
    for seed in seed_list:
        knowledge_runs("average", root, {"selection.average_last_k": 3}, [seed])
        selection = Selection.model_validate(
            storage.read_json(storage.join(root, f"reproduce-average-seed{seed}", "knowledge", "selection.json"))
        )
        averaged.append(next(c for c in selection.candidates if c.name.startswith("avg_last")))
        single.append(
            max((c for c in selection.candidates if c.name.startswith("samples_")), key=lambda c: c.objective)
        )
    findings.append(
        compare(
            "the average of the last 3 checkpoints scores at least as well as the best single checkpoint",
            "not_worse",
            ("average of the last 3", "best single checkpoint"),
            [c.objective for c in averaged],
            [c.objective for c in single],
            item_stderr([c.model_dump() for c in averaged], [c.model_dump() for c in single], {METRIC: 1.0}),
        )
    )
    update_progress_artifact(progress, progress=100.0)

    table = report.write_table(storage.join(root, "report"), "findings", findings)
    pruner_table = report.write_table(storage.join(root, "report"), "pruners", pruners)
    create_markdown_artifact(
        key="reproduce-findings",
        markdown=f"# Paper findings on the embedded lab ({seeds} seeds)\n\n"
        + table.to_markdown(index=False)
        + "\n\n## Pruners validated on the LR sweep\n\n"
        + pruner_table.to_markdown(index=False)
        + "\n",
    )
    return ReproduceResult(findings=findings, pruners=pruners)
