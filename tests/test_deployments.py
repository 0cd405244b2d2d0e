"""deployments/prefect.yaml: every deployment is valid, and phased-lab really runs from a
server and a process worker (`prefect deployment run`, worker --run-once)."""

from __future__ import annotations

import pytest
import yaml

from flows import serve
from tests.stack import prefect_server, read_flow_run, run_deployment

DEPLOYMENTS = {"phased-lab", "stacked-lab", "nightly-regression", "lr-sweep"}


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
        assert deployment["work_pool"]["name"] == serve.POOL
        flow.validate_parameters(deployment.get("parameters", {}))
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
    assert pool.type == "process" and pool.concurrency_limit == 1
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
    assert {"deployed-results", "deployed-report"} <= keys
    assert (tmp_path / "runs" / "deployed" / "report" / "summary.md").exists()
