"""Data preparation: chat files -> token ids + loss labels in one Parquet file, plus stats.json.

Input rows are OpenAI `messages`, ShareGPT `conversations` (from/value) or Alpaca
(instruction/input/output); all are normalised to `messages`. Any malformed row stops the
preparation with an error naming the file and line: silently skipping bad rows would change
the data a recipe trains on without anyone noticing.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from training import storage
from training.recipe import PhaseConfig

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """A malformed input row; the message starts with 'file:line:'."""


def read_rows(uri: str) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed row) from a JSONL or Parquet file (row numbers from 1)."""
    if uri.endswith(".parquet"):
        with fsspec.open(uri, "rb") as f:
            table = pq.read_table(io.BytesIO(f.read()))
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row
        return
    with fsspec.open(uri, "r") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{uri}:{i}: invalid JSON ({exc.msg})") from None


def normalise(row: Any, where: str) -> list[dict[str, str]]:
    """Return the row's conversation as validated OpenAI-style messages."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
    elif "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list):
            raise DataError(f"{where}: 'conversations' must be a list")
        messages = []
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
                raise DataError(f"{where}: ShareGPT turn needs 'from' in {sorted(SHAREGPT_ROLES)}, got {turn!r:.80}")
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
    elif "instruction" in row and "output" in row:
        prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    else:
        raise DataError(f"{where}: no 'messages' (nor ShareGPT 'conversations', nor Alpaca instruction/output)")

    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: message {j} is not an object")
        if msg.get("role") not in ROLES:
            raise DataError(f"{where}: message {j} has unknown role {msg.get('role')!r} (expected one of {ROLES})")
        if not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: message {j} content must be a string, got {type(msg.get('content')).__name__}")
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise DataError(f"{where}: message {j} is an empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def tokenize(
    tokenizer: Any, messages: list[dict[str, str]], train_on_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation rendered with the tokenizer's chat template.

    Assistant spans are found by rendering growing prefixes: the tokens that message i adds
    over `messages[:i]` + generation prompt are its answer. This works with any template that
    renders a prefix of the conversation as a prefix of the tokens, which we check.
    """

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    input_ids = render(messages, False)
    labels = list(input_ids) if train_on_prompt else [IGNORE_INDEX] * len(input_ids)
    if train_on_prompt:
        return input_ids, labels
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        start, end = len(prompt), len(upto)
        if upto[:start] != prompt or input_ids[:end] != upto:
            raise DataError("the chat template does not render prefixes as token prefixes; set train_on_prompt")
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


@dataclass
class PrepStats:
    files: dict[str, int] = field(default_factory=dict)  # rows read per input file
    samples: int = 0
    replayed: int = 0  # samples of earlier phases mixed in (PhaseConfig.replay)
    dropped_too_long: int = 0
    dropped_no_loss_tokens: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    max_len: int = 0
    mean_len: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


Conversation = tuple[str, list[dict[str, str]]]  # (sample id, messages)


def read_conversations(uri: str) -> list[Conversation]:
    """(id, messages) of every row, validated; the id defaults to file:line."""
    rows = []
    for line, row in read_rows(uri):
        where = f"{uri}:{line}"
        messages = normalise(row, where)
        rows.append((str(row.get("id", where)), messages))
    return rows


def response_length(conversation: Conversation) -> int:
    """Characters of the assistant turns: the paper's proxy for difficulty (A.6.1)."""
    return sum(len(m["content"]) for m in conversation[1] if m["role"] == "assistant")


def split_by_length(conversations: list[Conversation], part: Literal["short", "long"]) -> list[Conversation]:
    """The bottom half ('short') or the top half ('long') by response length; every
    conversation lands in exactly one half (ties ordered by id)."""
    ordered = sorted(conversations, key=lambda c: (response_length(c), c[0]))
    half = len(ordered) // 2
    return ordered[:half] if part == "short" else ordered[half:]


