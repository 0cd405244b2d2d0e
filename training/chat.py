"""Chat templates of real model families: which template, where answers are, when turns end.

Every family differs in what the lab's own template hid: Llama 3 ends a turn with
`<|eot_id|>` but its EOS is `<|end_of_text|>` and it has no pad token; Qwen ends with
`<|im_end|>` and adds a default system prompt; Qwen 3 rewrites earlier assistant turns (their
think blocks go); Mistral has no generation prompt and folds the system message into the last
user turn; Gemma rejects the system role; Granite's one `<|end_of_text|>` is BOS, EOS, pad and
end of turn; Phi-3 ends a turn with `<|end|>` but a rendering without a generation prompt with
an EOS outside every turn. Everything that depends on the template lives here,
found from renderings of the template itself, never from a table of family names:

    apply_template(tokenizer, recipe.model.chat_template)   the recipe's template, or the model's own
    assistant_spans / assistant_labels                      loss masks from ONE rendering
    end_of_turn_ids, stop_token_ids, pad_token_id           stopping and padding
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
BUNDLED = sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
IGNORE_INDEX = -100
_PROBE_ANSWER = "PROBEANSWER"  # a word no template rewrites, to see what a template puts after an answer


class ChatTemplateError(ValueError):
    """No usable chat template; the message names the recipe field to set."""


def template_text(setting: str) -> str:
    """The Jinja text of `model.chat_template`: a bundled name (chatml, llama3, ...) or a file."""
    if setting in BUNDLED:
        return (TEMPLATES_DIR / f"{setting}.jinja").read_text()
    path = Path(setting).expanduser()
    if path.is_file():
        return path.read_text()
    raise ChatTemplateError(
        f"model.chat_template: {setting!r} is neither a bundled template ({', '.join(BUNDLED)}) nor a Jinja file"
    )


def apply_template(tokenizer: Any, setting: str | None, model_name: str = "the model") -> Any:
    """Set the recipe's template on `tokenizer` (saved with it, so with every checkpoint).

    Without a setting the tokenizer keeps its own template; a base model that has none fails
    here, before anything is tokenized or trained.
    """
    if setting is not None:
        tokenizer.chat_template = template_text(setting)
    elif not tokenizer.chat_template:
        raise ChatTemplateError(
            f"{model_name} has no chat template: set model.chat_template to a bundled template "
            f"({', '.join(BUNDLED)}) or to a Jinja file"
        )
    return tokenizer


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@dataclass(frozen=True)
class TemplateShape:
    """What a template writes around an answer, measured on a probe conversation."""

    header: str  # the generation prompt: what precedes every answer ('' for Mistral)
    end_of_turn: tuple[str, ...]  # the special token that closes an assistant turn
    generation_blocks: bool  # the template marks answers with {% generation %}


def special_tokens(tokenizer: Any) -> list[str]:
    """Every special token string, longest first (so `<|im_end|>` wins over a shorter prefix)."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted(set(added) | set(tokenizer.all_special_tokens), key=len, reverse=True)


_shapes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (template, shape)


def template_shape(tokenizer: Any) -> TemplateShape:
    """The template's shape, measured once per tokenizer and template (three small renders)."""
    template = tokenizer.chat_template or ""
    cached = _shapes.get(tokenizer)
    if cached is None or cached[0] != template:
        cached = _shapes[tokenizer] = (template, _measure(tokenizer, template))
    return cached[1]


