"""Evaluation beside training (evaluation.devices): a real lab phase under a temporary Prefect API.

The overlap is read from the run's own files: evaluations.jsonl (when each background evaluation
started) against the mtime of the last checkpoint's meta.json (written at the last step).
"""

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.records import ProgressEvent, RecordError
from training.launch.devices import device_env
from training.launch.files import RunFiles

PHASE = {
    "name": "phase00",
    "data": ["embedded://curriculum/phase00/train.jsonl"],
    "objective": {"lab_instruction/rule_acc": 1.0},
}
OVERRIDES = {
    "phases": [PHASE],
    "training.epochs": 2,
    "checkpointing.save_every_samples": 640,
    "evaluation.limit": 20,
    "selection.average_last_k": 3,
}


def scores(run: Path) -> dict[str, dict]:
    """Every model's lm-eval results (all but the model's URI, which names the run's root)."""
    out = {}
    for path in sorted((run / "phase00" / "eval").glob("*/lm_eval.json")):
        result = json.loads(path.read_text())
        out[path.parent.name] = {k: v for k, v in result.items() if k != "checkpoint"}
    return out


@pytest.mark.slow
def test_evaluation_starts_before_training_ends_and_scores_equal_a_sequential_run(tmp_path, prefect_server, assets):
    from flows.finetune import finetune

    finetune(
        recipe="demo",
        storage_root=str(tmp_path / "beside"),
        overrides=OVERRIDES | {"evaluation.devices": "cpu:1"},
        run_id="r",
    )
    finetune(
        recipe="demo",
        storage_root=str(tmp_path / "after"),
        overrides=OVERRIDES | {"evaluation.devices": None},  # the demo's own setting is cpu:1
        run_id="r",
    )
    beside, after = tmp_path / "beside" / "r", tmp_path / "after" / "r"

    timeline = [json.loads(line) for line in (beside / "phase00" / "evaluations.jsonl").read_text().splitlines()]
    checkpoints = sorted((beside / "phase00" / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    assert sorted(t["model"] for t in timeline) == sorted(["base", *(c.name for c in checkpoints)])
    training_ended = datetime.fromtimestamp((checkpoints[-1] / "meta.json").stat().st_mtime, UTC)
    (first_checkpoint,) = [t for t in timeline if t["model"] == checkpoints[0].name]
    assert datetime.fromisoformat(first_checkpoint["started"]) < training_ended
    assert not (after / "phase00" / "evaluations.jsonl").exists()  # the sequential run evaluated in the flow

    # base, every checkpoint and the average of the last 3, scored alike by both runs
    assert scores(beside) == scores(after) and len(scores(after)) == len(checkpoints) + 2
    assert scores(after)["avg_last3"]["samples"] == int(checkpoints[-1].name.removeprefix("samples_"))
    selection = {
        r: json.loads((run / "phase00" / "selection.json").read_text()) for r, run in [("b", beside), ("a", after)]
    }
    assert selection["b"]["winner"]["name"] == selection["a"]["winner"]["name"]
    averaged = [c for c in selection["a"]["candidates"] if c["name"] == "avg_last3"]
    assert averaged and averaged[0]["checkpoint"] == str(after / "phase00" / "averaged" / "avg_last3")


@pytest.mark.slow
def test_a_failed_evaluation_fails_the_phase_with_its_own_error_and_stops_training(tmp_path, prefect_server, assets):
    from flows.finetune import finetune
    from tests.stack import processes_mentioning

    state = finetune(
        recipe="demo",
        storage_root=str(tmp_path),
        overrides=OVERRIDES | {"evaluation.devices": "cpu:1", "evaluation.tasks": ["lab_instruction", "no_such_task"]},
        run_id="broken",
        return_state=True,
    )
    assert state.is_failed()
    message = str(state.message)
    assert "evaluation of base failed" in message and "no_such_task" in message, message
    assert not (tmp_path / "broken" / "phase00" / "trained.json").exists()
    assert not processes_mentioning(str(tmp_path / "broken"))  # neither the training nor a worker survived


def test_the_evaluation_worker_serves_the_next_evaluator_with_the_same_environment(tmp_path, assets):
    """The worker on evaluation.devices outlives its phase's evaluator: the next phase's evaluator
    (same environment) gets the same process, whose output then goes to that phase's log; another
    environment gets a worker of its own. Scores do not depend on which worker ran them, and a
    done evaluator's kill (a later error in its phase) spares the worker it handed on."""
    from core.recipe import resolve
    from evaluation.worker import BackgroundEvaluator, EvalRequest

    recipe = resolve("demo", overrides={"evaluation.tasks": ["lab_instruction"], "evaluation.limit": 4})

    def evaluate_base(phase: str, env: dict[str, str]) -> tuple[BackgroundEvaluator, dict]:
        evaluator = BackgroundEvaluator(tmp_path / phase, log=lambda _line: None)
        evaluator.add_worker(env, reusable=True)
        eval_dir = tmp_path / phase / "eval" / "base"
        evaluator.submit(
            EvalRequest(recipe=recipe, name="base", uri=str(assets.base_model_dir), samples=0, eval_dir=str(eval_dir))
        )
        evaluator.wait()
        (record,) = [json.loads(line) for line in (tmp_path / phase / "evaluations.jsonl").read_text().splitlines()]
        return evaluator, record | {"metrics": json.loads((eval_dir / "lm_eval.json").read_text())["metrics"]}

    env = {**os.environ, **device_env("cpu:1", [])[1]}
    done, first = evaluate_base("phase00", env)
    done.kill()
    _, second = evaluate_base("phase05", env)
    _, other = evaluate_base("phase10", {**env, "RECIPE_LAB_OTHER_SLOT": "1"})
    assert first["pid"] == second["pid"] != other["pid"]
    assert first["metrics"] == second["metrics"] == other["metrics"]
    for phase in ("phase00", "phase05", "phase10"):  # one model load each, logged where that phase's output goes
        assert (tmp_path / phase / "eval-worker-0.log").read_text().count("Loading weights: 100%") == 1, phase


def test_device_split_gives_evaluation_its_own_share():
    assert device_env("cpu:1", []) == ({}, {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    visible = ["0", "1", "2", "3", "4", "5", "6", "7"]
    assert device_env("cuda:7", visible) == ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6"}, {"CUDA_VISIBLE_DEVICES": "7"})
    assert device_env("cuda:0", ["4", "6"]) == ({"CUDA_VISIBLE_DEVICES": "6"}, {"CUDA_VISIBLE_DEVICES": "4"})
    with pytest.raises(ValueError, match="only 2 GPUs visible"):
        device_env("cuda:2", ["0", "1"])
    with pytest.raises(ValueError, match="none is left to train"):
        device_env("cuda:0", ["0"])


def progress_line(step: int) -> str:
    event = ProgressEvent(
        step=step, total_steps=9, samples_seen=32 * step, epoch=0.1 * step, loss=1.0, grad_norm=1.0, lr=0.1
    )
    return event.model_dump_json() + "\n"


def test_run_files_report_whole_progress_lines_and_each_complete_checkpoint_once(tmp_path):
    files = RunFiles(tmp_path)
    assert files.new_progress() == [] and files.new_checkpoints() == []
    progress = tmp_path / "progress.jsonl"
    third = progress_line(3)
    progress.write_text(progress_line(1) + progress_line(2) + third[:10])  # the last line is being written
    assert [e.step for e in files.new_progress()] == [1, 2]
    with open(progress, "a") as f:
        f.write(third[10:])
    assert [e.step for e in files.new_progress()] == [3]
    (tmp_path / "checkpoints" / "samples_64").mkdir(parents=True)
    assert files.new_checkpoints() == []  # no meta.json yet: incomplete
    (tmp_path / "checkpoints" / "samples_64" / "meta.json").write_text("{}")
    assert [p.name for p in files.new_checkpoints()] == ["samples_64"]
    assert files.new_checkpoints() == []
    progress.write_text(progress_line(1))  # a resumed launch rewrote it
    assert [e.step for e in files.new_progress()] == [1]
    with open(progress, "a") as f:
        f.write('{"step": 2}\n')  # not a ProgressEvent: named by its line in the file
    with pytest.raises(RecordError, match=re.escape(f"{progress}:2: total_steps: Field required")):
        files.new_progress()


def test_run_files_read_a_resumed_log_from_its_start_even_when_it_grew_past_the_old_offset(tmp_path):
    """A resumed launch keeps steps 1-2 and redoes 3 onwards; by the next poll its log can be
    longer than the one already read (seen in CI: a mid-line offset gave 'Extra data')."""
    from training.logs import open_jsonl

    files = RunFiles(tmp_path)
    progress = tmp_path / "progress.jsonl"
    progress.write_text("".join(progress_line(i) for i in range(1, 5)))
    assert [e.step for e in files.new_progress()] == [1, 2, 3, 4]
    with open_jsonl(progress, ProgressEvent, keep_through_step=2) as log:
        log.write("".join(progress_line(i) for i in range(3, 6)))
    assert [e.step for e in files.new_progress()] == [1, 2, 3, 4, 5]
    assert files.new_progress() == []
