"""Real model families (tests/zoo.py): loss masks, templates, system turns, inputs, padding and
stopping, each checked against the family's own conventions written out here by hand."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from core import chat
from tests.zoo import FAMILIES
from training.data import IGNORE_INDEX, DataError, load_phase, load_tokenized, prepare

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Red, of course."},
]
# What each family trains on for CONVERSATION: every answer plus its end-of-turn token, as the
# family's template writes the turn (Mistral's answer token carries the space after [/INST];
# Qwen 3 writes an empty think block into the last turn, the one the model generates).
EXPECTED_TRAINED = {
    "llama3": ["Blue.<|eot_id|>", "Red, of course.<|eot_id|>"],
    "qwen2.5": ["Blue.<|im_end|>", "Red, of course.<|im_end|>"],
    "qwen3": ["Blue.<|im_end|>", "<think>\n\n</think>\n\nRed, of course.<|im_end|>"],
    "mistral": [" Blue.</s>", " Red, of course.</s>"],
    "gemma": ["Blue.<end_of_turn>", "Red, of course.<end_of_turn>"],
    "gemma2": ["Blue.<end_of_turn>", "Red, of course.<end_of_turn>"],
    "granite": ["Blue.<|end_of_text|>", "Red, of course.<|end_of_text|>"],
    "phi3": ["Blue.<|end|>", "Red, of course.<|end|>"],
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trained_texts(tokenizer, input_ids, labels) -> list[str]:
    """The decoded runs of tokens that carry loss (labels equal to the inputs there)."""
    runs, run = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs, run = [*runs, run], []
    runs += [run] if run else []
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


@pytest.fixture(scope="module")
def tokenizers(zoo):
    return {name: AutoTokenizer.from_pretrained(path) for name, path in zoo.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_masked_tokens_are_each_answer_plus_its_end_of_turn(tmp_path, tokenizers, family):
    tokenizer = tokenizers[family]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    system = "as_is" if FAMILIES[family].system_role else "merge_into_first_user"
    prepare(load_phase([str(source)])[0], tokenizer, str(tmp_path / "out"), 256, system_message=system)
    data = load_tokenized(str(tmp_path / "out"))
    assert trained_texts(tokenizer, data.input_ids[0].tolist(), data.labels[0].tolist()) == EXPECTED_TRAINED[family]
    # Nothing of the prompts is trained, and the system prompt reached the model.
    assert "You are terse." in tokenizer.decode(data.input_ids[0].tolist())


def test_qwen3_rewritten_history_gets_correct_masks_without_train_on_prompt(tokenizers):
    tokenizer = tokenizers["qwen3"]
    messages = [
        {"role": "system", "content": "Think, then answer."},
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nAnswer A"},
        {"role": "user", "content": "Second?"},
        {"role": "assistant", "content": "Answer B"},
        {"role": "user", "content": "Third?"},
        {"role": "assistant", "content": "<think>\nnew reasoning\n</think>\n\nAnswer C"},
    ]
    # The template rewrites history: rendering the first turns alone keeps a think block that
    # the whole conversation drops, so growing prefixes cannot locate the answers.
    first = chat.render(tokenizer, messages[:3])
    assert "old reasoning" in first and "old reasoning" not in chat.render(tokenizer, messages)
    input_ids, labels, _ = chat.assistant_labels(tokenizer, messages)
    assert trained_texts(tokenizer, input_ids, labels) == [
        "Answer A<|im_end|>",
        "Answer B<|im_end|>",
        "<think>\nnew reasoning\n</think>\n\nAnswer C<|im_end|>",
    ]


def test_a_model_without_template_fails_naming_the_field_and_works_once_set(tmp_path, zoo, tokenizers):
    from core.recipe import RecipeError, load_recipe

    bare = AutoTokenizer.from_pretrained(zoo["qwen2.5"])
    bare.chat_template = None
    with pytest.raises(chat.ChatTemplateError, match=r"base-qwen has no chat template: set model\.chat_template"):
        chat.apply_template(bare, None, "base-qwen")
    template_file = tmp_path / "mine.jinja"
    template_file.write_text(chat.template_text("chatml"))
    for setting in ("chatml", str(template_file)):
        tokenizer = chat.apply_template(AutoTokenizer.from_pretrained(zoo["qwen2.5"]), setting)
        ids, labels, _ = chat.assistant_labels(tokenizer, CONVERSATION[1:3])
        assert trained_texts(tokenizer, ids, labels) == ["Blue.<|im_end|>"]
        assert "You are Qwen" not in tokenizer.decode(ids)  # plain ChatML: no default system prompt
    # A template written for other tokens (ChatML on Llama 3's) could never teach where a turn ends.
    llama = chat.apply_template(AutoTokenizer.from_pretrained(zoo["llama3"]), "chatml")
    with pytest.raises(chat.ChatTemplateError, match=r"model\.chat_template: .*'<\|im_end\|>"):
        chat.assistant_labels(llama, CONVERSATION[1:3])
    recipe = {"model.name_or_path": str(zoo["qwen2.5"]), "model.chat_template": "no-such-template"}
    with pytest.raises(RecipeError, match=r"model\.chat_template: .*no-such-template"):
        load_recipe("demo", recipe)


def test_a_system_turn_given_to_gemma_fails_naming_file_and_line_unless_merged(tmp_path, tokenizers):
    tokenizer = tokenizers["gemma"]
    plain = {"messages": CONVERSATION[1:3]}
    source = write_jsonl(tmp_path / "chat.jsonl", [plain, {"messages": CONVERSATION}])
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare(load_phase([str(source)])[0], tokenizer, str(out), 256)
    assert str(err.value).startswith(f"{source}:2: the chat template rejects this conversation: System role")
    assert "model.system_message: merge_into_first_user" in str(err.value)
    assert not out.exists()
    stats = prepare(load_phase([str(source)])[0], tokenizer, str(out), 256, system_message="merge_into_first_user")
    assert stats.samples == 2


def test_openai_content_parts_read_as_text_and_unsupported_inputs_name_file_and_line(tmp_path, tokenizers):
    tokenizer = tokenizers["llama3"]
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Name a"}, {"type": "text", "text": "colour."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        ]
    }
    text = {"messages": [{"role": "user", "content": "Name a\ncolour."}, {"role": "assistant", "content": "Blue."}]}
    source = write_jsonl(tmp_path / "parts.jsonl", [parts, text])
    prepare(load_phase([str(source)])[0], tokenizer, str(tmp_path / "out"), 256)
    data = load_tokenized(str(tmp_path / "out"))
    assert data.input_ids[0].tolist() == data.input_ids[1].tolist()

    tool = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    image = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
            {"role": "assistant", "content": "A cat."},
        ]
    }
    for bad, expected in [(tool, "message 1 is a tool call or tool result (role 'tool')"), (image, "'image_url'")]:
        source = write_jsonl(tmp_path / "bad.jsonl", [text, text, bad])
        with pytest.raises(DataError) as err:
            load_phase([str(source)])
        assert str(err.value).startswith(f"{source}:3: ") and expected in str(err.value)
        assert "not supported" in str(err.value)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pad_and_stop_tokens_follow_the_family(zoo, tokenizers, family):
    from transformers import AutoConfig

    spec, tokenizer = FAMILIES[family], tokenizers[family]
    end_of_turn, eos = tokenizer.convert_tokens_to_ids([spec.end_of_turn, spec.eos])
    assert chat.stop_token_ids(tokenizer) == list(dict.fromkeys([end_of_turn, eos]))
    pad = chat.pad_token_id(tokenizer, AutoConfig.from_pretrained(zoo[family]))
    assert pad == (tokenizer.convert_tokens_to_ids(spec.pad) if spec.pad else end_of_turn)


def test_parallel_chunked_prep_equals_one_process_and_is_reused_until_inputs_change(tmp_path, assets, zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo["qwen2.5"])  # its own: the template is changed below
    with open(assets.train_file("phase00")) as f:
        source = write_jsonl(tmp_path / "d.jsonl", [next(f).strip() for _ in range(40)])
    conversations, files = load_phase([str(source)])
    serial = prepare(conversations, tokenizer, str(tmp_path / "serial"), 256, files=files, workers=1)
    parallel = prepare(conversations, tokenizer, str(tmp_path / "par"), 256, files=files, workers=2, chunk_size=8)
    assert serial == parallel and serial.samples == 40
    a, b = load_tokenized(str(tmp_path / "serial")), load_tokenized(str(tmp_path / "par"))
    assert a.ids == b.ids and (a.input_ids.values == b.input_ids.values).all()
    assert (a.labels.values == b.labels.values).all() and a.lengths() == b.lengths()
    assert a.nbytes() / serial.tokens <= 12  # int32 tokens and labels, one offset per sample
    assert sum(a.loss_tokens()) == serial.loss_tokens

    tokens = tmp_path / "par" / "tokens.parquet"
    written = tokens.stat().st_mtime_ns
    again = prepare(conversations, tokenizer, str(tmp_path / "par"), 256, files=files)
    assert again == parallel and tokens.stat().st_mtime_ns == written  # reused, not redone
    chat.apply_template(tokenizer, "chatml")  # another template: other tokens, prepared again
    redone = prepare(conversations, tokenizer, str(tmp_path / "par"), 256, files=files)
    assert redone.content_hash != parallel.content_hash and tokens.stat().st_mtime_ns != written


def force_answers(model, answer_token: int, end_of_turn: int, k: int) -> None:
    """Bias the logits so that every answer is `answer_token` k times, then `end_of_turn`, then
    `answer_token` again: a generator that misses the end of turn runs on past k tokens."""
    import torch

    generated = {"n": 0}

    def bias(module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids.shape[1] > 1:  # a prefill: a new answer starts
            generated["n"] = 0
        token = end_of_turn if generated["n"] == k else answer_token
        forced = torch.full_like(output.logits[:, -1], -1e4)
        forced[:, token] = 1e4
        output.logits[:, -1] = forced
        generated["n"] += 1
        return output

    model.register_forward_hook(bias, with_kwargs=True)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_answers_stop_at_the_family_end_of_turn_in_lm_eval_and_mt_bench(zoo, family):
    from lm_eval.api.instance import Instance

    from core.recipe import EvaluationConfig, MTBenchConfig
    from evaluation import lm_eval_runner, mt_bench

    k = 3
    lm = lm_eval_runner.load_lm(str(zoo[family]), EvaluationConfig(tasks=["lab_skills"], batch_size=2))
    tokenizer = lm.tokenizer
    answer_token = tokenizer(" ok", add_special_tokens=False)["input_ids"][-1]
    end_of_turn = tokenizer.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    force_answers(lm.model, answer_token, end_of_turn, k)
    expected = tokenizer.decode([answer_token] * k)

    prompts = [
        chat.render(tokenizer, [{"role": "user", "content": q}], generation_prompt=True)
        for q in ("Name a colour.", "Name a much longer list of colours, please.")
    ]
    requests = [
        Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 4 * k, "do_sample": False}), i)
        for i, p in enumerate(prompts)
    ]
    assert lm.generate_until(requests) == [expected, expected]

    questions = [
        mt_bench.Question(question_id=1, category="writing", turns=["Write a line.", "Shorter."]),
        mt_bench.Question(question_id=2, category="math", turns=["What is 2+2?", "And 3+3?"]),
    ]
    config = MTBenchConfig(judge_base_url="http://unused", judge_model="unused", max_new_tokens=4 * k)
    answers = mt_bench.generate_answers(lm.model, tokenizer, questions, config)
    assert [a.turns for a in answers] == [[expected.strip()] * 2] * 2


# Gemma 2 trains padded on CPU (eager: sdpa cannot cap its attention scores); its run is
# tests/test_lifetime.py's `lab run`.
PACKING_FAMILIES = [name for name in FAMILIES if name != "gemma2"]


@pytest.fixture(scope="module", params=PACKING_FAMILIES)
def family_run(request, tmp_path_factory, prefect_server, assets, zoo):
    """One real finetune flow per family (prep -> train -> checkpoints -> lm-eval on the lab
    tasks -> MT-Bench answers for two questions, judged by a local double), shared by the
    tests that read it. The data carries a system prompt (Gemma's is merged, as it must be)."""
    from flows.finetune import finetune
    from tests.conftest import mt_bench_settings
    from tests.judge_server import JudgeServer

    family = request.param
    root = tmp_path_factory.mktemp(f"flow-{family}")
    with open(assets.train_file("phase00")) as f:
        rows = [json.loads(next(f)) for _ in range(32)]
    for row in rows:
        row["messages"] = [{"role": "system", "content": "Answer briefly."}, *row["messages"]]
    data = write_jsonl(root / "train.jsonl", rows)
    with pytest.MonkeyPatch.context() as patch, JudgeServer(api_key="sk-test-families", default=("rating", 5)) as judge:
        patch.setenv("RECIPE_LAB_TEST_JUDGE_KEY", "sk-test-families")
        patch.setattr("tasks.finetune.mt_bench_cache_dir", lambda: root / "judgments")  # no judgments shared
        overrides = {
            "model.name_or_path": str(zoo[family]),
            "model.system_message": "as_is" if FAMILIES[family].system_role else "merge_into_first_user",
            "phases": [{"name": "phase00", "data": [str(data)], "objective": {"lab_instruction/rule_acc": 1.0}}],
            "training.epochs": 1,
            "training.effective_batch_size": 16,
            "training.warmup_steps": 0,
            "checkpointing.save_every_samples": None,
            "evaluation.limit": 4,
            "evaluation.batch_size": 8,
            "evaluation.max_gen_tokens": 8,
            "evaluation.mt_bench": mt_bench_settings(
                judge.base_url,
                "RECIPE_LAB_TEST_JUDGE_KEY",
                question_limit=1,
                categories=["writing", "math"],
                max_new_tokens=8,
            ),
        }
        finetune(recipe="demo", storage_root=str(root), overrides=overrides, run_id=family)
    run = root / family
    # The flow trained packed (training.packing, sdpa); the same phase is also trained padded,
    # through the same launcher, from the flow's own job file.
    from training.job import TrainJob
    from training.launch.local import run_training

    job = TrainJob.model_validate_json((run / "phase00" / "job.json").read_text())
    recipe = job.recipe.model_copy(update={"training": job.recipe.training.model_copy(update={"packing": False})})
    run_training(job.model_copy(update={"recipe": recipe, "output_dir": str(root / "padded")}), on_line=lambda _: None)
    return family, run


@pytest.mark.slow
def test_finetune_flow_runs_for_every_family(family_run):
    from transformers import AutoConfig, GenerationConfig

    family, run = family_run
    spec = FAMILIES[family]
    packed, padded = (
        json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (run / "phase00", run.parent / "padded")
    )
    # Packed, a step's 16 short samples (~1.6k tokens) share rows of one 4,096-token micro-batch;
    # padded, length groups are split to bound their padding.
    assert packed["micro_batches"] < padded["micro_batches"]
    assert packed["padding_efficiency"] == 1.0 > padded["padding_efficiency"]
    trained = 32 - 32 // 10  # the validation slice (training.validation_samples, at most a tenth) is held out
    assert packed["samples_seen"] == padded["samples_seen"] == trained
    last = f"samples_{trained}"
    for checkpoint in (
        run / "phase00" / "checkpoints" / last,
        run.parent / "padded" / "checkpoints" / last,
    ):
        assert (checkpoint / "meta.json").exists()
        assert AutoConfig.from_pretrained(checkpoint).model_type == spec.model_type
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        stops = tokenizer.convert_tokens_to_ids([spec.eos, spec.end_of_turn])  # the base's EOS, then end of turn
        generation = GenerationConfig.from_pretrained(checkpoint)
        assert generation.eos_token_id == list(dict.fromkeys(stops)) and generation.pad_token_id is not None
        assert tokenizer.chat_template == chat.template_text(spec.template)
    stats = json.loads((run / "data" / "phase00" / "stats.json").read_text())
    assert stats["samples"] == trained and len(stats["validation_ids"]) == 32 // 10 and stats["content_hash"]
    for model in ("base", last):
        scores = json.loads((run / "phase00" / "eval" / model / "lm_eval.json").read_text())["metrics"]
        assert {"lab_instruction/rule_acc", "lab_knowledge/acc", "lab_skills/exact_match"} <= set(scores)
        answers = (run / "phase00" / "eval" / model / "mt_bench_answers.jsonl").read_text().splitlines()
        assert [len(json.loads(a)["turns"]) for a in answers] == [2, 2]
        result = json.loads((run / "phase00" / "eval" / model / "mt_bench.json").read_text())
        assert result["metrics"]["mt_bench/overall"] == 5.0 and result["error_rate"] == 0.0
    assert json.loads((run / "phase00" / "selection.json").read_text())["winner"]["name"] in ("base", last)


@pytest.mark.slow
def test_the_export_stops_at_every_end_token_and_pads_whether_a_checkpoint_or_the_start_model_won(
    family_run, zoo, tmp_path
):
    """The zoo's base models stop at their EOS only and most name no pad (like the hub's base
    checkpoints); exported, a winning start model stops like a winning checkpoint: at the base's
    EOS, then the family's end of turn, with a pad id."""
    from evaluation.export import selected, write_model_dir

    family, run = family_run
    spec = FAMILIES[family]
    manifest, recipe, selection = selected(str(run), "phase00")
    tokenizer = AutoTokenizer.from_pretrained(zoo[family])
    base_eos = json.loads((zoo[family] / "generation_config.json").read_text())["eos_token_id"]
    expected = list(dict.fromkeys([base_eos, *tokenizer.convert_tokens_to_ids([spec.end_of_turn, spec.eos])]))
    checkpoint = next(c for c in selection.candidates if c.checkpoint != selection.start.checkpoint)
    exported = {}
    for name, winner in {"start": selection.start, "checkpoint": checkpoint}.items():
        write_model_dir(str(run), manifest, recipe, selection.model_copy(update={"winner": winner}), tmp_path / name)
        exported[name] = json.loads((tmp_path / name / "generation_config.json").read_text())
    assert exported["start"]["eos_token_id"] == exported["checkpoint"]["eos_token_id"] == expected
    assert exported["start"]["pad_token_id"] == exported["checkpoint"]["pad_token_id"] is not None


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_per_sample"])
@pytest.mark.parametrize("family", PACKING_FAMILIES)
def test_a_packed_row_gives_each_family_the_padded_loss(zoo, family, attn):
    """Samples packed into one row (position_ids restart per sample) are scored exactly as in a
    padded batch by every family's attention, sliding windows (Mistral, Gemma: 16 tokens)
    included: no attention crosses a sample boundary. Both ways of attending on a packed row:
    sdpa's row-wide mask and sdpa per sample (what training uses, training.attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    from training import attention
    from training.data import TokenizedData
    from training.step import collate, collate_packed, summed_token_loss

    assert attention.NAME == "sdpa_per_sample"
    model = AutoModelForCausalLM.from_pretrained(zoo[family], dtype=torch.float32, attn_implementation="sdpa")
    packed_model = AutoModelForCausalLM.from_pretrained(zoo[family], dtype=torch.float32, attn_implementation=attn)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(10, 2000, (n,), generator=g).tolist() for n in (30, 7, 22)]
    data = TokenizedData(ids=["a", "b", "c"], input_ids=ids, labels=ids)
    pad = chat.pad_token_id(AutoTokenizer.from_pretrained(zoo[family]), model.config)
    with torch.no_grad():
        padded = summed_token_loss(model, collate(data, [0, 1, 2], pad))
        packed = summed_token_loss(packed_model, collate_packed(data, [0, 1, 2]))
        alone = sum(summed_token_loss(model, collate(data, [i], pad)) for i in range(3))
    assert torch.allclose(padded, alone, rtol=1e-5) and torch.allclose(packed, alone, rtol=1e-5)


def test_generation_blocks_of_a_template_mark_the_answers(zoo):
    """A template that marks its answers with {% generation %} is taken at its word: here the
    blocks hold the answer only, so the end-of-turn token is not trained (the template's choice)."""
    tokenizer = AutoTokenizer.from_pretrained(zoo["qwen2.5"])
    tokenizer.chat_template = (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] }}{% endgeneration %}"
        "{%- else %}{{- message['content'] }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    assert chat.template_shape(tokenizer).generation_blocks
    input_ids, labels, _ = chat.assistant_labels(tokenizer, CONVERSATION)
    assert trained_texts(tokenizer, input_ids, labels) == ["Blue.", "Red, of course."]


