"""The embedded lab's tokenizer and tiny Llama base model, built locally from the world's text.

The tokenizer is a byte-level BPE with a ChatML-like template:

    <|begin_of_text|><|start|>user\\n{content}<|end|><|start|>assistant\\n{content}<|end|>

`<|end|>` is also the EOS token, so a generated answer stops where a trained answer ends, and
rendering a prefix of a conversation (plus the assistant header) yields a prefix of its tokens,
which is how data preparation finds the assistant spans to learn.

The model is a small LlamaForCausalLM pretrained on the encyclopedia only: it has seen the
facts but never the chat format, like a real base model before instruction tuning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from embedded import ModelSize, Pretraining

BOS, EOS, PAD, START = "<|begin_of_text|>", "<|end|>", "<|pad|>", "<|start|>"
CHAT_TEMPLATE = (
    r"{{ bos_token }}"
    r"{% for message in messages %}{{ '<|start|>' + message['role'] + '\n' + message['content'] + '<|end|>' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], size: ModelSize) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` (any byte sequence stays encodable) with the chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size.vocab_size,
        special_tokens=[BOS, EOS, PAD, START],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # Like Llama 3: plain `encode` starts with BOS; chat rendering writes BOS in the template
    # and is tokenized without special tokens, so BOS never doubles.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=size.max_position_embeddings,
        padding_side="left",  # batched generation continues from the right end of the prompt
    )


def new_model(tokenizer: PreTrainedTokenizerFast, size: ModelSize, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=size.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    documents: list[str],
    plan: Pretraining,
    seed: int,
    progress: Callable[[str], None],
) -> float:
    """Next-token training on random windows of the concatenated documents; returns the last loss.

    Each document is wrapped in BOS ... EOS so the model also learns where text ends.
    """
    stream: list[int] = []
    for doc in documents:
        stream += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(stream)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine down to 10% of the peak
        if step < plan.warmup_steps:
            return (step + 1) / plan.warmup_steps
        progress_ = (step - plan.warmup_steps) / max(1, plan.steps - plan.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    started = time.monotonic()
    loss = float("nan")
    with torch_threads(plan.threads):
        for step in range(plan.steps):
            starts = torch.randint(0, len(data) - plan.seq_len, (plan.batch_size,), generator=generator)
            batch = torch.stack([data[s : s + plan.seq_len] for s in starts.tolist()])
            out = model(input_ids=batch, labels=batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = out.loss.item()
            if (step + 1) % 50 == 0 or step + 1 == plan.steps:
                progress(
                    f"pretraining base model: step {step + 1}/{plan.steps}, loss {loss:.3f}, {time.monotonic() - started:.0f}s"
                )
    model.eval()
    return loss


def build_base_model(
    out_dir: Path,
    tokenizer_texts: list[str],
    documents: list[str],
    size: ModelSize,
    plan: Pretraining,
    seed: int,
    progress: Callable[[str], None],
) -> float:
    """Train the tokenizer, pretrain the model on `documents`, save both to `out_dir`.

    Returns the final pretraining loss. `out_dir` loads offline with
    AutoTokenizer / AutoModelForCausalLM.from_pretrained (safetensors weights).
    """
    progress(f"training tokenizer (byte-level BPE, vocab {size.vocab_size})")
    tokenizer = train_tokenizer(tokenizer_texts, size)
    model = new_model(tokenizer, size, seed)
    n_params = sum(p.numel() for p in model.parameters())
    progress(
        f"pretraining base model ({n_params / 1e6:.2f}M parameters, {plan.steps} steps) on {len(documents)} paragraphs"
    )
    loss = pretrain(model, tokenizer, documents, plan, seed, progress)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return loss
