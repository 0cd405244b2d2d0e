"""process_results functions of the embedded lab's generation tasks (called by lm-eval)."""

from __future__ import annotations

from typing import Any

from training.embedded.curriculum import check_rule


def instruction(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1.0 when the response obeys the item's format rule."""
    return {"rule_acc": float(check_rule(doc["rule"], results[0]))}


def skills(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match of the stripped answer (case-insensitive)."""
    return {"exact_match": float(results[0].strip().lower() == str(doc["answer"]).strip().lower())}
