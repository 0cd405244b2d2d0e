"""MT-Bench single-answer grading, as in FastChat's llm_judge (lm-sys/FastChat, fastchat/llm_judge).

Steps, each a plain function:

    data = load_mt_bench(config)                          questions, judge prompts, references
    answers = generate_answers(model, tokenizer, data.questions, config)   once per checkpoint
      (or generate_answers_from_server(url, name, ...): the model behind an OpenAI-compatible server)
    result = judge_answers({"ckpt-a": answers_a, ...}, data, config, cache_dir)
    write_results(result, {"ckpt-a": eval_dir_a, ...})    <eval_dir>/mt_bench.json

The judging side only sees `Answer`s, never models, so answers may come from anywhere.

What follows FastChat exactly: answer temperature by category; the single-v1 / single-math-v1
judge prompts for turn 1 and their multi-turn variants for turn 2; reference answers for the
NEED_REF_CATS categories; the judge at temperature 0 with 2,048 max tokens; the score from
`[[x]]`, else `[x]`, else -1 (an error); means exclude errors.

What we add: an OpenAI-compatible judge reached through the openai SDK (its retries) with
bounded concurrency;
a judgment cache (successful parses only, so a re-run re-asks the judge exactly for what
failed); error accounting, and an evaluation that fails when the judge fails too often.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, Field, ValidationError

from core import chat, items, storage
from core.recipe import MTBenchCategory as Category
from core.recipe import MTBenchConfig

log = logging.getLogger(__name__)

# FastChat's canonical copies; used when a file is not configured, then kept in the cache.
FASTCHAT_DATA_URL = "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data"
DOWNLOADS = {
    "question_file": ("question.jsonl", f"{FASTCHAT_DATA_URL}/mt_bench/question.jsonl"),
    "judge_prompt_file": ("judge_prompts.jsonl", f"{FASTCHAT_DATA_URL}/judge_prompts.jsonl"),
    "reference_file": ("reference_answer_gpt-4.jsonl", f"{FASTCHAT_DATA_URL}/mt_bench/reference_answer/gpt-4.jsonl"),
}

# Answer sampling temperature per category (FastChat's temperature_config); 0.0 = greedy.
TEMPERATURE: dict[str, float] = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
NEED_REF_CATS = ("math", "reasoning", "coding")
# (turn, needs a reference) -> judge prompt name in judge_prompts.jsonl
JUDGE_PROMPT_NAMES = {
    (1, False): "single-v1",
    (1, True): "single-math-v1",
    (2, False): "single-v1-multi-turn",
    (2, True): "single-math-v1-multi-turn",
}
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
JUDGE_MAX_TOKENS = 2048
CACHE_FILE = "judgments.jsonl"
RESULT_FILE = "mt_bench.json"


class MTBenchDataError(ValueError):
    """A question / judge prompt / reference file is missing, unreadable or malformed."""


class JudgeEndpointError(RuntimeError):
    """The judge endpoint cannot be used at all: unreachable, bad credentials, unknown route."""


class MTBenchError(RuntimeError):
    """Judging failed for more judgments than `max_error_rate` allows."""


# ---------------------------------------------------------------------------------------------
# Data files


class Question(BaseModel):
    question_id: int
    category: Category
    turns: list[str] = Field(min_length=2, max_length=2)


class JudgePrompt(BaseModel):
    name: str
    type: str
    system_prompt: str
    prompt_template: str
    output_format: str


class _ReferenceChoice(BaseModel):
    turns: list[str] = Field(min_length=2)


class _Reference(BaseModel):
    question_id: int
    choices: list[_ReferenceChoice] = Field(min_length=1)


class MTBenchData(BaseModel):
    questions: list[Question]
    judge_prompts: dict[str, JudgePrompt]
    references: dict[int, list[str]] = Field(description="question_id -> reference answers to turns 1 and 2")
    files: dict[str, str] = Field(description="config field -> 'path sha256=...' of the file read")


Record = TypeVar("Record", bound=BaseModel)


def _read_jsonl(path: Path, model: type[Record]) -> list[tuple[int, Record]]:
    """(line number, record) for each non-blank line; errors name the file and the line."""
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((lineno, model.model_validate(json.loads(line))))
        except json.JSONDecodeError as exc:
            raise MTBenchDataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in exc.errors())
            raise MTBenchDataError(f"{path}:{lineno}: {problems}") from None
    return records


def default_cache_root() -> Path:
    return Path(os.environ.get("RECIPE_LAB_CACHE", "~/.cache/recipe-lab")).expanduser()


def resolve_data_file(field: str, configured: str | None, cache_root: Path) -> Path:
    """The configured path, or FastChat's copy downloaded once into <cache_root>/mt_bench."""
    if configured is not None:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise MTBenchDataError(f"MT-Bench `{field}` {path} does not exist")
        return path
    name, url = DOWNLOADS[field]
    path = cache_root / "mt_bench" / name
    if path.is_file():
        return path
    log.info("downloading %s to %s", url, path)
    try:
        response = httpx.get(url, timeout=30, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise MTBenchDataError(
            f"MT-Bench `{field}` is not set and {url} could not be downloaded ({type(exc).__name__}: {exc}); "
            f"set `{field}` in the MT-Bench config to a local copy of that file"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.{os.getpid()}")
    tmp.write_bytes(response.content)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return path


def load_mt_bench(config: MTBenchConfig, cache_root: Path | None = None) -> MTBenchData:
    """Read and validate the three files, then apply `categories` and `question_limit`."""
    cache_root = cache_root or default_cache_root()
    paths = {field: resolve_data_file(field, getattr(config, field), cache_root) for field in DOWNLOADS}

    questions: list[Question] = []
    seen: dict[int, int] = {}
    for lineno, question in _read_jsonl(paths["question_file"], Question):
        if question.question_id in seen:
            raise MTBenchDataError(
                f"{paths['question_file']}:{lineno}: question_id {question.question_id} "
                f"already on line {seen[question.question_id]}"
            )
        seen[question.question_id] = lineno
        questions.append(question)

    prompts = {p.name: p for _, p in _read_jsonl(paths["judge_prompt_file"], JudgePrompt)}
    for name in JUDGE_PROMPT_NAMES.values():
        prompt = prompts.get(name)
        if prompt is None:
            raise MTBenchDataError(f"{paths['judge_prompt_file']}: judge prompt {name!r} is missing")
        if prompt.type != "single" or prompt.output_format != "[[rating]]":
            raise MTBenchDataError(
                f"{paths['judge_prompt_file']}: judge prompt {name!r} must have type 'single' and "
                f"output_format '[[rating]]' (has {prompt.type!r}, {prompt.output_format!r})"
            )

    references = {r.question_id: r.choices[0].turns for _, r in _read_jsonl(paths["reference_file"], _Reference)}

    if config.categories is not None:
        questions = [q for q in questions if q.category in config.categories]
    if config.question_limit is not None:
        taken: dict[str, int] = defaultdict(int)
        kept = []
        for question in questions:
            if taken[question.category] < config.question_limit:
                taken[question.category] += 1
                kept.append(question)
        questions = kept
    if not questions:
        raise MTBenchDataError(
            f"{paths['question_file']}: no questions left after the category filter {config.categories}"
        )

    missing = [q.question_id for q in questions if q.category in NEED_REF_CATS and q.question_id not in references]
    if missing:
        raise MTBenchDataError(f"{paths['reference_file']}: no reference answer for question_id {missing}")

    files = {field: f"{path} sha256={hashlib.sha256(path.read_bytes()).hexdigest()}" for field, path in paths.items()}
    return MTBenchData(
        questions=questions,
        judge_prompts={name: prompts[name] for name in JUDGE_PROMPT_NAMES.values()},
        references={q.question_id: references[q.question_id] for q in questions if q.category in NEED_REF_CATS},
        files=files,
    )


# ---------------------------------------------------------------------------------------------
# Answers


class Answer(BaseModel):
    question_id: int
    category: Category
    turns: list[str] = Field(min_length=2, max_length=2, description="The model's answers to turns 1 and 2.")


def write_answers(answers: Sequence[Answer], uri: str) -> None:
    storage.write_text(uri, "".join(a.model_dump_json() + "\n" for a in answers))


def read_answers(uri: str) -> list[Answer]:
    return [Answer.model_validate_json(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def generate_answers(model: Any, tokenizer: Any, questions: Sequence[Question], config: MTBenchConfig) -> list[Answer]:
    """Answer both turns of every question with the tokenizer's chat template.

    Questions are batched by temperature (one sampling setting per `generate` call); turn 2 sees
    turn 1's question and answer. Reproducible for the same model, questions and config.
    """
    import torch

    torch.manual_seed(config.seed)
    model.eval()
    by_temperature: dict[float, list[Question]] = defaultdict(list)
    for question in questions:
        by_temperature[TEMPERATURE[question.category]].append(question)

    replies: dict[int, list[str]] = {q.question_id: [] for q in questions}
    for temperature, group in sorted(by_temperature.items()):
        for start in range(0, len(group), config.generation_batch_size):
            batch = group[start : start + config.generation_batch_size]
            for turn in (1, 2):
                conversations = [_conversation(q, replies[q.question_id], turn) for q in batch]
                outputs = _generate_batch(model, tokenizer, conversations, temperature, config.max_new_tokens)
                for question, output in zip(batch, outputs, strict=False):
                    replies[question.question_id].append(output)
    return [Answer(question_id=q.question_id, category=q.category, turns=replies[q.question_id]) for q in questions]


def generate_answers_from_server(
    base_url: str, model: str, questions: Sequence[Question], config: MTBenchConfig, concurrency: int
) -> list[Answer]:
    """Both turns of every question from an OpenAI-compatible server, through the judge's client
    (its retries), `concurrency` questions at a time. The server applies the model's chat template
    and stops at its generation config's ids (evaluation.server serves a view that has both); each
    turn asks for at most `max_new_tokens`, at the category's temperature, as `generate_answers` does."""
    client = JudgeClient(config, base_url=base_url)
    stop = threading.Event()

    def answer(question: Question) -> Answer:
        replies: list[str] = []
        for turn in (1, 2):
            body = {
                "model": model,
                "messages": _conversation(question, replies, turn),
                "temperature": TEMPERATURE[question.category],
                "max_tokens": config.max_new_tokens,
                "seed": config.seed,
            }
            reply = client.complete(body, stop)
            if reply.content is None:
                raise MTBenchError(
                    f"MT-Bench question {question.question_id} turn {turn} from {base_url}: {reply.error}"
                )
            replies.append(reply.content.strip())
        return Answer(question_id=question.question_id, category=question.category, turns=replies)

    try:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="mt-bench-answer") as pool:
            return list(pool.map(answer, questions))
    finally:
        client.close()


def _conversation(question: Question, replies: list[str], turn: int) -> list[dict[str, str]]:
    """Turn 1: the first question. Turn 2: the first question, the model's answer, the second question."""
    messages = [{"role": "user", "content": question.turns[0]}]
    if turn == 2:
        messages += [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": question.turns[1]}]
    return messages


def _generate_batch(
    model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], temperature: float, max_new_tokens: int
) -> list[str]:
    import torch

    eos_ids = _eos_token_ids(model, tokenizer)
    pad_id = chat.pad_token_id(tokenizer, model.config)
    prompts = [
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for messages in conversations
    ]
    # The template already carries the special tokens (BOS and turn markers).
    encoded = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    width = max(len(ids) for ids in encoded)
    # Left padding, done here so the caller's tokenizer is not mutated (padding side, pad token).
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=model.device)

    # FastChat (gen_model_answer.py) passes only do_sample, temperature and max_new_tokens to
    # generate(): everything else (top_k, top_p, repetition_penalty...) is the model's own
    # generation config, i.e. HF's defaults unless the model ships its own.
    generation = copy.deepcopy(model.generation_config)
    generation.update(max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id)
    if temperature > 1e-4:
        generation.update(do_sample=True, temperature=temperature)
    else:
        generation.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation)

    texts = []
    for row in output[:, width:].tolist():
        stop = next((i for i, token in enumerate(row) if token in eos_ids), len(row))
        texts.append(tokenizer.decode(row[:stop], skip_special_tokens=True).strip())
    return texts


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The template's end-of-turn token(s) and EOS, plus any the model's generation config adds."""
    model_eos = model.generation_config.eos_token_id
    extra = model_eos if isinstance(model_eos, list) else [model_eos] if model_eos is not None else []
    return list(dict.fromkeys(chat.stop_token_ids(tokenizer) + extra))


# ---------------------------------------------------------------------------------------------
# Judge prompts and scores


@dataclass(frozen=True)
class JudgeRequest:
    """One judgment to make: a checkpoint's answer to one turn of one question."""

    checkpoint: str
    question: Question
    turn: int
    prompt_name: str
    system_prompt: str
    user_prompt: str
    cache_key: str


def judge_prompt(question: Question, answer: Answer, turn: int, data: MTBenchData) -> tuple[str, str, str]:
    """(prompt name, system prompt, user prompt) exactly as FastChat's run_judge_single builds them."""
    needs_reference = question.category in NEED_REF_CATS
    name = JUDGE_PROMPT_NAMES[(turn, needs_reference)]
    prompt = data.judge_prompts[name]
    references = {}
    if needs_reference:
        reference = data.references[question.question_id]
        references = {"ref_answer_1": reference[0], "ref_answer_2": reference[1]}
    if turn == 1:
        user_prompt = prompt.prompt_template.format(question=question.turns[0], answer=answer.turns[0], **references)
    else:
        user_prompt = prompt.prompt_template.format(
            question_1=question.turns[0],
            question_2=question.turns[1],
            answer_1=answer.turns[0],
            answer_2=answer.turns[1],
            **references,
        )
    return name, prompt.system_prompt, user_prompt


def parse_score(judgment: str) -> float:
    """The rating in `[[x]]`, else in `[x]`, else -1 (FastChat's patterns)."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    return float(match.group(1)) if match else -1.0


def cache_key(
    question_id: int, turn: int, answer: Answer, judge_model: str, system_prompt: str, user_prompt: str
) -> str:
    answer_hash = hashlib.sha256(json.dumps(answer.turns[:turn]).encode()).hexdigest()
    payload = json.dumps([question_id, turn, answer_hash, judge_model, system_prompt, user_prompt])
    return hashlib.sha256(payload.encode()).hexdigest()


def build_requests(
    answers_by_checkpoint: Mapping[str, Sequence[Answer]], data: MTBenchData, judge_model: str
) -> list[JudgeRequest]:
    """Two judgments per question per checkpoint; every checkpoint must answer exactly the loaded questions."""
    questions = {q.question_id: q for q in data.questions}
    requests = []
    for checkpoint, answers in answers_by_checkpoint.items():
        by_id = {a.question_id: a for a in answers}
        if sorted(by_id) != sorted(questions) or len(by_id) != len(answers):
            missing = sorted(set(questions) - set(by_id))
            extra = sorted(set(by_id) - set(questions))
            raise ValueError(
                f"answers of checkpoint {checkpoint!r} do not match the questions: missing {missing}, "
                f"unexpected {extra}, {len(answers) - len(by_id)} duplicates"
            )
        for question in data.questions:
            answer = by_id[question.question_id]
            for turn in (1, 2):
                name, system_prompt, user_prompt = judge_prompt(question, answer, turn, data)
                key = cache_key(question.question_id, turn, answer, judge_model, system_prompt, user_prompt)
                requests.append(JudgeRequest(checkpoint, question, turn, name, system_prompt, user_prompt, key))
    return requests


# ---------------------------------------------------------------------------------------------
# Judge client


@dataclass
class JudgeReply:
    content: str | None  # None when the request failed
    attempts: int
    error: str | None = None
    cancelled: bool = False  # the run is being stopped; this reply counts for nothing


class JudgeClient:
    """The openai SDK's client for an OpenAI-compatible judge; its retry machinery does the retries.

    The SDK retries 408 / 409 / 429 / 5xx, timeouts and connection errors `max_retries` times
    with exponential backoff and jitter (0.5 s doubling to 8 s), and waits as the server's
    Retry-After asks (up to 120 s). It retries in the calling thread, so a thread-local counter
    fed by an HTTP request hook counts every attempt of one judgment.
    """

    def __init__(self, config: MTBenchConfig, base_url: str | None = None) -> None:
        """The judge of `config`; with `base_url`, that endpoint instead (a local model server: no key)."""
        import openai

        self.config = config
        api_key = None if base_url else os.environ.get(config.judge_api_key_env) or None
        base_url = base_url or config.judge_base_url
        self.url = f"{base_url.rstrip('/')}/chat/completions"
        self._attempts = threading.local()
        self.headers = {} if api_key else {"Authorization": openai.omit}
        self.client = openai.OpenAI(
            base_url=base_url,
            # No key (a local vLLM): the SDK insists on one, so a placeholder that is never sent.
            api_key=api_key or "no-key",
            max_retries=config.max_retries,
            timeout=config.timeout_s,
            http_client=openai.DefaultHttpxClient(event_hooks={"request": [self._count_attempt]}),
        )

    def _count_attempt(self, request: Any) -> None:
        self._attempts.n = getattr(self._attempts, "n", 0) + 1

    def close(self) -> None:
        self.client.close()

    def complete(self, body: dict[str, Any], stop: threading.Event) -> JudgeReply:
        """One chat completion, retried by the SDK.

        Returns the reply or, when the retries run out on a judgment-level failure, the error.
        Raises JudgeEndpointError when the endpoint itself is unusable: 401/403/404, or no
        connection could be opened at all; it then sets `stop` so that the other workers stop too.
        """
        import openai

        if stop.is_set():
            return JudgeReply(None, 0, cancelled=True)
        self._attempts.n = 0
        try:
            completion = self.client.chat.completions.create(**body, extra_headers=self.headers)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            stop.set()
            raise JudgeEndpointError(
                f"judge endpoint {self.url} rejected the request with HTTP {exc.status_code}; check the API key "
                f"in the environment variable {self.config.judge_api_key_env}"
            ) from None
        except openai.NotFoundError:
            stop.set()
            raise JudgeEndpointError(
                f"judge endpoint {self.url} answered HTTP 404 (model {body['model']!r}); check judge_base_url and "
                "judge_model"
            ) from None
        except openai.APIStatusError as exc:
            attempts = self._attempts.n
            if exc.status_code == 429 or exc.status_code >= 500:  # the SDK's retries ran out
                return JudgeReply(None, attempts, f"HTTP {exc.status_code} (after {attempts} attempts)")
            # this request is wrong (e.g. longer than the judge's context): the SDK does not retry it
            return JudgeReply(None, attempts, f"HTTP {exc.status_code}: {exc.response.text[:300]}")
        except openai.APITimeoutError as exc:
            return JudgeReply(None, self._attempts.n, f"{exc.message} (after {self._attempts.n} attempts)")
        except openai.APIConnectionError as exc:
            stop.set()
            raise JudgeEndpointError(
                f"judge endpoint {self.url} is unreachable after {self._attempts.n} attempts: cannot connect "
                f"({type(exc.__cause__).__name__}: {exc.__cause__})"
            ) from None
        except openai.APIResponseValidationError as exc:
            return JudgeReply(None, self._attempts.n, f"malformed chat completion: {exc.response.text[:300]!r}")
        try:
            return JudgeReply(completion.choices[0].message.content or "", self._attempts.n)
        except (AttributeError, IndexError, TypeError):
            return JudgeReply(None, self._attempts.n, f"malformed chat completion: {completion!r:.300}")


# ---------------------------------------------------------------------------------------------
# Judging and results


class Judgment(BaseModel):
    question_id: int
    category: str
    turn: int
    prompt_name: str
    score: float = Field(description="The judge's rating, -1 when none could be had (an error).")
    judgment: str = Field(description="The judge's text ('' when the request failed).")
    error: str | None = None
    cached: bool = False


class CheckpointMTBench(BaseModel):
    checkpoint: str
    overall: float | None = Field(description="Mean score over both turns, errors excluded.")
    turn_1: float | None
    turn_2: float | None
    per_category: dict[str, float | None] = Field(description="Mean over both turns per category.")
    n_judgments: int
    n_errors: int
    error_rate: float
    n_cached: int = Field(description="Judgments served from the cache.")
    judge_calls: int = Field(description="HTTP requests sent to the judge, retries included.")
    retries: int
    judgments: list[Judgment]

    def metrics(self) -> dict[str, float]:
        """Flat 'mt_bench/<name>' metrics for selection objectives and gates."""
        values = {"overall": self.overall, "turn_1": self.turn_1, "turn_2": self.turn_2, **self.per_category}
        flat = {f"mt_bench/{name}": value for name, value in values.items() if value is not None}
        return flat | {"mt_bench/error_rate": self.error_rate}


class MTBenchResult(BaseModel):
    judge_base_url: str
    judge_model: str
    question_limit: int | None
    categories: list[str] | None
    n_questions: int
    files: dict[str, str]
    checkpoints: dict[str, CheckpointMTBench]


def _mean(scores: list[float]) -> float | None:
    return sum(scores) / len(scores) if scores else None


@dataclass
class _Tally:
    """One checkpoint's judgments and counters while judging."""

    total: int = 0
    judgments: list[Judgment] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    calls: int = 0
    retries: int = 0


def _summarise(checkpoint: str, tally: _Tally, order: Mapping[tuple[int, int], int]) -> CheckpointMTBench:
    judgments = sorted(tally.judgments, key=lambda j: order[(j.question_id, j.turn)])
    scored = [j for j in judgments if j.error is None]
    categories = sorted({j.category for j in judgments}, key=list(TEMPERATURE).index)
    errors = len(judgments) - len(scored)
    return CheckpointMTBench(
        checkpoint=checkpoint,
        overall=_mean([j.score for j in scored]),
        turn_1=_mean([j.score for j in scored if j.turn == 1]),
        turn_2=_mean([j.score for j in scored if j.turn == 2]),
        per_category={c: _mean([j.score for j in scored if j.category == c]) for c in categories},
        n_judgments=len(judgments),
        n_errors=errors,
        error_rate=errors / len(judgments),
        n_cached=sum(j.cached for j in judgments),
        judge_calls=tally.calls,
        retries=tally.retries,
        judgments=judgments,
    )


def _load_cache(path: Path) -> dict[str, tuple[float, str]]:
    """cache key -> (score, judgment text)."""
    cache = {}
    if path.is_file():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                entry = json.loads(line)
                cache[entry["key"]] = (float(entry["score"]), str(entry["judgment"]))
            except (ValueError, KeyError, TypeError):
                # A run killed mid-write leaves a torn last line; that judgment is simply redone.
                log.warning("%s:%d: unreadable judgment cache line skipped", path, lineno)
    return cache


def judge_answers(
    answers_by_checkpoint: Mapping[str, Sequence[Answer]],
    data: MTBenchData,
    config: MTBenchConfig,
    cache_dir: Path,
) -> MTBenchResult:
    """Judge every checkpoint's answers (cache first, then the endpoint) and score them.

    Raises MTBenchError as soon as a checkpoint has more failed judgments than `max_error_rate`
    allows (the remaining requests are cancelled), JudgeEndpointError when the endpoint is
    unusable. Successful judgments are cached before either is raised.
    """
    requests = build_requests(answers_by_checkpoint, data, config.judge_model)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_path = cache_dir / CACHE_FILE
    cache = _load_cache(cache_path)
    url = f"{config.judge_base_url.rstrip('/')}/chat/completions"
    api_key = os.environ.get(config.judge_api_key_env) or None

    tallies = {checkpoint: _Tally() for checkpoint in answers_by_checkpoint}
    # Checkpoints that gave the same answers get the same judge prompt: it is asked once, and the
    # reply serves the later ones as if from the cache (what judging them one by one would do).
    pending: dict[str, list[JudgeRequest]] = defaultdict(list)
    for request in requests:
        tallies[request.checkpoint].total += 1
        if request.cache_key in cache:
            score, text = cache[request.cache_key]
            tallies[request.checkpoint].judgments.append(_judgment(request, text, score, None, cached=True))
        else:
            pending[request.cache_key].append(request)
    log.info(
        "MT-Bench: %d judgments, %d from the cache, %d to ask %s at %s",
        len(requests),
        len(requests) - sum(map(len, pending.values())),
        len(pending),
        config.judge_model,
        url,
    )

    stop = threading.Event()
    client = JudgeClient(config)
    pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="mt-bench-judge")
    try:
        with open(cache_path, "a", encoding="utf-8") as cache_file:
            futures = {
                pool.submit(client.complete, _request_body(same[0], config), stop): same for same in pending.values()
            }
            for done, future in enumerate(as_completed(futures), start=1):
                if done % 50 == 0:
                    log.info("MT-Bench: %d of %d judge requests done", done, len(futures))
                same, reply = futures[future], future.result()
                if reply.cancelled:  # another request is failing the run; its exception comes up next
                    continue
                asked = same[0]
                tallies[asked.checkpoint].calls += reply.attempts
                tallies[asked.checkpoint].retries += reply.attempts - 1
                score = parse_score(reply.content) if reply.content is not None else -1.0
                error = reply.error or (
                    None if score != -1 else f"no [[rating]] in the judgment: {reply.content[:200]!r}"
                )
                if error and api_key:  # in case an endpoint echoes the key back in an error body
                    error = error.replace(api_key, "<redacted>")
                for request in same:
                    judgment = _judgment(request, reply.content or "", score, error, cached=request is not asked)
                    tallies[request.checkpoint].judgments.append(judgment)
                if error is None:
                    entry = {
                        "key": asked.cache_key,
                        "question_id": asked.question.question_id,
                        "turn": asked.turn,
                        "judge_model": config.judge_model,
                        "score": score,
                        "judgment": reply.content,
                    }
                    cache_file.write(json.dumps(entry) + "\n")
                    cache_file.flush()  # a crash later keeps every judgment paid for so far
                    continue
                for request in same:
                    tally = tallies[request.checkpoint]
                    tally.errors.append(f"question {request.question.question_id} turn {request.turn}: {error}")
                    # Failures only grow, so once over the limit the final rate is too: stop now.
                    if len(tally.errors) > config.max_error_rate * tally.total:
                        raise MTBenchError(
                            f"MT-Bench judging of checkpoint {request.checkpoint!r} failed: at least "
                            f"{len(tally.errors)} of {tally.total} judgments failed (max_error_rate="
                            f"{config.max_error_rate}); judge {config.judge_model!r} at {url}. First failures: "
                            + " | ".join(tally.errors[:3])
                        )
    except BaseException:
        stop.set()  # requests not started yet are skipped; ones in flight end with the closed client
        pool.shutdown(wait=False, cancel_futures=True)
        client.close()
        raise
    pool.shutdown()
    client.close()

    order = {(r.question.question_id, r.turn): i for i, r in enumerate(requests)}
    checkpoints = {}
    for checkpoint, tally in tallies.items():
        checkpoints[checkpoint] = summary = _summarise(checkpoint, tally, order)
        log.info(
            "MT-Bench %s: overall %s, error rate %.3f, %d judge calls, %d retries",
            checkpoint,
            summary.overall,
            summary.error_rate,
            summary.judge_calls,
            summary.retries,
        )
    return MTBenchResult(
        judge_base_url=config.judge_base_url,
        judge_model=config.judge_model,
        question_limit=config.question_limit,
        categories=config.categories,
        n_questions=len(data.questions),
        files=data.files,
        checkpoints=checkpoints,
    )


