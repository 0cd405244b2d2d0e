"""Attention over packed rows without a row-wide mask: each sample attends causally to itself.

transformers' sdpa keeps the samples of a packed row apart with a block-diagonal (T x T) mask
built from the position_ids: a row of T tokens costs T^2 in compute and mask memory whatever
its samples' lengths, so packed sdpa rows had to be capped at max_seq_len and padded.
flash-attn's varlen kernel computes each sample's attention alone, but it is GPU-only and an
optional install. `sdpa_per_sample` does what the varlen kernel does with torch's own sdpa: it
cuts each row where position_ids restart at 0 and runs causal sdpa on the samples, a few calls
per row (no mask: sdpa's fused kernels), so a row costs about the sum of its samples' squared
lengths.

Training registers it with transformers (AttentionInterface / AttentionMaskInterface) and uses
it for packed rows on CPU; checkpoints keep plain sdpa. On CUDA the per-sample loop would cost
host syncs and per-group gathers in every layer, so `training_kernel` picks a varlen kernel
there: flash-attn's (when it imports) or flex_attention with transformers' packed BlockMask
(training.kernels, which needs no torch: `lab plan` asks it too).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface

from training.kernels import SDPA_PER_SAMPLE

NAME = SDPA_PER_SAMPLE  # the name transformers knows this kernel by (registered below)
EXACT_FROM = 128  # samples longer than this get attention at their exact length (see length_groups)


def sdpa_per_sample(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """(batch, heads, T, dim) query/key/value -> (batch, T, heads, dim), as transformers' sdpa returns.

    A row's samples are grouped by length (short ones rounded up to a power of two) and each
    group runs as one causal sdpa call on a (samples, heads, length, dim) batch: a few calls per
    row rather than one per short sample. A sample's padded tail comes after its tokens, so
    causal attention never lets a real token see it. Sliding-window layers (Mistral, Gemma) get
    a banded mask; a row without position_ids (a plain forward, e.g. the checkpoint probe) is
    one sample.
    """
    if softcap is not None:
        raise ValueError(f"{NAME} does not support attention softcapping (Gemma 2); set model.attn_implementation")
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError(f"{NAME} is for training packed rows: no padding mask, no KV cache")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    width = query.shape[2]
    rows = []
    for b in range(query.shape[0]):
        outputs, positions = [], []
        for index, real in length_groups(None if position_ids is None else position_ids[b], width):
            length = index.shape[1]
            mask = None
            if sliding_window is not None and length > sliding_window:
                i = torch.arange(length, device=query.device)
                mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)
            out = F.scaled_dot_product_attention(
                gather(query[b], index),
                gather(key[b], index),
                gather(value[b], index),
                attn_mask=mask,
                is_causal=mask is None,
                dropout_p=dropout,
                scale=scaling,
            )
            outputs.append(out.transpose(0, 1).flatten(1, 2)[:, real.flatten()])  # (heads, real tokens, dim)
            positions.append(index[real])
        rows.append(torch.cat(outputs, dim=1)[:, torch.argsort(torch.cat(positions))])
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def gather(row: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(heads, T, dim) -> (samples, heads, length, dim): the tokens `index` (samples, length) points at."""
    return row[:, index.flatten()].unflatten(1, tuple(index.shape)).transpose(0, 1)


def length_groups(position_ids: torch.Tensor | None, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A packed row's samples (cut where position_ids restart at 0) grouped by length (rounded up
    to a power of two up to EXACT_FROM tokens): per group, the token index of each sample's
    slots (samples, length) and which slots are real (the rest repeat the sample's first token)."""
    starts = torch.zeros(1, dtype=torch.long)  # a row always starts a sample, whatever its first position
    if position_ids is not None:
        starts = torch.unique(torch.cat([starts, torch.nonzero(position_ids == 0).flatten().cpu()]))
    lengths = torch.diff(starts, append=torch.tensor([width]))
    # Short samples share a call at a power-of-two length: padding them costs less than a call
    # each. A long sample's attention dominates and padding it up to 2x would cost up to 4x, so
    # it is grouped at its exact length (in practice a call of its own).
    rounded = torch.where(lengths > EXACT_FROM, lengths, 2 ** torch.ceil(torch.log2(lengths.double())).long())
    groups = []
    for length in torch.unique(rounded).tolist():
        chosen = rounded == length
        first, n = starts[chosen], lengths[chosen]
        slots = torch.arange(length)
        real = slots[None, :] < n[:, None]
        index = torch.where(real, first[:, None] + slots[None, :], first[:, None])
        device = position_ids.device if position_ids is not None else None
        groups.append((index.to(device), real.to(device)))
    return groups


def no_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """The mask transformers would build for this attention: none (samples are cut from position_ids)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"{NAME} is for packed rows: a padding mask cannot be honoured")
    return None


AttentionInterface.register(NAME, sdpa_per_sample)
AttentionMaskInterface.register(NAME, no_mask)
