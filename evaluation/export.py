"""Export: the selected model of a run as a ready-to-serve directory, with a model card.

    <to>/model.safetensors (+ config.json)   the weights in the recipe's training dtype
    <to>/tokenizer.json, tokenizer_config.json, chat_template.jinja   the tokenizer and its chat template
    <to>/generation_config.json             stops at the template's end-of-turn token(s) (core.chat)
    <to>/README.md                          model card: base model, recipe, data, phases, scores
                                            with intervals, why the checkpoint was selected, plots
    <to>/training.png, scores.png           the run report's plots, when the run has them

`to` is a local directory or any fsspec URL (s3://bucket/prefix): the directory is built
locally, then renamed into place or uploaded with README.md last (a destination with a README
is complete). Nothing in it depends on where it goes, so a local export and a bucket export are
byte for byte equal. Only an earlier export (its card's front matter tags `recipe-lab`) is
replaced, unless `force`. The same export comes out whether a trained checkpoint or the phase's
start model won: the recipe's chat template, and generation stopping at the model's own EOS
id(s), the template's end of turn and EOS, with a pad id (core.chat.configure_generation).
`push_to_hub` uploads the same directory through huggingface_hub, with the token from the
environment (HF_TOKEN or `huggingface-cli login`), never a parameter.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from core import records, storage
from core.chat import apply_template, configure_generation, stop_token_ids
from core.recipe import Recipe
from core.records import Manifest, PrepStats
from evaluation.selection import CheckpointScore, Selection

PLOTS = ("training.png", "scores.png")


class ExportError(ValueError):
    """The run cannot be exported (unknown phase, unfinished phase); the message says which."""


def selected(run_uri: str, phase: str | None) -> tuple[Manifest, Recipe, Selection]:
    """(manifest, recipe, selection) of `phase`, by default the run's last phase."""
    manifest = records.read_manifest(run_uri)
    if manifest is None:
        raise ExportError(f"{run_uri}: no manifest.json there; expected a run directory or URI")
    recipe = Recipe.model_validate(manifest.recipe)
    names = [p.name for p in recipe.phases]
    name = phase or names[-1]
    if name not in names:
        raise ExportError(f"{run_uri}: no phase {name!r} (phases: {names})")
    if name not in manifest.phases:
        raise ExportError(f"{run_uri}: phase {name} has no selected checkpoint yet (done: {list(manifest.phases)})")
    selection = Selection.model_validate(storage.read_json(storage.join(run_uri, name, "selection.json")))
    return manifest, recipe, selection


def export_run(
    run_uri: str, to: str | None, phase: str | None = None, push_to_hub: str | None = None, force: bool = False
) -> str:
    """Export the selected model of `phase` (default: the last) of the run at `run_uri` to `to`
    and/or the Hub repo `push_to_hub`; returns where it went. An earlier export at `to` is
    replaced whole; anything else there is refused, unless `force`."""
    if not to and not push_to_hub:
        raise ExportError("export needs a destination: a directory or s3://... , and/or a Hub repo")
    manifest, recipe, selection = selected(run_uri, phase)
    if to and storage.is_local(to) and storage.is_local(run_uri):
        target, run = Path(to).resolve(), Path(run_uri).resolve()
        if target == run or target in run.parents:  # replacing it would delete the run, --force or not
            raise ExportError(f"--to {to}: holds the run being exported; choose a directory outside it")
    if to and not force:
        check_replaceable(to)
    local = Path(to) if to and storage.is_local(to) else None
    if local:
        local.parent.mkdir(parents=True, exist_ok=True)
    # Built beside a local destination (then renamed into place), else in a temporary directory.
    with tempfile.TemporaryDirectory(prefix=".recipe-lab-export-", dir=local.parent if local else None) as tmp:
        build = Path(tmp) / "model"
        write_model_dir(run_uri, manifest, recipe, selection, build)
        if push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi()  # token: HF_TOKEN or the login cache, never an argument
            api.create_repo(push_to_hub, repo_type="model", exist_ok=True)
            api.upload_folder(
                repo_id=push_to_hub, folder_path=str(build), commit_message=f"recipe-lab export of {run_uri}"
            )
        if local:
            shutil.rmtree(local, ignore_errors=True)
            build.rename(local)
        elif to:
            if storage.exists(to):
                storage.remove_tree(to, first=("README.md",))
            storage.upload_tree(build, to, last=("README.md",))
    return to or f"hf://{push_to_hub}"


def check_replaceable(to: str) -> None:
    """`to` is empty, missing, or an earlier export (its model card is one of ours)."""
    fs, path = storage.filesystem(to)
    if not fs.exists(path) or not fs.find(path):
        return
    card = storage.join(to, "README.md")
    if not (storage.exists(card) and is_our_card(storage.read_text(card))):
        raise ExportError(
            f"--to {to}: not empty and holds no earlier recipe-lab export: choose a new or empty directory, "
            "or pass --force to replace what is there"
        )


def is_our_card(card: str) -> bool:
    """Whether a model card's YAML front matter (between the leading `---` lines, as the Hub reads
    it) carries the recipe-lab tag that `model_card` writes."""
    front, closed, _ = card.removeprefix("---\n").partition("\n---\n")
    if not card.startswith("---\n") or not closed:
        return False
    try:
        meta = yaml.safe_load(front)
    except yaml.YAMLError:
        return False
    return isinstance(meta, dict) and "recipe-lab" in (meta.get("tags") or [])