def _request_body(request: JudgeRequest, config: MTBenchConfig) -> dict[str, Any]:
    return {
        "model": config.judge_model,
        "messages": [
            {"role": "system", "content": request.system_prompt},
            {"role": "user", "content": request.user_prompt},
        ],
        "n": 1,
        "temperature": 0,
        "max_tokens": JUDGE_MAX_TOKENS,
    }


def _judgment(request: JudgeRequest, text: str, score: float, error: str | None, cached: bool) -> Judgment:
    return Judgment(
        question_id=request.question.question_id,
        category=request.question.category,
        turn=request.turn,
        prompt_name=request.prompt_name,
        score=score,
        judgment=text,
        error=error,
        cached=cached,
    )


def per_question(scores: CheckpointMTBench) -> list[dict[str, Any]]:
    """Per-item records of one model's judgments, on the judge's /10 scale, item = question id:
    mt_bench/overall and mt_bench/<category> take the mean of its judged turns, mt_bench/turn_<t>
    each turn's score; failed judgments (-1) are left out, as in the means."""
    turns: dict[tuple[int, str], dict[int, float]] = defaultdict(dict)
    for j in scores.judgments:
        if j.error is None and j.score >= 0:
            turns[(j.question_id, j.category)][j.turn] = j.score
    rows = []
    for (question, category), judged in sorted(turns.items()):
        mean = sum(judged.values()) / len(judged)
        rows += [{"metric": f"mt_bench/{name}", "item": question, "value": mean} for name in ("overall", category)]
        rows += [{"metric": f"mt_bench/turn_{t}", "item": question, "value": v} for t, v in judged.items()]
    return [{"task": "mt_bench", **row} for row in rows]


def write_results(result: MTBenchResult, eval_dirs: Mapping[str, str]) -> dict[str, str]:
    """Write <eval_dir>/mt_bench.json for each checkpoint (local path or fsspec URL), its per-question
    records first (mt_bench.items.parquet); return the result URIs."""
    written = {}
    for checkpoint, directory in eval_dirs.items():
        uri = storage.join(directory, RESULT_FILE)
        header = result.model_dump(exclude={"checkpoints"})
        scores = result.checkpoints[checkpoint]
        items.write_items(items.items_uri(uri), per_question(scores))
        storage.write_json(uri, {"suite": "mt_bench", "metrics": scores.metrics(), **header, **scores.model_dump()})
        written[checkpoint] = uri
    return written
