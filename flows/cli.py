"""`lab`: the command line of recipe-lab.

lab validate RECIPE...           check recipes, errors by field
lab plan RECIPE [--gpus N] [--gpu-memory GiB] [--nodes M] [--samples S] [--json] [--set key=value]...
                                 batch arithmetic, memory per GPU, wall time, attention kernel, rolling-state
                                 cost, launch files (no data needed)
lab run RECIPE [--strategy phased|stacked] [--storage-root DIR] [--smoke] [--set key=value]...
lab eval TARGET... [--recipe R] [--set key=value]...   runs or models, outside training
lab sweep RECIPE --grid key=v1,v2 [--rungs N1,N2 --eta 2 --pruner eval] [--validate]   successive halving
lab reproduce [--seeds K]        the paper's findings across K seeds, scaled down to the lab (resumable)
lab nightly-spread [RECIPE] --seeds K   the nightly recipe's seed spread -> its regression tolerances
lab demo [--storage-root DIR]    the embedded lab, phased and stacked, with a comparison
lab export RUN [--phase P] --to DIR|s3://... [--push-to-hub REPO]   the selected model, ready to serve
lab serve [--port N] [--storage-root s3://...] [--alert-block B]   Prefect server + UI, pool, deployments,
                                 regression alert, worker

What a user can fix (a missing file, an unreadable model, a bad recipe, a package a setting needs)
is found before any server or process starts and reported as one line on stderr, exit code 2;
`--debug` shows the traceback instead. Commands that run flows without a configured Prefect API
run them on a temporary one that ends with the command (flows.serve.temporary_api).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from core.recipe import Recipe, RecipeError, load_recipe, resolve
from training.lifetime import own_children


class UsageError(ValueError):
    """A command line that cannot work; the message names the option."""


def parse_value(raw: str) -> Any:
    """JSON when it parses (numbers, lists, booleans), else the string itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_pairs(pairs: list[str], flag: str) -> list[tuple[str, str]]:
    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"{flag} {pair!r}: expected key=value")
        parsed.append((key, raw))
    return parsed


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """--set key=value pairs."""
    return {key: parse_value(raw) for key, raw in parse_pairs(pairs, "--set")}


def parse_grid(pairs: list[str]) -> dict[str, list[Any]]:
    """--grid key=v1,v2,... pairs."""
    return {key: [parse_value(v) for v in raw.split(",")] for key, raw in parse_pairs(pairs, "--grid")}


def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for source in args.recipes:
        try:
            recipe = load_recipe(source)
        except RecipeError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        print(
            f"{source}: ok ({recipe.name}, {recipe.strategy}, {len(recipe.phases)} phases, EBS {recipe.training.effective_batch_size})"
        )
    return 1 if failed else 0


def plan_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--set pairs plus plan's --gpus / --nodes, which are launch settings."""
    overrides = parse_overrides(args.set)
    if args.gpus is not None:
        overrides["launch.num_processes"] = args.gpus
    if args.nodes is not None:
        overrides["launch.num_machines"] = args.nodes
        if args.nodes > 1:
            overrides.setdefault("launch.main_process_ip", "MAIN_NODE_IP")
    return overrides


def cmd_plan(args: argparse.Namespace) -> int:
    from training.lab_plan import plan_recipe

    recipe = resolve(args.recipe, args.strategy, plan_overrides(args))
    plan, text = plan_recipe(recipe, args.gpu_memory, args.samples, args.mean_tokens, args.tokens_per_s)
    print(text)
    if args.json:
        print(json.dumps(plan.record()))  # the last line: one JSON object
    return 0 if plan.fits else 1


def check_memory(recipe: Recipe, gpu_memory_gib: float | None) -> str | None:
    """Why this run will not fit on its GPUs (the refusal, naming the knob), or None.

    Only GPU backends are checked, against --gpu-memory or the GPU found here; a model whose
    config.json cannot be read is reported and not checked."""
    from training.lab_plan import plan_recipe
    from training.plan import device_memory_bytes

    if recipe.launch.backend == "cpu" or device_memory_bytes(gpu_memory_gib) is None:
        return None  # nothing to check against (no GPU here and no --gpu-memory)
    try:
        plan, _ = plan_recipe(recipe, gpu_memory_gib)
    except (OSError, KeyError, ValueError) as exc:
        print(f"warning: no memory plan ({type(exc).__name__}: {exc}); launching unchecked", file=sys.stderr)
        return None
    return None if plan.fits else plan.refusal()


