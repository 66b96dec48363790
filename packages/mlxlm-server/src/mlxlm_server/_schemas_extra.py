"""Schemas of the smaller endpoints: models, embeddings, tokenize, detokenize, health."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ._schemas_chat import ChatMessage
from ._schemas_common import Request, Response

__all__ = [
    "DetokenizeRequest",
    "DetokenizeResponse",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "Health",
    "ModelCard",
    "ModelList",
    "TokenizeRequest",
    "TokenizeResponse",
]


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlxlm"
    kind: Literal["model", "adapter"] = "model"


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingRequest(Request):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class TokenizeRequest(Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(Response):
    tokens: list[int]
    count: int
    max_model_len: int | None = None


class DetokenizeRequest(Request):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


class DetokenizeResponse(Response):
    prompt: str


class Health(Response):
    status: Literal["ok", "unavailable"]
    detail: dict[str, Any] | None = None
