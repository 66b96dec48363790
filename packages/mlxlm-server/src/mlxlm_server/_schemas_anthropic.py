"""/v1/messages: Anthropic's Messages API shapes (text content)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ._schemas_common import MAX_SEED, Request, Response

__all__ = ["MessagesRequest", "MessagesResponse"]


class TextBlock(Request):
    type: Literal["text"]
    text: str


class AnthropicMessage(Request):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]


class MessagesRequest(Request):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[TextBlock] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    stop_sequences: list[str] | None = Field(None, max_length=16)
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="extension")


class TextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class MessagesUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessagesResponse(Response):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[TextOut]
    model: str
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence"] | None
    stop_sequence: str | None = None
    usage: MessagesUsage
