"""Data preparation: chat files -> token ids + loss labels in one Parquet file, plus stats.json.

Input rows are OpenAI `messages`, ShareGPT `conversations` (from/value) or Alpaca
(instruction/input/output); all are normalised to `messages`. Any malformed row stops the
preparation with an error naming the file and line: silently skipping bad rows would change
the data a recipe trains on without anyone noticing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from jinja2.exceptions import TemplateError

from core import chat, records, storage
from core.recipe import PhaseConfig
from core.records import PrepStats

IGNORE_INDEX = chat.IGNORE_INDEX
PREP_FORMAT = 3  # bump when the prepared tokens of the same inputs change
SystemMessage = Literal["as_is", "merge_into_first_user"]
ROLES = ("system", "user", "assistant")
UNSUPPORTED_ROLES = ("tool", "function", "ipython")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


VALIDATION_FILE = "validation.parquet"


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
    out = []
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: message {j} is not an object")
        if msg.get("role") in UNSUPPORTED_ROLES or msg.get("tool_calls"):
            raise DataError(
                f"{where}: message {j} is a tool call or tool result (role {msg.get('role')!r}); "
                "tool use is not supported: drop these turns or render them as text"
            )
        if msg.get("role") not in ROLES:
            raise DataError(f"{where}: message {j} has unknown role {msg.get('role')!r} (expected one of {ROLES})")
        content = message_text(msg.get("content"), f"{where}: message {j}")
        if msg["role"] == "assistant" and not content.split("</think>")[-1].strip():
            # An empty answer teaches the model to end its turn at once (a think block alone is
            # no answer either: templates drop earlier turns' reasoning). Empty user and system
            # turns are rendered as the template writes them.
            raise DataError(f"{where}: message {j} is an empty assistant turn (nothing to learn but stopping)")
        out.append({"role": msg["role"], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn to learn from")
    return out


def message_text(content: Any, where: str) -> str:
    """A message's text: a string, or OpenAI content parts whose text parts are joined with
    newlines (as vLLM's OpenAI server joins them). Any other part (image, audio, file) is an
    error: the text models trained here would silently lose it."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where} content must be a string or a list of content parts, got {type(content).__name__}")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise DataError(f"{where} content part {k} is of type {kind!r}, which is not supported (text parts only)")
        texts.append(part["text"])
    return "\n".join(texts)


