"""Pruning a phase's checkpoints: keep-only-selected and keep_last_n (pure file operations)."""

import json
from pathlib import Path

import pytest

from core import storage
from training.launch.checkpoints import complete_checkpoints, keep_last_checkpoints, prune_checkpoints


def make_phase(root: Path) -> Path:
    for samples, complete in ((64, True), (128, True), (192, True), (256, False)):
        path = root / "checkpoints" / f"samples_{samples}"
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"w")
        if complete:
            (path / "meta.json").write_text(json.dumps({"samples_seen": samples}))
    return root


def test_keep_selected_deletes_every_other_complete_checkpoint(tmp_path):
    phase = make_phase(tmp_path)
    removed = prune_checkpoints(phase, "s3://bucket/run/phase00/checkpoints/samples_128/", "keep_selected")
    assert [p.name for p in removed] == ["samples_64", "samples_192"]
    assert [p.name for p in complete_checkpoints(phase)] == ["samples_128"]
    assert (
        phase / "checkpoints" / "samples_256"
    ).exists()  # incomplete ones are remove_incomplete_checkpoints' business


def test_the_start_model_winning_deletes_all_and_none_keeps_all(tmp_path):
    assert prune_checkpoints(make_phase(tmp_path / "a"), None, "none") == []
    assert len(complete_checkpoints(tmp_path / "a")) == 3
    assert len(prune_checkpoints(make_phase(tmp_path / "b"), None, "keep_selected")) == 3


def test_an_unknown_winner_deletes_nothing(tmp_path):
    phase = make_phase(tmp_path)
    with pytest.raises(ValueError, match="nothing deleted"):
        prune_checkpoints(phase, str(tmp_path / "elsewhere" / "samples_999"), "keep_selected")
    assert len(complete_checkpoints(phase)) == 3


def test_keep_last_n_deletes_the_oldest_complete_checkpoints_meta_first(tmp_path, monkeypatch):
    phase = make_phase(tmp_path)
    deleted_meta_while_weights_present = []
    real_unlink = Path.unlink

    def unlink(path, *args, **kwargs):
        if path.name == "meta.json":
            deleted_meta_while_weights_present.append((path.parent / "model.safetensors").exists())
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert [p.name for p in keep_last_checkpoints(phase, 2)] == ["samples_64"]
    assert deleted_meta_while_weights_present == [True]
    assert [p.name for p in complete_checkpoints(phase)] == ["samples_128", "samples_192"]
    assert keep_last_checkpoints(phase, 2) == [] and keep_last_checkpoints(phase, None) == []
    assert (phase / "checkpoints" / "samples_256").exists()  # the newest is incomplete: not counted, not touched


def test_storage_lists_complete_checkpoints_by_samples_seen(tmp_path):
    phase = make_phase(tmp_path)
    (phase / "checkpoints" / "samples_1024").mkdir()
    (phase / "checkpoints" / "samples_1024" / "meta.json").write_text("{}")
    assert storage.complete_checkpoints(str(phase)) == [
        f"{phase}/checkpoints/samples_{n}"
        for n in (64, 128, 192, 1024)  # numeric order, not text order
    ]
