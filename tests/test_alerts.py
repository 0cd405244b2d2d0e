"""The nightly regression's alert against a real Prefect server: `lab serve`'s wiring creates one
automation however often it runs, and the regression event, emitted by the nightly task's own
code, reaches a webhook (a local HTTP server started here) through it."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest

from flows import alerts, serve
from tests.conftest import REPO
from tests.stack import prefect_server

pytestmark = pytest.mark.slow

# The nightly task's emitter, as the nightly flow calls it, in a process of its own.
EMIT = """
from prefect.events.worker import EventsWorker
from tasks.nightly import MetricCheck, Night, alert_regression

check = MetricCheck(metric="phase00/lab_instruction/rule_acc", value=0.4, baseline=0.6, tolerance=0.05)
night = Night(run_id="night-2", recipe="demo", fingerprint="f", date="d", metrics={}, baseline_run_id="night-1",
              checks=[check])
alert_regression.fn(night)
EventsWorker.drain_all()
"""


@pytest.fixture
def webhook():
    """A local HTTP server; yields (url, queue of the JSON bodies POSTed to it)."""
    received: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def test_serve_wires_one_automation_and_the_regression_event_reaches_the_webhook(tmp_path, webhook, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, received = webhook
    monkeypatch.setenv(alerts.WEBHOOK_ENV, url)
    with prefect_server(tmp_path) as env:
        first = serve.wire_alerts(env, None)
        second = serve.wire_alerts(env, None)  # lab serve started again
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            (automation,) = client.read_automations_by_name(alerts.AUTOMATION)
        assert first == second and str(automation.id) in first
        assert automation.trigger.expect == {"recipe-lab.nightly.regression"}

        emitted = subprocess.run([sys.executable, "-c", EMIT], cwd=REPO, env=env, capture_output=True, text=True)
        assert emitted.returncode == 0, emitted.stderr
        body = received.get(timeout=90)  # the server's trigger and action services, then the POST

    assert body["subject"] == "recipe-lab nightly regression: demo"
    assert "night-2" in body["body"] and "night-1" in body["body"]
    assert "- phase00/lab_instruction/rule_acc: 0.4 (last good 0.6, tolerance 0.05)" in body["body"]
    assert received.empty()  # one event, one notification
    assert os.environ[alerts.WEBHOOK_ENV] not in first  # the URL (it may hold a token) is not printed
