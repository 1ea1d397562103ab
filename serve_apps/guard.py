"""ASGI guards shared by the Serve applications, answered before any route (or FastAPI's own docs routes) runs:

- `BodyLimit`: a request body larger than the app allows gets 413 before anything reads it. Each app keeps its
  limit in `app.state.max_body_bytes` (set where its replica starts).
- `BearerAuth`: every path, `/docs` and `/openapi.json` included, needs the app's bearer token when it has one
  (`app.state.token_sha256`, see serve_apps/auth.py). Route dependencies cannot do this: FastAPI adds its docs
  routes as plain Starlette routes, which ignore them.

Each guard answers in the app's own error shape: `reply(status, message)`, FastAPI's `{"detail": message}` by
default (the LLM server passes OpenAI's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.responses import Response

from serve_apps.auth import bearer_ok

DEFAULT_MAX_BODY_BYTES = 1 << 20

Reply = Callable[[int, str], Response]


def detail_reply(status: int, message: str) -> Response:
    """FastAPI's error shape; a 401 names the scheme the client must use."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


class BodyLimit:
    """Answer 413 to a request whose body is larger than the app's `state.max_body_bytes`, declared or
    streamed, before the application reads any of it (the body is read here and replayed to the app)."""

    def __init__(self, app: Any, reply: Reply = detail_reply):
        self.app, self.reply = app, reply

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(scope["app"].state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await self._too_large(limit, scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            chunks.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return await self._too_large(limit, scope, receive, send)
            more = message.get("more_body", False)
        replay = iter(chunks)

        async def receive_again() -> dict:
            return next(replay, None) or await receive()

        return await self.app(scope, receive_again, send)

    async def _too_large(self, limit: int, scope: dict, receive: Any, send: Any) -> None:
        response = self.reply(413, f"request body larger than {limit} bytes (limit 'max_body_bytes')")
        await response(scope, receive, send)


class BearerAuth:
    """Answer 401 to a request without the bearer token whose SHA-256 is the app's `state.token_sha256`
    (None or unset: no auth), whatever its path. Add it last (outermost): a request without the token is
    refused before its body is read."""

    def __init__(self, app: Any, reply: Reply = detail_reply):
        self.app, self.reply = app, reply

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            digest = getattr(scope["app"].state, "token_sha256", None)
            authorization = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not bearer_ok(authorization.decode("latin-1"), digest):
                response = self.reply(401, "missing or wrong bearer token")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
