"""Real model families (tests/zoo.py): loss masks, templates, system turns, inputs, padding and
stopping, each checked against the family's own conventions written out here by hand."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.zoo import FAMILIES
from training import chat
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
    input_ids, labels = chat.assistant_labels(tokenizer, messages)
    assert trained_texts(tokenizer, input_ids, labels) == [
        "Answer A<|im_end|>",
        "Answer B<|im_end|>",
        "<think>\nnew reasoning\n</think>\n\nAnswer C<|im_end|>",
    ]


def test_a_model_without_template_fails_naming_the_field_and_works_once_set(tmp_path, zoo, tokenizers):
    from training.recipe import RecipeError, load_recipe

    bare = AutoTokenizer.from_pretrained(zoo["qwen2.5"])
    bare.chat_template = None
    with pytest.raises(chat.ChatTemplateError, match=r"base-qwen has no chat template: set model\.chat_template"):
        chat.apply_template(bare, None, "base-qwen")
    template_file = tmp_path / "mine.jinja"
    template_file.write_text(chat.template_text("chatml"))
    for setting in ("chatml", str(template_file)):
        tokenizer = chat.apply_template(AutoTokenizer.from_pretrained(zoo["qwen2.5"]), setting)
        ids, labels = chat.assistant_labels(tokenizer, CONVERSATION[1:3])
        assert trained_texts(tokenizer, ids, labels) == ["Blue.<|im_end|>"]
        assert "You are Qwen" not in tokenizer.decode(ids)  # plain ChatML: no default system prompt
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


def test_parallel_chunked_prep_equals_one_process_and_is_reused_until_inputs_change(tmp_path, assets, tokenizers):
    tokenizer = tokenizers["qwen2.5"]
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