@contextmanager
def running_flows() -> Iterator[None]:
    """What a command needs to run flows, once its checks passed: a Prefect API (a temporary one
    when none is configured) and, on a terminal, each phase's training as a progress bar."""
    from flows.progress import show_training_bars
    from flows.serve import temporary_api

    show_training_bars()
    with temporary_api():
        yield


def checked(recipe: Recipe) -> Recipe:
    """The recipe as it will run (training.preflight), or the one-line failure, before Prefect starts."""
    from training.preflight import check

    return check(recipe)[0]


def cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    recipe = resolve(args.recipe, args.strategy, overrides, args.smoke)
    if refusal := check_memory(recipe, args.gpu_memory):
        print(refusal, file=sys.stderr)
        return 2
    recipe = checked(recipe)
    if recipe.export.to:
        from evaluation.export import check_replaceable

        check_replaceable(recipe.export.to)  # refused now, not after the training
    from flows.finetune import finetune

    with running_flows():
        result = finetune(
            recipe=args.recipe,
            strategy=args.strategy,
            overrides=overrides,
            storage_root=args.storage_root,
            smoke=args.smoke,
            run_id=args.run_id,
        )
    print_summary([s.row() for s in (result.base, *result.phases)], f"run {result.run_id} ({result.run_uri})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from core import records
    from training.preflight import model_config

    overrides = parse_overrides(args.set)
    for target in args.targets:
        manifest = records.read_manifest(target)
        if manifest is not None:
            resolve(args.recipe or manifest.recipe, overrides=overrides)
        else:
            resolve(args.recipe or "demo", overrides=overrides)
            model_config(target, field=f"target {target}")
    from flows.evaluate import evaluate

    with running_flows():
        rows = evaluate(targets=args.targets, recipe=args.recipe, overrides=overrides, storage_root=args.storage_root)
    print_summary(rows, "evaluation")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from flows.sweep import expand_grid, resolve_run, sweep

    grid = parse_grid(args.grid) or None
    for overrides in expand_grid(grid) if grid else [{}]:
        checked(resolve_run(args.recipe, overrides, args.smoke))
    with running_flows():
        summary = sweep(
            recipe=args.recipe,
            grid=grid,
            rungs=[int(v) for v in args.rungs.split(",")] if args.rungs else None,
            eta=args.eta,
            pruner=args.pruner,
            validate_ranking=args.validate,
            storage_root=args.storage_root,
            smoke=args.smoke,
            sweep_id=args.sweep_id,
        )
    print_summary(
        [r.model_dump(exclude={"overrides"}) | r.overrides for r in summary.runs],
        f"sweep {summary.sweep_id}",
    )
    print(
        f"samples trained {summary.samples_trained} of {summary.samples_planned} planned; saved {summary.samples_saved} "
        f"samples ({summary.train_seconds_saved} s of training); winner {summary.winner}"
    )
    if summary.validation:
        print_summary([v.model_dump() for v in summary.validation], "pruners validated against the final scores")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds}: at least 1 seed per arm")
    from flows.reproduce import reproduce

    started = time.perf_counter()
    with running_flows():
        result = reproduce(storage_root=args.storage_root, seeds=args.seeds)
    print_summary(result.findings, f"paper findings on the embedded lab ({args.seeds} seeds)")
    print_summary(result.pruners, "pruners validated on the LR sweep")
    print(f"wall time: {time.perf_counter() - started:.0f}s")
    return 0


def cmd_nightly_spread(args: argparse.Namespace) -> int:
    if args.seeds < 2:
        raise UsageError(f"--seeds {args.seeds}: a seed spread needs at least 2 seeds")
    checked(resolve(args.recipe))
    from flows.nightly import nightly_seed_spread

    with running_flows():
        spread = nightly_seed_spread(recipe=args.recipe, seeds=args.seeds, storage_root=args.storage_root)
    rows = [{"metric": m, "per seed": v.values, "tolerance": v.tolerance} for m, v in spread.metrics.items()]
    print_summary(rows, f"seed spread of the nightly {spread.recipe} ({spread.seeds} seeds)")
    return 0


