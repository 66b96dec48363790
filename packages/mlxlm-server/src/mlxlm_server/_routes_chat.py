"""POST /v1/chat/completions: chat, tools, structured output, streamed or not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ._chat import message_dicts, render_chat
from ._engine_bridge import Slot
from ._errors import APIError
from ._generation import GenParams, Piece, TokenInfo, collect, make_jobs, run_jobs, stream_jobs
from ._schemas_chat import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    FunctionCallOut,
    FunctionDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
)
from ._schemas_common import ErrorResponse, Usage
from ._sse import DONE, sse
from ._state import ServerState, new_id
from ._tools import CallStreamer, ParsedCall, StreamEvent, ToolParser

router = APIRouter()

# The engine's finish reasons plus "tool_calls" (a reply the tool parser turned into calls).
ChatFinish = Literal["stop", "length", "tool_calls"]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 429, 503)
}


def logprob_entries(tokens: list[TokenInfo], slot: Slot) -> list[TokenLogprob]:
    from ._vocab import token_bytes

    table = token_bytes(slot.tokenizer)
    out = []
    for t in tokens:
        top = [
            TopLogprob(
                token=table[i].decode("utf-8", "replace") if i < len(table) else "",
                logprob=v,
                bytes=list(table[i]) if i < len(table) else [],
            )
            for i, v in (t.top or [])
        ]
        out.append(
            TokenLogprob(
                token=t.text, logprob=t.logprob or 0.0, bytes=list(t.bytes), top_logprobs=top
            )
        )
    return out


def tool_calls_out(calls: list[ParsedCall]) -> list[ToolCall]:
    return [
        ToolCall(id=new_id("call"), function=FunctionCallOut(name=c.name, arguments=c.arguments))
        for c in calls
    ]


def _plan_tools(
    state: ServerState, slot: Slot, req: ChatCompletionRequest, params: GenParams
) -> tuple[list[dict[str, Any]] | None, ToolParser | None]:
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice or ("auto" if tools else "none")
    named = None if isinstance(choice, str) else choice.function.name
    structured = req.response_format is not None and req.response_format.type != "text"
    return state.plan_tools(
        slot,
        params,
        tools,
        choice if isinstance(choice, str) else "named",
        named=named,
        parallel=req.parallel_tool_calls,
        structured=structured,
    )


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
    state: ServerState = request.app.state.server
    started = time.monotonic()
    slot = state.slot(req.model)
    state.check_n(req.n)
    max_tokens = state.max_tokens(req.max_completion_tokens, req.max_tokens)
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = state.params(slot, req, max_tokens=max_tokens, logprobs=k)
    state.response_format(slot, req.response_format, params)
    tools, parser = _plan_tools(state, slot, req, params)
    template_args = {**state.config.chat_template_args, **(req.chat_template_kwargs or {})}
    prompt = render_chat(
        slot.tokenizer, message_dicts(req.messages), tools=tools, template_args=template_args
    )
    state.check_prompt(slot, prompt)
    jobs = make_jobs(
        state.bridge, slot.name, prompt, params, req.n, state.eos(slot), state.vocab_size(slot)
    )
    state.bridge.submit(jobs)
    state.metrics.prompt_tokens.inc(len(prompt))
    rid, created = new_id("chatcmpl"), int(time.time())
    pieces = stream_jobs(state.bridge, jobs, slot.tokenizer, params)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = _stream(
            state, slot, req, rid, created, pieces, parser, len(prompt), include_usage, started
        )
        return StreamingResponse(body, media_type="text/event-stream")
    results = await run_jobs(request, collect(pieces, req.n), timeout=state.config.request_timeout)
    choices, completion, cached = [], 0, 0
    for r in results:
        completion += r.completion_tokens
        cached = max(cached, r.cached_tokens)
        message = AssistantMessage(content=r.text)
        finish = r.finish_reason
        parsed = parser.parse(r.text) if parser is not None else None
        if parsed is not None:
            content, calls = parsed
            message = AssistantMessage(content=content, tool_calls=tool_calls_out(calls))
            finish = "tool_calls" if finish == "stop" else finish
        logprobs = (
            ChoiceLogprobs(content=logprob_entries(r.tokens, slot)) if k is not None else None
        )
        choices.append(
            Choice(index=r.index, message=message, logprobs=logprobs, finish_reason=finish)
        )
    state.metrics.generated_tokens.inc(completion)
    usage = Usage(
        prompt_tokens=len(prompt),
        completion_tokens=completion,
        total_tokens=len(prompt) + completion,
    )
    usage.prompt_tokens_details = {"cached_tokens": cached}  # type: ignore[attr-defined]
    return ChatCompletion(id=rid, created=created, model=req.model, choices=choices, usage=usage)


async def _stream(
    state: ServerState,
    slot: Slot,
    req: ChatCompletionRequest,
    rid: str,
    created: int,
    pieces: AsyncIterator[Piece],
    parser: ToolParser | None,
    prompt_tokens: int,
    include_usage: bool,
    started: float,
) -> AsyncIterator[bytes]:
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        return sse(
            ChatCompletionChunk(
                id=rid, created=created, model=req.model, choices=choices, usage=usage
            )
        )

    k = (req.top_logprobs or 0) if req.logprobs else None
    streamers = {i: CallStreamer(parser) for i in range(req.n)} if parser is not None else {}
    counts = dict.fromkeys(range(req.n), 0)
    try:
        for i in range(req.n):
            yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        async with asyncio.timeout(
            max(0.0, state.config.request_timeout - (time.monotonic() - started))
        ):
            async for p in pieces:
                counts[p.index] = p.completion_tokens
                logprobs = (
                    ChoiceLogprobs(content=logprob_entries(p.tokens, slot))
                    if k is not None
                    else None
                )
                finish: ChatFinish | None = p.finish_reason
                streamer = streamers.get(p.index)
                if streamer is None:
                    events = [StreamEvent("content", p.text)] if p.text else []
                else:
                    events = streamer.feed(p.text)
                    if finish is not None:
                        events += streamer.finish()
                        if streamer.calls and finish == "stop":
                            finish = "tool_calls"
                for delta in _deltas(events):
                    # Log-probabilities ride on the first chunk of the piece they belong to.
                    yield chunk([ChunkChoice(index=p.index, delta=delta, logprobs=logprobs)])
                    logprobs = None
                if logprobs is not None and logprobs.content:
                    yield chunk(
                        [ChunkChoice(index=p.index, delta=Delta(content=""), logprobs=logprobs)]
                    )
                if finish is not None:
                    done = ChunkChoice(index=p.index, delta=Delta(), finish_reason=finish)
                    yield chunk([done])
        completion = sum(counts.values())
        state.metrics.generated_tokens.inc(completion)
        if include_usage:
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                total_tokens=prompt_tokens + completion,
            )
            yield chunk([], usage)
    except APIError as exc:
        yield sse(exc.body())
    except TimeoutError:
        yield sse(
            APIError(408, "the request took longer than the server's limit", code="timeout").body()
        )
    yield DONE


def _deltas(events: list[StreamEvent]) -> list[Delta]:
    """OpenAI deltas: a call opens with its id, type and name (arguments ""), then its
    arguments arrive in fragments; consecutive content is sent as one."""
    out: list[Delta] = []
    for e in events:
        if e.kind == "content":
            if out and out[-1].tool_calls is None and out[-1].content is not None:
                out[-1].content += e.text
            else:
                out.append(Delta(content=e.text))
        elif e.kind == "call":
            function = FunctionDelta(name=e.name, arguments="")
            call = ToolCallDelta(
                index=e.index, id=new_id("call"), type="function", function=function
            )
            out.append(Delta(tool_calls=[call]))
        else:
            call = ToolCallDelta(index=e.index, function=FunctionDelta(arguments=e.text))
            out.append(Delta(tool_calls=[call]))
    return out