TRICKY = [
    {"role": "system", "content": "  Sé breve. 🙂  "},
    {"role": "user", "content": "Qu'est-ce que 2+2 ? Réponds vite."},
    {"role": "assistant", "content": " Quatre 🎉 — évidemment.\n"},
    {"role": "user", "content": "和 3+3 呢?"},
    {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n六 (six) ✓"},
]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_batched_masks_equal_a_reference_from_every_token_offset(tokenizers, family, train_on_prompt):
    """The batched path (span -> token lookups at span edges) against the plain computation:
    one rendering, one tokenization with offsets, a token trained when it starts inside an
    assistant span. Multi-byte characters split into several byte-level tokens included."""
    tokenizer = tokenizers[family]
    conversations = [CONVERSATION, TRICKY, TRICKY[1:3]]
    if not FAMILIES[family].system_role:
        conversations = [chat.merge_system(c) for c in conversations]
    batched = chat.assistant_labels_batch(tokenizer, conversations, train_on_prompt)
    for (text, spans), (ids, labels, _) in zip(chat.assistant_spans(tokenizer, conversations), batched, strict=True):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        expected = [
            token if train_on_prompt or any(begin <= s < end for begin, end in spans) else IGNORE_INDEX
            for token, (s, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
        ]
        assert ids.tolist() == encoded["input_ids"] and labels.tolist() == expected