def build_assets_meanwhile() -> None:
    """Build the embedded assets in a background thread: on a first run that build (~35 s on 2
    cores) overlaps the start of Prefect's temporary server (~11 s), and the demo's build task
    then finds the assets built or waits on the build's lock. A failure here is left to that
    task, which builds again and reports it."""
    from embedded import build_assets

    def build() -> None:
        try:
            build_assets(progress=print)
        except Exception:  # reported by the flow's own build, which tries again
            pass

    threading.Thread(target=build, name="embedded-assets", daemon=True).start()


def cmd_demo(args: argparse.Namespace) -> int:
    checked(resolve(args.recipe))
    from flows.demo import demo

    started = time.perf_counter()
    build_assets_meanwhile()
    with running_flows():
        result = demo(recipe=args.recipe, storage_root=args.storage_root)
    print_summary(result.comparison, "phased vs stacked on the embedded lab")
    print(f"\nreport: {result.report}  (comparison.md, comparison.csv, comparison.png)")
    for run in result.runs.values():
        print(f"run:    {run.run_uri}/report  (summary.md, training.png, scores.png)")
        if run.gate_failed is not None:
            print(f"        {run.strategy} stopped at a gate: {run.gate_failed}")
    print(f"wall time: {time.perf_counter() - started:.0f}s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from evaluation.export import export_run

    where = export_run(args.run, args.to, args.phase, args.push_to_hub, force=args.force)
    print(f"exported to {where}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import socket

    from flows.serve import serve

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError as exc:
            raise UsageError(f"--port {args.port}: cannot serve there ({exc.strerror}); choose another port") from None

    serve(args.port, args.storage_root, args.alert_block)
    return 0


def print_summary(rows: list[dict[str, Any]], title: str) -> None:
    import pandas as pd

    columns = [c for c in rows[0] if c not in ("start_objective", "run_samples")] if rows else []
    print(f"\n== {title}")
    print(pd.DataFrame(rows)[columns].to_string(index=False))


def expected_failures() -> tuple[type[Exception], ...]:
    """What a user fixes from one line naming the file, field or knob (any other failure shows its traceback)."""
    from core.chat import ChatTemplateError
    from evaluation.export import ExportError
    from training.data import DataError
    from training.preflight import PreflightError

    return RecipeError, PreflightError, DataError, ChatTemplateError, ExportError, UsageError


def main(argv: list[str] | None = None) -> None:
    # Before Prefect is imported: its server's telemetry heartbeat, on the temporary server's
    # SQLite database, printed a "database is locked" traceback at the start of every run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    own_children()  # trainers and evaluation workers end with this process, even a kill -9 of it
    # In-process evaluation on a small CPU box: one torch thread evaluated the lab 7x faster than
    # two on 2 cores (measured). Set OMP_NUM_THREADS yourself to use more on a big machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(prog="lab", description="recipe-lab: phased / stacked SFT of small LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the traceback of a failure, not one line")

    p = sub.add_parser("validate", parents=[debug], help="validate recipe YAML files")
    p.add_argument("recipes", nargs="+", help="recipe names (recipes/NAME.yaml) or paths")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "plan", parents=[debug], help="what a recipe costs: batch arithmetic, memory per GPU, wall time, launch"
    )
    p.add_argument("recipe", help="recipe name or YAML path")
    p.add_argument("--strategy", choices=["phased", "stacked"], default=None)
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node (launch.num_processes)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (launch.num_machines)")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default: this machine's GPU)")
    p.add_argument(
        "--samples", type=int, default=None, help="samples in the data (all phases), when it is not reachable"
    )
    p.add_argument("--mean-tokens", type=float, default=1024, help="mean tokens per sample (default 1024)")
    p.add_argument("--tokens-per-s", type=float, default=None, help="measured tokens/s per GPU for the wall time")
    p.add_argument("--json", action="store_true", help="end with the plan as one JSON object on its own line")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. training.learning_rate=1e-5"
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", parents=[debug], help="run the finetune flow locally")
    p.add_argument("recipe", help="recipe name or YAML path")
    p.add_argument("--strategy", choices=["phased", "stacked"], default=None)
    p.add_argument("--storage-root", default="./runs", help="local dir or s3://bucket/prefix (default ./runs)")
    p.add_argument("--smoke", action="store_true", help="shrink to a few CPU minutes on the embedded lab")
    p.add_argument("--run-id", default=None, help="reuse to resume a run")
    p.add_argument(
        "--gpu-memory", type=float, default=None, help="GiB per GPU for the memory check (default: this machine's GPU)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. training.learning_rate=1e-5"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", parents=[debug], help="evaluate checkpoints or whole runs outside training")
    p.add_argument("targets", nargs="+", help="run directories (with manifest.json) or model directories / hub ids")
    p.add_argument(
        "--recipe", default=None, help="suites to use (default: the run's own recipe; 'demo' for single models)"
    )
    p.add_argument("--storage-root", default="./runs", help="where single-model results go (<root>/eval/<name>/)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. evaluation.limit=100"
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "sweep", parents=[debug], help="a grid of runs with multi-rung early stopping (successive halving)"
    )
    p.add_argument("recipe", help="recipe name or YAML path")
    p.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="e.g. training.learning_rate=1e-3,2e-3"
    )
    p.add_argument(
        "--rungs",
        default=None,
        metavar="N1,N2",
        help="samples of the first phase at which runs are ranked and cut (successive halving); none = no early stop",
    )
    p.add_argument("--eta", type=float, default=2.0, help="at each rung the best ceil(n / eta) of n runs go on")
    p.add_argument(
        "--pruner", choices=["eval", "dynamics", "loss_slope"], default="eval", help="how runs are ranked at a rung"
    )
    p.add_argument(
        "--validate", action="store_true", help="stop nothing; finish every run and score each pruner's ranking"
    )
    p.add_argument("--storage-root", default="./runs")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--sweep-id", default=None)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "reproduce", parents=[debug], help="the paper's comparisons on the embedded lab, with a findings table"
    )
    p.add_argument("--storage-root", default="./runs", help="runs go under <root>/reproduce/ (re-run to resume)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per arm (data order, fine-tune init); CIs need >= 2")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "nightly-spread", parents=[debug], help="measure the nightly recipe's seed spread; its tolerances follow"
    )
    p.add_argument("recipe", nargs="?", default="demo")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--storage-root", default="./runs", help="the nightly's storage root")
    p.set_defaults(func=cmd_nightly_spread)

    p = sub.add_parser("demo", parents=[debug], help="the embedded lab end to end, phased and stacked")
    p.add_argument("--recipe", default="demo")
    p.add_argument("--storage-root", default="./runs")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "export", parents=[debug], help="the selected model of a run as a ready-to-serve directory with a model card"
    )
    p.add_argument("run", help="run directory or URI (with manifest.json), e.g. runs/demo-phased-... or s3://b/p/RUN")
    p.add_argument("--phase", default=None, help="export this phase's selected model (default: the last phase)")
    p.add_argument("--to", default=None, help="directory or s3://bucket/prefix (an earlier export there is replaced)")
    p.add_argument("--force", action="store_true", help="replace whatever is at --to, even if not an earlier export")
    p.add_argument(
        "--push-to-hub", default=None, metavar="REPO", help="also push to this Hub repo (token from HF_TOKEN)"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "serve", parents=[debug], help="local Prefect server (UI), the lab work pool, every deployment and a worker"
    )
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--storage-root", default=None, help="s3://bucket/prefix: keep Prefect results there too")
    p.add_argument(
        "--alert-block",
        default=None,
        help="notification block (type/name, e.g. slack-webhook/team) for nightly regressions; "
        "default: a webhook block for $RECIPE_LAB_ALERT_WEBHOOK when set",
    )
    p.set_defaults(func=cmd_serve)

    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except Exception as exc:
        if args.debug or not isinstance(exc, expected_failures()):
            raise
        print(exc, file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
