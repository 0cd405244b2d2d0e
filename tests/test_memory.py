"""Memory: activation checkpointing and the chunked cross-entropy change no number, and the
chunked loss never holds the full-vocabulary logits of a micro-batch.

Peak memory is measured, not timed: the torch profiler records every CPU allocation and free
with the running total of allocated bytes, whose maximum over one forward + backward is the peak
of tensor memory (relative to what was allocated before).
"""

import json
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from tests.test_step_equivalence import B, random_data, tiny_model
from training.step import collate, collate_packed, summed_token_loss, use_chunked_loss


def loss_and_grads(batch, checkpointing: bool, chunk: int | None) -> tuple[float, torch.Tensor]:
    model = tiny_model()
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if chunk:
        use_chunked_loss(model, chunk)
    loss = summed_token_loss(model, batch)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("packed", [False, True])
def test_checkpointing_and_chunked_loss_give_the_plain_loss_and_gradients(packed):
    data = random_data()
    batch = collate_packed(data, list(range(B))) if packed else collate(data, list(range(B)), pad_id=0)
    plain_loss, plain = loss_and_grads(batch, checkpointing=False, chunk=None)
    assert plain.abs().max() > 0
    for checkpointing, chunk in [(True, None), (False, 16), (True, 7)]:  # 7: a ragged last chunk
        loss, grads = loss_and_grads(batch, checkpointing, chunk)
        assert loss == pytest.approx(plain_loss, rel=1e-5)
        assert (grads - plain).abs().max() <= 1e-5 * plain.abs().max()


def peak_bytes(fn, trace: Path) -> int:
    """Peak of allocated CPU tensor bytes while fn runs (from the profiler's allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def test_chunked_loss_peak_memory_is_at_least_4x_lower_at_a_32k_vocabulary(tmp_path):
    vocab, tokens = 32_000, 2048
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=tokens,
    )
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(tokens)[None]}
    peaks, losses = {}, {}
    for chunk in (None, 256):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        if chunk:
            use_chunked_loss(model, chunk)

        def step(model=model, chunk=chunk):
            loss = summed_token_loss(model, batch)
            loss.backward()
            losses[chunk] = loss.item()

        peaks[chunk] = peak_bytes(step, tmp_path / f"{chunk}.json")
    logits_fp32 = tokens * vocab * 4
    print(f"peak bytes: plain {peaks[None]:,} chunked {peaks[256]:,} (one fp32 logits copy: {logits_fp32:,})")
    assert losses[256] == pytest.approx(losses[None], rel=1e-5)
    assert peaks[None] >= logits_fp32  # the plain path holds at least the full logits
    assert peaks[None] >= 4 * peaks[256]


def test_the_chunked_loss_caps_final_logits_as_the_models_own_loss_does():
    """Gemma 2's final_logit_softcapping inside the chunked loss: the same summed loss and
    gradients as the model's own forward (a mean over the loss tokens). The cap is set low, so
    that it matters: without it the loss is far from what it is with it."""
    from transformers import Gemma2ForCausalLM

    from tests.zoo import FAMILIES, tiny_config

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 40), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, -100, ids)

    def loss_and_grads(chunk: int | None, cap: float | None) -> tuple[float, torch.Tensor]:
        config = tiny_config(FAMILIES["gemma2"], vocab_size=300, final_logit_softcapping=cap)
        torch.manual_seed(0)
        model = Gemma2ForCausalLM._from_config(config, attn_implementation="eager")
        with torch.no_grad():
            model.lm_head.weight.mul_(50)  # logits of a few units, which a cap of 0.5 squeezes
        if chunk:
            use_chunked_loss(model, chunk)
            loss = summed_token_loss(model, {"input_ids": ids, "labels": labels})
        else:
            loss = model(input_ids=ids, labels=labels).loss * (labels[:, 1:] != -100).sum()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    own, own_grads = loss_and_grads(None, cap=0.5)
    chunked, grads = loss_and_grads(7, cap=0.5)  # 7: a ragged last chunk
    assert chunked == pytest.approx(own, rel=1e-5)
    assert (grads - own_grads).abs().max() <= 1e-5 * own_grads.abs().max()
    uncapped, _ = loss_and_grads(7, cap=None)
    assert abs(uncapped - own) > 0.1 * own
