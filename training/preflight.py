"""What a run needs, checked before anything expensive starts: its data files, its model's
config, the optional packages its settings name, and what its model family needs from training.

`lab run` calls `check` before Prefect starts (a failure is one line naming the file, field or
knob, in seconds); the finetune flow calls it again in its own process before data prep and
logs each setting it changed, one line each.

Families: what trains a model's attention on each device is training.kernels.training_kernel
(the trainer's own choice); here it is said, one line per setting a family changes. Gemma 2 caps
attention scores (attn_logit_softcapping: cap * tanh(score / cap)) and its final logits
(final_logit_softcapping). sdpa cannot cap scores, so it trains on CPU with eager attention,
padded (eager cannot keep packed samples apart), and on CUDA with flex_attention, to whose
score_mod transformers hands the cap, packed; final logits are capped inside the chunked loss
(training.train). Only a combination with no way to train is refused: flash_attention_2 on CPU.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

from core.recipe import EMBEDDED, Recipe
from training.kernels import training_kernel

Device = Literal["cpu", "cuda"]


class PreflightError(ValueError):
    """A run that cannot start; the message is one line naming the file, field or knob."""


def model_config(name_or_path: str, field: str = "model.name_or_path") -> Any:
    """The transformers config of a model directory or hub id (only config.json is fetched, or
    read from the Hugging Face cache when offline); an error names `field`, where it was given."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as exc:
        if Path(name_or_path).expanduser().exists() or name_or_path.startswith(("/", ".", "~")):
            why = "no readable config.json there" if isinstance(exc, OSError) else str(exc).splitlines()[0]
        elif os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            why = "not in the Hugging Face cache, and HF_HUB_OFFLINE=1 keeps the Hub out of reach"
        else:
            why = str(exc).splitlines()[0]
        raise PreflightError(f"{field}: cannot read the config of {name_or_path!r}: {why}") from None


def training_device(recipe: Recipe) -> Device:
    """Where the run's training computes: CPU for launch.backend cpu and for a local launch on a
    machine without CUDA; CUDA otherwise (a cluster scheduler's nodes have the GPUs)."""
    if recipe.launch.backend == "cpu":
        return "cpu"
    if recipe.launch.scheduler != "local":
        return "cuda"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def family_settings(config: Any, recipe: Recipe, device: Device) -> tuple[Recipe, list[str]]:
    """The recipe to run with the model of `config` (a transformers config, or None for none to
    honour) on `device`, and one line per setting its family changes; refuses a kernel chosen
    explicitly that cannot train on `device`."""
    requested = recipe.model.attn_implementation
    if device == "cpu" and requested == "flash_attention_2":
        raise PreflightError(
            "model.attn_implementation: flash_attention_2 cannot train on CPU (this run's training device); "
            "use sdpa or eager, or launch on GPUs"
        )
    lines, model = [], {}
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap and requested != "eager":
        kernel = training_kernel(requested, device, config)
        how = (
            "eager applies the cap, padded (it cannot keep packed samples apart)"
            if kernel == "eager"
            else f"{kernel} applies the cap (transformers' score_mod) and keeps packed samples apart"
        )
        lines.append(
            f"model.attn_implementation: {requested} -> {kernel} on {device}: {config.model_type} caps attention "
            f"scores (attn_logit_softcapping {cap:g}), which {requested} cannot; {how}"
        )
        if not recipe.training.packing:  # unpacked, the trainer loads the kernel the recipe names
            model["attn_implementation"] = kernel
    final_cap = getattr(config, "final_logit_softcapping", None)
    if final_cap and recipe.training.loss_chunk_tokens:
        lines.append(
            f"training.loss_chunk_tokens: {recipe.training.loss_chunk_tokens}, with {config.model_type}'s final-logit "
            f"softcapping ({final_cap:g}) applied inside the chunked loss"
        )
    return recipe.model_copy(update={"model": recipe.model.model_copy(update=model)}), lines


def missing_files(recipe: Recipe) -> list[str]:
    """'phases.I.data: PATH' for each local data file that is not there (embedded and remote
    data are checked where they are read)."""
    missing = []
    for i, phase in enumerate(recipe.phases):
        for k, part in enumerate(phase.stacked_from or [phase]):
            index = k if phase.stacked_from else i  # a stacked phase's parts are the recipe's phases, in order
            for uri in part.data:
                if "://" not in uri and not Path(uri).expanduser().is_file():
                    missing.append(f"phases.{index}.data: {uri}")
    return missing


def check(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe to run and its lines (see family_settings), or a PreflightError naming the
    first thing missing: a data file, the model's config, a way to train it here, a package a
    setting needs."""
    if missing := missing_files(recipe):
        raise PreflightError(f"{missing[0]}: no such file" + (f" (and {len(missing) - 1} more)" if missing[1:] else ""))
    # The lab's own model (a Llama built here) needs nothing of its family.
    config = None if recipe.model.name_or_path.startswith(EMBEDDED) else model_config(recipe.model.name_or_path)
    recipe, lines = family_settings(config, recipe, training_device(recipe))
    from training.tracking import missing_trackers

    if missing := missing_trackers(recipe):
        raise PreflightError(
            f"training.report_to: {', '.join(missing)} not installed: pip install 'recipe-lab[trackers]'"
        )
    if recipe.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise PreflightError(
            "model.attn_implementation: flash_attention_2 needs flash-attn, not installed: pip install 'recipe-lab[gpu]'"
        )
    return recipe, lines