def tokenize(
    tokenizer: Any,
    messages: list[dict[str, str]],
    train_on_prompt: bool = False,
    system_message: SystemMessage = "as_is",
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and labels (int32 arrays) of a conversation rendered once with the tokenizer's chat template
    (core.chat.assistant_labels: answers and their end-of-turn token carry the loss)."""
    settings = {"train_on_prompt": train_on_prompt, "system_message": system_message}
    labelled = _tokenize_batch(tokenizer, [messages], settings)[0]
    return labelled.input_ids, labelled.labels


class Conversation(NamedTuple):
    id: str
    messages: list[dict[str, str]]
    where: str  # file:line, for errors


def read_conversations(uri: str) -> list[Conversation]:
    """(id, messages) of every row, validated; the id defaults to file:line."""
    rows = []
    for line, row in read_rows(uri):
        where = f"{uri}:{line}"
        messages = normalise(row, where)
        rows.append(Conversation(str(row.get("id", where)), messages, where))
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


def content_hash(conversations: Sequence[Conversation], tokenizer: Any, settings: dict[str, Any]) -> str:
    """What the prepared tokens depend on: every conversation, the tokenizer (vocabulary,
    special tokens, template) and the preparation settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": PREP_FORMAT, **settings}, sort_keys=True).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token]).encode())
    for conversation in conversations:
        digest.update(json.dumps([conversation.id, conversation.messages]).encode())
    return digest.hexdigest()


@dataclass
class _Chunk:
    """One chunk of tokenized samples (kept ones only), as flat numpy buffers."""

    ids: list[str]
    lengths: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray
    dropped_too_long: int = 0
    dropped_no_loss_tokens: int = 0
    straddling_header: int = 0


def _tokenize_chunk(tokenizer: Any, settings: dict[str, Any], conversations: list[Conversation]) -> _Chunk:
    """Tokenize a chunk as one batch; keep the samples that fit and carry loss."""
    try:
        labelled = _tokenize_batch(tokenizer, [c.messages for c in conversations], settings)
    except (TemplateError, ValueError):
        for conversation in conversations:  # again one by one, for an error that names the row
            _tokenize_one(tokenizer, conversation, settings)
        raise
    ids, lengths, all_ids, all_labels = [], [], [], []
    dropped_too_long = dropped_no_loss_tokens = straddling_header = 0
    for conversation, (input_ids, labels, straddles) in zip(conversations, labelled, strict=True):
        if len(input_ids) > settings["max_seq_len"]:
            dropped_too_long += 1
            continue
        if (labels[1:] == IGNORE_INDEX).all():
            dropped_no_loss_tokens += 1
            continue
        straddling_header += straddles
        ids.append(conversation.id)
        lengths.append(len(input_ids))
        all_ids.append(input_ids)
        all_labels.append(labels)
    return _Chunk(
        ids=ids,
        lengths=np.asarray(lengths, np.int64),
        input_ids=np.concatenate(all_ids) if all_ids else np.zeros(0, np.int32),
        labels=np.concatenate(all_labels) if all_labels else np.zeros(0, np.int32),
        dropped_too_long=dropped_too_long,
        dropped_no_loss_tokens=dropped_no_loss_tokens,
        straddling_header=straddling_header,
    )


def _tokenize_batch(
    tokenizer: Any, conversations: list[list[dict[str, str]]], settings: dict[str, Any]
) -> list[chat.Labelled]:
    if settings["system_message"] == "merge_into_first_user":
        conversations = [chat.merge_system(messages) for messages in conversations]
    return chat.assistant_labels_batch(tokenizer, conversations, settings["train_on_prompt"])


def _tokenize_one(tokenizer: Any, conversation: Conversation, settings: dict[str, Any]) -> chat.Labelled:
    """One conversation, with template errors turned into errors naming the row."""
    try:
        return _tokenize_batch(tokenizer, [conversation.messages], settings)[0]
    except TemplateError as exc:
        hint = ""
        if any(m["role"] == "system" for m in conversation.messages) and "system" in str(exc).lower():
            hint = (
                "; set model.system_message: merge_into_first_user to fold the system message into the first user turn"
            )
        raise DataError(f"{conversation.where}: the chat template rejects this conversation: {exc}{hint}") from None
    except ValueError as exc:
        raise DataError(f"{conversation.where}: {exc}") from None


def _tokenized_chunks(
    conversations: list[Conversation], tokenizer: Any, settings: dict[str, Any], workers: int, chunk_size: int
) -> Iterator[_Chunk]:
    """Chunks in input order; in `workers` threads when there is more than one chunk.

    Threads, not processes: the Rust batch encoder, most of the work, runs without the GIL, and
    threads need no start-up (a spawned process spent seconds importing transformers, and
    imported the caller's script again). At most two chunks per thread are in flight, so
    memory stays bounded by the chunk size.
    """
    chunks = [conversations[i : i + chunk_size] for i in range(0, len(conversations), chunk_size)]
    tokenize_chunk = partial(_tokenize_chunk, tokenizer, settings)
    if workers <= 1 or len(chunks) <= 1:
        yield from map(tokenize_chunk, chunks)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(tokenize_chunk, c) for c in chunks[: 2 * workers])
        for c in chunks[2 * workers :]:
            yield pending.popleft().result()
            pending.append(pool.submit(tokenize_chunk, c))
        while pending:
            yield pending.popleft().result()


