"""bench/selection.py measures policies against a test split that no policy may read: deleting
that split must leave every policy's pick unchanged (no leakage)."""

import json
import shutil

import pytest
import torch

from bench import selection as bench
from core import records
from core.items import write_items
from tests.test_averaging import checkpoint_meta
from training.averaging import average_checkpoints

pytestmark = pytest.mark.slow


@pytest.fixture
def lab_copy(tmp_path, assets, monkeypatch):
    """A copy of the lab assets (this test deletes its test split), made the cache of this test."""
    cache = tmp_path / "cache"
    shutil.copytree(assets.root, cache / "embedded" / assets.root.name)
    monkeypatch.setenv("RECIPE_LAB_CACHE", str(cache))
    return cache / "embedded" / assets.root.name


def checkpoints(base, out):
    """Three 'checkpoints' (the base model with seeded noise on its weights) and their average."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = [("start", str(base), 0, False)]
    for k, samples in enumerate((100, 200, 300)):
        model = AutoModelForCausalLM.from_pretrained(base)
        generator = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        path = out / f"samples_{samples}"
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
        meta = checkpoint_meta(samples)
        (path / records.META).write_text(records.dumps(meta))  # written last: a complete checkpoint
        models.append((path.name, str(path), samples, False))
    averaged = average_checkpoints([out / f"samples_{s}" for s in (100, 200, 300)], out / "avg_last3")
    return [*models, ("avg_last3", str(averaged), 300, True)]


def test_deleting_the_test_split_leaves_every_pick_unchanged(tmp_path, lab_copy):
    models = checkpoints(lab_copy / "base-model", tmp_path / "models")
    cfg = bench.recipe(0, ["lab_skills"]).model_copy(deep=True)
    cfg.evaluation.limit = 40

    def picks(work):
        for name, loss in [("start", 3.0), ("samples_100", 2.0), ("samples_200", 1.5), ("samples_300", 1.7)]:
            rows = [
                {"task": "validation", "metric": "validation/loss", "item": i, "value": loss + i / 100}
                for i in range(8)
            ]
            write_items(str(work / "phase" / "validation" / f"{name}.items.parquet"), rows)
        bench.scores_and_picks(cfg, models, work)
        return json.loads((work / "picks.json").read_text())

    with_test = picks(tmp_path / "with")
    # After the picks, the bench scores the test split (its own lm-eval task through the worker's path).
    test_cfg = bench.recipe(0, ["lab_skills_test"]).model_copy(deep=True)
    test_cfg.evaluation.limit = 40
    tested = bench.score(test_cfg, "start", str(lab_copy / "base-model"), 0, tmp_path / "with" / "test.json")
    assert "lab_skills_test/exact_match" in tested.metrics
    for phase in ("phase00", "phase05", "phase10"):
        (lab_copy / "curriculum" / phase / "test.jsonl").unlink()
    without_test = picks(tmp_path / "without")
    assert with_test == without_test
    assert {p.split()[0] for p in with_test} == {"best", "earliest_within_noise", "smoothed", "last", "lowest_val_loss"}
    assert with_test["last"]["name"] == "samples_300" and with_test["lowest_val_loss"]["name"] == "samples_200"
