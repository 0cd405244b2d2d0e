"""lm-evaluation-harness on a checkpoint: one model load for all of its tasks.

Real models use standard task names (mmlu, arc_challenge, gsm8k, ...). The embedded lab has
three local tasks whose YAMLs are written at run time next to the data, because lm-eval
resolves `data_files` against the working directory unless they are absolute (NOTES.md):

    lab_instruction   generate_until, rule_acc (the curriculum's rule checker)
    lab_knowledge     multiple_choice, acc / acc_norm
    lab_skills        generate_until, exact_match (stripped answer)

Results are flattened to {"task/metric": value}; a metric with a filter other than "none"
keeps it ("gsm8k/exact_match,strict-match"). Beside each result file, `items.write_items` keeps
the per-item outcomes (lm-eval's `log_samples`): one row per task, metric, item and value, the
item id being the document's own `id` when it has one (the lab's items), else its index in the
task; both are the same for every checkpoint of a run. Paired comparisons
(evaluation/paired.py) read them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import yaml

from core import items, storage
from core.chat import apply_template, configure_generation
from core.recipe import EvaluationConfig
from evaluation.device import load_causal_lm
from evaluation.server import ServerEndpoint

LAB_TASKS = ("lab_instruction", "lab_knowledge", "lab_skills")
# The same tasks on each phase's test split (test.jsonl): never in a recipe's selection, only for
# measuring picks against held-out truth (bench/selection.py).
LAB_TEST_TASKS = tuple(f"{task}_test" for task in LAB_TASKS)

# Loaded by lm-eval from next to the YAMLs (`!function lab_results.instruction`).
LAB_RESULTS_MODULE = """\
from evaluation.lab_metrics import answer, choices, instruction, no_target, prompt, question, skills  # noqa: F401
"""


class FunctionTag(str):
    """Dumps as lm-eval's `!function module.name` YAML tag."""


yaml.SafeDumper.add_representer(FunctionTag, lambda d, v: d.represent_scalar("!function", str(v)))


def lab_task_configs(
    curriculum_dir: Path, max_gen_tokens: int, split_file: str = "eval.jsonl", suffix: str = ""
) -> dict[str, dict[str, Any]]:
    """The lab tasks on one split of each phase: eval.jsonl (selection) or test.jsonl (suffix _test)."""
    generation = {"until": [], "do_sample": False, "max_gen_toks": max_gen_tokens}

    def data(phase: str) -> dict[str, Any]:
        path = (curriculum_dir / phase / split_file).resolve()
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test"}

    tasks = {
        "lab_instruction": {
            **data("phase00"),
            "output_type": "generate_until",
            "doc_to_text": FunctionTag("lab_results.prompt"),
            "doc_to_target": FunctionTag("lab_results.no_target"),
            "generation_kwargs": generation,
            "process_results": FunctionTag("lab_results.instruction"),
            "metric_list": [{"metric": "rule_acc", "aggregation": "mean", "higher_is_better": True}],
        },
        "lab_knowledge": {
            **data("phase05"),
            "output_type": "multiple_choice",
            "doc_to_text": FunctionTag("lab_results.question"),
            "doc_to_choice": FunctionTag("lab_results.choices"),
            "doc_to_target": FunctionTag("lab_results.answer"),
            # The chat template puts the answer right after the assistant header.
            "target_delimiter": "",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        },
        "lab_skills": {
            **data("phase10"),
            "output_type": "generate_until",
            "doc_to_text": FunctionTag("lab_results.question"),
            "doc_to_target": FunctionTag("lab_results.answer"),
            "generation_kwargs": generation,
            "process_results": FunctionTag("lab_results.skills"),
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
    }
    return {f"{name}{suffix}": config for name, config in tasks.items()}


def write_lab_tasks(task_dir: Path, curriculum_dir: Path, max_gen_tokens: int) -> Path:
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "lab_results.py").write_text(LAB_RESULTS_MODULE)
    splits = lab_task_configs(curriculum_dir, max_gen_tokens) | lab_task_configs(
        curriculum_dir, max_gen_tokens, "test.jsonl", "_test"
    )
    for name, config in splits.items():
        (task_dir / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **config}, sort_keys=False))
    return task_dir


