"""Every model's evaluation is a Prefect task run in an evaluation worker: smoke `lab run`s against a
real Prefect server (one server, three runs), read back through the Prefect API and the runs' files.

  beside   evaluation.devices cpu:1, two phases; the first evaluation attempt anywhere fails once
           (a task of the test's own, lm-eval's plugin mechanism): it is retried, the run completes
  after    evaluation.devices unset (the sequential path: after training, in a worker), one phase
  broken   evaluation.devices cpu:1, a task that always fails: the phase fails with its error
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from core.records import ProgressEvent, RecordError
from training.launch.devices import device_env
from training.launch.files import RunFiles

REPO = Path(__file__).resolve().parents[1]
PHASES = [
    {
        "name": "phase00",
        "data": ["embedded://curriculum/phase00/train.jsonl"],
        "objective": {"lab_checked/exact_match": 1},
    },
    {
        "name": "phase05",
        "data": ["embedded://curriculum/phase05/train.jsonl"],
        "objective": {"lab_instruction/rule_acc": 1},
    },
]
FLAKY = """\
import os

from evaluation.lab_metrics import skills

MARKER = {marker!r}


def process(doc, results):
    if {persistent}:
        raise RuntimeError("persistent injected failure")
    try:
        os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL))  # the first call anywhere fails, once
    except FileExistsError:
        return skills(doc, results)
    raise RuntimeError("injected first-attempt failure")
"""


def checked_task(tmp: Path, curriculum: Path, persistent: bool = False, failed_before: bool = False) -> Path:
    """An include directory with `lab_checked`: lab_skills whose result processing fails as told."""
    from evaluation.lm_eval_runner import LAB_RESULTS_MODULE, FunctionTag, lab_task_configs

    tmp.mkdir(parents=True)
    (tmp / "lab_results.py").write_text(LAB_RESULTS_MODULE)
    marker = tmp / "failed-once"
    if failed_before:
        marker.touch()
    (tmp / "checked.py").write_text(FLAKY.format(marker=str(marker), persistent=persistent))
    config = {**lab_task_configs(curriculum, 32)["lab_skills"], "process_results": FunctionTag("checked.process")}
    (tmp / "lab_checked.yaml").write_text(yaml.safe_dump({"task": "lab_checked", **config}, sort_keys=False))
    return tmp


def lab_run(env: dict, root: Path, run_id: str, include: Path, *sets: str) -> subprocess.CompletedProcess:
    """`lab run demo --smoke` as a user runs it, against the test's Prefect server; its pid is the flow's."""
    command = [sys.executable, "-m", "flows.cli", "run", "demo", "--smoke", "--run-id", run_id]
    command += ["--storage-root", str(root), "--set", f"phases={json.dumps(PHASES)}"]
    command += ["--set", 'evaluation.tasks=["lab_instruction", "lab_checked"]', "--set", "evaluation.limit=20"]
    command += ["--set", f"evaluation.include_path={include}", *(a for s in sets for a in ("--set", s))]
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(command, proc.returncode, f"pid={proc.pid}\n{out}")


def task_runs(env: dict, run_id: str) -> tuple[object, list]:
    """The flow run of `run_id` and its task runs, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        (flow_run,) = [r for r in client.read_flow_runs() if r.parameters.get("run_id") == run_id]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    return flow_run, runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, assets):
    from tests.stack import prefect_server

    tmp = tmp_path_factory.mktemp("overlap")
    root, curriculum = tmp / "runs", assets.root / "curriculum"
    with prefect_server(tmp) as env:
        env = {**env, "PYTHONPATH": str(REPO)}
        done = {
            "beside": lab_run(
                env, root, "beside", checked_task(tmp / "beside", curriculum), "evaluation.devices=cpu:1"
            ),
            "after": lab_run(
                env,
                root,
                "after",
                checked_task(tmp / "after", curriculum, failed_before=True),
                "evaluation.devices=null",
                f"phases={json.dumps(PHASES[:1])}",
            ),
            "broken": lab_run(
                env,
                root,
                "broken",
                checked_task(tmp / "broken", curriculum, persistent=True),
                "evaluation.devices=cpu:1",
                f"phases={json.dumps(PHASES[:1])}",
            ),
        }
        api = {run_id: task_runs(env, run_id) for run_id in done}
    return root, done, api


def flow_pid(done: subprocess.CompletedProcess) -> int:
    return int(done.stdout.split("\n", 1)[0].removeprefix("pid="))


