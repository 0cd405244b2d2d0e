"""A zoo of tiny random models of real families, each wearing its family's chat template.

Built locally from the lab's byte-level BPE (nothing downloaded), with one merge real
vocabularies have ("\n\n" is one token, so an answer's leading newline can merge with the
header's): each family gets its own special tokens on top of it, its own BOS / EOS / pad conventions, its real architecture class
(tiny: 2 layers, hidden 32) and the bundled template text written from the family's public
conventions (core/templates/). What each family breaks in a Llama-lab-only pipeline:

    llama3   no pad token; a turn ends with <|eot_id|>, EOS is <|end_of_text|>
    qwen2.5  ChatML (<|im_end|>, EOS <|endoftext|>), a default system prompt, no pad token
    qwen3    rewrites history: think blocks only on the turns after the last question
    mistral  [INST] ... [/INST], no generation prompt, system folded into the last user turn,
             EOS </s> ends a turn, no pad token, sliding-window attention
    gemma    (Gemma 3) rejects the system role, <end_of_turn> ends a turn, EOS <eos>, pad <pad>
    gemma2   (Gemma 2) the same conventions, and softcapping: attention logits (which sdpa and
             packed rows cannot do) and final logits (which the chunked loss must apply)
    granite  (Granite 3) one token <|end_of_text|> is BOS, EOS, pad and end of turn (nothing may
             drop labels equal to the pad id), a default system prompt, muP multipliers
    phi3     (Phi-3 mini) <|end|> ends a turn, yet a rendering without a generation prompt ends
             with an EOS outside every turn (not trained); pad is the EOS <|endoftext|>
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from core.chat import template_text


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    template: str  # bundled template name
    specials: tuple[str, ...]  # added on top of the lab's BPE
    bos: str | None
    eos: str
    pad: str | None
    end_of_turn: str
    system_role: bool = True
    add_bos: bool = True  # plain `encode` starts with BOS (Granite's GPT-2 tokenizer adds none)
    config: tuple[tuple[str, object], ...] = ()


# Gemma 2 and 3 share their tokens and turn conventions (and reject the system role).
GEMMA_TOKENS = dict(
    specials=("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    end_of_turn="<end_of_turn>",
    system_role=False,
)
GEMMA_SHAPE = (("head_dim", 8), ("query_pre_attn_scalar", 8), ("sliding_window", 16))

FAMILIES = {
    f.name: f
    for f in [
        Family(
            "llama3",
            "llama",
            "llama3",
            ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            bos="<|begin_of_text|>",
            eos="<|end_of_text|>",
            pad=None,
            end_of_turn="<|eot_id|>",
        ),
        Family(
            "qwen2.5",
            "qwen2",
            "qwen2.5",
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos=None,
            eos="<|endoftext|>",
            pad=None,
            end_of_turn="<|im_end|>",
        ),
        Family(
            "qwen3",
            "qwen3",
            "qwen3",
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
            bos=None,
            eos="<|endoftext|>",
            pad=None,
            end_of_turn="<|im_end|>",
        ),
        Family(
            "mistral",
            "mistral",
            "mistral",
            ("<s>", "</s>", "[INST]", "[/INST]"),
            bos="<s>",
            eos="</s>",
            pad=None,
            end_of_turn="</s>",
            config=(("sliding_window", 16),),
        ),
        Family("gemma", "gemma3_text", "gemma", **GEMMA_TOKENS, config=GEMMA_SHAPE),
        Family(
            "gemma2",
            "gemma2",
            "gemma2",
            **GEMMA_TOKENS,
            config=(*GEMMA_SHAPE, ("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)),
        ),
        Family(
            "granite",
            "granite",
            "granite",
            ("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"),
            bos="<|end_of_text|>",
            eos="<|end_of_text|>",
            pad="<|end_of_text|>",
            end_of_turn="<|end_of_text|>",
            add_bos=False,
            # Granite 3.0's muP multipliers: attention scaled by 1 / head_dim (not its square root),
            # scaled embeddings, residuals and logits; an attention that drops `scaling` shows here.
            config=(
                ("attention_multiplier", 0.125),
                ("embedding_multiplier", 12.0),
                ("residual_multiplier", 0.22),
                ("logits_scaling", 8.0),
            ),
        ),
        Family(
            "phi3",
            "phi3",
            "phi3",
            ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            bos="<s>",
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            end_of_turn="<|end|>",
        ),
    ]
}


def family_tokenizer(base_tokenizer_dir: Path, family: Family) -> PreTrainedTokenizerFast:
    """The lab's BPE (plus the "\n\n" merge) with the family's special tokens, BOS rule and template."""
    spec = json.loads((base_tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    newline = "\u010a"  # the byte-level form of "\n"
    vocab[newline * 2] = 1 + max([*vocab.values(), *(t["id"] for t in spec["added_tokens"])])
    spec["model"]["merges"].append([newline, newline])
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.add_special_tokens(list(family.specials))
    if family.bos and family.add_bos:  # plain `encode` starts with the family's BOS (templates write it themselves)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A",
            pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, backend.token_to_id(family.bos))],
        )
    else:
        backend.post_processor = None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        chat_template=template_text(family.template),
        model_max_length=512,
    )


def tiny_config(family: Family, **settings: object) -> PretrainedConfig:
    """The config of a tiny model of `family` (2 layers, hidden 32), `settings` on top."""
    shape = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return AutoConfig.for_model(family.model_type, **(shape | dict(family.config) | settings))


def build_family(base_tokenizer_dir: Path, family: Family, out_dir: Path, seed: int = 0) -> Path:
    """save_pretrained a tiny random model of `family` with its tokenizer into `out_dir`.

    Like the hub's base checkpoints: generation_config.eos_token_id is the EOS only, and pad
    is absent where the family has none; recipe-lab must supply the rest.
    """
    import torch

    tokenizer = family_tokenizer(base_tokenizer_dir, family)
    config = tiny_config(
        family,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_zoo(base_tokenizer_dir: Path, root: Path) -> dict[str, Path]:
    return {name: build_family(base_tokenizer_dir, family, root / name) for name, family in FAMILIES.items()}


if (
    __name__ == "__main__"
):  # python -m tests.zoo DIR: the zoo on disk, e.g. for `lab run --set model.name_or_path=DIR/llama3`
    import sys

    from embedded import build_assets

    for name, path in build_zoo(build_assets().base_model_dir, Path(sys.argv[1])).items():
        print(f"{name}: {path}")