def write_model_dir(run_uri: str, manifest: Manifest, recipe: Recipe, selection: Selection, out: Path) -> None:
    """Weights in the training dtype, tokenizer, generation config, plots, then README.md last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    winner = selection.winner
    source = storage.local_checkpoint(winner.checkpoint)
    out.mkdir(parents=True)
    # The model's generation_config.json (or, without one, its config's defaults) completed as
    # training completes every checkpoint's: a start model that won gets what its checkpoints got.
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, recipe.model.dtype))
    tokenizer = apply_template(AutoTokenizer.from_pretrained(source), recipe.model.chat_template, winner.checkpoint)
    configure_generation(model, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    plots = [name for name in PLOTS if storage.exists(storage.join(run_uri, "report", name))]
    for name in plots:
        fs, path = storage.filesystem(storage.join(run_uri, "report", name))
        fs.get_file(path, str(out / name))
    (out / "README.md").write_text(model_card(run_uri, manifest, recipe, selection, tokenizer, plots))


def score_cell(score: CheckpointScore, key: str) -> str:
    value, se = score.metrics.get(key), score.stderr.get(key)
    if value is None:
        return "-"
    return f"{value:.4f} ± {se:.4f}" if se else f"{value:.4f}"


def model_card(
    run_uri: str, manifest: Manifest, recipe: Recipe, selection: Selection, tokenizer: Any, plots: list[str]
) -> str:
    """README.md: Hub metadata, then what was trained on what, how it scored, and why this one."""
    winner = selection.winner
    base = recipe.model.name_or_path
    header = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["recipe-lab", "sft", recipe.strategy],
        **({} if "://" in base else {"base_model": base}),
    }
    t = recipe.training
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        f"# {recipe.name}: {selection.phase} / {winner.name}",
        "",
        f"Supervised fine-tune of `{base}` with recipe-lab, recipe `{recipe.name}` ({recipe.strategy}). "
        f"Run `{manifest.run_id}`, code version `{manifest.code_version}`. "
        f"This directory holds the checkpoint selected in phase `{selection.phase}`: **{winner.name}** "
        f"({winner.samples} samples into the phase).",
        "",
        "Load it with `AutoModelForCausalLM.from_pretrained(...)`; prompts use the tokenizer's chat template, "
        f"and generation stops at {tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))} (end of turn, EOS).",
        "",
        "## Recipe",
        "",
        f"- dtype {recipe.model.dtype}; effective batch size {t.effective_batch_size} samples; peak learning rate "
        f"{t.learning_rate:g}, schedule {t.schedule}, warmup "
        f"{t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio or 0}"
        f"{' steps' if t.warmup_steps is not None else ' (ratio)'}; {t.epochs:g} epochs; AdamW "
        f"({t.adam_beta1}, {t.adam_beta2}), weight decay {t.weight_decay:g}; max sequence length {t.max_seq_len}; "
        f"seed {t.seed}.",
        "",
        "## Phases and data",
        "",
        "| phase | data | samples | replayed | tokens | dropped (too long) | selected |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase in recipe.phases:
        stats_uri = storage.join(run_uri, "data", phase.name, records.STATS)
        stats = records.parse(PrepStats, storage.read_text(stats_uri), stats_uri) if storage.exists(stats_uri) else None
        parts = phase.stacked_from or [phase]
        data = "<br>".join(
            f"`{f}`" + (f" ({p.length_split} half)" if p.length_split else "") for p in parts for f in p.data
        )
        selection_uri = storage.join(run_uri, phase.name, "selection.json")
        chosen = storage.read_json(selection_uri)["winner"]["name"] if storage.exists(selection_uri) else "-"
        lines.append(
            f"| {phase.name} | {data} | {stats.samples if stats else '-'} | {stats.replayed if stats else '-'} | "
            f"{stats.tokens if stats else '-'} | {stats.dropped_too_long if stats else '-'} | {chosen} |"
        )
    keys = sorted({k for c in [selection.start, *selection.candidates] for k in c.metrics})
    objective = " + ".join(f"{w:g} x {k}" for k, w in selection.objective.items())
    lines += [
        "",
        f"## Scores of phase {selection.phase}",
        "",
        f"Objective: {objective} (weighted mean). Intervals: {selection.confidence:.0%} t intervals from each "
        f"model's per-item records; selection policy `{selection.policy}`, every comparison paired on items; "
        "metrics are shown ± their standard error.",
        "",
        "| model | samples | objective | interval | " + " | ".join(keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    scored = {c.name: c for c in [selection.start, *selection.candidates]}
    for c in scored.values():
        interval = f"[{c.interval[0]:.4f}, {c.interval[1]:.4f}]" if c.interval else "-"
        name = f"**{c.name}** (selected)" if c.name == winner.name else c.name
        lines.append(
            f"| {name} | {c.samples} | {c.objective:.4f} | {interval} | "
            + " | ".join(score_cell(c, k) for k in keys)
            + " |"
        )
    lines += ["", "## Why this checkpoint", ""]
    lines += [f"- {reason}" for reason in selection.gate.reasons]
    lines.append(f"- gate: {'passed' if selection.gate.passed else 'FAILED'}")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    lines += [
        "",
        "## Full recipe",
        "",
        "```yaml",
        yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