@pytest.mark.slow
def test_every_evaluation_is_a_task_run_beside_its_phases_training_retried_once(runs):
    root, done, api = runs
    assert done["beside"].returncode == 0, done["beside"].stdout[-3000:]
    _, task_runs = api["beside"]
    for phase in ("phase00", "phase05"):
        (training,) = [t for t in task_runs if t.name == f"train-beside-{phase}"]
        evaluations = [t for t in task_runs if t.name.startswith(f"evaluate-{phase}-")]
        models = sorted(p.name for p in (root / "beside" / phase / "eval").iterdir())
        assert sorted(t.name.removeprefix(f"evaluate-{phase}-") for t in evaluations) == models
        assert all(t.state.type.value == "COMPLETED" for t in evaluations)
        # the order of events: a checkpoint's evaluation started while its phase's training ran
        checkpoints = [t for t in evaluations if "samples_" in t.name]
        assert any(training.start_time < t.start_time < training.end_time for t in checkpoints), phase
        # what each task returned is what selection saw: its models' scores, as written, with the
        # trainer's validation/loss beside them (the mean of its per-sample file; none for the average)
        selection = json.loads((root / "beside" / phase / "selection.json").read_text())
        scored = {c["name"]: c["metrics"] for c in selection["candidates"]}
        if phase == "phase00":
            scored["base"] = selection["start"]["metrics"]
        assert sorted(scored) == models
        for name, metrics in scored.items():
            written = json.loads((root / "beside" / phase / "eval" / name / "lm_eval.json").read_text())["metrics"]
            validation = root / "beside" / phase / "validation" / f"{'start' if name == 'base' else name}.items.parquet"
            if validation.exists():
                written["validation/loss"] = pd.read_parquet(validation)["value"].mean()
            assert metrics == pytest.approx(written)
            assert ("validation/loss" in metrics) == (not name.startswith("avg_last"))
    runs_twice = [t.name for t in task_runs if t.name.startswith("evaluate-") and t.run_count == 2]
    assert len(runs_twice) == 1, [(t.name, t.run_count) for t in task_runs]
    assert all(t.run_count == 1 for t in task_runs if t.name.startswith("evaluate-") and t.name not in runs_twice)
    assert "injected first-attempt failure" in done["beside"].stdout


@pytest.mark.slow
def test_every_model_is_evaluated_in_a_worker_not_the_flow_and_placement_leaves_scores_alike(runs):
    root, done, _ = runs
    assert done["after"].returncode == 0, done["after"].stdout[-3000:]
    for run_id, phases in (("beside", ("phase00", "phase05")), ("after", ("phase00",))):
        for phase in phases:
            timeline = [json.loads(line) for line in (root / run_id / phase / "evaluations.jsonl").open()]
            models = sorted(p.name for p in (root / run_id / phase / "eval").iterdir())
            assert sorted(r["model"] for r in timeline) == models
            assert all(r["pid"] != flow_pid(done[run_id]) for r in timeline), (run_id, phase)
    # the worker on evaluation.devices served the run's next phase too
    reserved = {
        phase: [
            r["pid"]
            for r in map(json.loads, (root / "beside" / phase / "evaluations.jsonl").open())
            if r["slot"] == "reserved-0"
        ]
        for phase in ("phase00", "phase05")
    }
    assert reserved["phase00"][-1] == reserved["phase05"][0]
    # beside training or after it, phase00's models score alike (same seed, same training)
    for model in (root / "after" / "phase00" / "eval").iterdir():
        after = json.loads((model / "lm_eval.json").read_text())
        beside = json.loads((root / "beside" / "phase00" / "eval" / model.name / "lm_eval.json").read_text())
        assert after["metrics"] == beside["metrics"], model.name


@pytest.mark.slow
def test_a_persistent_evaluation_failure_fails_the_phase_with_its_error_and_leaves_no_process(runs):
    from tests.stack import processes_mentioning

    root, done, api = runs
    assert done["broken"].returncode != 0
    flow_run, task_runs = api["broken"]
    assert flow_run.state.type.value == "FAILED"
    assert "persistent injected failure" in flow_run.state.message, flow_run.state.message
    failed = [t for t in task_runs if t.name.startswith("evaluate-") and t.state.type.value == "FAILED"]
    assert failed and all(t.run_count == 2 for t in failed)  # retried once, as the decorator says
    assert not (root / "broken" / "phase00" / "selection.json").exists()
    assert not processes_mentioning(str(root / "broken"))  # neither the training nor a worker survived