TOKENS_SCHEMA = pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])


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
    system_message: SystemMessage = "as_is",
    workers: int | None = None,
    chunk_size: int = 512,
    validation_samples: int = 0,
) -> PrepStats:
    """Tokenize conversations into `out_dir/tokens.parquet` and write `out_dir/stats.json`.

    `validation_samples` of the phase's own conversations (`validation_slice`) are held out, before
    replay, into `out_dir/validation.parquet` (same columns): the trainer's validation loss.

    `replay_fraction` of `replay_pool` (the earlier phases' data, a seeded sample) is mixed
    in. Samples longer than max_seq_len are dropped and counted, never truncated (a truncated
    answer teaches the model to stop mid-sentence). Tokenization runs in `workers` threads
    (default: one per available core) and is written a chunk at a time (one Parquet row group
    each) into a partial file that replaces tokens.parquet only when every row validated, so a
    bad row leaves nothing half-written. When `out_dir` already holds the preparation of the
    same conversations, tokenizer, template and settings (stats.json's content_hash), it is
    reused as is: a resumed run does not prepare again. Row order does not matter: the
    sampler draws a fresh permutation every epoch.
    """
    stats = PrepStats(files=dict(files or {}))
    conversations, held_out = validation_slice(list(conversations), validation_samples)
    stats.validation_ids = [c.id for c in held_out]
    if replay_fraction > 0:
        replayed = random.Random(seed).sample(list(replay_pool), round(replay_fraction * len(replay_pool)))
        stats.replayed = len(replayed)
        conversations += replayed
    settings = {"max_seq_len": max_seq_len, "train_on_prompt": train_on_prompt, "system_message": system_message}
    stats.content_hash = content_hash([*conversations, *held_out], tokenizer, {**settings, "held_out": len(held_out)})
    stats_uri, tokens_uri = storage.join(out_dir, records.STATS), storage.join(out_dir, "tokens.parquet")
    validation_uri = storage.join(out_dir, VALIDATION_FILE)
    if storage.exists(stats_uri) and storage.exists(tokens_uri) and (not held_out or storage.exists(validation_uri)):
        previous = records.parse(PrepStats, storage.read_text(stats_uri), stats_uri)
        if previous.content_hash == stats.content_hash:
            return previous

    fs, path = storage.filesystem(tokens_uri)
    directory = path.rsplit("/", 1)[0]
    created = not fs.exists(directory)
    partial = f"{path}.partial"
    lengths = []
    try:
        fs.makedirs(directory, exist_ok=True)
        with fs.open(partial, "wb") as f, pq.ParquetWriter(f, TOKENS_SCHEMA) as writer:
            workers = workers or len(os.sched_getaffinity(0))
            for chunk in _tokenized_chunks(conversations, tokenizer, settings, workers, chunk_size):
                stats.dropped_too_long += chunk.dropped_too_long
                stats.dropped_no_loss_tokens += chunk.dropped_no_loss_tokens
                stats.straddling_header += chunk.straddling_header
                if not chunk.ids:
                    continue
                table = _chunk_table(chunk)
                writer.write_table(table)
                lengths.append(chunk.lengths)
                starts = np.cumsum([0, *chunk.lengths[:-1]])
                trained = chunk.labels != IGNORE_INDEX
                trained[starts] = False  # labels are shifted in the loss: a sample's first position predicts nothing
                stats.loss_tokens += int(trained.sum())
        if not lengths:
            raise DataError(
                f"no usable samples in {sorted(stats.files)} (dropped {stats.dropped_too_long} too long, "
                f"{stats.dropped_no_loss_tokens} without loss tokens)"
            )
        if held_out:  # the held-out slice, written before tokens.parquet is in place (a reuse needs both)
            tables = [_chunk_table(c) for c in _tokenized_chunks(held_out, tokenizer, settings, workers, chunk_size)]
            stats.validation_ids = [i for t in tables for i in t.column("id").to_pylist()]  # too long: dropped
            with fs.open(storage.filesystem(validation_uri)[1], "wb") as f:
                pq.write_table(pa.concat_tables(tables) if tables else TOKENS_SCHEMA.empty_table(), f)
        fs.mv(partial, path)
    except BaseException:
        if fs.exists(partial):
            fs.rm(partial)
        if created and fs.exists(directory):
            fs.rm(directory, recursive=True)
        raise
    every = np.concatenate(lengths)
    stats.samples, stats.tokens, stats.max_len = len(every), int(every.sum()), int(every.max())
    stats.mean_len = round(stats.tokens / stats.samples, 2)
    storage.write_json(stats_uri, stats.model_dump())
    return stats


