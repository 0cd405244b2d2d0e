"""`lab serve`: a local Prefect server with the UI, the `lab` and `lab-control` work pools,
every deployment of deployments/prefect.yaml, and a process worker on each, for people who
want to click.

The same steps by hand are in the README ("Operations"); the deployment tests drive these
functions, so what `lab serve` does is what is tested.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

from core import storage
from training.lifetime import stop_with

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
POOL = "lab"  # GPU machines: one worker each, taking one flow run at a time
CONTROL_POOL = "lab-control"  # flows that only orchestrate (a sweep's parent): no GPU slot taken
RESULTS_BLOCK = "recipe-lab-results"
PREFECT = [sys.executable, "-m", "prefect"]


def start(args: list[str], env: dict[str, str], log: IO | None = None) -> subprocess.Popen:
    """A long-running Prefect process in its own process group, so `stop` reaches its children
    (the server's uvicorn, the worker's flow runs and their training)."""
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT if log else None, start_new_session=True
    )


def stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def prefect(args: list[str], env: dict[str, str]) -> str:
    """One Prefect CLI command, run to completion; its output, or an error that shows it."""
    done = subprocess.run([*PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def start_server(port: int, env: dict[str, str], log: IO | None = None, timeout_s: float = 120) -> subprocess.Popen:
    proc = start([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    wait_healthy(proc, port, timeout_s)
    return proc


def wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float) -> None:
    """Until the Prefect API on `port` answers its health check; stopped and raised if it does
    not in `timeout_s` or its process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise TimeoutError(f"prefect server on port {port} not healthy after {timeout_s}s")


@contextmanager
def temporary_api() -> Iterator[None]:
    """A Prefect API for the flows `lab` runs here, when none is configured (PREFECT_API_URL).

    What Prefect would start on its own (its temporary server: uvicorn serving Prefect's app on a
    free port, over the Prefect home's database, without the UI), but bound to this process: the
    kernel stops it when this process dies, even by SIGKILL (a parent-death signal, which fires
    when the *thread* that started it ends: it is started here, by the thread that runs the
    flows and outlives them). Prefect's own leaves its server running after a kill -9.
    Its own session: a Ctrl-C meant for the flow does not stop the API under it.
    """
    from prefect.context import refresh_global_settings_context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if PREFECT_API_URL.value():
        yield
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app_dir = Path(importlib.util.find_spec("prefect").origin).parents[1]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # its heartbeat writes to the SQLite db the run is busy with
    command = ["uvicorn", "--app-dir", str(app_dir), "--factory", "prefect.server.api.server:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    parent = os.getpid()
    server = subprocess.Popen(
        [sys.executable, "-m", *command], env=env, start_new_session=True, preexec_fn=lambda: stop_with(parent)
    )
    try:
        # At least 90 s (Prefect's default is 20): a first start creates the database, which took
        # longer than 20 s on a busy 2-core machine.
        wait_healthy(server, port, max(90, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        # In the environment and Prefect's process-wide settings, which every thread reads (a
        # thread that evaluates checkpoints beside training starts without a settings context).
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        refresh_global_settings_context()
        yield
    finally:
        if os.environ.pop("PREFECT_API_URL", None):
            # What the flows logged and emitted last is still queued: sent before the API goes.
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
            refresh_global_settings_context()
        stop(server)


def deploy_all(env: dict[str, str]) -> str:
    """The `lab` process pool (GPU machines) and the `lab-control` pool (orchestration only),
    then every deployment in deployments/prefect.yaml. One GPU job per machine is the worker's
    limit (`start_worker`), so N machines' workers on one pool run N flow runs at once."""
    for pool in (POOL, CONTROL_POOL):
        prefect(["work-pool", "create", pool, "--type", "process", "--overwrite"], env)
    return prefect(["--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)], env)


def use_result_storage(root: str, env: dict[str, str]) -> str:
    """Persist Prefect results under <root>/prefect-results: a RemoteFileSystem block, made the
    server's default result storage. The block holds no credentials: s3fs reads them (and
    AWS_ENDPOINT_URL) from the environment of the process that runs the flow."""
    basepath = storage.join(root, "prefect-results")
    subprocess.run([sys.executable, "-c", SET_RESULT_STORAGE, RESULTS_BLOCK, basepath], cwd=REPO, env=env, check=True)
    return basepath


# Run against the server in `env` (a subprocess, so this process's own Prefect settings don't matter).
SET_RESULT_STORAGE = """
import sys
from prefect.client.orchestration import get_client
from prefect.filesystems import RemoteFileSystem

block_id = RemoteFileSystem(basepath=sys.argv[2]).save(sys.argv[1], overwrite=True)
with get_client(sync_client=True) as client:
    client.update_server_default_result_storage(block_id)
"""


def start_worker(
    env: dict[str, str], log: IO | None = None, run_once: bool = False, pool: str = POOL
) -> subprocess.Popen:
    """A process worker; its flow runs start in this checkout (the pull step reads
    RECIPE_LAB_HOME). On the GPU pool it takes one flow run at a time (one GPU job per machine);
    on the control pool any number (they only wait on others)."""
    limit = ["--limit", "1"] if pool == POOL else []
    return start(
        [*PREFECT, "worker", "start", "--pool", pool, *limit, *(["--run-once"] if run_once else [])],
        {**env, "RECIPE_LAB_HOME": str(REPO)},
        log,
    )


def wire_alerts(env: dict[str, str], alert_block: str | None) -> str:
    """The nightly regression's automation on the server in `env` (flows.alerts), when there is
    somewhere to send it; what was done, in a line."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import alerts

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        block_id = alerts.notification_block_id(alert_block)
        if block_id is None:
            return f"alerts: none (set {alerts.WEBHOOK_ENV} or --alert-block to be told of nightly regressions)"
        automation_id = alerts.ensure_regression_alert(block_id)
    return f"alerts: automation '{alerts.AUTOMATION}' ({automation_id}) -> block {block_id}"


def serve(port: int, storage_root: str | None, alert_block: str | None = None) -> None:
    """Server, pool, deployments, the regression alert and a worker; runs until Ctrl-C, then stops both."""
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    server = start_server(port, env)
    workers: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a SIGTERM too runs the cleanup below
    try:
        print(deploy_all(env))
        if storage_root and not storage.is_local(storage_root):
            print(f"Prefect results: {use_result_storage(storage_root, env)}")
        print(wire_alerts(env, alert_block))
        workers = [start_worker(env), start_worker(env, pool=CONTROL_POOL)]
        print(f"UI: http://127.0.0.1:{port}   pools: {POOL}, {CONTROL_POOL}   API: {env['PREFECT_API_URL']}")
        print("try: PREFECT_API_URL=... prefect deployment run finetune/phased-lab --params '{\"smoke\": true}'")
        workers[0].wait()
    except KeyboardInterrupt:
        pass
    finally:
        for proc in [*workers, server]:
            stop(proc)
