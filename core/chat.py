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

import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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

    end_of_turn: tuple[str, ...]  # the special token that closes an assistant turn
    generation_blocks: bool  # the template marks answers with {% generation %}


def special_tokens(tokenizer: Any) -> list[str]:
    """Every special token string, longest first (so `<|im_end|>` wins over a shorter prefix)."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted(set(added) | set(tokenizer.all_special_tokens), key=len, reverse=True)


@dataclass
class _Measured:
    """What is measured once per tokenizer and template: its shape and the skeletons of the
    conversation structures seen so far."""

    template: str
    shape: TemplateShape
    skeletons: dict[tuple[tuple[str, str], ...], _Skeleton]


_measures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> _Measured


def _measured(tokenizer: Any) -> _Measured:
    template = tokenizer.chat_template or ""
    cached = _measures.get(tokenizer)
    if cached is None or cached.template != template:
        cached = _measures[tokenizer] = _Measured(template, _measure(tokenizer, template), {})
    return cached


def template_shape(tokenizer: Any) -> TemplateShape:
    """The template's shape, measured once per tokenizer and template (one small render)."""
    return _measured(tokenizer).shape


def _measure(tokenizer: Any, template: str) -> TemplateShape:
    user = [{"role": "user", "content": "Hello."}]
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
    return TemplateShape(end_of_turn=(closing,), generation_blocks="generation %}" in template)


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
    """Generation stops where the model already stopped (its generation_config's EOS id or ids), at
    the template's end-of-turn token(s) and at EOS, and pads with a real id. Set on the model's
    generation_config, so every checkpoint saved from it and every export stops where its answers
    end, whether a trained checkpoint or the start model is exported (the same ids either way:
    the ids already there come first, so applying it again changes nothing)."""
    model.generation_config.update(**generation_settings(model.generation_config, tokenizer, model.config))


def generation_settings(generation_config: Any, tokenizer: Any, config: Any) -> dict[str, Any]:
    """The generation_config fields `configure_generation` sets (also for a served checkpoint)."""
    eos = generation_config.eos_token_id
    known = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return {
        "eos_token_id": list(dict.fromkeys(known + stop_token_ids(tokenizer))),
        "pad_token_id": pad_token_id(tokenizer, config),
    }


# Where each message's text lands in a rendering is found by construction, never by searching
# for the text: the conversation is rendered once more with each content's text replaced by
# markers (characters of a private-use plane, which no template writes and which cannot match
# anything else), the markers are found in that skeleton, and the real texts spliced back in
# must give the real rendering character for character. What a template may inspect or change
# in a content stays in the skeleton as it is: leading and trailing whitespace (`| trim`) and
# think tags (Qwen 3 splits on them and drops earlier turns' reasoning), so the skeleton takes
# the same branches and transformations. A template that does anything else with a content
# (upper-cases it, cuts it at a word) makes the splice differ from the real rendering: refused.
_MARKER_BASE = 0xF0000  # Supplementary Private Use Area-A
_MARKERS = re.compile("[\U000f0000-\U000ffffd]")
_KEPT = re.compile(r"\A\s+|\s+\Z|\s*</?think>\s*")
_MAX_SKELETONS = 65536  # cached conversation structures per tokenizer (each a few hundred characters)


class Labelled(NamedTuple):
    """One conversation's token ids and labels (IGNORE_INDEX outside the answers), int32 arrays."""

    input_ids: np.ndarray
    labels: np.ndarray
    straddles: bool  # a token starts in an answer's header and ends in the answer (not trained)


@dataclass(frozen=True)
class _Skeleton:
    """The rendering of a conversation whose texts are markers."""

    text: str
    markers: tuple[tuple[int, int], ...]  # (position in text, piece) of every marker, in order
    turns: tuple[tuple[int, int], ...]  # (start, end) of each assistant turn in text


def _sentinels(messages: list[dict[str, str]]) -> tuple[tuple[tuple[str, str], ...], list[str], list[int]]:
    """(role, content with its texts replaced by markers) per message, the text each marker stands
    for, and the number of markers before each message (so a message owns a known range)."""
    skeleton, pieces, owned = [], [], []
    for j, message in enumerate(messages):
        content = message["content"]
        if _MARKERS.search(content):
            raise ValueError(
                f"message {j} ({message['role']}) contains private-use characters U+F0000-U+FFFFD, with which "
                "recipe-lab locates each message in the rendering; remove them"
            )
        owned.append(len(pieces))
        parts, at = [], 0
        for kept in _KEPT.finditer(content):
            if kept.start() > at:
                parts.append(chr(_MARKER_BASE + len(pieces)))
                pieces.append(content[at : kept.start()])
            parts.append(kept.group())
            at = kept.end()
        if at < len(content):
            parts.append(chr(_MARKER_BASE + len(pieces)))
            pieces.append(content[at:])
        skeleton.append((message["role"], "".join(parts)))
    return tuple(skeleton), pieces, [*owned, len(pieces)]


