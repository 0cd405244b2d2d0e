"""deployments/prefect.yaml: every deployment is valid, and phased-lab really runs from a
server and a process worker (`prefect deployment run`, worker --run-once)."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import islice

import pytest
import yaml

from flows import serve
from tests.stack import prefect_server, read_flow_run, run_deployment, wait_for_state

DEPLOYMENTS = {"phased-lab", "stacked-lab", "nightly-regression", "lr-sweep", "sweep-probe", "sweep-run"}


def spec() -> dict:
    return yaml.safe_load(serve.PREFECT_FILE.read_text())


def test_every_deployment_and_schedule_validates_against_its_flow():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    config = spec()
    assert {d["name"] for d in config["deployments"]} == DEPLOYMENTS
    assert "git_clone" not in yaml.safe_dump(config["pull"])  # runs from a checkout, offline
    for deployment in config["deployments"]:
        flow = load_flow_from_entrypoint(str(serve.REPO / deployment["entrypoint"]))
        # only a sweep's parent runs on the control pool: it holds no GPU slot while its runs train
        control = deployment["name"] == "lr-sweep"
        assert deployment["work_pool"]["name"] == (serve.CONTROL_POOL if control else serve.POOL)
        started_by_a_sweep = {"run_id": "r", "rung": 32} if deployment["name"] == "sweep-probe" else {}
        flow.validate_parameters({**deployment.get("parameters", {}), **started_by_a_sweep})
        for schedule in deployment.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad cron or zone
            flow.validate_parameters({**deployment.get("parameters", {}), **schedule.get("parameters", {})})

    lr_sweep = next(d for d in config["deployments"] if d["name"] == "lr-sweep")
    assert lr_sweep["parameters"]["rungs"] and lr_sweep["parameters"]["eta"] > 1  # it stops runs early
    nightly = next(d for d in config["deployments"] if d["name"] == "nightly-regression")
    assert nightly["schedules"][0]["cron"].split()[:2] == ["0", "2"]
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}


@pytest.mark.slow
def test_phased_lab_runs_from_a_deployment_on_a_process_worker(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with prefect_server(tmp_path) as env:
        serve.deploy_all(env)
        params = {"smoke": True, "storage_root": str(tmp_path / "runs"), "run_id": "deployed"}
        flow_run_id = run_deployment("finetune/phased-lab", params, env)
        with open(tmp_path / "worker.log", "w") as log:
            worker = serve.start_worker(env, log, run_once=True)
            try:
                worker.wait(timeout=540)
            finally:
                serve.stop(worker)

        run = read_flow_run(flow_run_id, env)
        assert run.state.is_completed(), (run.state, (tmp_path / "worker.log").read_text()[-3000:])
        # deployment defaults and the run's overrides, merged key by key
        assert run.parameters == {"recipe": "lab", "strategy": "phased", **params}
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            pool = client.read_work_pool(serve.POOL)
            deployments = {d.name: d for d in client.read_deployments()}
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
    assert pool.type == "process"
    assert set(deployments) == DEPLOYMENTS
    nightly = deployments["nightly-regression"]
    assert nightly.schedules[0].schedule.cron == "0 2 * * *" and nightly.schedules[0].schedule.timezone
    assert (
        nightly.global_concurrency_limit.limit == 1
        and nightly.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    )
    keys = {a.key for a in artifacts}
    for phase in ("phase00", "phase05", "phase10"):
        assert {f"deployed-{phase}-scores", f"deployed-{phase}-gate"} <= keys
    # training progress is updated per whole percent (not per step); each phase's bar reached its end
    progress = {a.key: a.data for a in artifacts if a.type == "progress"}
    assert set(progress) == {f"deployed-{phase}-training" for phase in ("phase00", "phase05", "phase10")}
    assert all(value >= 99.0 for value in progress.values()), progress
    assert {"deployed-results", "deployed-report"} <= keys
    assert (tmp_path / "runs" / "deployed" / "report" / "summary.md").exists()


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(900)  # 7 minutes on 2 busy cores, mostly flow-run process start-ups; 600 s was hit under load
def test_a_sweep_on_the_pool_trains_its_runs_at_once_on_two_workers_and_equals_a_serial_sweep(tmp_path, assets):
    data = tmp_path / "phase05-1600.jsonl"
    with open(assets.train_file("phase05")) as f:
        data.write_text("".join(islice(f, 1600)))
    grid = {
        "phases": [[{"name": "p", "data": [str(data)], "objective": {"lab_knowledge/acc": 1.0}}]],
        "training.epochs": [2],
        "evaluation.tasks": [["lab_knowledge"]],
        "evaluation.limit": [20],
        "checkpointing.save_every_samples": [None],  # a checkpoint per epoch only
        "training.learning_rate": [1e-3, 2e-3],
    }
    # smoke: 2 x 50 steps of 32 samples; one rung after the first epoch, where eta 1.5 keeps both
    # runs (ceil(2 / 1.5) = 2): each run is a probe flow run, then a finish flow run, on the pool.
    # A stage trains for ~8 s on an idle 2-core machine, longer than the seconds by which the two
    # workers' flow runs start apart (15-step stages of 2.5 s did not overlap in one CI-like run).
    params = {"recipe": "demo", "grid": grid, "rungs": [1600], "eta": 1.5, "pruner": "dynamics", "smoke": True}
    with prefect_server(tmp_path) as env:
        env["PREFECT_WORKER_QUERY_SECONDS"] = "1"
        serve.deploy_all(env)
        flow_run_id = run_deployment(
            "sweep/lr-sweep", {**params, "storage_root": str(tmp_path / "pool"), "sweep_id": "pool"}, env
        )
        names = ("gpu0", "gpu1", "control")
        logs = [open(tmp_path / f"worker-{name}.log", "w") for name in names]
        workers = [
            serve.start_worker(env, logs[0]),
            serve.start_worker(env, logs[1]),
            serve.start_worker(env, logs[2], pool=serve.CONTROL_POOL),
        ]
        try:
            run = wait_for_state(flow_run_id, env, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, timeout_s=720)
        finally:
            for worker in workers:
                serve.stop(worker)
        assert run.state.is_completed(), (
            run.state,
            [(tmp_path / f"worker-{n}.log").read_text()[-3000:] for n in names],
        )
        # The same sweep serially in one process (what `lab sweep` does), against the same server.
        serial = {**params, "storage_root": str(tmp_path / "serial"), "sweep_id": "serial"}
        code = "import json, sys; from flows.sweep import sweep; sweep(**json.loads(sys.argv[1]))"
        subprocess.run([sys.executable, "-c", code, json.dumps(serial)], env=env, cwd=serve.REPO, check=True)
        pooled = json.loads((tmp_path / "pool" / "pool" / "sweep.json").read_text())

        # The parent restarted (same sweep id, no worker left to train anything) picks up the
        # flow runs it started: it creates no probe or finish flow run (only its own), and ends
        # with the same results. Were they submitted again, nothing would run them (timeout).
        again = {**params, "storage_root": str(tmp_path / "pool"), "sweep_id": "pool", "on_pool": True}
        code = (
            "import json, sys; from flows.sweep import sweep; from prefect.client.orchestration import get_client\n"
            "count = lambda: len(get_client(sync_client=True).read_flow_runs(limit=200))\n"
            "before = count(); sweep(**json.loads(sys.argv[1])); print('new flow runs', count() - before)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(again)],
            env=env,
            cwd=serve.REPO,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert "new flow runs 1" in out.stdout, out.stdout[-2000:]
        restarted = json.loads((tmp_path / "pool" / "pool" / "sweep.json").read_text())
        assert restarted["runs"] == pooled["runs"]

    alone = json.loads((tmp_path / "serial" / "serial" / "sweep.json").read_text())
    assert [r["status"] for r in pooled["runs"]] == ["finished", "finished"]
    for key in ("final_objective", "rung_ranks", "samples_trained", "samples_planned"):
        assert [r[key] for r in pooled["runs"]] == [r[key] for r in alone["runs"]], key
    stages = []  # per run: (first, last) step time of its probe and of its finish
    for a, b in zip(pooled["runs"], alone["runs"], strict=True):
        steps = read_jsonl(tmp_path / "pool" / a["run_id"] / "p" / "metrics.jsonl")
        assert [m["loss"] for m in steps] == [
            m["loss"] for m in read_jsonl(tmp_path / "serial" / b["run_id"] / "p" / "metrics.jsonl")
        ]
        probe, finish = steps[:50], steps[50:]
        stages.append([(probe[0]["time"], probe[-1]["time"]), (finish[0]["time"], finish[-1]["time"])])
    # The two workers trained the runs at the same time: in the probe or the finish stage (or
    # both), one run's steps overlap the other's (run one after another, they never would).
    overlaps = [max(a[0], b[0]) < min(a[1], b[1]) for a, b in zip(*stages, strict=True)]
    assert any(overlaps), stages