def validation_slice(conversations: list[Conversation], n: int) -> tuple[list[Conversation], list[Conversation]]:
    """(kept, held out): the n conversations (at most a tenth of them) that come first in sha256-of-id
    order: the same slice whatever the file order, the seed or the other phases."""
    n = min(n, len(conversations) // 10)
    order = sorted(range(len(conversations)), key=lambda i: hashlib.sha256(conversations[i].id.encode()).hexdigest())
    held = set(order[:n])
    return [c for i, c in enumerate(conversations) if i not in held], [
        c for i, c in enumerate(conversations) if i in held
    ]


def _chunk_table(chunk: _Chunk) -> pa.Table:
    offsets = pa.array(np.concatenate([[0], np.cumsum(chunk.lengths)]).astype(np.int32))
    return pa.table(
        {
            "id": chunk.ids,
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(chunk.input_ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(chunk.labels)),
        },
        schema=TOKENS_SCHEMA,
    )


class Ragged(Sequence):
    """Variable-length rows over one flat numpy buffer: row i is values[offsets[i]:offsets[i+1]]
    (a view; no per-token Python objects)."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values, self.offsets = values, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()


@dataclass
class TokenizedData:
    """Prepared samples. `input_ids` / `labels` are Ragged numpy buffers when loaded from disk
    (about 8 bytes per token); lists of lists work too (tests build them by hand)."""

    ids: list[str]
    input_ids: Sequence[Sequence[int]]
    labels: Sequence[Sequence[int]]

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> list[int]:
        if isinstance(self.input_ids, Ragged):
            return self.input_ids.lengths()
        return [len(x) for x in self.input_ids]

    def loss_tokens(self) -> list[int]:
        # Labels are shifted inside the loss: the first position never predicts anything.
        if isinstance(self.labels, Ragged):
            trained = self.labels.values != IGNORE_INDEX
            starts = self.labels.offsets[:-1]
            trained[starts] = False  # prepared samples are never empty
            return np.add.reduceat(trained, starts, dtype=np.int64).tolist() if len(starts) else []
        return [sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in self.labels]

    def nbytes(self) -> int:
        """Bytes held by the token buffers (Ragged only)."""
        return sum(r.values.nbytes + r.offsets.nbytes for r in (self.input_ids, self.labels) if isinstance(r, Ragged))


def _ragged(column: pa.ChunkedArray) -> Ragged:
    """A list<int32> column (one chunk per row group) copied into one flat array, chunk by chunk:
    the Arrow buffers are released afterwards and only about 4 bytes per token stay."""
    lengths = np.concatenate([np.diff(np.asarray(chunk.offsets)) for chunk in column.chunks] or [np.zeros(0, np.int64)])
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    values = np.empty(offsets[-1], dtype=np.int32)
    at = 0
    for chunk in column.chunks:
        chunk_offsets = np.asarray(chunk.offsets)
        flat = chunk.values.to_numpy()[chunk_offsets[0] : chunk_offsets[-1]]
        values[at : at + len(flat)] = flat
        at += len(flat)
    return Ragged(values, offsets)


def load_tokenized(data_dir: str, file: str = "tokens.parquet") -> TokenizedData:
    """tokens.parquet (or validation.parquet) as numpy buffers (memory-mapped read for a local directory)."""
    uri = storage.join(data_dir, file)
    if storage.is_local(uri):
        table = pq.read_table(storage.local_path(uri), memory_map=True)
    else:
        with fsspec.open(uri, "rb") as f:
            table = pq.read_table(io.BytesIO(f.read()))
    data = TokenizedData(
        ids=table.column("id").to_pylist(),
        input_ids=_ragged(table.column("input_ids")),
        labels=_ragged(table.column("labels")),
    )
    del table
    pa.default_memory_pool().release_unused()  # the decoded Parquet pages: copied above
    return data