def flatten_results(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval's results dict -> ({"task/metric": value}, {"task/metric": stderr})."""
    values, stderrs = {}, {}
    for task, entries in results.items():
        for key, value in entries.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            name = f"{task}/{metric}" if filt == "none" else f"{task}/{metric},{filt}"
            values[name] = float(value)
            stderr = entries.get(f"{metric}_stderr,{filt}")
            if isinstance(stderr, (int, float)):
                stderrs[name] = float(stderr)
    return values, stderrs


def load_lm(model_dir: str, config: EvaluationConfig, chat_template: str | None = None) -> Any:
    """The checkpoint as lm-eval's HFLM on `evaluation.device`: `chat_template` is the recipe's
    `model.chat_template` (a base model may have none of its own), and generation stops at the
    template's end-of-turn token(s) as well as at EOS (Llama 3, Qwen and Gemma end turns before EOS)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if config.apply_chat_template:
        apply_template(tokenizer, chat_template, model_dir)
    model = load_causal_lm(model_dir, config.device)  # on the GPU in the training dtype when there is one
    configure_generation(model, tokenizer)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, device=str(model.device))


def evaluate_model(
    model_dir: str,
    config: EvaluationConfig,
    task_dir: Path | None,
    chat_template: str | None = None,
    server: ServerEndpoint | None = None,
) -> dict[str, Any]:
    """Run every configured task on one model directory with a single model load, batched
    (`evaluation.batch_size`), on `evaluation.device`. With a `server` (the model behind an
    OpenAI-compatible endpoint) the tasks it can serve go to it (`by_model`); the others run here."""
    import lm_eval
    import torch.utils.collect_env as collect_env
    from lm_eval.tasks import TaskManager

    # lm-eval attaches torch's environment report to every result (pip list, lscpu, nvidia-smi:
    # ~0.7 s of subprocesses); we do not keep it, and it cannot change within a process.
    if not hasattr(collect_env.get_pretty_env_info, "cache_info"):
        collect_env.get_pretty_env_info = functools.cache(collect_env.get_pretty_env_info)
    include = [str(p) for p in (task_dir, config.include_path) if p]
    # Indexing lm-eval's ~15k built-in tasks costs seconds; skip it when the local ones have them all.
    manager = TaskManager(include_path=include or None, include_defaults=False)
    if not set(config.tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include or None)
    if server is None:
        runs: dict[str, list[Any]] = {"hf": list(config.tasks)}
    else:
        runs = by_model(config, manager, server)
    outputs = []
    for kind, tasks in runs.items():
        lm = load_lm(model_dir, config, chat_template) if kind == "hf" else server_lm(kind, server, config)
        outputs.append(
            lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=config.num_fewshot,
                limit=config.limit,
                apply_chat_template=config.apply_chat_template,
                task_manager=manager,
                log_samples=True,  # per-item outcomes: selection compares checkpoints item by item
                bootstrap_iters=1000,
                random_seed=0,
                numpy_random_seed=0,
                torch_random_seed=0,
                fewshot_random_seed=0,
            )
        )
        del lm  # the HF model's memory goes before the next run
    results = {task: entry for output in outputs for task, entry in output["results"].items()}
    metrics, stderr = flatten_results(results)
    return {
        "metrics": metrics,
        "stderr": stderr,
        "results": results,
        "n_samples": {task: n for output in outputs for task, n in output.get("n-samples", {}).items()},
        "items": [row for output in outputs for row in per_item_outcomes(output["samples"])],
    }


def per_item_outcomes(samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """lm-eval's logged samples -> rows (task, metric, item, value) of every numeric per-item metric,
    keyed like `flatten_results` ("task/metric" or "task/metric,filter")."""
    rows = []
    for task, logged in samples.items():
        for sample in logged:
            doc = sample["doc"]
            item = str(doc["id"]) if isinstance(doc, dict) and "id" in doc else str(sample["doc_id"])
            suffix = "" if sample["filter"] == "none" else f",{sample['filter']}"
            for metric in sample["metrics"]:
                value = sample[metric]
                if isinstance(value, (bool, int, float)):  # not the tuples that corpus-level metrics log
                    rows.append({"task": task, "metric": f"{task}/{metric}{suffix}", "item": item, "value": value})
    return rows


def by_model(config: EvaluationConfig, manager: Any, server: ServerEndpoint) -> dict[str, list[Any]]:
    """The tasks (loaded, so that each loads once) by who answers them: "chat" = the server's chat
    endpoint (it applies the template), "completions" = its completions endpoint (prompt logprobs
    for multiple choice, or prompts rendered here), "hf" = the model loaded here (multiple choice on
    a server without prompt logprobs)."""
    runs: dict[str, list[Any]] = {}
    for name in config.tasks:
        loaded = manager.load([name])
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        objects = [top] if top is not None else list(loaded["tasks"].values())  # a tag: its tasks
        generation = all(t.get_config("output_type") == "generate_until" for t in loaded["tasks"].values())
        if generation:
            kind = "chat" if config.apply_chat_template else "completions"
        else:
            kind = "completions" if server.prompt_logprobs else "hf"
        runs.setdefault(kind, []).extend(objects)
    return runs


def server_lm(kind: str, server: ServerEndpoint, config: EvaluationConfig) -> Any:
    """lm-eval's client of the server: generation stops at the same EOS text the HF path adds
    (lm-eval's `until`), at the view's stop ids (its generation_config), and at each task's cap."""
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI
    from transformers import AutoTokenizer

    def with_eos(client: type) -> type:
        class Client(client):
            # lm-eval 0.4.13 drops the EOS stop string on concurrent requests (num_concurrent > 1)
            def _create_payload(self, messages: Any, generate: bool = False, eos: str | None = None, **kwargs: Any):
                return super()._create_payload(messages, generate=generate, eos=eos or self.eos_string, **kwargs)

        return Client

    common = {
        "model": server.model,
        "num_concurrent": server.num_concurrent,
        "max_retries": 3,
        "timeout": 3600,
        "eos_string": AutoTokenizer.from_pretrained(server.tokenizer).eos_token,
    }
    if kind == "chat":
        return with_eos(LocalChatCompletion)(
            base_url=f"{server.base_url}/chat/completions", tokenized_requests=False, **common
        )
    return with_eos(LocalCompletionsAPI)(
        base_url=f"{server.base_url}/completions",
        tokenizer_backend="huggingface",
        tokenizer=server.tokenizer,
        tokenized_requests=server.prompt_logprobs,  # token ids: vLLM returns their logprobs one for one
        batch_size=1,
        **common,
    )


def evaluate_checkpoint(
    model_dir: str,
    config: EvaluationConfig,
    task_dir: Path | None,
    out_uri: str,
    label: str,
    samples: int,
    chat_template: str | None = None,
    server: ServerEndpoint | None = None,
) -> dict[str, Any]:
    """Evaluate and write `<out_uri>` (lm_eval.json) and, first, its per-item records beside it
    (`items.items_uri(out_uri)`); return what was written (without the per-item rows)."""
    evaluated = evaluate_model(model_dir, config, task_dir, chat_template, server)
    items.write_items(items.items_uri(out_uri), evaluated.pop("items"))
    result = {"checkpoint": label, "samples": samples, **evaluated}
    storage.write_text(out_uri, json.dumps(result, indent=2, default=str) + "\n")
    return result