def _measure(tokenizer: Any, template: str) -> TemplateShape:
    user = [{"role": "user", "content": "Hello."}]
    bare, prompted = render(tokenizer, user), render(tokenizer, user, generation_prompt=True)
    header = _generation_prompt(tokenizer, bare, prompted)
    answered = render(tokenizer, [*user, {"role": "assistant", "content": _PROBE_ANSWER}])
    after = answered[answered.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER) :].lstrip(" ")
    closing = next((s for s in special_tokens(tokenizer) if after.startswith(s)), None)
    if closing is None:
        # The model could never learn (nor be told) where its answer ends; typically a template
        # written for other tokens, e.g. ChatML's <|im_end|> on a tokenizer without it.
        raise ChatTemplateError(
            f"model.chat_template: the template closes an assistant turn with {after[:20]!r}, which does "
            "not start with a special token of this tokenizer; use a template written for this model's tokens"
        )
    return TemplateShape(header=header, end_of_turn=(closing,), generation_blocks="generation %}" in template)


def _generation_prompt(tokenizer: Any, bare: str, prompted: str) -> str:
    """What the generation prompt adds after the last turn ('' for Mistral, which has none).

    Usually `prompted` is `bare` plus the prompt; Phi-3 ends `bare` with an EOS that the prompt
    replaces (`<|endoftext|>` vs `<|assistant|>\n`). The two are then compared token by token
    (a special token is one token; characters would match `<|` of both) and the prompt is what
    follows the tokens they share.
    """
    if prompted.startswith(bare):
        return prompted[len(bare) :]
    a, b = (tokenizer.backend_tokenizer.encode(text, add_special_tokens=False) for text in (bare, prompted))
    shared = next(
        (i for i, (x, y) in enumerate(zip(a.ids, b.ids, strict=False)) if x != y), min(len(a.ids), len(b.ids))
    )
    return prompted[b.offsets[shared - 1][1] :] if shared else prompted


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that close an assistant turn in this template (may be the EOS)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in template_shape(tokenizer).end_of_turn]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Where generation stops: the template's end-of-turn token(s), then EOS."""
    ids = end_of_turn_ids(tokenizer) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return list(dict.fromkeys(ids))


def pad_token_id(tokenizer: Any, config: Any = None) -> int:
    """The tokenizer's pad, else the model config's, else the end-of-turn token: never None.

    Pad positions are masked out of attention and loss, so any id works; end-of-turn (Llama 3,
    Mistral have no pad) is what their own fine-tuning guides use.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if config is not None and getattr(config, "pad_token_id", None) is not None:
        return config.pad_token_id
    return stop_token_ids(tokenizer)[0]


def configure_generation(model: Any, tokenizer: Any) -> None:
    """Generation stops at the template's end-of-turn token(s) and at EOS, and pads with a real
    id: set on the model's generation_config, so every checkpoint saved from it (and every
    export copying its generation_config.json) stops where its answers end."""
    model.generation_config.update(**generation_settings(tokenizer, model.config))


def generation_settings(tokenizer: Any, config: Any) -> dict[str, Any]:
    """The generation_config fields that end answers where the template ends a turn."""
    return {"eos_token_id": stop_token_ids(tokenizer), "pad_token_id": pad_token_id(tokenizer, config)}


def _located(text: str, content: str, start: int) -> tuple[int, int] | None:
    """(begin, end) of `content` in `text` at or after `start`, as the template wrote it.

    Templates trim content (Llama 3, Gemma) or keep only the answer after a think block
    (Qwen 3 on earlier turns); each form is tried, the exact one first.
    """
    for form in _forms(content):
        at = text.find(form, start) if form else -1
        if at >= 0:
            return at, at + len(form)
    return None


def _forms(content: str) -> Iterator[str]:
    """The forms of `content` a template may write, the exact one first (each made only when
    the ones before it were not found: this runs for every message of every conversation)."""
    yield content
    yield content.strip()
    yield content.split("</think>")[-1].strip()


def assistant_spans(text: str, messages: list[dict[str, str]], shape: TemplateShape) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in one rendering of the whole conversation.

    A span runs from the end of the turn's header (the generation prompt) through the closing
    end-of-turn token, so the model learns everything it must generate after the prompt,
    stopping included, and nothing of the next turn. User turns are located too, in order, so
    an answer is never matched inside a later question. System messages are skipped: templates
    move them (Mistral folds the system message into the last user turn).
    """
    spans, cursor = [], 0
    for j, message in enumerate(messages):
        if message["role"] == "system":
            continue
        found = _located(text, message["content"], cursor)
        if found is None:
            raise ValueError(f"message {j} ({message['role']}) is not in the template's rendering of the conversation")
        begin, end = found
        if message["role"] == "assistant":
            header_at = text.rfind(shape.header, cursor, begin) if shape.header else -1
            if header_at >= 0:
                begin = header_at + len(shape.header)
            (closing,) = shape.end_of_turn
            at = text.find(closing, end)
            if at < 0:
                raise ValueError(f"message {j} (assistant) is not closed by {closing!r} in the template's rendering")
            end = at + len(closing)
            spans.append((begin, end))
        cursor = end
    return spans


