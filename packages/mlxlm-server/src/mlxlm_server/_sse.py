"""Server-sent events: one ``data:`` line per JSON payload (``event:`` for Anthropic)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

__all__ = ["DONE", "sse"]

DONE = b"data: [DONE]\n\n"


def sse(payload: BaseModel | dict[str, Any], *, event: str | None = None) -> bytes:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude_none=False)
    else:
        data = json.dumps(payload, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()
