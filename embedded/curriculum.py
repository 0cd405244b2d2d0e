"""The embedded lab's three-phase curriculum, generated from the fictional world.

    phase00  instruction following: format tasks whose answers a rule can check (`check_rule`)
    phase05  knowledge: questions about the world's facts; eval is multiple choice and asks
             with question phrasings that never appear in train, about facts that train covers
    phase10  compositional skills: add, compare and match facts given in the question

Every phase has two disjoint evaluation splits of distinct items, neither in train: the selection
split (eval.jsonl, what checkpoint selection reads) and the test split (test.jsonl, at least twice
as large, never read by any selection policy: bench/selection.py scores picks on it).

Train rows are chats: {"id", "messages": [{"role": "user", ...}, {"role": "assistant", ...}]}.
Eval and test rows:
    phase00  {"id", "prompt", "rule": {"kind": ..., ...}}
    phase05  {"id", "question", "choices": [4 strings], "answer": index of the right choice}
    phase10  {"id", "question", "answer": str}   (exact match on the stripped answer)

No eval prompt is ever a train prompt. Answers are short and regular so that a tiny model
learns them in a minute of CPU.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from embedded.world import COLOURS, GOODS, Kingdom

Row = dict[str, Any]


# ---------------------------------------------------------------- phase00: instruction following


def check_rule(rule: dict[str, Any], response: str) -> bool:
    """True when `response` obeys the format rule of a phase00 eval item.

    Pure function, also imported by the evaluation code. Surrounding whitespace is ignored;
    everything else is strict (case, punctuation, count). Rule kinds:

        uppercase  {"word"}            the word in upper case:            ZORBIA
        lowercase  {"word"}            the word in lower case:            zorbia
        repeat     {"word", "times"}   the word `times` times, comma-separated: Zorbia, Zorbia
        brackets   {"word"}            the word in square brackets:       [Zorbia]
        quotes     {"word"}            the word in double quotes:         "Zorbia"
        json       {"key", "value"}    a JSON object with only that key:  {"answer": "Zorbia"}
        word_count {"n"}               exactly n whitespace-separated words
        hyphen     {"words": [a, b]}   the two words joined by a hyphen:  Zorbia-amber
    """
    text = response.strip()
    kind = rule["kind"]
    if kind == "uppercase":
        return text == rule["word"].upper()
    if kind == "lowercase":
        return text == rule["word"].lower()
    if kind == "repeat":
        return [part.strip() for part in text.split(",")] == [rule["word"]] * rule["times"]
    if kind == "brackets":
        return text == f"[{rule['word']}]"
    if kind == "quotes":
        return text == f'"{rule["word"]}"'
    if kind == "json":
        try:
            return json.loads(text) == {rule["key"]: rule["value"]}
        except json.JSONDecodeError:
            return False
    if kind == "word_count":
        return len(text.split()) == rule["n"]
    if kind == "hyphen":
        return text == "-".join(rule["words"])
    raise ValueError(f"unknown rule kind {kind!r}")


NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
JSON_KEYS = ("answer", "name", "value")


@dataclass(frozen=True)
class Item:
    """One generated question with its reference answer (and, for phase00, its rule)."""

    prompt: str
    answer: str
    rule: dict[str, Any] | None = None


def _describe(k: Kingdom) -> list[str]:
    """Words of a short description of a kingdom; word_count answers are its prefixes."""
    return f"{k.name} flies a {k.banner} banner and exports {k.export}".split()


INSTRUCTION_PROMPTS: dict[str, tuple[str, ...]] = {
    "uppercase": ("Write the word {w} in uppercase.", "Write {w} in capital letters.", "Convert {w} to uppercase."),
    "lowercase": ("Write the word {W} in lowercase.", "Write {W} in small letters.", "Convert {W} to lowercase."),
    "repeat": (
        "Repeat the word {w} {n} times, separated by commas.",
        "Write {w} {n} times, separated by commas.",
        "Say {w} {n} times, with commas between.",
    ),
    "brackets": (
        "Answer with the word {w} wrapped in square brackets.",
        "Write {w} inside square brackets.",
        "Put {w} in square brackets.",
    ),
    "quotes": (
        "Put the word {w} in double quotes.",
        "Write {w} inside double quotes.",
        "Answer with {w} in double quotes.",
    ),
    "json": (
        "Answer in JSON with the key '{k}' set to {w}.",
        "Reply with a JSON object whose key '{k}' has the value {w}.",
        "Give JSON with '{k}' equal to {w}.",
    ),
    "word_count": (
        "Reply with exactly {n} words about {e}.",
        "Describe {e} in exactly {n} words.",
        "Use exactly {n} words to describe {e}.",
    ),
    "hyphen": ("Join the words {w} and {v} with a hyphen.", "Write {w} and {v} joined by a hyphen."),
}
INSTRUCTION_KINDS = tuple(INSTRUCTION_PROMPTS)


def instruction_item(rng: random.Random, kind: str, world: list[Kingdom]) -> Item:
    """A random phase00 item of the given kind, using the world's names as content."""
    words = (
        [k.name for k in world]
        + [k.capital for k in world]
        + [k.ruler.split()[1] for k in world]
        + list(GOODS)
        + list(COLOURS)
    )
    w, v = rng.sample(words, 2)
    kingdom = rng.choice(world)
    n = {"repeat": rng.choice(tuple(NUMBER_WORDS)), "word_count": rng.randint(2, 6)}.get(kind, 0)
    key = rng.choice(JSON_KEYS)
    prompt = rng.choice(INSTRUCTION_PROMPTS[kind]).format(
        w=w, W=w.upper(), v=v, n=NUMBER_WORDS.get(n, n), e=kingdom.name, k=key
    )
    answer, rule = {
        "uppercase": (w.upper(), {"word": w}),
        "lowercase": (w.lower(), {"word": w}),
        "repeat": (", ".join([w] * n), {"word": w, "times": n}),
        "brackets": (f"[{w}]", {"word": w}),
        "quotes": (f'"{w}"', {"word": w}),
        "json": (json.dumps({key: w}), {"key": key, "value": w}),
        "word_count": (" ".join(_describe(kingdom)[:n]), {"n": n}),
        "hyphen": (f"{w}-{v}", {"words": [w, v]}),
    }[kind]
    return Item(prompt, answer, {"kind": kind, **rule})


