"""A Kubernetes API double: a real local HTTP server answering the REST calls the kubernetes
client makes for a Kubeflow Trainer TrainJob (no cluster can run here).

    with KubernetesDouble(log_lines=["step 1/2 ...", "step 2/2 ..."], outcome="Complete") as api:
        run_on_kubernetes(job, on_line, api_client=api.client())
    api.trainjobs   # the bodies POSTed, by name;  api.deleted  # (name, delete options) received

Answers:
  POST   /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs        201, the object
  GET    /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs/NAME   the object; its status has
         the `outcome` condition once node 0's log was read to the end
  DELETE /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs/NAME   200 Status
  GET    /api/v1/namespaces/NS/pods?labelSelector=...   node 0's pod when the selector names the job
  GET    /api/v1/namespaces/NS/pods/POD/log?follow=true  the log lines, streamed one by one; with
         `hold_log` the stream stays open after them (a job still running) until the server stops
Anything else: 404 with a Kubernetes Status body.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


class KubernetesDouble:
    def __init__(self, log_lines: list[str], outcome: str = "Complete", hold_log: bool = False) -> None:
        self.log_lines, self.outcome, self.hold_log = log_lines, outcome, hold_log
        self.trainjobs: dict[str, dict[str, Any]] = {}
        self.deleted: list[tuple[str, dict[str, Any]]] = []
        self.requests: list[tuple[str, str]] = []  # (method, path?query)
        self.log_read = threading.Event()
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def client(self):
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.host
        return client.ApiClient(configuration)

    def __enter__(self) -> KubernetesDouble:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, like the API server

            def log_message(self, *args: object) -> None:
                pass

            def send_json(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def not_found(self) -> None:
                self.send_json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})

            def body(self) -> dict[str, Any]:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

            def do_POST(self) -> None:
                api.requests.append(("POST", self.path))
                match = TRAINJOBS.match(urlparse(self.path).path)
                if not match or match[2]:
                    return self.not_found()
                obj = self.body()
                obj["metadata"] |= {"uid": "00000000-0000-0000-0000-000000000001", "resourceVersion": "1"}
                api.trainjobs[obj["metadata"]["name"]] = obj
                self.send_json(201, obj)

            def do_DELETE(self) -> None:
                api.requests.append(("DELETE", self.path))
                match = TRAINJOBS.match(urlparse(self.path).path)
                if not match or match[2] not in api.trainjobs:
                    return self.not_found()
                api.deleted.append((match[2], self.body()))
                self.send_json(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

            def do_GET(self) -> None:
                api.requests.append(("GET", self.path))
                url = urlparse(self.path)
                query = parse_qs(url.query)
                if (match := TRAINJOBS.match(url.path)) and match[2] in api.trainjobs:
                    obj = dict(api.trainjobs[match[2]])
                    if api.log_read.is_set():
                        obj["status"] = {"conditions": [{"type": api.outcome, "status": "True", "message": "done"}]}
                    return self.send_json(200, obj)
                if match := PODS.match(url.path):
                    selector = dict(kv.split("=") for kv in query.get("labelSelector", [""])[0].split(",") if kv)
                    name = selector.get("trainer.kubeflow.org/trainjob-name")
                    items = []
                    if name in api.trainjobs and selector.get("batch.kubernetes.io/job-completion-index") == "0":
                        items = [
                            {
                                "metadata": {"name": f"{name}-node-0-0-x7k2p", "namespace": match[1]},
                                "status": {"phase": "Running"},
                            }
                        ]
                    return self.send_json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if (match := POD_LOG.match(url.path)) and query.get("follow") == ["true"]:
                    # As the API server streams a followed log: chunked, one chunk per line as it is written.
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client stopped following
                        for line in api.log_lines:
                            data = line.encode() + b"\n"
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                            self.wfile.flush()
                        if api.hold_log:
                            api.stopping.wait()
                        self.wfile.write(b"0\r\n\r\n")
                        api.log_read.set()
                    return
                self.not_found()

        return Handler
