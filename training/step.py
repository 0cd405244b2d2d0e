"""One optimizer step: the batches, the loss and the gradient accumulation (no I/O, no logging).

The loss of a step is the mean over every unmasked token of the step (all micro-batches, all
ranks), so the number of micro-batches never changes the gradient (`backward_step`). With
packing (the default) each micro-batch is one row of concatenated samples, position_ids
restarting per sample (`collate_packed`); otherwise a right-padded batch (`collate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from accelerate import Accelerator
from transformers import DataCollatorWithFlattening
from transformers.modeling_outputs import CausalLMOutputWithPast

from training.data import IGNORE_INDEX, TokenizedData
from training.sampler import Step


def collate(data: TokenizedData, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and loss. (Not transformers'
    DataCollatorForSeq2Seq: it pads on the tokenizer's padding_side, which is left for some models.)"""
    width = max(len(data.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        input_ids[row, :n] = torch.tensor(data.input_ids[i])
        labels[row, :n] = torch.tensor(data.labels[i])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_packed(
    data: TokenizedData,
    indices: list[int],
    pad_id: int = 0,
    row_multiple: int | None = None,
    flash_kwargs: bool = False,
) -> dict[str, torch.Tensor | int]:
    """Concatenated samples in one row, no padding between them.

    position_ids restart at 0 for each sample: that is how transformers finds the sample
    boundaries and keeps attention within each sample (no attention_mask). The first label of
    each sample is masked: it would be the next-token target of the previous sample's last
    token. Shifted as in the padded case, the loss covers exactly the same tokens.

    This is transformers' `DataCollatorWithFlattening`. `row_multiple` (flex_attention): the row
    is padded up to a multiple of it, the padding one more "sample" (positions from 0, no labels)
    that attends only to itself. `flash_kwargs` (flash_attention_2): also the varlen kernel's
    sample boundaries (int32 cu_seq_lens_q/k, Python-int max_length_q/k); without them
    transformers derives them from the position_ids in every layer, with a host sync each time.
    """
    features = [{"input_ids": data.input_ids[i], "labels": data.labels[i]} for i in indices]
    padding = -sum(len(f["input_ids"]) for f in features) % row_multiple if row_multiple else 0
    if padding:
        features.append({"input_ids": [pad_id] * padding, "labels": [IGNORE_INDEX] * padding})
    return DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(features, return_tensors="pt")


def summed_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over unmasked tokens: the step divides once.

    A model set up by `use_chunked_loss` computes it inside its forward (no logits returned);
    otherwise from the full logits. use_cache=False: training needs no KV cache, and with one
    transformers ignores the packed row's position_ids when it builds the attention mask
    (attention would cross samples).
    """
    if getattr(unwrap(model), "chunked_loss", False):
        return model(**batch, use_cache=False).loss
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DDP / DeepSpeed wrapper (FSDP2 wraps in place)."""
    return getattr(model, "module", model)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed next-token cross-entropy of `head(hidden) * logit_scale`, `chunk_tokens` rows at a time;
    with `softcap` (Gemma 2's final_logit_softcapping) the logits are capped first, as the model's
    own forward does: softcap * tanh(logits / softcap).

    Only the loss tokens are projected, and each chunk but the last is checkpointed: its logits
    (and their float32 copy) are freed after its forward and recomputed in backward, so at most
    one chunk's logits exist at any time instead of the micro-batch's full-vocabulary logits.
    The last chunk's are kept: backward starts with them, so recomputing them would save no peak
    memory (and a micro-batch of one chunk recomputes nothing). The head is called as a module,
    so ZeRO-3 gathers its weight for each chunk.
    """
    targets = labels[:, 1:].flatten()
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1].flatten(0, 1)[keep], targets[keep]
    plain = logit_scale == 1.0 and softcap is None
    if hidden.is_cuda and LIGER_CE is not None and plain and not hasattr(head.weight, "ds_id"):
        return LIGER_CE(reduction="sum")(head.weight, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        end = start + chunk_tokens
        if end < len(targets):
            chunk = torch.utils.checkpoint.checkpoint(
                _chunk_loss, hidden[start:end], head, targets[start:end], logit_scale, softcap, use_reentrant=False
            )
        else:
            chunk = _chunk_loss(hidden[start:end], head, targets[start:end], logit_scale, softcap)
        total = total + chunk
    return total


def _chunk_loss(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    logits = head(hidden).float()
    if scale != 1.0:  # Granite's logits_scaling, in place: no second float32 copy of the chunk's logits
        logits.mul_(scale)
    if softcap is not None:  # Gemma 2's final-logit softcapping (tanh keeps its output for backward)
        logits = torch.tanh(logits.div_(softcap)) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def _liger_cross_entropy() -> type | None:
    """Liger's fused linear cross-entropy (GPU, optional): never materialises the logits at all."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss


LIGER_CE = _liger_cross_entropy()


def use_chunked_loss(model: torch.nn.Module, chunk_tokens: int) -> None:
    """Make the causal LM's forward return the summed chunked loss (`.loss`) instead of logits.

    The forward itself is replaced (before accelerate / DeepSpeed / FSDP wrap it), so the loss
    runs inside the wrapped forward, under its autocast, with the output weight gathered.
    The decoder (`model.model`) is unchanged; Granite's logits_scaling and Gemma 2's final-logit
    softcapping are kept. Called without labels (the checkpoint probe) it returns logits as before.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    logit_scale = 1.0 / getattr(model.config, "logits_scaling", 1.0)
    softcap = getattr(model.config, "final_logit_softcapping", None)

    logits_forward = model.forward  # without labels (the checkpoint probe): the usual logits

    def forward(input_ids, labels=None, position_ids=None, attention_mask=None, use_cache=False, **attention_kwargs):
        """attention_kwargs: flash-attn's varlen boundaries (collate_packed), passed to every layer."""
        inputs = dict(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=use_cache
        )
        if labels is None:
            return logits_forward(**inputs, **attention_kwargs)
        out = decoder(**inputs, **attention_kwargs)
        loss = chunked_cross_entropy(out.last_hidden_state, head, labels, chunk_tokens, logit_scale, softcap)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = forward
    model.chunked_loss = True


def backward_step(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    step_loss_tokens: int,
    world_size: int,
    weights: Sequence[float] | None = None,
    backward: Callable[[torch.Tensor], object] = torch.Tensor.backward,
) -> torch.Tensor:
    """Accumulate one optimizer step's gradients over this rank's micro-batches.

    Returns this rank's summed token loss. Each micro-batch's summed loss is scaled by
    world_size / step_loss_tokens: DDP, ZeRO and FSDP average gradients over ranks, so the
    result is the gradient of the token mean over the whole step, however the samples were
    split. `weights` (default 1) zero out filler micro-batches that a rank runs only to take
    part in the collectives.
    """
    loss_sum = torch.zeros((), dtype=torch.float64)
    for m, batch in enumerate(batches):
        with accumulation_boundary(model, last=m == len(batches) - 1):
            token_loss = summed_token_loss(model, batch) * (weights[m] if weights else 1.0)
            backward(token_loss * world_size / step_loss_tokens)
        loss_sum += token_loss.detach().double().cpu()
    return loss_sum


def accumulation_boundary(model: torch.nn.Module, last: bool) -> AbstractContextManager:
    """Gradients are synchronised once per step, on the last micro-batch.

    DDP: `no_sync` on the others. FSDP2: the same with `set_requires_gradient_sync(False)`; the
    unsharded gradients then accumulate locally, in float32 (its reduce_dtype, see
    make_accelerator). A DeepSpeed engine is told whether this is the step's last micro-batch
    (ZeRO-2/3 forbid no_sync and reduce as they go; the boundary decides when the reduced
    gradients are final).
    """
    if hasattr(model, "set_gradient_accumulation_boundary"):
        model.set_gradient_accumulation_boundary(last)
        return nullcontext()
    if last:
        return nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return fsdp2_no_sync(model)
    return nullcontext()


@contextmanager
def fsdp2_no_sync(model: torch.nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def on_device(batch: dict[str, torch.Tensor | int], device: torch.device) -> dict[str, torch.Tensor | int]:
    """The batch's tensors on `device`; Python ints (flash-attn's max lengths) stay as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def rank_micro_batches(
    step: Step, rank: int, lengths: Sequence[int], sharded: bool
) -> tuple[list[list[int]], list[float]]:
    """This rank's micro-batches of `step` (sample indices) and their loss weights.

    A rank short of micro-batches still joins the collectives, with zero-weight fillers (the
    step's shortest sample): DDP's one all-reduce needs one; ZeRO / FSDP (`sharded`) need as
    many as the busiest rank.
    """
    mine = step.micro_batches[rank]
    fillers = max(0, (max(len(r) for r in step.micro_batches) if sharded else 1) - len(mine))
    filler = [min(step.samples, key=lambda i: lengths[i])]
    return mine + [filler] * fillers, [1.0] * len(mine) + [0.0] * fillers


def clip_gradients(
    accelerator: Accelerator, model: torch.nn.Module, max_grad_norm: float | None, deepspeed: bool
) -> float:
    """The global gradient norm before clipping, after clipping to `max_grad_norm`.

    A DeepSpeed engine computes the norm, clips and updates in one call (`engine.step()`), so
    under DeepSpeed this is also the update; elsewhere the optimizer steps after it.
    """
    if deepspeed:
        model.step()
        return float(model.get_global_grad_norm())
    return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf")).item()