def _skeleton(tokenizer: Any, sentinels: tuple[tuple[str, str], ...], owned: list[int]) -> _Skeleton:
    """Render a sentinel conversation and find each assistant turn in it (cached per structure:
    conversations whose contents differ only in their text share one).

    A turn starts where the template's prompt for it ends: the prompt is rendered for the
    messages before the turn (with the generation prompt), and its text after its last marker,
    the part that is the template's own, is found between the turn's first marker and the
    marker before it (Mistral folds the system message into the last user turn, so the prompt
    as a whole need not be a prefix of the conversation). A turn ends with the first end-of-turn
    token after its last marker. Between the two is everything the model generates after its
    prompt: the answer as the template writes it (Mistral's leading space, Qwen 3's think block)
    and the end-of-turn token.
    """
    measured = _measured(tokenizer)
    if (cached := measured.skeletons.get(sentinels)) is not None:
        return cached
    messages = [{"role": role, "content": content} for role, content in sentinels]
    text = render(tokenizer, messages)
    markers = tuple((m.start(), ord(m.group()) - _MARKER_BASE) for m in _MARKERS.finditer(text))
    (closing,) = measured.shape.end_of_turn
    turns = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        own = [at for at, piece in markers if owned[j] <= piece < owned[j + 1]]
        if not own:
            raise ChatTemplateError(f"message {j} (assistant) is not in the template's rendering of the conversation")
        after_previous = max((at + 1 for at, _ in markers if at < own[0]), default=0)
        start = _prompt_end(render(tokenizer, messages[:j], generation_prompt=True), text, after_previous, own[0])
        if start is None:
            raise ChatTemplateError(
                f"message {j} (assistant): the end of the template's prompt for it is not before the answer in the "
                "rendered conversation"
            )
        close = text.find(closing, own[-1] + 1)
        if close < 0:
            raise ChatTemplateError(f"message {j} (assistant) is not closed by {closing!r} in the template's rendering")
        end = close + len(closing)
        inside = [(at, piece) for at, piece in markers if start <= at < end]
        if [at for at, _ in inside] != own or any(not owned[j] <= piece < owned[j + 1] for _, piece in inside):
            raise ChatTemplateError(
                f"message {j} (assistant): the template writes other messages' text into this answer's turn, or "
                "this answer elsewhere; the turn cannot be told apart"
            )
        turns.append((start, end))
    skeleton = _Skeleton(text, markers, tuple(turns))
    if len(measured.skeletons) >= _MAX_SKELETONS:  # a bound, not an LRU: structures repeat
        measured.skeletons.clear()
    measured.skeletons[sentinels] = skeleton
    return skeleton


def _prompt_end(prompt: str, text: str, begin: int, end: int) -> int | None:
    """Where the prompt for a turn ends in `text`, searched in text[begin:end] (the template's text
    between the previous content and the answer). The prompt's own text after its last content
    is looked for; when the template renders the earlier turns differently in the prompt (Mistral
    moves the system message), the longest end of it that is there (at least one visible character)."""
    tail = _MARKERS.split(prompt)[-1]
    for cut in range(len(tail) + 1):
        suffix = tail[cut:]
        if cut and not suffix.strip():
            return None
        if (at := text.rfind(suffix, begin, end)) >= 0:
            return at + len(suffix)
    return None


# transformers tracks {% generation %} blocks in state shared by every user of the compiled
# template, and refuses a second rendering while one is running: one such rendering at a time.
_generation_lock = threading.Lock()


