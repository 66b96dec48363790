"""Models, embeddings, tokenize/detokenize, health and metrics."""

from __future__ import annotations

import base64
from typing import Any

import mlx.core as mx
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ._chat import message_dicts, render_chat
from ._engine_bridge import Slot
from ._errors import APIError, bad_request
from ._routes_chat import ERRORS
from ._schemas_extra import (
    DetokenizeRequest,
    DetokenizeResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    Health,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from ._state import ServerState

router = APIRouter()
MAX_EMBED_INPUTS = 256


def _cards(state: ServerState) -> list[ModelCard]:
    return [
        ModelCard(id=name, created=state.created, kind="model" if name == state.base else "adapter")
        for name in state.slots
    ]


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(request.app.state.server))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
async def get_model(model_id: str, request: Request) -> ModelCard:
    state: ServerState = request.app.state.server
    for card in _cards(state):
        if card.id == model_id:
            return card
    raise APIError(
        404, f"model {model_id!r} is not served here", param="model", code="model_not_found"
    )


def embed(slot: Slot, inputs: list[list[int]]) -> list[np.ndarray]:
    """Mean of the final (normed) hidden states over the input's tokens, L2-normalised.

    Runs on the engine thread. The decoder stack is the model's ``model`` submodule (Hugging
    Face naming, shared by every architecture here); the language-model head is skipped.
    """
    stack = getattr(slot.model, "model", None)
    if stack is None or not callable(stack):
        raise bad_request("this model cannot produce embeddings (no decoder stack)", param="model")
    out = []
    for tokens in inputs:
        hidden = stack(mx.array([tokens]))[0].astype(mx.float32)
        pooled = mx.mean(hidden, axis=0)
        pooled = pooled / mx.maximum(mx.linalg.norm(pooled), 1e-12)
        out.append(pooled)
    mx.eval(out)
    return [np.array(v, dtype=np.float32) for v in out]


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
async def embeddings(req: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    """Embeddings as the L2-normalised mean of the model's final hidden states (a generative
    model is not trained for this: fine for similarity within one model, not a substitute
    for a dedicated embedding model)."""
    state: ServerState = request.app.state.server
    slot = state.slot(req.model)
    tok = slot.tokenizer
    raw = req.input
    inputs: list[list[int]] = []
    if isinstance(raw, str):
        inputs = [list(tok.encode(raw))]
    elif raw and all(isinstance(x, int) for x in raw):
        inputs = [[x for x in raw if isinstance(x, int)]]  # one input, already tokenized
    else:
        # The schema admits homogeneous lists only: here, strings or lists of token ids.
        for x in raw:
            if isinstance(x, str):
                inputs.append(list(tok.encode(x)))
            elif isinstance(x, list):
                inputs.append(list(x))
    if not inputs or len(inputs) > MAX_EMBED_INPUTS:
        raise bad_request(f"input must hold 1 to {MAX_EMBED_INPUTS} items", param="input")
    for tokens in inputs:
        state.check_prompt(slot, tokens)
    hidden = int(getattr(getattr(slot.model, "args", None), "hidden_size", 0) or 0)
    if req.dimensions is not None and req.dimensions != hidden:
        raise bad_request(f"this model's embeddings have {hidden} dimensions", param="dimensions")
    vectors = await state.bridge.call(lambda: embed(slot, inputs))
    data = [
        Embedding(
            index=i,
            embedding=base64.b64encode(v.astype("<f4").tobytes()).decode()
            if req.encoding_format == "base64"
            else v.tolist(),
        )
        for i, v in enumerate(vectors)
    ]
    used = sum(len(t) for t in inputs)
    return EmbeddingResponse(
        data=data, model=req.model, usage=EmbeddingUsage(prompt_tokens=used, total_tokens=used)
    )


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(req: TokenizeRequest, request: Request) -> TokenizeResponse:
    state: ServerState = request.app.state.server
    slot = state.slot(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages")
    if req.messages is not None:
        if not req.messages:
            raise bad_request("messages is empty", param="messages")
        tokens = render_chat(
            slot.tokenizer,
            message_dicts(req.messages),
            template_args=state.config.chat_template_args,
        )
    else:
        tokens = list(
            slot.tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        )
    return TokenizeResponse(
        tokens=tokens, count=len(tokens), max_model_len=state.context_length(slot)
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(req: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state: ServerState = request.app.state.server
    slot = state.slot(req.model)
    vocab = state.vocab_size(slot)
    if any(not 0 <= t < vocab for t in req.tokens):
        raise bad_request(f"token ids must be in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=slot.tokenizer.decode(req.tokens))


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(request: Request) -> Any:
    state: ServerState = request.app.state.server
    bridge = state.bridge
    detail: dict[str, Any] = {
        "engine": bridge.state,
        "restarts": bridge.restarts,
        "in_flight": bridge.in_flight,
    }
    if bridge.healthy:
        return Health(status="ok", detail=detail)
    detail["error"] = bridge.last_error or "engine stalled"
    return JSONResponse(Health(status="unavailable", detail=detail).model_dump(), status_code=503)


@router.get("/metrics", responses={200: {"content": {"text/plain": {}}}, **ERRORS})
async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
