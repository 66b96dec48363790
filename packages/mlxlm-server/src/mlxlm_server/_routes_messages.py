"""POST /v1/messages: Anthropic's Messages API over the same engine, with client tools.

Tools run on the OpenAI machinery: ``tools`` become function tools for the chat template,
``tool_choice`` maps ``auto``/``any``/``tool``/``none`` to ``auto``/``required``/named/
``none`` (a required or named call is forced by constrained decoding), the reply is read
by the model's tool-call parser, and calls come back as ``tool_use`` blocks with
``stop_reason: "tool_use"``. Earlier ``tool_use`` blocks and the user's ``tool_result``
blocks become the assistant tool calls and ``tool`` messages the template knows. Streamed,
a call is a ``tool_use`` content block whose ``input_json_delta`` fragments concatenate to
the JSON of the non-streamed ``input`` (both are the model's own text).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ._chat import render_chat
from ._errors import APIError, bad_request
from ._generation import GenParams, collect, make_jobs, run_jobs, stream_jobs
from ._routes_chat import ERRORS
from ._schemas_anthropic import (
    MessagesRequest,
    MessagesResponse,
    MessagesUsage,
    TextBlock,
    TextOut,
    ToolUseOut,
)
from ._sse import sse
from ._state import ServerState, new_id
from ._tools import CallStreamer, StreamEvent

router = APIRouter()

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
_STOP_REASONS: dict[str, StopReason] = {"stop": "end_turn", "length": "max_tokens"}
_CHOICES = {"auto": "auto", "any": "required", "tool": "named", "none": "none"}


def _text(content: str | list[TextBlock] | Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.text for b in content if b.type == "text")


def _tool_use_id() -> str:
    return "toolu_" + uuid.uuid4().hex[:24]


def chat_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    """The conversation as the chat-template messages the OpenAI routes build."""
    chat = [{"role": "system", "content": _text(req.system)}] if req.system else []
    for m in req.messages:
        if isinstance(m.content, str):
            chat.append({"role": m.role, "content": m.content})
            continue
        kinds = {b.type for b in m.content}
        if m.role == "assistant":
            if "tool_result" in kinds:
                raise bad_request("tool_result blocks belong in user turns", param="messages")
            item: dict[str, Any] = {"role": "assistant", "content": _text(m.content)}
            calls = [
                {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
                for b in m.content
                if b.type == "tool_use"
            ]
            if calls:
                item["tool_calls"] = calls
            chat.append(item)
            continue
        if "tool_use" in kinds:
            raise bad_request("tool_use blocks belong in assistant turns", param="messages")
        # Results answer the previous assistant turn's calls, so they come first.
        for b in m.content:
            if b.type == "tool_result":
                chat.append(
                    {"role": "tool", "tool_call_id": b.tool_use_id, "content": _text(b.content)}
                )
        if "text" in kinds or not m.content:
            chat.append({"role": "user", "content": _text(m.content)})
    return chat


def _reason(finish: str | None, matched: str | None, called: bool) -> StopReason:
    if matched is not None:
        return "stop_sequence"
    if called and finish == "stop":
        return "tool_use"
    return _STOP_REASONS.get(finish or "stop", "end_turn")


@router.post("/v1/messages", response_model=MessagesResponse, responses=ERRORS)
async def messages(req: MessagesRequest, request: Request) -> Any:
    state: ServerState = request.app.state.server
    slot = state.slot(req.model)
    params = GenParams(
        max_tokens=state.max_tokens(req.max_tokens),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=[s for s in req.stop_sequences or [] if s],
    )
    tools = None
    if req.tools:
        tools = [
            {
                "type": "function",
                "function": {
                    k: v
                    for k, v in (
                        ("name", t.name),
                        ("description", t.description),
                        ("parameters", t.input_schema),
                    )
                    if v is not None
                },
            }
            for t in req.tools
        ]
    choice = req.tool_choice
    kind = _CHOICES[choice.type] if choice is not None else ("auto" if tools else "none")
    if kind == "named" and not (choice and choice.name):
        raise bad_request("tool_choice of type 'tool' needs a name", param="tool_choice")
    tools, parser = state.plan_tools(
        slot,
        params,
        tools,
        kind,
        named=choice.name if choice is not None else None,
        parallel=not (choice is not None and choice.disable_parallel_tool_use),
    )
    template_args = state.config.chat_template_args
    prompt = render_chat(
        slot.tokenizer, chat_messages(req), tools=tools, template_args=template_args
    )
    state.check_prompt(slot, prompt)
    jobs = make_jobs(
        state.bridge, slot.name, prompt, params, 1, state.eos(slot), state.vocab_size(slot)
    )
    state.bridge.submit(jobs)
    state.metrics.prompt_tokens.inc(len(prompt))
    pieces = stream_jobs(state.bridge, jobs, slot.tokenizer, params)
    mid = new_id("msg")

    if not req.stream:
        (r,) = await run_jobs(request, collect(pieces, 1), timeout=state.config.request_timeout)
        parsed = parser.parse(r.text) if parser is not None else None
        content: list[TextOut | ToolUseOut] = [TextOut(text=r.text)]
        if parsed is not None:
            text, calls = parsed
            content = [TextOut(text=text)] if text else []
            content += [
                ToolUseOut(id=_tool_use_id(), name=c.name, input=json.loads(c.arguments))
                for c in calls
            ]
        state.metrics.generated_tokens.inc(r.completion_tokens)
        return MessagesResponse(
            id=mid,
            content=content,
            model=req.model,
            stop_reason=_reason(r.finish_reason, r.stop_string, parsed is not None),
            stop_sequence=r.stop_string,
            usage=MessagesUsage(input_tokens=len(prompt), output_tokens=r.completion_tokens),
        )

    async def events() -> AsyncIterator[bytes]:
        start: dict[str, Any] = {
            "id": mid, "type": "message", "role": "assistant", "content": [], "model": req.model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": len(prompt), "output_tokens": 0},
        }  # fmt: skip
        yield sse({"type": "message_start", "message": start}, event="message_start")
        blocks = _Blocks()
        if parser is None:  # plain text: one text block, opened at once
            yield blocks.open({"type": "text", "text": ""})
        streamer = CallStreamer(parser) if parser is not None else None
        finish, used, matched = None, 0, None
        try:
            async with asyncio.timeout(state.config.request_timeout):
                async for p in pieces:
                    finish, used = p.finish_reason or finish, p.completion_tokens
                    matched = p.stop_string or matched
                    if streamer is None:
                        found = [StreamEvent("content", p.text)] if p.text else []
                    else:
                        found = streamer.feed(p.text)
                        if p.finish_reason is not None:
                            found += streamer.finish()
                    for event in found:
                        for out in blocks.send(event):
                            yield out
        except (APIError, TimeoutError) as exc:
            error = (
                exc
                if isinstance(exc, APIError)
                else APIError(408, "request timed out", code="timeout")
            )
            body = {"type": "error", "error": {"type": error.type, "message": error.message}}
            yield sse(body, event="error")
            return
        if blocks.index < 0:  # nothing at all was generated: an empty text block
            yield blocks.open({"type": "text", "text": ""})
        yield blocks.close()
        called = streamer is not None and streamer.calls > 0
        state.metrics.generated_tokens.inc(used)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": _reason(finish, matched, called), "stop_sequence": matched},
            "usage": {"output_tokens": used},
        }
        yield sse(delta, event="message_delta")
        yield sse({"type": "message_stop"}, event="message_stop")

    return StreamingResponse(events(), media_type="text/event-stream")


class _Blocks:
    """Content blocks of a streamed message: one open at a time, indexed in order."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None  # the open block's type, None when none is open

    def open(self, block: dict[str, Any]) -> bytes:
        self.index += 1
        self.kind = block["type"]
        body = {"type": "content_block_start", "index": self.index, "content_block": block}
        return sse(body, event="content_block_start")

    def close(self) -> bytes:
        if self.kind is None:
            return b""
        self.kind = None
        return sse({"type": "content_block_stop", "index": self.index}, event="content_block_stop")

    def delta(self, delta: dict[str, Any]) -> bytes:
        body = {"type": "content_block_delta", "index": self.index, "delta": delta}
        return sse(body, event="content_block_delta")

    def send(self, event: StreamEvent) -> list[bytes]:
        out = []
        if event.kind == "content":
            if self.kind != "text":
                out += [self.close(), self.open({"type": "text", "text": ""})]
            out.append(self.delta({"type": "text_delta", "text": event.text}))
        elif event.kind == "call":
            block = {"type": "tool_use", "id": _tool_use_id(), "name": event.name, "input": {}}
            out += [self.close(), self.open(block)]
        else:
            out.append(self.delta({"type": "input_json_delta", "partial_json": event.text}))
        return [b for b in out if b]
