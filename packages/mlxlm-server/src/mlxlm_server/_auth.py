"""API keys and request-size bounds, as plain ASGI middleware (they run before routing,
so no route can forget them)."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import HTTPException

from ._errors import error_body

__all__ = ["ApiKeyMiddleware", "BodyLimitMiddleware"]

Scope = dict[str, Any]
ASGI = Callable[
    [Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]

OPEN_PATHS = frozenset({"/health"})


async def _send_error(
    send: Callable[[Any], Awaitable[None]],
    status: int,
    body: dict[str, Any],
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class ApiKeyMiddleware:
    """Every route but /health needs ``Authorization: Bearer <key>`` (or ``x-api-key``)."""

    def __init__(self, app: ASGI, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _ok(self, scope: Scope) -> bool:
        given = None
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif name == b"x-api-key":
                given = value.strip()
        if given is None:
            return False
        # compare against every key so timing does not tell which one nearly matched
        return any([hmac.compare_digest(given, k) for k in self.keys])

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in OPEN_PATHS
            or scope["method"] == "OPTIONS"
            or self._ok(scope)
        ):
            await self.app(scope, receive, send)
            return
        body = error_body(
            "a valid API key is required (Authorization: Bearer <key>)",
            type="authentication_error",
            code="invalid_api_key",
        )
        await _send_error(send, 401, body, [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with 413, declared or streamed."""

    def __init__(self, app: ASGI, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = error_body(f"request body larger than {self.limit} bytes", code="body_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    await _send_error(send, 413, message)
                    return
        seen = 0

        async def limited() -> Any:
            # Raised while the route reads its body: FastAPI lets HTTPException through,
            # and the app's handler turns it into the 413 error body.
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, message["error"]["message"])
            return msg

        await self.app(scope, limited, send)
