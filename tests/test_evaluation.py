"""lm-eval on the lab's local tasks: real evaluation of the tiny model, one load per checkpoint."""

import json
import math

import pandas as pd
import pytest
import transformers

from core.recipe import EvaluationConfig
from evaluation.lm_eval_runner import LAB_TASKS, evaluate_checkpoint, flatten_results, write_lab_tasks

pytestmark = pytest.mark.slow


@pytest.fixture
def count_model_loads(monkeypatch):
    """Counts real from_pretrained calls (the real loader still runs)."""
    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    return calls


def test_all_lab_tasks_of_a_checkpoint_cost_one_model_load(tmp_path, assets, count_model_loads):
    task_dir = write_lab_tasks(tmp_path / "tasks", assets.curriculum_dir, max_gen_tokens=16)
    # The YAMLs carry absolute data paths (lm-eval resolves relative ones against the cwd).
    for name in LAB_TASKS:
        text = (task_dir / f"{name}.yaml").read_text()
        assert str(assets.curriculum_dir.resolve()) in text
    tasks = [*LAB_TASKS, "lab_skills_test"]
    out = tmp_path / "eval" / "lm_eval.json"
    config = EvaluationConfig(tasks=tasks, limit=8, batch_size=8)
    result = evaluate_checkpoint(str(assets.base_model_dir), config, task_dir, str(out), "base", 0)
    assert count_model_loads == [str(assets.base_model_dir)]
    # Per-item records beside the scores: every item of every task, ids from the data files, means = scores.
    records = pd.read_parquet(tmp_path / "eval" / "lm_eval.items.parquet")
    assert list(records.columns) == ["task", "metric", "item", "value"]
    for key, split in [("lab_knowledge/acc", "phase05/eval"), ("lab_skills_test/exact_match", "phase10/test")]:
        rows = records[records.metric == key]
        ids = [json.loads(line)["id"] for line in (assets.curriculum_dir / f"{split}.jsonl").read_text().splitlines()]
        assert sorted(rows["item"]) == sorted(ids[:8])
    # Every metric's score and standard error are the mean and std/sqrt(n) of its items. Which
    # metrics vary over 8 items (a nonzero error) depends on the CPU that built the embedded model.
    for key, rows in records.groupby("metric"):
        assert rows["value"].mean() == pytest.approx(result["metrics"][key])
        assert result["stderr"][key] == pytest.approx(rows["value"].std(ddof=1) / math.sqrt(len(rows)))
    assert set(result["metrics"]) >= {
        "lab_instruction/rule_acc",
        "lab_knowledge/acc",
        "lab_knowledge/acc_norm",
        "lab_skills/exact_match",
    }
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())


def test_flatten_keeps_filters_and_stderr():
    results = {
        "gsm8k": {
            "alias": "gsm8k",
            "exact_match,strict-match": 0.5,
            "exact_match_stderr,strict-match": 0.01,
            "exact_match,flexible-extract": 0.6,
            "exact_match_stderr,flexible-extract": 0.02,
        },
        "mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.03},
    }
    values, stderr = flatten_results(results)
    assert values == {"gsm8k/exact_match,strict-match": 0.5, "gsm8k/exact_match,flexible-extract": 0.6, "mmlu/acc": 0.4}
    assert stderr == {
        "gsm8k/exact_match,strict-match": 0.01,
        "gsm8k/exact_match,flexible-extract": 0.02,
        "mmlu/acc": 0.03,
    }