def assistant_labels(
    tokenizer: Any, messages: list[dict[str, str]], train_on_prompt: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and labels (IGNORE_INDEX outside the answers) of one conversation, as int32 arrays."""
    return assistant_labels_batch(tokenizer, [messages], train_on_prompt)[0]


# transformers tracks {% generation %} blocks in state shared by every user of the compiled
# template, and refuses a second rendering while one is running: one such rendering at a time.
_generation_lock = threading.Lock()


def assistant_labels_batch(
    tokenizer: Any, conversations: list[list[dict[str, str]]], train_on_prompt: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, labels) of each conversation, each from ONE rendering of it.

    Templates with `{% generation %}` blocks mark the answers themselves; for the others,
    the assistant spans' character offsets become token offsets (a token is trained when it
    overlaps a span: Mistral's answer starts with a token that carries the space before it;
    tokens cover the text in order, so a span's tokens are one contiguous run).
    The conversations are rendered and encoded as one batch: the batch encoder, most of the
    work, releases the GIL, so batches encode in parallel threads.
    """
    shape = template_shape(tokenizer)
    if shape.generation_blocks and not train_on_prompt:
        with _generation_lock:
            out = tokenizer.apply_chat_template(
                conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
        pairs = [
            (np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool))
            for ids, mask in zip(out["input_ids"], out["assistant_masks"], strict=True)
        ]
        return [(ids, np.where(mask, ids, IGNORE_INDEX).astype(np.int32)) for ids, mask in pairs]
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    # The backend tokenizer directly: the same ids and offsets as tokenizer(...), without the
    # wrapper's overhead (and without its padding/truncation settings, which it mutates per call).
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    out = []
    for text, messages, encoding in zip(texts, conversations, encodings, strict=True):
        ids = np.asarray(encoding.ids, dtype=np.int32)
        labels = ids.copy() if train_on_prompt else np.full_like(ids, IGNORE_INDEX)
        if not train_on_prompt:
            for begin, end in assistant_spans(text, messages, shape):
                first, stop = _first_token(encoding, begin, text), _first_token(encoding, end, text)
                # A token that straddles the span's end overlaps it too (and so do its byte-level
                # siblings, which share its offsets).
                while stop < len(ids) and encoding.token_to_chars(stop)[0] < end:
                    stop += 1
                labels[first:stop] = ids[first:stop]
        out.append((ids, labels))
    return out


def _first_token(encoding: Any, char: int, text: str) -> int:
    """Index of the first token that covers a character at or after `char` (the token count if
    none does). A few lookups per answer: reading every token's offsets into Python cost about
    an eighth of the encoding, holding the GIL."""
    for at in range(char, len(text)):
        token = encoding.char_to_token(at)
        if token is not None:
            return token
    return len(encoding)


def merge_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """A leading system message folded into the first user turn (for templates without a system role)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first_user is None:
        return rest
    merged = {"role": "user", "content": f"{system}\n\n{rest[first_user]['content']}"}
    return [*rest[:first_user], merged, *rest[first_user + 1 :]]
