"""Assistant masks on adversarial contents, for every template of the zoo, against an oracle.

The oracle: a hand-annotated copy of each template (tests/templates/, reviewed once) whose
`{% generation %}` blocks hold what the model generates after its prompt, through the
end-of-turn token, rendered by transformers' own `return_assistant_tokens_mask`. The masks under
test come from the plain template (core.chat). One stated difference: a token that starts in
the header and ends in the answer is the prompt's (not trained); transformers trains it.
"""

import json
import random
import unicodedata

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from core import chat
from tests.conftest import REPO
from tests.zoo import FAMILIES, family_tokenizer
from training.data import IGNORE_INDEX

ANNOTATED = REPO / "tests" / "templates"
CONVERSATIONS = 120  # per template

# Text a template writes itself, or that other turns hold: an answer that equals it must still be
# found where it is, not where its text first occurs.
TEMPLATE_TEXT = [
    "user",
    "assistant",
    "system",
    "model",
    "a",
    "A",
    ".",
    "\n",
    "[INST]",
    "[/INST]",
    "<|im_start|>assistant\n",
    "<start_of_turn>model\n",
    "<|assistant|>\n",
    "<|end_header_id|>\n\n",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "Knowledge Cutoff Date: April 2024.\nYou are Granite, developed by IBM.",
    "You are",
    "{{ message['content'] }}",
]
ODD_TEXT = [
    unicodedata.normalize("NFD", "Café crème, Å"),  # decomposed: not NFC
    "ﬁne ﬂag",  # ligatures (NFKC would change them)
    "a\u00a0b\u2028c\u3000d",  # no-break space, line separator, ideographic space
    "👍🏽 六 (six) ✓",
    "x\x1cy",  # a control character str.strip() treats as whitespace
]
BLANK = ["", " ", "\n\n", "\t \n"]


def adversarial_conversations(n: int, seed: int) -> list[list[dict[str, str]]]:
    """`n` seeded conversations: an optional system message, then 1-3 user/assistant exchanges
    whose contents are template text, single characters, odd Unicode, blanks (users and systems
    only: the reader refuses empty answers), repeats of earlier messages, leading newlines,
    trailing whitespace and think blocks."""
    rng = random.Random(seed)

    def text(earlier: list[str], blank_ok: bool) -> str:
        kind = rng.choice(["template", "odd", "blank", "repeat", "words"] if blank_ok else ["template", "odd", "words"])
        if kind == "repeat" and earlier:
            body = rng.choice(earlier)
        elif kind == "blank":
            return rng.choice(BLANK)
        else:
            body = rng.choice(TEMPLATE_TEXT if kind == "template" else ODD_TEXT if kind == "odd" else ["Blue.", "b"])
        if not blank_ok and not body.strip():
            body = rng.choice(["a", "assistant", "."])
        body = rng.choice(["", "\n", "\n\n", " "]) + body + rng.choice(["", "\n", "  "])
        if not blank_ok and rng.random() < 0.2:
            body = f"<think>\n{rng.choice(TEMPLATE_TEXT)}\n</think>\n\n{body}"
        return body

    conversations = []
    for _ in range(n):
        messages, earlier = [], []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": text(earlier, blank_ok=True)})
        for _ in range(rng.randint(1, 3)):
            for role in ("user", "assistant"):
                content = text(earlier, blank_ok=role == "user")
                messages.append({"role": role, "content": content})
                earlier.append(content)
        conversations.append(messages)
    return conversations


def oracle(tokenizer, annotated: str, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """(token ids, trained?) by the annotated template: a token is trained when it starts inside
    a generation block. Checked here against transformers' own assistant mask, which also trains
    a token that starts before a block and reaches into it."""
    plain = chat.render(tokenizer, messages)
    (text,), (blocks,) = render_jinja_template(
        conversations=[messages],
        chat_template=annotated,
        return_assistant_tokens_mask=True,
        **tokenizer.special_tokens_map,
    )
    assert text == plain  # the annotated copy renders exactly as the template it annotates
    marked = tokenizer.apply_chat_template(
        messages, chat_template=annotated, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    trained = [any(begin <= start < end for begin, end in blocks) for start, _ in offsets]
    for t, ((start, stop), theirs) in enumerate(zip(offsets, marked["assistant_masks"], strict=True)):
        straddles = any(start < begin < stop for begin, _ in blocks)
        assert bool(theirs) == (trained[t] or straddles), (t, text)
    return marked["input_ids"], trained


@pytest.fixture(scope="module")
def family_tokenizers(assets):
    return {name: family_tokenizer(assets.base_model_dir, family) for name, family in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_masks_train_exactly_what_the_annotated_template_marks_on_adversarial_contents(family_tokenizers, family):
    tokenizer = family_tokenizers[family]
    annotated = (ANNOTATED / f"{FAMILIES[family].template}.jinja").read_text()
    conversations = adversarial_conversations(CONVERSATIONS, seed=sum(map(ord, family)))
    if not FAMILIES[family].system_role:
        conversations = [chat.merge_system(c) for c in conversations]
    labelled = chat.assistant_labels_batch(tokenizer, conversations)
    straddling = 0
    for messages, (ids, labels, straddles) in zip(conversations, labelled, strict=True):
        expected_ids, trained = oracle(tokenizer, annotated, messages)
        assert ids.tolist() == expected_ids
        assert [label != IGNORE_INDEX for label in labels.tolist()] == trained, messages
        assert all(label == token for label, token in zip(labels, ids, strict=True) if label != IGNORE_INDEX)
        straddling += straddles
    # The header/answer straddle happens where the header ends in a newline and the template
    # keeps an answer's leading newlines (ChatML, Phi-3, Granite's role tag does not end in one).
    assert (straddling > 0) == (family in ("qwen2.5", "qwen3", "phi3"))


def test_data_prep_counts_the_samples_whose_answer_starts_inside_a_header_token(tmp_path, family_tokenizers):
    """Qwen's header ends in a newline and "\\n\\n" is one token: an answer that starts with
    newlines shares its first token with the header. That token is the prompt's; stats.json
    counts the samples that have one."""
    from training.data import load_phase, load_tokenized, prepare

    tokenizer = family_tokenizers["qwen2.5"]
    rows = [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]
        for answer in ("\n\nA", "A", "\n\nB")
    ]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    stats = prepare(load_phase([str(source)])[0], tokenizer, str(tmp_path / "out"), 256)
    assert stats.straddling_header == 2
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["straddling_header"] == 2
    data = load_tokenized(str(tmp_path / "out"))
    trained = tokenizer.decode([t for t in data.labels[0].tolist() if t != IGNORE_INDEX])
    assert trained == "\nA<|im_end|>"  # the answer's first newline went with the header's ("\n\n", not trained)


def test_a_template_that_rewrites_texts_otherwise_is_refused_naming_the_row(tmp_path, family_tokenizers):
    from training.data import DataError, load_phase, prepare

    tokenizer = family_tokenizers["qwen2.5"]
    tokenizer.chat_template = tokenizer.chat_template.replace("message.content", "message.content | upper")
    source = tmp_path / "chat.jsonl"
    source.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"
    )
    with pytest.raises(DataError, match=rf"^{source}:1: the chat template changes a message's text"):
        prepare(load_phase([str(source)])[0], tokenizer, str(tmp_path / "out"), 256)
    assert not (tmp_path / "out").exists()