@pytest.mark.slow
def test_one_owner_reuses_its_worker_across_phases_replaces_a_failed_one_and_kills_all(tmp_path, assets):
    """The run's owner of evaluation processes: the worker on evaluation.devices serves phase after
    phase (one model load each, logged in that phase's directory), a failed evaluation raises its own
    error and the next one gets a fresh worker, training's slots come and go, and nothing outlives it."""
    from core.recipe import resolve
    from evaluation.worker import EvalRequest, EvaluationFailed, EvaluationWorkers
    from tests.stack import processes_mentioning

    recipe = resolve("demo", overrides={"evaluation.tasks": ["lab_instruction"], "evaluation.limit": 4})
    broken = resolve("demo", overrides={"evaluation.tasks": ["no_such_task"]})

    def request(cfg, phase: str) -> EvalRequest:
        eval_dir = tmp_path / phase / "eval" / "base"
        return EvalRequest(recipe=cfg, name="base", uri=str(assets.base_model_dir), samples=0, eval_dir=str(eval_dir))

    with EvaluationWorkers(log=lambda _line: None) as workers:
        workers.open_slots("reserved", [device_env("cpu:1", [])[1]])
        first = workers.evaluate(request(recipe, "phase00"), tmp_path / "phase00")
        second = workers.evaluate(request(recipe, "phase05"), tmp_path / "phase05")
        with pytest.raises(EvaluationFailed, match="no_such_task"):
            workers.evaluate(request(broken, "phase10"), tmp_path / "phase10")
        third = workers.evaluate(request(recipe, "phase15"), tmp_path / "phase15")
        workers.open_slots("training", [{"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}])
        workers.close_slots("training")
        assert processes_mentioning(str(tmp_path))  # the reserved worker waits for the next model
    assert first.pid == second.pid != third.pid
    metrics = [
        json.loads((tmp_path / p / "eval/base/lm_eval.json").read_text())["metrics"] for p in ("phase00", "phase05")
    ]
    assert metrics[0] == metrics[1]
    for phase in ("phase00", "phase05", "phase15"):
        assert (tmp_path / phase / "eval-worker-reserved-0.log").read_text().count("Loading weights: 100%") == 1
        assert [json.loads(line)["pid"] for line in (tmp_path / phase / "evaluations.jsonl").open()]
    assert not processes_mentioning(str(tmp_path))


@pytest.mark.slow
def test_a_failed_evaluation_stops_the_training_beside_it(tmp_path, assets, prepared_slice):
    """run_training's `stop` (set by a phase's evaluation that failed for good): the launch is
    killed at once, mid-phase, with nothing left running and no incomplete checkpoint."""
    import threading

    import psutil

    from core.recipe import load_recipe
    from core.records import FINISHED
    from tests.stack import processes_mentioning
    from training.job import TrainJob
    from training.launch.files import TrainingStopped
    from training.launch.local import run_training

    # 40 epochs (250 steps of ~0.1 s): room to stop in. Stopping takes a poll and the kill (alone here: 8 steps
    # past the first checkpoint); under load the 25 steps of 4 epochs once all ran before the ranks were gone.
    epochs = 40
    recipe = load_recipe("demo", {"training.epochs": epochs, "checkpointing.save_every_samples": 64})
    model = str(assets.base_model_dir)
    out = tmp_path / "phase00"
    job = TrainJob(
        run_id="t",
        phase="phase00",
        recipe=recipe,
        model_path=model,
        parent_checkpoint=model,
        data_dir=prepared_slice("phase00", 200),
        output_dir=str(out),
    )
    stop, seen = threading.Event(), []

    def on_checkpoint(path: Path) -> None:  # the first checkpoint's evaluation "failed"
        seen.append(path.name)
        stop.set()

    with pytest.raises(TrainingStopped, match="phase00"):
        run_training(job, on_line=lambda _: None, on_checkpoint=on_checkpoint, stop=stop)
    assert seen and not (out / FINISHED).exists()
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    assert steps < epochs * 200 // recipe.training.effective_batch_size  # stopped mid-phase
    assert all((c / "meta.json").exists() for c in (out / "checkpoints").iterdir())
    _, living = psutil.wait_procs(processes_mentioning(str(out)), timeout=15)  # the ranks had SIGINT
    assert not living


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
