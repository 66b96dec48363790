"""Pieces shared by the request and response schemas of several endpoints."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ErrorDetail",
    "ErrorResponse",
    "FunctionDefinition",
    "JSONSchemaFormat",
    "ResponseFormat",
    "SamplingFields",
    "StreamOptions",
    "Tool",
    "ToolChoiceFunction",
    "ToolChoiceNamed",
    "Usage",
]

MAX_SEED = 2**63 - 1


class Request(BaseModel):
    """Requests ignore fields they do not know (clients send many), but type the rest."""

    model_config = ConfigDict(extra="ignore")


class Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StreamOptions(Request):
    include_usage: bool = False


class JSONSchemaFormat(Request):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(Request):
    name: str


class ToolChoiceNamed(Request):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class SamplingFields(Request):
    """The sampling options every generation endpoint accepts (OpenAI names + extensions)."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(
        None, ge=0, le=1_000_000, description="extension: keep the k most likely"
    )
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="extension: min-p filter")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=10.0, description="extension: multiplicative repetition penalty"
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100]"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = Field(None, description="up to 16 stop strings")
    stop_token_ids: list[int] | None = Field(
        None, max_length=64, description="extension: token ids that end generation"
    )
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