# ---------------------------------------------------------------- phase05: knowledge

# Attribute -> (train phrasings, eval-only phrasings). {e} is the subject.
QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "capital": (
        (
            "What is the capital of {e}?",
            "Which city is the capital of {e}?",
            "Name the capital of {e}.",
            "What is the capital city of {e}?",
        ),
        ("From which city is {e} governed?", "What city is the seat of {e}?"),
    ),
    "ruler": (
        ("Who rules {e}?", "Who is the ruler of {e}?", "Name the ruler of {e}.", "Who governs {e}?"),
        ("Who holds the throne of {e}?", "By whom is {e} ruled?"),
    ),
    "export": (
        (
            "What does {e} export?",
            "What is the main export of {e}?",
            "Name the main export of {e}.",
            "What is {e} known for?",
        ),
        ("What do the merchants of {e} sell abroad?", "Which good does {e} export most?"),
    ),
    "banner": (
        (
            "What colour is the banner of {e}?",
            "What is the colour of the banner of {e}?",
            "Name the colour of the banner of {e}.",
            "What colour banner does {e} fly?",
        ),
        ("What colour is the flag of {e}?", "The banner of {e} has which colour?"),
    ),
    "towers": (
        (
            "How many towers does {e} have?",
            "How many towers are there in {e}?",
            "What is the number of towers in {e}?",
            "Count the towers of {e}.",
        ),
        ("How many towers stand in the walls of {e}?", "{e} has how many towers?"),
    ),
    "founded": (
        (
            "When was {e} founded?",
            "In which year was {e} founded?",
            "What is the founding year of {e}?",
            "Name the year {e} was founded.",
        ),
        ("From what year does {e} date?", "{e} was founded in which year?"),
    ),
    # Reverse facts: the subject is the capital / the ruler, the answer the kingdom.
    "capital_of": (
        (
            "Which kingdom has {e} as its capital?",
            "{e} is the capital of which kingdom?",
            "Of which kingdom is {e} the capital?",
        ),
        ("Which kingdom is governed from {e}?",),
    ),
    "ruler_of": (
        ("Which kingdom does {e} rule?", "{e} is the ruler of which kingdom?"),
        ("Over which kingdom does {e} hold the throne?",),
    ),
}


