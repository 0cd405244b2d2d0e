"""Experiment trackers (training.report_to) on a real one-phase run of the finetune flow:
TensorBoard event files and a real MLflow tracking server (started here) hold exactly what
metrics.jsonl and selection.json say; W&B, offline, writes its run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from flows import serve
from tests.stack import free_port
from tests.waiting import poll

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free port with its own SQLite store; yields its URI."""
    port = free_port()
    store = tmp_path / "mlflow"
    store.mkdir()
    log = open(store / "server.log", "w")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--default-artifact-root", str(store / "art")),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, (store / "server.log").read_text()[-2000:]
        try:
            return httpx.get(f"{uri}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert poll(healthy, timeout_s=180, interval_s=0.5), "mlflow server not healthy"
        yield uri
    finally:
        serve.stop(proc)  # its process group: SIGTERM, then SIGKILL after a grace period
        log.close()


def test_report_to_tensorboard_mlflow_and_wandb(tmp_path, prefect_server, assets, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flows.finetune import finetune

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the environment is the only way in
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = tmp_path / "train.jsonl"
    with open(assets.train_file("phase00")) as f:
        data.write_text("".join(islice(f, 160)))
    overrides = {
        "phases": [{"name": "phase00", "data": [str(data)], "objective": {"lab_instruction/rule_acc": 1.0}}],
        "training.epochs": 1,
        "training.report_to": ["tensorboard", "mlflow", "wandb"],
        "checkpointing.save_every_samples": 64,
        "evaluation.limit": 10,
    }
    finetune(recipe="demo", overrides=overrides, storage_root=str(tmp_path / "runs"), run_id="tracked")
    phase = tmp_path / "runs" / "tracked" / "phase00"
    metrics = [json.loads(line) for line in (phase / "metrics.jsonl").read_text().splitlines()]
    selection = json.loads((phase / "selection.json").read_text())
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    logged = [k for k, v in metrics[0].items() if k != "step" and isinstance(v, int | float)]
    assert {"loss", "grad_norm", "lr", "samples_seen", "tokens_per_s"} <= set(logged)
    step_of = {0: 0} | {m["samples_seen"]: m["step"] for m in metrics}
    scored = {c["name"]: c for c in [selection["start"], *selection["candidates"]]}
    # 160 rows less the validation slice (a tenth of the phase) = 144 trained: saves at 64, 128, the end
    assert {"samples_64", "samples_128", f"samples_{160 - 160 // 10}"} <= set(scored)

    # TensorBoard: the scalars read back are metrics.jsonl's numbers (TensorBoard stores float32).
    events = EventAccumulator(str(phase / "tensorboard"))
    events.Reload()
    for key in logged:
        points = [(s.step, s.value) for s in events.Scalars(f"train/{key}")]
        assert points == [(m["step"], np.float32(m[key])) for m in metrics], key
    # validation/loss at each checkpoint's step: the mean of its per-sample file
    validation = {
        step_of[int(f.name.removeprefix("samples_").removesuffix(".items.parquet"))]: pd.read_parquet(f)["value"].mean()
        for f in (phase / "validation").glob("samples_*.items.parquet")
    }
    assert len(validation) == 3
    points = [(s.step, s.value) for s in events.Scalars("validation/loss")]
    assert points == [(step, pytest.approx(np.float32(loss))) for step, loss in sorted(validation.items())]
    objective = [(s.step, s.value) for s in events.Scalars("eval/objective")]
    assert sorted(objective) == sorted((step_of[c["samples"]], np.float32(c["objective"])) for c in scored.values())

    # MLflow, read back through its client: one run for the phase, the same numbers (float64).
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("demo").experiment_id], "tags.`recipe_lab.run_id` = 'tracked'"
    )
    assert run.data.tags["recipe_lab.phase"] == "phase00" and run.info.run_name == "tracked/phase00"
    assert json.loads((phase / "trackers.json").read_text())["mlflow"] == run.info.run_id
    for key in logged:
        history = client.get_metric_history(run.info.run_id, f"train/{key}")
        assert [(h.step, h.value) for h in history] == [(m["step"], m[key]) for m in metrics], key
    knowledge = client.get_metric_history(run.info.run_id, "eval/lab_instruction/rule_acc")
    assert sorted((h.step, h.value) for h in knowledge) == sorted(
        (step_of[c["samples"]], c["metrics"]["lab_instruction/rule_acc"]) for c in scored.values()
    )
    winner = selection["winner"]
    assert run.data.params["selection.winner"] == winner["name"]
    assert run.data.metrics["selection/objective"] == winner["objective"]
    assert run.data.params["training.learning_rate"] == str(2e-3)
    assert json.loads(run.data.params["training.report_to"]) == ["tensorboard", "mlflow", "wandb"]

    # W&B offline: run directories under the phase for the one run id <run_id>-<phase>, one per
    # process that wrote to it (training, then the evaluation's scores; `wandb sync` merges them).
    offline = sorted(Path(phase / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all((d / "run-tracked-phase00.wandb").stat().st_size > 0 for d in offline)
