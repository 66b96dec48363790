"""/v1/responses (stateless): OpenAI's Responses API, the subset that needs no storage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ._schemas_common import JSONSchemaFormat, Request, Response, SamplingFields

__all__ = ["ResponsesRequest", "ResponsesResponse"]


class InputText(Request):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(Request):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]


class TextFormat(Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOptions(Request):
    format: TextFormat | None = None

    def as_json_schema(self) -> JSONSchemaFormat | None:
        if self.format is None or self.format.type != "json_schema":
            return None
        schema = self.format.schema_ if self.format.schema_ is not None else {}
        return JSONSchemaFormat(name=self.format.name or "response", schema=schema)


class ResponsesRequest(SamplingFields):
    model: str
    input: str | list[InputMessage] = Field(description="a string, or a list of messages")
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=0)
    text: TextOptions | None = None
    store: bool | None = Field(None, description="ignored: this server keeps no state")
    previous_response_id: str | None = Field(None, description="refused: stateless server")


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ResponsesUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: str


class ResponsesResponse(Response):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete"]
    model: str
    output: list[OutputMessage]
    usage: ResponsesUsage
    incomplete_details: IncompleteDetails | None = None
    parallel_tool_calls: bool = False
    tool_choice: str = "none"
    tools: list[Any] = Field(default_factory=list)
