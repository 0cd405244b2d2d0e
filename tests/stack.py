"""A real Prefect server (and workers) for the deployment, cancel and S3 tests, through the
same functions `lab serve` uses. Everything started here runs in its own process group and is
stopped as a group."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil

from flows import serve
from tests.waiting import poll


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prefect_server(tmp: Path) -> Iterator[dict[str, str]]:
    """A server on a free port with its own PREFECT_HOME; yields the environment that talks to it."""
    port = free_port()
    home = tmp / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    with open(tmp / "server.log", "w") as log:
        server = serve.start_server(port, env, log)
        try:
            yield env
        finally:
            serve.stop(server)


def run_deployment(name: str, params: dict, env: dict[str, str]) -> str:
    """`prefect deployment run NAME --params ...`; the flow run's id."""
    out = serve.prefect(["deployment", "run", name, "--params", json.dumps(params)], env)
    return re.search(r"UUID:\s*([0-9a-f-]{36})", out)[1]


def read_flow_run(flow_run_id: str, env: dict[str, str]):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def wait_for_state(flow_run_id: str, env: dict[str, str], done: set[str], timeout_s: float):
    last = None

    def finished():
        nonlocal last
        last = read_flow_run(flow_run_id, env)
        return last if last.state and last.state.type.value in done else None

    if run := poll(finished, timeout_s, interval_s=1):
        return run
    raise TimeoutError(f"flow run {flow_run_id} not in {done} after {timeout_s}s (last: {last and last.state})")


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose command line contains `text`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
    return found


def alive(pids: list[int]) -> list[int]:
    living = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                living.append(pid)
    return living
