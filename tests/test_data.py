"""Data prep: normalisation, loss masks, dropped samples, and errors that name file and line."""

import json
from pathlib import Path

import pytest

from training.data import IGNORE_INDEX, DataError, load_phase, load_tokenized, prepare, tokenize

GOOD = {
    "messages": [
        {"role": "user", "content": "Write the word tower in uppercase."},
        {"role": "assistant", "content": "TOWER"},
    ]
}


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"messages": [', "invalid JSON"),
        ('{"text": "hello"}', "no 'messages'"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}', "unknown role 'wizard'"),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}',
            "empty assistant turn",
        ),
        (
            '{"messages": [{"role": "user", "content": ["not", "a", "string"]}, {"role": "assistant", "content": "a"}]}',
            "content part 0 is of type 'str', which is not supported",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>hm</think>\\n"}]}',
            "message 1 is an empty assistant turn",
        ),
        ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant turn"),
    ],
)
def test_bad_line_names_file_and_line_and_writes_nothing(tmp_path, tokenizer, bad_line, expected):
    source = write_jsonl(tmp_path / "train.jsonl", [json.dumps(GOOD), json.dumps(GOOD), bad_line])
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare(load_phase([str(source)])[0], tokenizer, str(out), max_seq_len=256)
    assert str(err.value).startswith(f"{source}:3: ")
    assert expected in str(err.value)
    assert not out.exists()


def test_sharegpt_and_alpaca_are_normalised(tmp_path, tokenizer):
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Write the word tower in uppercase."},
            {"from": "gpt", "value": "TOWER"},
        ]
    }
    alpaca = {"instruction": "Write the word tower in uppercase.", "input": "", "output": "TOWER"}
    source = write_jsonl(tmp_path / "mixed.jsonl", [json.dumps(GOOD), json.dumps(sharegpt), json.dumps(alpaca)])
    prepare(load_phase([str(source)])[0], tokenizer, str(tmp_path / "out"), max_seq_len=256)
    data = load_tokenized(str(tmp_path / "out"))
    assert data.input_ids[0].tolist() == data.input_ids[1].tolist() == data.input_ids[2].tolist()


def test_loss_only_on_assistant_tokens(tokenizer):
    messages = [
        {"role": "user", "content": "Write the word tower in uppercase."},
        {"role": "assistant", "content": "TOWER"},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "TOWER TOWER"},
    ]
    input_ids, labels = tokenize(tokenizer, messages)
    trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert "TOWER" in trained and "TOWER TOWER" in trained
    assert "uppercase" not in trained and "Again" not in trained
    assert trained.count(tokenizer.eos_token) == 2  # each answer learns to stop
    _, unmasked = tokenize(tokenizer, messages, train_on_prompt=True)
    assert IGNORE_INDEX not in unmasked


def test_empty_user_and_system_turns_are_rendered_as_the_template_writes_them(tmp_path, tokenizer):
    """The reader accepts them and data prep trains the answers after them (it failed on an empty
    user turn, searching for the empty text)."""
    blank = {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": ""},
            {"role": "assistant", "content": "TOWER"},
            {"role": "user", "content": "  "},
            {"role": "assistant", "content": "TOWER"},
        ]
    }
    source = write_jsonl(tmp_path / "blank.jsonl", [json.dumps(blank)])
    stats = prepare(load_phase([str(source)])[0], tokenizer, str(tmp_path / "out"), max_seq_len=256)
    data = load_tokenized(str(tmp_path / "out"))
    trained = tokenizer.decode([t for t in data.labels[0].tolist() if t != IGNORE_INDEX])
    assert stats.samples == 1 and trained == "TOWER" + tokenizer.eos_token + "TOWER" + tokenizer.eos_token


