"""/v1/messages: Anthropic's Messages API shapes (text and client tools)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from ._schemas_common import MAX_SEED, Request, Response

__all__ = ["MessagesRequest", "MessagesResponse", "TextOut", "ToolUseOut"]


class TextBlock(Request):
    type: Literal["text"]
    text: str


class ToolUseBlock(Request):
    """A call the assistant made earlier in the conversation."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=64)
    input: dict[str, Any]


class ToolResultBlock(Request):
    """What the client's tool returned for a call (in a user turn)."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[TextBlock] = ""
    is_error: bool = False


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class AnthropicMessage(Request):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class AnthropicTool(Request):
    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description="the tool to call, with type 'tool'")
    disable_parallel_tool_use: bool = False


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
    tools: list[AnthropicTool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="extension")


class TextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class MessagesUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessagesResponse(Response):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[TextOut | ToolUseOut]
    model: str
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: MessagesUsage
