"""From a validated request to generated text: samplers, jobs, stop strings, logprobs.

Every generation endpoint builds :class:`GenParams`, turns each wanted sequence into an
engine :class:`Job` (``n`` choices are ``n`` jobs, each with its own sampler so seeded
choices do not depend on what else is in the batch), and reads :class:`Piece` s back:
text that can no longer change (held back while it could still become a stop string),
the tokens behind it with their log-probabilities, and the finish reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from mlxlm_core import MlxlmError
from mlxlm_core.sampling import make_logits_processors, make_sampler

from ._engine_bridge import EngineBridge, Failed, FinishReason, Job
from ._errors import APIError, bad_request
from ._vocab import token_bytes

__all__ = ["GenParams", "Piece", "TokenInfo", "collect", "run_jobs", "stream_jobs"]

MAX_STOP_STRINGS = 16


@dataclass
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    # Builds a fresh constrained-decoding processor per sequence (it is stateful).
    constraint: Callable[[], Callable[..., Any]] | None = None


def parse_stop(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    return [s for s in items if s]


def parse_logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float] | None:
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(
                f"logit_bias key {key!r} is not a token id", param="logit_bias"
            ) from None
        if not 0 <= token < vocab:
            raise bad_request(
                f"logit_bias token {token} is outside the vocabulary", param="logit_bias"
            )
        if not -100.0 <= value <= 100.0:
            raise bad_request("logit_bias values must be in [-100, 100]", param="logit_bias")
        out[token] = float(value)
    return out


def make_jobs(
    bridge: EngineBridge,
    slot: str,
    prompt: list[int],
    params: GenParams,
    n: int,
    eos: Sequence[int],
    vocab: int,
) -> list[Job]:
    loop = asyncio.get_running_loop()
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
    if bad:
        raise bad_request(
            f"stop_token_ids {bad[:3]} are outside the vocabulary", param="stop_token_ids"
        )
    stops = frozenset([*eos, *params.stop_token_ids])
    jobs = []
    for i in range(n):
        try:
            sampler = None
            if params.temperature > 0:
                sampler = make_sampler(
                    temp=params.temperature,
                    top_p=params.top_p,
                    min_p=params.min_p,
                    top_k=params.top_k,
                    seed=None if params.seed is None else (params.seed + i) % (2**63),
                )
            processors = make_logits_processors(
                logit_bias=params.logit_bias,
                repetition_penalty=params.repetition_penalty,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
            )
        except MlxlmError as exc:
            raise bad_request(str(exc)) from None
        if params.constraint is not None:
            processors.append(params.constraint())
        jobs.append(
            Job(
                slot=slot,
                prompt=list(prompt),
                max_tokens=params.max_tokens,
                loop=loop,
                sampler=sampler,
                processors=processors or None,
                stop_tokens=stops,
                logprobs=params.logprobs,
            )
        )
    return jobs


@dataclass
class TokenInfo:
    id: int
    text: str
    bytes: bytes
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class Piece:
    index: int  # which choice
    text: str
    tokens: list[TokenInfo]
    finish_reason: FinishReason | None
    completion_tokens: int
    cached_tokens: int = 0
    stop_string: str | None = None  # the stop string that ended it, if one did


async def _pieces(
    bridge: EngineBridge, job: Job, index: int, tokenizer: Any, params: GenParams
) -> AsyncIterator[Piece]:
    """Read one job's events and turn them into safe-to-send text pieces."""
    table = token_bytes(tokenizer)
    detok = tokenizer.make_detokenizer()
    stops = params.stop
    hold = max((len(s) for s in stops), default=1) - 1
    full, emitted, count = "", 0, 0
    pending: list[tuple[TokenInfo, int, int]] = []  # token, text start, text end
    try:
        if job.max_tokens == 0:
            yield Piece(index, "", [], "length", 0)
            return
        while True:
            event = await job.events.get()
            if isinstance(event, Failed):
                raise event.error
            count += 1
            finish = event.finish_reason
            ends_on_stop_token = finish == "stop" and event.token in (job.stop_tokens or ())
            start = len(full)
            if not ends_on_stop_token:
                detok.add_token(event.token)
            if finish is not None:
                detok.finalize()
            full += detok.last_segment
            if not ends_on_stop_token:
                raw = table[event.token] if event.token < len(table) else b""
                info = TokenInfo(
                    event.token, raw.decode("utf-8", "replace"), raw, event.logprob, event.top
                )
                pending.append((info, start, len(full)))
            cut, matched = None, None
            if stops:
                lo = max(0, emitted - hold)
                found = [(i, s) for i, s in ((full.find(s, lo), s) for s in stops) if i >= 0]
                if found:
                    cut, matched = min(found)
                    full = full[:cut]
                    finish = "stop"
                    bridge.cancel(job)
            safe = len(full) if finish is not None else max(emitted, len(full) - hold)
            text, emitted = full[emitted:safe], safe
            if finish is not None:
                ready = [p for p in pending if cut is None or p[1] < cut or p[1] == p[2] == cut]
                pending = []
            else:
                ready = [p for p in pending if p[2] <= safe]
                pending = pending[len(ready) :]
            yield Piece(
                index, text, [p[0] for p in ready], finish, count, job.cached_tokens, matched
            )
            if finish is not None:
                return
    finally:
        if not job.finished:
            bridge.cancel(job)
        bridge.release(job)


async def stream_jobs(
    bridge: EngineBridge,
    jobs: Sequence[Job],
    tokenizer: Any,
    params: GenParams,
    *,
    first_index: int = 0,
) -> AsyncIterator[Piece]:
    """Pieces of several jobs interleaved as they come (jobs must already be submitted)."""
    if len(jobs) == 1:
        async for piece in _pieces(bridge, jobs[0], first_index, tokenizer, params):
            yield piece
        return
    merged: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def pump(job: Job, index: int) -> None:
        try:
            async for piece in _pieces(bridge, job, index, tokenizer, params):
                await merged.put(piece)
        except BaseException as exc:
            await merged.put(exc)
        finally:
            await merged.put(None)

    tasks = [asyncio.create_task(pump(j, first_index + i)) for i, j in enumerate(jobs)]
    try:
        live = len(tasks)
        while live:
            item = await merged.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for job in jobs:
            if not job.finished:
                bridge.cancel(job)


@dataclass
class Result:
    index: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    stop_string: str | None = None


async def collect(pieces: AsyncIterator[Piece], count: int, first_index: int = 0) -> list[Result]:
    results = [Result(first_index + i) for i in range(count)]
    async for piece in pieces:
        r = results[piece.index - first_index]
        r.text += piece.text
        r.tokens.extend(piece.tokens)
        r.completion_tokens = piece.completion_tokens
        r.cached_tokens = piece.cached_tokens
        if piece.finish_reason is not None:
            r.finish_reason = piece.finish_reason
            r.stop_string = piece.stop_string
    return results


async def until_disconnected(request: Request) -> None:
    """Return when the client hangs up (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_jobs(request: Request, coro: Any, *, timeout: float) -> Any:
    """Await ``coro`` unless the client disconnects (then cancel it) or time runs out."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {work, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if work in done:
            return work.result()
        if watch in done:
            raise APIError(499, "client disconnected", code="client_closed")
        raise APIError(
            408, f"the request took longer than the server's {timeout:g} s limit", code="timeout"
        )
    finally:
        for task in (work, watch):
            if not task.done():
                task.cancel()
