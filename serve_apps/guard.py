"""ASGI guards shared by the Serve applications: a request body larger than the app allows gets 413 before
anything reads it. Each app keeps its limit in `app.state.max_body_bytes` (set where its replica starts)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

DEFAULT_MAX_BODY_BYTES = 1 << 20


class BodyLimit:
    """Answer 413 to a request whose body is larger than the app's `state.max_body_bytes`, declared or
    streamed, before the application reads any of it (the body is read here and replayed to the app)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = getattr(scope["app"].state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _too_large(limit, scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            chunks.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return await _too_large(limit, scope, receive, send)
            more = message.get("more_body", False)
        replay = iter(chunks)

        async def receive_again() -> dict:
            return next(replay, None) or await receive()

        return await self.app(scope, receive_again, send)


async def _too_large(limit: int, scope: dict, receive: Any, send: Any) -> None:
    response = JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
    await response(scope, receive, send)
