"""POST /v1/completions: raw-text completion of one or several prompts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ._engine_bridge import Slot
from ._errors import APIError, bad_request
from ._generation import Piece, TokenInfo, collect, make_jobs, run_jobs, stream_jobs
from ._routes_chat import ERRORS
from ._schemas_common import Usage
from ._schemas_completions import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from ._sse import DONE, sse
from ._state import ServerState, new_id
from ._vocab import token_bytes

router = APIRouter()


def _prompts(state: ServerState, slot: Slot, prompt: Any) -> list[list[int]]:
    tok = slot.tokenizer
    if isinstance(prompt, str):
        return [list(tok.encode(prompt))]
    if not prompt:
        raise bad_request("prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [list(tok.encode(p)) for p in prompt]
    return [list(p) for p in prompt]


def _logprobs(tokens: list[TokenInfo], slot: Slot, offset: int) -> CompletionLogprobs:
    table = token_bytes(slot.tokenizer)
    out = CompletionLogprobs()
    for t in tokens:
        out.tokens.append(t.text)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append(
            {table[i].decode("utf-8", "replace"): v for i, v in (t.top or []) if i < len(table)}
        )
        out.text_offset.append(offset)
        offset += len(t.text)
    return out


@router.post("/v1/completions", response_model=Completion, responses=ERRORS)
async def completions(req: CompletionRequest, request: Request) -> Any:
    state: ServerState = request.app.state.server
    started = time.monotonic()
    slot = state.slot(req.model)
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of must equal n (no server-side ranking)", param="best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs is not supported", param="echo")
    state.check_n(req.n)
    prompts = _prompts(state, slot, req.prompt)
    if len(prompts) * req.n > state.config.max_n * 4:
        raise bad_request(
            f"at most {state.config.max_n * 4} completions per request", param="prompt"
        )
    for p in prompts:
        state.check_prompt(slot, p)
    params = state.params(
        slot, req, max_tokens=state.max_tokens(req.max_tokens), logprobs=req.logprobs
    )
    state.response_format(slot, req.response_format, params)
    eos, vocab = state.eos(slot), state.vocab_size(slot)
    groups = [make_jobs(state.bridge, slot.name, p, params, req.n, eos, vocab) for p in prompts]
    state.bridge.submit([j for g in groups for j in g])
    total_prompt = sum(len(p) for p in prompts)
    state.metrics.prompt_tokens.inc(total_prompt)
    echoes = [slot.tokenizer.decode(p) if req.echo else "" for p in prompts]
    streams = [
        stream_jobs(state.bridge, g, slot.tokenizer, params, first_index=i * req.n)
        for i, g in enumerate(groups)
    ]
    rid, created = new_id("cmpl"), int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _stream(
            state, slot, req, rid, created, streams, echoes, total_prompt, include_usage, started
        )
        return StreamingResponse(body, media_type="text/event-stream")

    async def gather() -> list[Any]:
        parts = await asyncio.gather(*(collect(s, req.n, i * req.n) for i, s in enumerate(streams)))
        return [r for part in parts for r in part]

    results = await run_jobs(request, gather(), timeout=state.config.request_timeout)
    choices = []
    for r in results:
        echo = echoes[r.index // req.n]
        logprobs = _logprobs(r.tokens, slot, len(echo)) if req.logprobs is not None else None
        choices.append(
            CompletionChoice(
                index=r.index, text=echo + r.text, logprobs=logprobs, finish_reason=r.finish_reason
            )
        )
    completion = sum(r.completion_tokens for r in results)
    state.metrics.generated_tokens.inc(completion)
    usage = Usage(
        prompt_tokens=total_prompt,
        completion_tokens=completion,
        total_tokens=total_prompt + completion,
    )
    return Completion(id=rid, created=created, model=req.model, choices=choices, usage=usage)


async def _merge(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    if len(streams) == 1:
        async for p in streams[0]:
            yield p
        return
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def pump(s: AsyncIterator[Piece]) -> None:
        try:
            async for p in s:
                await queue.put(p)
        except BaseException as exc:
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        live = len(tasks)
        while live:
            item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


async def _stream(
    state: ServerState,
    slot: Slot,
    req: CompletionRequest,
    rid: str,
    created: int,
    streams: list[AsyncIterator[Piece]],
    echoes: list[str],
    prompt_tokens: int,
    include_usage: bool,
    started: float,
) -> AsyncIterator[bytes]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return sse(
            Completion(id=rid, created=created, model=req.model, choices=choices, usage=usage)
        )

    offsets = {i: len(echoes[i // req.n]) for i in range(len(echoes) * req.n)}
    counts: dict[int, int] = {}
    try:
        for i, echo in enumerate(echoes):
            for j in range(req.n):
                if echo:
                    yield chunk([CompletionChoice(index=i * req.n + j, text=echo)])
        async with asyncio.timeout(
            max(0.0, state.config.request_timeout - (time.monotonic() - started))
        ):
            async for p in _merge(streams):
                counts[p.index] = p.completion_tokens
                logprobs = (
                    _logprobs(p.tokens, slot, offsets[p.index])
                    if req.logprobs is not None
                    else None
                )
                offsets[p.index] += len(p.text)
                if p.text or p.finish_reason or (logprobs and logprobs.tokens):
                    yield chunk(
                        [
                            CompletionChoice(
                                index=p.index,
                                text=p.text,
                                logprobs=logprobs,
                                finish_reason=p.finish_reason,
                            )
                        ]
                    )
        completion = sum(counts.values())
        state.metrics.generated_tokens.inc(completion)
        if include_usage:
            yield chunk(
                [],
                Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion,
                    total_tokens=prompt_tokens + completion,
                ),
            )
    except APIError as exc:
        yield sse(exc.body())
    except TimeoutError:
        yield sse(
            APIError(408, "the request took longer than the server's limit", code="timeout").body()
        )
    yield DONE