def load_phase(
    sources: list[str], length_split: Literal["short", "long"] | None = None
) -> tuple[list[Conversation], dict[str, int]]:
    """A phase's conversations (optionally one length half of them) and the rows read per file."""
    conversations, counts = [], {}
    for source in sources:
        rows = read_conversations(storage.resolve_embedded(source))
        counts[source] = len(rows)
        conversations += rows
    return (split_by_length(conversations, length_split) if length_split else conversations), counts


def phase_conversations(
    phases: Sequence[PhaseConfig], index: int
) -> tuple[list[Conversation], list[Conversation], dict[str, int]]:
    """What phase `index` of `phases` trains on: (its conversations, the pool its `replay` samples
    from, rows read per file). A stacked phase's conversations are each part's (its length half),
    once; the pool is the earlier phases' conversations."""
    phase = phases[index]
    conversations, files = [], {}
    for part in phase.stacked_from or [phase]:
        rows, counts = load_phase(part.data, part.length_split)
        conversations += rows
        files |= counts
    pool = [c for earlier in range(index) for c in phase_conversations(phases, earlier)[0]] if phase.replay else []
    return conversations, pool, files


def prepare(
    conversations: list[Conversation],
    tokenizer: Any,
    out_dir: str,
    max_seq_len: int,
    train_on_prompt: bool = False,
    replay_pool: list[Conversation] = (),
    replay_fraction: float = 0.0,
    seed: int = 0,
    files: dict[str, int] | None = None,
) -> PrepStats:
    """Tokenize conversations into `out_dir/tokens.parquet` and write `out_dir/stats.json`.

    `replay_fraction` of `replay_pool` (the earlier phases' data, a seeded sample) is mixed
    in. Samples longer than max_seq_len are dropped and counted, never truncated (a truncated
    answer teaches the model to stop mid-sentence). Files are written only after every row
    validated, so a bad row leaves nothing half-written. Row order does not matter: the
    sampler draws a fresh permutation every epoch.
    """
    stats = PrepStats(files=dict(files or {}))
    conversations = list(conversations)
    if replay_fraction > 0:
        replayed = random.Random(seed).sample(list(replay_pool), round(replay_fraction * len(replay_pool)))
        stats.replayed = len(replayed)
        conversations += replayed

    ids: list[str] = []
    all_input_ids: list[list[int]] = []
    all_labels: list[list[int]] = []
    for sample_id, messages in conversations:
        input_ids, labels = tokenize(tokenizer, messages, train_on_prompt)
        if len(input_ids) > max_seq_len:
            stats.dropped_too_long += 1
            continue
        loss_tokens = sum(1 for t in labels[1:] if t != IGNORE_INDEX)
        if loss_tokens == 0:
            stats.dropped_no_loss_tokens += 1
            continue
        ids.append(sample_id)
        all_input_ids.append(input_ids)
        all_labels.append(labels)
        stats.tokens += len(input_ids)
        stats.loss_tokens += loss_tokens
        stats.max_len = max(stats.max_len, len(input_ids))
    if not ids:
        raise DataError(f"no usable samples in {sorted(stats.files)} (dropped {stats.dropped_too_long} too long)")

    stats.samples = len(ids)
    stats.mean_len = round(stats.tokens / len(ids), 2)
    table = pa.table(
        {
            "id": ids,
            "input_ids": pa.array(all_input_ids, type=pa.list_(pa.int32())),
            "labels": pa.array(all_labels, type=pa.list_(pa.int32())),
        }
    )
    fs, path = storage.filesystem(storage.join(out_dir, "tokens.parquet"))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
    storage.write_json(storage.join(out_dir, "stats.json"), stats.to_dict())
    return stats


@dataclass
class TokenizedData:
    ids: list[str]
    input_ids: list[list[int]]
    labels: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    def loss_tokens(self) -> list[int]:
        # Labels are shifted inside the loss: the first position never predicts anything.
        return [sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in self.labels]


def load_tokenized(data_dir: str) -> TokenizedData:
    with fsspec.open(storage.join(data_dir, "tokens.parquet"), "rb") as f:
        table = pq.read_table(io.BytesIO(f.read()))
    return TokenizedData(
        ids=table.column("id").to_pylist(),
        input_ids=table.column("input_ids").to_pylist(),
        labels=table.column("labels").to_pylist(),
    )
