"""Functions of the embedded lab's lm-eval tasks: each item's text, choices and target, and the
process_results of the generation tasks (called by lm-eval through `!function`).

The fields are functions rather than Jinja strings such as "{{prompt}}": lm-eval compiles a
string field's template again for every item (2,000 compilations per lab evaluation).
"""

from __future__ import annotations

from typing import Any

from embedded.curriculum import check_rule


def instruction(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1.0 when the response obeys the item's format rule."""
    return {"rule_acc": float(check_rule(doc["rule"], results[0]))}


def skills(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match of the stripped answer (case-insensitive)."""
    return {"exact_match": float(results[0].strip().lower() == str(doc["answer"]).strip().lower())}


def prompt(doc: dict[str, Any]) -> str:
    return doc["prompt"]


def question(doc: dict[str, Any]) -> str:
    return doc["question"]


def choices(doc: dict[str, Any]) -> list[str]:
    return doc["choices"]


def answer(doc: dict[str, Any]) -> Any:
    return doc["answer"]


def no_target(doc: dict[str, Any]) -> str:
    """lab_instruction has no reference answer: its rule checker scores the response."""
    return ""
