"""The server backend over real HTTP: `transformers serve` (an OpenAI-compatible server that runs
here) serves the lab model from an evaluation worker; lm-eval's generation tasks and MT-Bench
answers go through it, and equal the HF path in the worker on the same items: each generation
item's response (a task of the test's own, `lab_echo`, records them as lm-eval hands them over;
the base model scores 0 on the lab's generation metrics, so equal scores alone would prove little).

The model is the lab's base model as a hub base model may come: no chat template of its own (the
recipe names one) and a generation config that does not stop at the end of a turn. So the server
path can only match the HF path if the template reaches the server, the stop ids do too, and each
request asks for the same number of new tokens."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from core.recipe import resolve
from evaluation.worker import EvalRequest, EvaluationWorkers
from tests.conftest import mt_bench_settings

pytestmark = pytest.mark.slow
MAX_GEN_TOKENS = 12
# The base model (assets v3) ends some MT-Bench answers within this cap (6 tokens), not others (11, 14).
MAX_NEW_TOKENS = 10
ECHO = """\
import json

RECORD = {record!r}


def process(doc, results):
    with open(RECORD, "a") as f:
        f.write(json.dumps({{"question": doc["question"], "response": results[0]}}) + "\\n")
    return {{"chars": len(results[0])}}
"""


def echo_task(root: Path, curriculum: Path, record: Path) -> Path:
    """An include directory with `lab_echo`: lab_skills's items and generation settings, each
    response appended to `record` (from the evaluation worker, where lm-eval runs)."""
    from evaluation.lm_eval_runner import LAB_RESULTS_MODULE, FunctionTag, lab_task_configs

    root.mkdir(parents=True)
    (root / "lab_results.py").write_text(LAB_RESULTS_MODULE)  # lab_skills's item functions
    (root / "echo.py").write_text(ECHO.format(record=str(record)))
    config = lab_task_configs(curriculum, MAX_GEN_TOKENS)["lab_skills"] | {
        "process_results": FunctionTag("echo.process"),
        "metric_list": [{"metric": "chars", "aggregation": "mean", "higher_is_better": True}],
    }
    (root / "lab_echo.yaml").write_text(yaml.safe_dump({"task": "lab_echo", **config}, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory, assets) -> tuple[Path, Path]:
    """(model directory without template or stop ids, the template as a file the recipe names)."""
    root = tmp_path_factory.mktemp("bare")
    model = root / "model"
    shutil.copytree(assets.base_model_dir, model)
    template = root / "lab.jinja"
    shutil.move(model / "chat_template.jinja", template)
    generation = json.loads((model / "generation_config.json").read_text())
    del generation["eos_token_id"]
    (model / "generation_config.json").write_text(json.dumps(generation))
    return model, template


def recipe_for(backend: str, model: Path, template: Path, include: Path | None = None):
    return resolve(
        "demo",
        overrides={
            "model.name_or_path": str(model),
            "model.chat_template": str(template),
            "evaluation.backend": backend,
            "evaluation.tasks": ["lab_instruction", "lab_knowledge", "lab_skills", "lab_echo"],
            "evaluation.include_path": str(include) if include else None,
            "evaluation.limit": 10,
            "evaluation.max_gen_tokens": MAX_GEN_TOKENS,
            "evaluation.server.num_concurrent": 4,
            "evaluation.mt_bench": mt_bench_settings(
                "http://unused", "RECIPE_LAB_NO_KEY", question_limit=1, max_new_tokens=MAX_NEW_TOKENS
            )
            | {"categories": ["math", "reasoning", "coding", "extraction"]},  # temperature 0: greedy both ways
        },
    )


@pytest.fixture(scope="module")
def both_paths(tmp_path_factory, bare_model, assets) -> dict[str, tuple[dict, list[dict], Path, list[dict]]]:
    """backend -> (lm_eval.json, MT-Bench answers, the worker's log, lab_echo's responses), each from one worker."""
    model, template = bare_model
    out = {}
    for backend in ("hf", "transformers-serve"):
        work = tmp_path_factory.mktemp(backend)
        record = work / "responses.jsonl"
        recipe = recipe_for(backend, model, template, echo_task(work / "tasks", assets.root / "curriculum", record))
        with EvaluationWorkers(log=lambda _line: None) as workers:
            workers.open_slots("cpu", [{"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}])
            request = EvalRequest(recipe=recipe, name="bare", uri=str(model), samples=0, eval_dir=str(work / "eval"))
            workers.evaluate(request, work)
        answers = [json.loads(line) for line in (work / "eval" / "mt_bench_answers.jsonl").open()]
        responses = sorted((json.loads(line) for line in record.open()), key=lambda r: r["question"])
        lm_eval = json.loads((work / "eval" / "lm_eval.json").read_text())
        out[backend] = lm_eval, answers, work / "eval-worker-cpu-0.log", responses
    return out


def test_generation_tasks_and_mt_bench_answers_through_the_server_equal_the_hf_path(both_paths):
    (hf, hf_answers, hf_log, hf_responses) = both_paths["hf"]
    (served, served_answers, log, served_responses) = both_paths["transformers-serve"]
    assert "transformers.cli.transformers serve" in log.read_text()  # the worker started the server
    # generation items went to the server's chat endpoint (the multiple-choice one stays on HF)
    assert log.read_text().count("POST /v1/chat/completions") >= 3 * 10 + 4 * 2
    assert served["metrics"] == hf["metrics"]
    assert set(served["metrics"]) >= {"lab_instruction/rule_acc", "lab_skills/exact_match", "lab_knowledge/acc"}
    assert served["n_samples"] == hf["n_samples"]
    assert len(hf_responses) == 10 and all(r["response"].strip() for r in hf_responses)
    assert served_responses == hf_responses  # item by item, the same text
    assert served_answers == hf_answers and len(hf_answers) == 4
    # the per-item records too (lm-eval's logged samples, on the served tasks as on HF): row for row
    hf_items, served_items = (
        pd.read_parquet(path.parent / "eval" / "lm_eval.items.parquet").sort_values(
            ["metric", "item"], ignore_index=True
        )
        for path in (hf_log, log)
    )
    pd.testing.assert_frame_equal(served_items, hf_items)
    assert (served_items.groupby("metric").size() == 10).all()  # evaluation.limit items of every task
    assert {"lab_instruction/rule_acc", "lab_skills/exact_match", "lab_echo/chars"} <= set(served_items["metric"])


def test_the_plumbing_template_stop_ids_and_caps(both_paths, bare_model, tmp_path):
    """Who does what on the server path, checked against the tokenizer: the server renders the
    recipe's template once (its prompt token count is the HF rendering's, BOS not doubled), stops
    at the template's end of turn (some answers end early) and at the cap (others are cut there)."""
    import openai
    from transformers import AutoTokenizer

    from core.chat import apply_template, stop_token_ids
    from evaluation import server

    model, template = bare_model
    tokenizer = apply_template(AutoTokenizer.from_pretrained(model), str(template), str(model))
    hf_answers = both_paths["hf"][1]
    lengths = [len(tokenizer(turn, add_special_tokens=False)["input_ids"]) for a in hf_answers for turn in a["turns"]]
    assert min(lengths) < MAX_NEW_TOKENS - 2 and max(lengths) >= MAX_NEW_TOKENS - 2, lengths  # both ends exercised

    view = server.served_view(str(model), str(template), tmp_path / "view")
    generation = json.loads((view / "generation_config.json").read_text())
    assert generation["eos_token_id"] == stop_token_ids(tokenizer)
    recipe = recipe_for("transformers-serve", model, template)
    messages = [{"role": "user", "content": "Which banner does Thogaeth fly?"}]
    with server.serve(view, "transformers-serve", recipe.evaluation.server, tmp_path / "server.log") as endpoint:
        client = openai.OpenAI(base_url=endpoint.base_url, api_key="none")
        reply = client.chat.completions.create(model=endpoint.model, messages=messages, temperature=0, max_tokens=3)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert reply.usage.prompt_tokens == len(rendered["input_ids"])
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
