"""The embedded lab assets: determinism, held-out evals, rules, chat template, model, cache."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
import torch

import embedded
from embedded import PHASES, EmbeddedAssets, Pretraining, build_assets
from embedded.base_model import new_model, pretrain, train_tokenizer
from embedded.curriculum import INSTRUCTION_KINDS, build_curriculum, check_rule, instruction_item, jsonl
from embedded.world import encyclopedia, make_world

# Same data, tokenizer and model shape as the real build; only a few pretraining steps, so
# these tests take seconds (the pretraining budget is part of the cache key).
FAST = Pretraining(steps=3, batch_size=4)


@pytest.fixture
def fast_build(monkeypatch):
    monkeypatch.setattr(embedded, "PRETRAINING", FAST)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> EmbeddedAssets:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embedded, "PRETRAINING", FAST)
        return build_assets(tmp_path_factory.mktemp("cache"), seed=0)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def curriculum_bytes(seed: int) -> dict[str, tuple[str, str, str]]:
    world = make_world(seed, embedded.N_KINGDOMS)
    phases = build_curriculum(world, seed, embedded.N_TRAIN, embedded.EVAL_SPLITS)
    return {phase: tuple(jsonl(rows) for rows in splits) for phase, splits in phases.items()}


def test_generation_is_deterministic_per_seed():
    assert curriculum_bytes(0) == curriculum_bytes(0)
    other = curriculum_bytes(1)
    assert all(other[p] != curriculum_bytes(0)[p] for p in PHASES)
    assert encyclopedia(make_world(0, 8), 0, 6) == encyclopedia(make_world(0, 8), 0, 6)


def test_tokenizer_training_is_deterministic():
    texts = encyclopedia(make_world(0, 20), 0, 6)
    size = embedded.MODEL
    assert (
        train_tokenizer(texts, size).backend_tokenizer.to_str()
        == train_tokenizer(texts, size).backend_tokenizer.to_str()
    )


@pytest.mark.parametrize("caller_threads", [1, 3])
def test_pretraining_runs_on_its_own_thread_count_whatever_the_caller_set(caller_threads):
    """The model must not depend on the caller's torch threads (OMP_NUM_THREADS): pretraining
    runs on Pretraining.threads, gives the caller its setting back, and repeats bit for bit."""
    documents = encyclopedia(make_world(0, 8), 0, 2)
    tokenizer = train_tokenizer(documents, embedded.MODEL)
    plan = Pretraining(steps=3, batch_size=4)
    seen: list[int] = []
    weights = []
    before = torch.get_num_threads()
    torch.set_num_threads(caller_threads)
    try:
        for _ in range(2):
            model = new_model(tokenizer, embedded.MODEL, seed=0)
            pretrain(model, tokenizer, documents, plan, 0, lambda _msg: seen.append(torch.get_num_threads()))
            weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
            assert torch.get_num_threads() == caller_threads
    finally:
        torch.set_num_threads(before)
    assert seen == [plan.threads, plan.threads]  # the progress line of the last step, from inside the loop
    assert torch.equal(weights[0], weights[1])


def test_built_files_are_the_generator_output(assets):
    expected = curriculum_bytes(0)
    for phase in PHASES:
        files = (assets.train_file(phase), assets.eval_file(phase), assets.test_file(phase))
        assert tuple(f.read_text() for f in files) == expected[phase]
    with pytest.raises(ValueError, match="unknown embedded phase"):
        assets.train_file("phase99")


def test_sizes_and_row_shapes(assets):
    for phase in PHASES:
        train, evals = read_jsonl(assets.train_file(phase)), read_jsonl(assets.eval_file(phase))
        tests = read_jsonl(assets.test_file(phase))
        assert 1500 <= len(train) <= 3000 and (len(evals), len(tests)) == embedded.EVAL_SPLITS[phase]
        assert len(tests) >= 2 * len(evals)  # the test split: at least twice the selection split
        assert len({r["id"] for r in train + evals + tests}) == len(train) + len(evals) + len(tests)
        assert [set(r) for r in tests] == [set(r) for r in evals[:1]] * len(tests)
        for row in train:
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            assert row["messages"][1]["content"].strip()
    for row in read_jsonl(assets.eval_file("phase00")):
        assert set(row) == {"id", "prompt", "rule"} and row["rule"]["kind"] in INSTRUCTION_KINDS
    for row in read_jsonl(assets.eval_file("phase05")):
        assert set(row) == {"id", "question", "choices", "answer"}
        assert len(set(row["choices"])) == 4 and 0 <= row["answer"] < 4
    for row in read_jsonl(assets.eval_file("phase10")):
        assert set(row) == {"id", "question", "answer"} and row["answer"] == row["answer"].strip()


def eval_pairs(phase: str, rows: list[dict]) -> list[tuple[str, str | None]]:
    """(prompt, reference answer) of eval rows; phase00 rows have a rule, not an answer."""
    if phase == "phase00":
        return [(r["prompt"], None) for r in rows]
    if phase == "phase05":
        return [(r["question"], r["choices"][r["answer"]]) for r in rows]
    return [(r["question"], r["answer"]) for r in rows]


def test_no_eval_prompt_or_pair_appears_in_any_train_file(assets):
    train = [r["messages"] for p in PHASES for r in read_jsonl(assets.train_file(p))]
    train_prompts = {m[0]["content"] for m in train}
    train_pairs = {(m[0]["content"], m[1]["content"]) for m in train}
    for phase in PHASES:
        selection = eval_pairs(phase, read_jsonl(assets.eval_file(phase)))
        test = eval_pairs(phase, read_jsonl(assets.test_file(phase)))
        for prompt, answer in selection + test:
            assert prompt not in train_prompts, (phase, prompt)
            assert (prompt, answer) not in train_pairs
        assert not {p for p, _ in selection} & {p for p, _ in test}  # the two splits share no item


def test_knowledge_eval_asks_about_facts_that_train_teaches(assets):
    world = make_world(0, embedded.N_KINGDOMS)
    names = [n for k in world for n in (k.name, k.capital, k.ruler)]
    taught = {
        (m[1]["content"], n)
        for r in read_jsonl(assets.train_file("phase05"))
        for m in [r["messages"]]
        for n in names
        if n in m[0]["content"]
    }
    asked = {}
    for split in ("eval", "test"):
        asked[split] = set()
        for row in read_jsonl(assets.curriculum_dir / "phase05" / f"{split}.jsonl"):
            subject = max((n for n in names if n in row["question"]), key=len)  # "Queen Ana" over "Ana..."
            assert (row["choices"][row["answer"]], subject) in taught, row
            asked[split].add((row["choices"][row["answer"]], subject))
    assert not asked["eval"] & asked["test"]  # no fact is asked in both splits


def test_check_rule_accepts_reference_answers():
    import random

    rng, world = random.Random(0), make_world(0, embedded.N_KINGDOMS)
    for kind in INSTRUCTION_KINDS:
        for _ in range(20):
            item = instruction_item(rng, kind, world)
            assert check_rule(item.rule, item.answer), item
            assert check_rule(item.rule, f"  {item.answer}\n"), "surrounding whitespace is ignored"


@pytest.mark.parametrize(
    "rule, good, bad",
    [
        ({"kind": "uppercase", "word": "Zorbia"}, "ZORBIA", ["Zorbia", "ZORBIA!", "ZORBIA ZORBIA"]),
        ({"kind": "lowercase", "word": "Zorbia"}, "zorbia", ["Zorbia", "zorbi"]),
        (
            {"kind": "repeat", "word": "salt", "times": 3},
            "salt, salt, salt",
            ["salt, salt", "salt salt salt", "salt, salt, Salt"],
        ),
        ({"kind": "brackets", "word": "red"}, "[red]", ["red", "(red)", "[red"]),
        ({"kind": "quotes", "word": "red"}, '"red"', ["red", "'red'"]),
        (
            {"kind": "json", "key": "answer", "value": "Vel"},
            '{"answer": "Vel"}',
            ['{"name": "Vel"}', '{"answer": "Vel", "x": 1}', "answer: Vel", '{"answer": "Vel"'],
        ),
        ({"kind": "word_count", "n": 3}, "Zorbia flies a", ["Zorbia flies", "Zorbia flies a red", ""]),
        ({"kind": "hyphen", "words": ["red", "salt"]}, "red-salt", ["salt-red", "red - salt", "red salt"]),
    ],
)
def test_check_rule_good_and_bad(rule, good, bad):
    assert check_rule(rule, good)
    assert not any(check_rule(rule, response) for response in bad)


def test_check_rule_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown rule kind"):
        check_rule({"kind": "poem"}, "x")


def test_chat_template_prefix_property_and_eos(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.base_model_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of Zorbia?"},
        {"role": "assistant", "content": "Velmora"},
        {"role": "user", "content": "Write red in capital letters."},
        {"role": "assistant", "content": "RED"},
    ]

    def render(msgs, generation_prompt):
        return list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt)["input_ids"])

    for i in (2, 4):
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        assert full[: len(prompt)] == prompt
        assert full[-1] == tok.eos_token_id
        assert tok.decode(full[len(prompt) :]) == messages[i]["content"] + tok.eos_token
    text = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|begin_of_text|><|start|>user\nWhat is the capital of Zorbia?<|end|><|start|>assistant\n"
    assert tok(text, add_special_tokens=False)["input_ids"].count(tok.bos_token_id) == 1


def test_curriculum_samples_are_short(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.base_model_dir)
    for phase in PHASES:
        lengths = [
            len(tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"])
            for r in read_jsonl(assets.train_file(phase))
        ]
        assert max(lengths) <= 64, phase


def test_model_and_tokenizer_reload_offline(assets, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert (assets.base_model_dir / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(assets.base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.base_model_dir)
    assert isinstance(model, LlamaForCausalLM) and model.config.tie_word_embeddings
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|end|>", "<|pad|>")
    assert model.generation_config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Who rules Zorbia?"}], add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_cache_hit_builds_nothing_and_returns_the_same_paths(assets, fast_build, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("a cache hit must not build")

    monkeypatch.setattr(embedded, "_build", no_build)
    messages: list[str] = []
    again = build_assets(assets.root.parent.parent, seed=0, progress=messages.append)
    assert again == assets and messages == []
    assert (
        json.loads((assets.root / embedded.MARKER).read_text())["rows"]["phase05"]["test"]
        == embedded.EVAL_SPLITS["phase05"][1]
    )


def test_failed_build_leaves_no_cache_and_next_build_succeeds(tmp_path, fast_build, monkeypatch):
    real_build = embedded._build

    def killed(root, seed, report):
        (root / "world.json").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_build", killed)
    with pytest.raises(KeyboardInterrupt):
        build_assets(tmp_path, seed=3)
    parent = tmp_path / "embedded"
    assert [p.name for p in parent.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(embedded, "_build", real_build)
    assert (build_assets(tmp_path, seed=3).root / embedded.MARKER).exists()


def test_concurrent_builders_share_one_build(tmp_path, fast_build):
    messages: list[str] = []
    results: list[EmbeddedAssets] = []

    def worker():
        results.append(build_assets(tmp_path, seed=5, progress=messages.append))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert sum(m.startswith("generating the world") for m in messages) == 1
    assert [p.name for p in (tmp_path / "embedded").iterdir() if p.name.startswith(".")] == []
