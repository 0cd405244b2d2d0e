"""A phase killed after training but before it was recorded as trained is recorded, not retrained.

The flow process is SIGKILLed exactly when the train task is about to write trained.json (the
window that, on S3, spans the last checkpoint's upload); the re-run must not launch training.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow

from core import storage
from core.recipe import Recipe, resolve
from core.records import FINISHED
from tasks.finetune import TRAINED, ModelRef, prepare_data, train_phase

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@flow(name="train-one-phase")
def train_one_phase(recipe: Recipe, run_uri: str) -> list[ModelRef]:
    phase = recipe.phases[0]
    prepare_data(recipe, phase, run_uri)
    return train_phase(
        recipe, phase, run_uri, "killed", ModelRef(name="base", uri=recipe.model.name_or_path, samples=0)
    )


def run_killed_before_the_record(recipe_json: str, run_uri: str) -> None:
    """In a subprocess: the flow, SIGKILLed where the task writes trained.json."""
    write_text = storage.write_text

    def kill_at_record(uri: str, text: str) -> None:
        if uri.endswith(TRAINED):
            os.kill(os.getpid(), signal.SIGKILL)
        write_text(uri, text)

    storage.write_text = kill_at_record
    train_one_phase(Recipe.model_validate_json(recipe_json), run_uri)


def test_kill_between_training_and_trained_json_does_not_retrain(tmp_path, prefect_server, assets):
    from itertools import islice

    from prefect.settings import PREFECT_API_URL

    data = tmp_path / "train.jsonl"
    with open(assets.train_file("phase00")) as f:
        data.write_text("".join(islice(f, 160)))
    recipe = resolve(
        "demo",
        overrides={
            "phases": [{"name": "phase00", "data": [str(data)], "objective": {"lab_instruction/rule_acc": 1.0}}],
            "training.epochs": 1,
            "checkpointing.save_every_samples": 64,
            "checkpointing.state_every_steps": 2,
        },
    )
    run_uri = str(tmp_path / "run")
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tests.test_trained_record as t; t.run_killed_before_the_record(sys.argv[1], sys.argv[2])",
            recipe.model_dump_json(),
            run_uri,
        ],
        cwd=REPO,
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
        capture_output=True,
        text=True,
    )
    phase = tmp_path / "run" / "phase00"
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # Killed in the window: training finished (160 rows less the validation slice, a tenth of the
    # phase: 144 samples, 5 steps of 32), the phase is not recorded, the state is there.
    trained = 160 - 160 // 10
    assert json.loads((phase / FINISHED).read_text()) == {"steps": 5, "samples_seen": trained}
    assert not (phase / TRAINED).exists() and (phase / "state" / "progress.json").exists()
    metrics = (phase / "metrics.jsonl").read_text()
    metrics_mtime = (phase / "metrics.jsonl").stat().st_mtime_ns
    checkpoints = sorted((p.name for p in (phase / "checkpoints").iterdir()), key=lambda n: int(n.split("_")[1]))

    again = train_one_phase(recipe, run_uri)

    # Not retrained: the trainer rewrites metrics.jsonl whenever it starts, and it did not.
    assert (phase / "metrics.jsonl").stat().st_mtime_ns == metrics_mtime
    assert (phase / "metrics.jsonl").read_text() == metrics
    assert checkpoints == ["samples_64", "samples_128", f"samples_{trained}"]
    assert [c.name for c in again] == checkpoints
    assert [m["name"] for m in json.loads((phase / TRAINED).read_text())] == [c.name for c in again]
    assert not (phase / "state").exists()  # removed only now that the phase is recorded