def assistant_spans(
    tokenizer: Any, conversations: list[list[dict[str, str]]]
) -> list[tuple[str, list[tuple[int, int]]]]:
    """(rendering, character spans of its assistant turns) of each conversation.

    Templates with `{% generation %}` blocks mark the spans themselves; for the others each
    span is everything the model generates for a turn: from the end of its prompt through the
    end-of-turn token (see _skeleton), placed in the real rendering by splicing the texts back
    into the skeleton.
    """
    if template_shape(tokenizer).generation_blocks:
        from transformers.utils.chat_template_utils import render_jinja_template

        with _generation_lock:
            texts, indices = render_jinja_template(
                conversations=conversations,
                chat_template=tokenizer.chat_template,
                return_assistant_tokens_mask=True,
                **tokenizer.special_tokens_map,
            )
        return list(zip(texts, [list(spans) for spans in indices], strict=True))
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    return [(text, _spans(tokenizer, text, messages)) for text, messages in zip(texts, conversations, strict=True)]


def _spans(tokenizer: Any, text: str, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
    sentinels, pieces, owned = _sentinels(messages)
    skeleton = _skeleton(tokenizer, sentinels, owned)
    spliced, shift, shifts, at = [], 0, [], 0  # shifts: (skeleton position, shift after it)
    for position, piece in skeleton.markers:
        spliced += [skeleton.text[at:position], pieces[piece]]
        shift += len(pieces[piece]) - 1
        shifts.append((position, shift))
        at = position + 1
    spliced.append(skeleton.text[at:])
    if "".join(spliced) != text:
        raise ChatTemplateError(
            "the chat template changes a message's text in a way recipe-lab cannot follow (it keeps texts as they "
            "are, trims them, or splits think blocks); rendered with the texts spliced back in, the conversation "
            f"differs from its real rendering from character {_first_difference(''.join(spliced), text)}"
        )

    def real(position: int) -> int:  # a skeleton position (never a marker's) in the real rendering
        moved = [s for at, s in shifts if at < position]
        return position + (moved[-1] if moved else 0)

    return [(real(start), real(end)) for start, end in skeleton.turns]


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def assistant_labels(tokenizer: Any, messages: list[dict[str, str]], train_on_prompt: bool = False) -> Labelled:
    """Token ids and labels of one conversation (see assistant_labels_batch)."""
    return assistant_labels_batch(tokenizer, [messages], train_on_prompt)[0]


def assistant_labels_batch(
    tokenizer: Any, conversations: list[list[dict[str, str]]], train_on_prompt: bool = False
) -> list[Labelled]:
    """Token ids and labels of each conversation, each from ONE rendering of it.

    The rule for tokens: a token is trained when it starts inside an assistant span. A token
    that starts in the turn's header and ends in the answer (a leading newline merged with the
    header's newline) belongs to the prompt the model is given, so it is not trained, and the
    sample is flagged (data prep counts them). Tokens cover the text in order, so a span's
    tokens are one contiguous run. The conversations are rendered and encoded as one batch: the
    batch encoder, most of the work, releases the GIL, so batches encode in parallel threads.
    """
    if train_on_prompt:
        rendered = [(text, []) for text in tokenizer.apply_chat_template(conversations, tokenize=False)]
    else:
        rendered = assistant_spans(tokenizer, conversations)
    texts = [text for text, _ in rendered]
    # The backend tokenizer directly: the same ids and offsets as tokenizer(...), without the
    # wrapper's overhead (and without its padding/truncation settings, which it mutates per call).
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    out = []
    for (text, turns), encoding in zip(rendered, encodings, strict=True):
        ids = np.asarray(encoding.ids, dtype=np.int32)
        labels = ids.copy() if train_on_prompt else np.full_like(ids, IGNORE_INDEX)
        straddles = False
        for begin, end in turns:
            first, stop = _first_token_from(encoding, begin, text), _first_token_from(encoding, end, text)
            straddles |= first > 0 and first < len(ids) and _starts_before(encoding, first - 1, begin, text)
            labels[first:stop] = ids[first:stop]
        out.append(Labelled(ids, labels, straddles))
    return out


def _first_token_from(encoding: Any, char: int, text: str) -> int:
    """Index of the first token that starts at or after `char` (the token count if none does).
    A few lookups per answer: reading every token's offsets into Python cost about an eighth of
    the encoding, holding the GIL. Byte-level siblings of a character share its offsets."""
    token = next((t for t in map(encoding.char_to_token, range(char, len(text))) if t is not None), len(encoding))
    while token < len(encoding) and encoding.token_to_chars(token)[0] < char:
        token += 1
    return token


def _starts_before(encoding: Any, token: int, char: int, text: str) -> bool:
    """Whether `token` starts before `char` and reaches past it (it straddles `char`)."""
    begin, end = encoding.token_to_chars(token)
    return begin < char < end


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