def test_over_long_samples_are_dropped_and_counted(tmp_path, tokenizer):
    long = {"messages": [{"role": "user", "content": "tower " * 200}, {"role": "assistant", "content": "TOWER"}]}
    source = write_jsonl(tmp_path / "t.jsonl", [json.dumps(GOOD), json.dumps(long), json.dumps(GOOD)])
    conversations, files = load_phase([str(source)])
    stats = prepare(conversations, tokenizer, str(tmp_path / "out"), max_seq_len=64, files=files)
    assert (stats.samples, stats.dropped_too_long) == (2, 1)
    written = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert written["dropped_too_long"] == 1 and written["files"] == {str(source): 3}
    assert max(load_tokenized(str(tmp_path / "out")).lengths()) <= 64


def test_parquet_input_and_replay_of_earlier_phases(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "id": f"q{i}",
            "messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}],
        }
        for i in range(40)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    current, _ = load_phase([str(tmp_path / "d.parquet")])
    earlier, _ = load_phase(
        [str(write_jsonl(tmp_path / "earlier.jsonl", [json.dumps({"id": f"e{i}", **GOOD}) for i in range(50)]))]
    )
    stats = prepare(current, tokenizer, str(tmp_path / "out"), 256, replay_pool=earlier, replay_fraction=0.2, seed=3)
    data = load_tokenized(str(tmp_path / "out"))
    assert data.ids[:40] == [f"q{i}" for i in range(40)]
    replayed = data.ids[40:]
    assert (
        stats.replayed == len(replayed) == 10 and all(i.startswith("e") for i in replayed) and len(set(replayed)) == 10
    )
    again = prepare(current, tokenizer, str(tmp_path / "again"), 256, replay_pool=earlier, replay_fraction=0.2, seed=3)
    assert load_tokenized(str(tmp_path / "again")).ids == data.ids and again.replayed == 10  # seeded


def test_length_split_puts_every_sample_in_one_half_and_replay_adds_one_percent(tmp_path, tokenizer):
    """Paper A.6.1: bottom 50% by response length, then top 50% plus a 1% replay of the short."""
    rows = [
        {
            "id": f"s{i:03d}",
            "messages": [
                {"role": "user", "content": "Go."},
                {"role": "assistant", "content": "x" * (1 + (i * 37) % 200)},
            ],
        }
        for i in range(400)
    ]
    source = str(write_jsonl(tmp_path / "all.jsonl", [json.dumps(r) for r in rows]))
    short, _ = load_phase([source], "short")
    long, _ = load_phase([source], "long")
    short_ids, long_ids = {c[0] for c in short}, {c[0] for c in long}
    assert short_ids | long_ids == {r["id"] for r in rows} and not short_ids & long_ids
    assert len(short_ids) == len(long_ids) == 200
    assert max(len(c[1][1]["content"]) for c in short) <= min(len(c[1][1]["content"]) for c in long)

    prepare(long, tokenizer, str(tmp_path / "long"), 512, replay_pool=short, replay_fraction=0.01, seed=0)
    trained_long = load_tokenized(str(tmp_path / "long")).ids
    replayed = [i for i in trained_long if i in short_ids]
    assert len(replayed) == 2  # 1% of 200
    assert set(trained_long) - set(replayed) == long_ids  # the rest of phase II is exactly the long half


def test_a_script_without_main_guard_prepares_in_parallel_once(tmp_path, assets):
    """Tokenization threads start nothing that imports the caller's script again (spawned
    worker processes did: an unguarded script ran once more per worker, or failed)."""
    import subprocess
    import sys

    source = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"id": f"r{i}", **GOOD}) for i in range(12)])
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from transformers import AutoTokenizer\n"
        "from training.data import load_phase, prepare\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(assets.base_model_dir)!r})\n"
        f"stats = prepare(load_phase([{str(source)!r}])[0], tokenizer, {str(tmp_path / 'out')!r}, 256,"
        " workers=2, chunk_size=4)\n"
        "print('prepared', stats.samples)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines().count("prepared 12") == 1
