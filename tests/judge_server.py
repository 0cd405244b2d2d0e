"""A scripted OpenAI-compatible judge: a real local HTTP server for MT-Bench tests.

    with JudgeServer(api_key="k", script=[("rating", 7), ("status", 429), ("text", "no score")]) as judge:
        ...  # point the client at judge.base_url
    judge.requests  # every request that passed the key check: body and the action that answered it

Actions, consumed one per authorised POST to /v1/chat/completions, in arrival order:
    ("rating", x)             200, a judgment ending in "Rating: [[x]]"
    ("text", s)               200, the judgment text s (e.g. a malformed one)
    ("status", code)          that HTTP status with an OpenAI-style error body
    ("status", code, after)   the same with a Retry-After: <after> header
    ("hang", seconds)         no answer until the client closes the connection (it timed out),
                              or at most that long; then the connection is closed
After the script, `default` answers every request: an action, or a function of the request's
body giving one (a judge that answers by what it is asked, whatever the arrival order). A wrong
or missing key gets 401 and consumes nothing.
"""

from __future__ import annotations

import json
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Action = tuple[Any, ...]


@dataclass
class RecordedRequest:
    body: dict[str, Any]
    action: Action
    authorization: str | None = None  # the Authorization header as received


class JudgeServer:
    def __init__(
        self,
        api_key: str | None,
        script: Sequence[Action] = (),
        default: Action | Callable[[dict[str, Any]], Action] = ("rating", 5),
        latency_s: float = 0.0,
    ) -> None:
        self.api_key = api_key
        self.latency_s = latency_s  # per answered request, like a hosted judge's response time
        self.script = list(script)
        self.default = default
        self.requests: list[RecordedRequest] = []
        self.unauthorised = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _next_action(self, body: dict[str, Any], authorization: str | None) -> Action:
        with self._lock:
            if self.script:
                action = self.script.pop(0)
            else:
                action = self.default(body) if callable(self.default) else self.default
            self.requests.append(RecordedRequest(body, action, authorization))
            return action

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path != "/v1/chat/completions":
                    return self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    with server._lock:
                        server.unauthorised += 1
                    return self._json(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
                action = server._next_action(body, self.headers.get("Authorization"))
                time.sleep(server.latency_s)
                kind = action[0]
                if kind == "rating":
                    return self._completion(body, f"The answer is adequate. Rating: [[{action[1]}]]")
                if kind == "text":
                    return self._completion(body, action[1])
                if kind == "status":
                    headers = {"Retry-After": str(action[2])} if len(action) > 2 else {}
                    return self._json(
                        action[1], {"error": {"message": f"scripted {action[1]}", "type": "server_error"}}, headers
                    )
                if kind == "hang":
                    # Readable at end of file: wait for the client to give up and close the connection.
                    select.select([self.connection], [], [], action[1])
                    self.close_connection = True
                    return None
                raise ValueError(f"unknown judge server action {action!r}")

            def _completion(self, body: dict[str, Any], content: str) -> None:
                self._json(
                    200,
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", ""),
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                    },
                )

            def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler
