"""A small OpenAI-compatible (and Anthropic-shaped) HTTP server for tests, on 127.0.0.1 with an ephemeral port.

    with serve_openai(responses=["first answer", "second"], api_key="sk-test") as server:
        client = openai.OpenAI(base_url=server.url, api_key="sk-test")
        ...
        server.requests  # what was sent: path, JSON body, headers (without the credentials)

Routes: `GET /v1/models`, `POST /v1/chat/completions` (OpenAI) and `POST /v1/messages` (Anthropic).
Answers come from `responses`: a list (a queue; the last answer repeats once it is exhausted), or a callable
`f(messages, body) -> str`. An answer that is a dict `{"status": 429, "error": "..."}` is sent as an
HTTP error. Tests that need a real model behind the API use the project's own server instead
(serve_apps/llm_server.py, see tests/serve_apps/test_llm_server.py); this one stays for scripted answers, errors and the
Anthropic route.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = str | dict[str, Any]
Responder = Callable[[list[dict[str, Any]], dict[str, Any]], Answer]
_SECRET_HEADERS = {"authorization", "x-api-key", "api-key", "proxy-authorization"}


@dataclass
class Request:
    method: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]  # lower-case names, credentials removed
    authorized: bool

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])


@dataclass
class Server:
    url: str  # the OpenAI-style base URL, ending in /v1
    root: str  # scheme://host:port (the Anthropic client's base URL)
    requests: list[Request] = field(default_factory=list)

    @property
    def chat_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith(("/chat/completions", "/messages"))]


def _text_of(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


class _Handler(BaseHTTPRequestHandler):
    server_version = "worldgen-test-llm/1"
    state: _State  # set on the subclass built per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: dict[str, Any]) -> bool:
        headers = {k.lower(): v for k, v in self.headers.items()}
        key = self.state.api_key
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:]
        authorized = key is None or given == key
        safe = {k: v for k, v in headers.items() if k not in _SECRET_HEADERS}
        with self.state.lock:
            self.state.server.requests.append(Request(self.command, self.path, body, safe, authorized))
        return authorized

    def _unauthorized(self, anthropic: bool) -> None:
        if anthropic:
            error = {
                "type": "error",
                "error": {"type": "authentication_error", "message": "invalid x-api-key"},
            }
        else:
            error = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
        self._send(401, error)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        authorized = self._record({})
        if not self.path.rstrip("/").endswith("/models"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
        elif not authorized:
            self._unauthorized(anthropic=False)
        else:
            self._send(
                200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.state.models]}
            )

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._send(400, {"error": {"message": "body is not JSON"}})
            return
        authorized = self._record(body)
        anthropic = self.path.rstrip("/").endswith("/messages")
        if not (anthropic or self.path.rstrip("/").endswith("/chat/completions")):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        if not authorized:
            self._unauthorized(anthropic)
            return
        messages = list(body.get("messages", []))
        answer = self.state.answer(messages, body)
        if isinstance(answer, dict):
            status = int(answer.get("status", 500))
            self._send(status, {"error": {"message": answer.get("error", "scripted error"), "type": "test"}})
            return
        model = body.get("model", "test-model")
        if anthropic:
            self._send(
                200,
                {
                    "id": f"msg_{self.state.count}",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": answer}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 1, "output_tokens": 1},
                },
            )
            return
        self._send(
            200,
            {
                "id": f"chatcmpl-{self.state.count}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )


class _State:
    def __init__(self, server: Server, responses: Sequence[Answer] | Responder, api_key: str | None, models):
        self.server, self.api_key, self.models = server, api_key, list(models)
        self.responses = responses
        self.lock = threading.Lock()
        self.count = 0

    def answer(self, messages: list[dict[str, Any]], body: dict[str, Any]) -> Answer:
        with self.lock:
            self.count += 1
            index = self.count - 1
        if callable(self.responses):
            return self.responses(messages, body)
        if not self.responses:
            last = next((m for m in reversed(messages) if m.get("role") == "user"), {})
            return f"echo: {_text_of(last.get('content', ''))}"
        return self.responses[min(index, len(self.responses) - 1)]


@contextmanager
def serve_openai(
    responses: Sequence[Answer] | Responder = (),
    api_key: str | None = None,
    models: Sequence[str] = ("test-model",),
) -> Iterator[Server]:
    """Run the test server in a background thread for the `with` block; `api_key` turns on the key check.

    With no `responses`, each answer echoes the last user message ("echo: …").
    """
    handler = type("Handler", (_Handler,), {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    host, port = httpd.server_address[:2]
    server = Server(url=f"http://{host}:{port}/v1", root=f"http://{host}:{port}")
    handler.state = _State(server, responses, api_key, models)
    thread = threading.Thread(target=httpd.serve_forever, name="test-openai-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