def fact(kingdom: Kingdom, relation: str) -> tuple[str, str]:
    """(subject, answer) of a relation of `QUESTIONS` for one kingdom."""
    if relation == "capital_of":
        return kingdom.capital, kingdom.name
    if relation == "ruler_of":
        return kingdom.ruler, kingdom.name
    return kingdom.name, kingdom.value(relation)


def knowledge_choices(
    rng: random.Random, world: list[Kingdom], kingdom: Kingdom, relation: str
) -> tuple[list[str], int]:
    """Four shuffled choices, the right answer among three distractors of the same attribute."""
    answer = fact(kingdom, relation)[1]
    pool = sorted({fact(k, relation)[1] for k in world} - {answer})
    choices = rng.sample(pool, 3) + [answer]
    rng.shuffle(choices)
    return choices, choices.index(answer)


# ---------------------------------------------------------------- phase10: compositional skills

SKILL_KINDS = ("sum", "more", "fewer", "difference", "same_banner")
SUM_QUESTIONS = ("How many towers do they have together?", "How many towers do they have in total?")


def skill_item(rng: random.Random, kind: str, world: list[Kingdom]) -> Item:
    """A question that combines two facts stated in the question itself."""
    if kind == "same_banner":
        a = rng.choice(world)
        same = rng.random() < 0.5
        others = [k for k in world if k is not a and (k.banner == a.banner) == same] or [k for k in world if k is not a]
        b = rng.choice(others)
        question = rng.choice(("Are the two banners the same colour?", "Do they fly the same colour?"))
        prompt = f"The banner of {a.name} is {a.banner} and the banner of {b.name} is {b.banner}. {question}"
        return Item(prompt, "yes" if a.banner == b.banner else "no")
    a, b = rng.sample(world, 2)
    if kind != "sum":
        while a.towers == b.towers:  # comparisons need a strict winner
            a, b = rng.sample(world, 2)
    given = f"{a.name} has {a.towers} towers and {b.name} has {b.towers} towers."
    if kind == "sum":
        return Item(f"{given} {rng.choice(SUM_QUESTIONS)}", str(a.towers + b.towers))
    more, fewer = (a, b) if a.towers > b.towers else (b, a)
    if kind == "more":
        return Item(f"{given} {rng.choice(('Which has more towers?', 'Which of them has more towers?'))}", more.name)
    if kind == "fewer":
        return Item(f"{given} {rng.choice(('Which has fewer towers?', 'Which of them has fewer towers?'))}", fewer.name)
    if kind == "difference":
        return Item(
            f"{given} How many more towers does {more.name} have than {fewer.name}?", str(more.towers - fewer.towers)
        )
    raise ValueError(f"unknown skill kind {kind!r}")


# ---------------------------------------------------------------- assembly


def chat(row_id: str, prompt: str, answer: str) -> Row:
    return {"id": row_id, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


Splits = tuple[int, int]  # (selection, test) items of a phase's evaluation


def _held_out_items(
    rng: random.Random, make: Callable[[random.Random, str], Item], kinds: tuple[str, ...], n_train: int, n_eval: int
) -> tuple[list[Item], list[Item]]:
    """Distinct items, kinds in turn: the first n_eval are eval (both splits), the rest (shuffled) train.

    Deduplicating by prompt before the split is what keeps every eval prompt out of train and
    the two evaluation splits apart.
    """
    items: list[Item] = []
    seen: set[str] = set()
    for _ in range(50 * (n_eval + n_train)):
        item = make(rng, kinds[len(items) % len(kinds)])
        if item.prompt not in seen:
            seen.add(item.prompt)
            items.append(item)
            if len(items) == n_eval + n_train:
                break
    else:
        raise ValueError(f"the world is too small for {n_train} + {n_eval} distinct items of kinds {kinds}")
    train = items[n_eval:]
    rng.shuffle(train)
    return train, items[:n_eval]


def split_rows(phase: str, rows: list[Row], splits: Splits) -> tuple[list[Row], list[Row]]:
    """(selection, test) rows with ids <phase>-eval-NNNN and <phase>-test-NNNN."""
    selection, test = rows[: splits[0]], rows[splits[0] : sum(splits)]
    return (
        [{"id": f"{phase}-eval-{i:04d}", **row} for i, row in enumerate(selection)],
        [{"id": f"{phase}-test-{i:04d}", **row} for i, row in enumerate(test)],
    )


def instruction_phase(
    world: list[Kingdom], rng: random.Random, n_train: int, splits: Splits
) -> tuple[list[Row], list[Row], list[Row]]:
    train, evals = _held_out_items(
        rng, lambda r, kind: instruction_item(r, kind, world), INSTRUCTION_KINDS, n_train, sum(splits)
    )
    train_rows = [chat(f"phase00-train-{i:05d}", it.prompt, it.answer) for i, it in enumerate(train)]
    return train_rows, *split_rows("phase00", [{"prompt": it.prompt, "rule": it.rule} for it in evals], splits)


def knowledge_phase(world: list[Kingdom], rng: random.Random, splits: Splits) -> tuple[list[Row], list[Row], list[Row]]:
    """Train: every fact in every train phrasing. Eval: distinct facts (none in both splits), eval-only phrasings."""
    facts = [(k, relation) for k in world for relation in QUESTIONS]
    train = []
    for kingdom, relation in facts:
        subject, answer = fact(kingdom, relation)
        train += [(template.format(e=subject), answer) for template in QUESTIONS[relation][0]]
    rng.shuffle(train)
    train_rows = [chat(f"phase05-train-{i:05d}", prompt, answer) for i, (prompt, answer) in enumerate(train)]
    if sum(splits) > len(facts):
        raise ValueError(f"the world has {len(facts)} facts, too few for evaluation splits {splits}")
    eval_rows = []
    for kingdom, relation in rng.sample(facts, sum(splits)):
        question = rng.choice(QUESTIONS[relation][1]).format(e=fact(kingdom, relation)[0])
        choices, answer = knowledge_choices(rng, world, kingdom, relation)
        eval_rows.append({"question": question, "choices": choices, "answer": answer})
    return train_rows, *split_rows("phase05", eval_rows, splits)


def skills_phase(
    world: list[Kingdom], rng: random.Random, n_train: int, splits: Splits
) -> tuple[list[Row], list[Row], list[Row]]:
    train, evals = _held_out_items(rng, lambda r, kind: skill_item(r, kind, world), SKILL_KINDS, n_train, sum(splits))
    train_rows = [chat(f"phase10-train-{i:05d}", it.prompt, it.answer) for i, it in enumerate(train)]
    return train_rows, *split_rows("phase10", [{"question": it.prompt, "answer": it.answer} for it in evals], splits)


def build_curriculum(
    world: list[Kingdom], seed: int, n_train: int, splits: dict[str, Splits]
) -> dict[str, tuple[list[Row], list[Row], list[Row]]]:
    """phase -> (train rows, selection-split rows, test-split rows). phase05's train size is set by
    the world's facts."""
    return {
        "phase00": instruction_phase(world, random.Random(f"{seed}-phase00"), n_train, splits["phase00"]),
        "phase05": knowledge_phase(world, random.Random(f"{seed}-phase05"), splits["phase05"]),
        "phase10": skills_phase(world, random.Random(f"{seed}-phase10"), n_train, splits["phase10"]),
    }


def jsonl(rows: list[Row]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
