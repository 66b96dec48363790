"""The OpenAI Responses API (stateless) over the same engine: the conversation is rendered
with the chat template and streamed as SSE events in that API's vocabulary. (Anthropic's
Messages API is in :mod:`._routes_messages`.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ._chat import render_chat
from ._engine_bridge import Slot
from ._errors import APIError, bad_request
from ._generation import GenParams, Piece, collect, make_jobs, run_jobs, stream_jobs
from ._routes_chat import ERRORS
from ._schemas_common import ResponseFormat
from ._schemas_responses import (
    IncompleteDetails,
    OutputMessage,
    OutputText,
    ResponsesRequest,
    ResponsesResponse,
    ResponsesUsage,
)
from ._sse import sse
from ._state import ServerState, new_id

router = APIRouter()


async def _start(
    state: ServerState,
    request: Request,
    slot: Slot,
    messages: list[dict[str, Any]],
    params: GenParams,
) -> tuple[list[int], AsyncIterator[Piece]]:
    prompt = render_chat(slot.tokenizer, messages, template_args=state.config.chat_template_args)
    state.check_prompt(slot, prompt)
    jobs = make_jobs(
        state.bridge, slot.name, prompt, params, 1, state.eos(slot), state.vocab_size(slot)
    )
    state.bridge.submit(jobs)
    state.metrics.prompt_tokens.inc(len(prompt))
    return prompt, stream_jobs(state.bridge, jobs, slot.tokenizer, params)


def _parts_text(content: Any) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


# --- /v1/responses ------------------------------------------------------------------------------


@router.post("/v1/responses", response_model=ResponsesResponse, responses=ERRORS)
async def responses(req: ResponsesRequest, request: Request) -> Any:
    state: ServerState = request.app.state.server
    slot = state.slot(req.model)
    if req.previous_response_id:
        raise bad_request(
            "this server is stateless: previous_response_id is not supported",
            param="previous_response_id",
        )
    if req.n != 1:
        raise bad_request("n must be 1 for /v1/responses", param="n")
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        for m in req.input:
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": _parts_text(m.content)})
    params = state.params(
        slot, req, max_tokens=state.max_tokens(req.max_output_tokens), logprobs=None
    )
    text_opts = req.text
    fmt = text_opts.format if text_opts else None
    if text_opts is not None and fmt is not None and fmt.type != "text":
        state.response_format(
            slot, ResponseFormat(type=fmt.type, json_schema=text_opts.as_json_schema()), params
        )
    prompt, pieces = await _start(state, request, slot, messages, params)
    rid, mid, created = new_id("resp"), new_id("msg"), int(time.time())

    def build(text: str, finish: str | None, used: int) -> ResponsesResponse:
        done = finish != "length"
        return ResponsesResponse(
            id=rid,
            created_at=created,
            status="completed" if done else "incomplete",
            model=req.model,
            output=[
                OutputMessage(
                    id=mid,
                    status="completed" if done else "incomplete",
                    content=[OutputText(text=text)],
                )
            ],
            usage=ResponsesUsage(
                input_tokens=len(prompt), output_tokens=used, total_tokens=len(prompt) + used
            ),
            incomplete_details=None if done else IncompleteDetails(reason="max_output_tokens"),
        )

    if not req.stream:
        (r,) = await run_jobs(request, collect(pieces, 1), timeout=state.config.request_timeout)
        return build(r.text, r.finish_reason, r.completion_tokens)

    async def events() -> AsyncIterator[bytes]:
        seq = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal seq
            seq += 1
            return sse({"type": kind, "sequence_number": seq, **fields}, event=kind)

        first = build("", None, 0).model_dump()
        first["status"], first["output"] = "in_progress", []
        yield event("response.created", response=first)
        item = {
            "type": "message",
            "id": mid,
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        yield event("response.output_item.added", output_index=0, item=item)
        yield event(
            "response.content_part.added",
            item_id=mid,
            output_index=0,
            content_index=0,
            part={"type": "output_text", "text": "", "annotations": []},
        )
        text, finish, used = "", None, 0
        try:
            async with asyncio.timeout(state.config.request_timeout):
                async for p in pieces:
                    text += p.text
                    finish, used = p.finish_reason or finish, p.completion_tokens
                    if p.text:
                        yield event(
                            "response.output_text.delta",
                            item_id=mid,
                            output_index=0,
                            content_index=0,
                            delta=p.text,
                        )
        except (APIError, TimeoutError) as exc:
            error = (
                exc
                if isinstance(exc, APIError)
                else APIError(408, "request timed out", code="timeout")
            )
            yield event("error", code=error.code, message=error.message, param=error.param)
            return
        final = build(text, finish, used)
        yield event(
            "response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text
        )
        yield event(
            "response.content_part.done",
            item_id=mid,
            output_index=0,
            content_index=0,
            part={"type": "output_text", "text": text, "annotations": []},
        )
        yield event("response.output_item.done", output_index=0, item=final.output[0].model_dump())
        kind = "response.completed" if final.status == "completed" else "response.incomplete"
        yield event(kind, response=final.model_dump())

    return StreamingResponse(events(), media_type="text/event-stream")
