"""validation/loss: the model's loss on the phase's held-out slice (training.validation_samples).

training.data.prepare writes the slice to <data>/validation.parquet (never trained on in the phase).
The loop scores it on the start model and at every checkpoint; each sample's mean next-token loss
goes to <phase>/validation/<model>.items.parquet (core.items), their mean to the checkpoint's
meta.json and the trackers. Selection reads the per-item files (a lower-is-better metric).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from core import items, storage
from training.data import VALIDATION_FILE, TokenizedData, load_tokenized
from training.step import on_device, summed_token_loss


def load_validation(data_dir: str) -> TokenizedData | None:
    """The phase's held-out slice, or None when there is none."""
    if not storage.exists(storage.join(data_dir, VALIDATION_FILE)):
        return None
    data = load_tokenized(data_dir, VALIDATION_FILE)
    return data if len(data) else None


def score_validation(
    accelerator: Accelerator,
    model: torch.nn.Module,
    data: TokenizedData,
    to_batch: Callable[[list[int]], dict[str, torch.Tensor | int]],
    out: Path,
    name: str,
) -> float:
    """validation/loss of the model as it is now: each held-out sample's mean next-token loss, one
    forward per sample on every rank (under ZeRO-3 / FSDP a forward is collective), written per
    sample by rank 0 to <out>/validation/<name>.items.parquet; returns the mean over the samples."""
    model.eval()
    with torch.no_grad():
        losses = [
            summed_token_loss(model, on_device(to_batch([i]), accelerator.device)).item() / n
            for i, n in enumerate(data.loss_tokens())
        ]
    model.train()
    if accelerator.is_main_process:
        rows = [
            {"task": "validation", "metric": "validation/loss", "item": i, "value": v}
            for i, v in zip(data.ids, losses, strict=True)
        ]
        items.write_items(str(out / "validation" / f"{name}{items.SUFFIX}"), rows)
    return statistics.fmean(losses)
