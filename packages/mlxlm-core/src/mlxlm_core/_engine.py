"""The decode loop: one batched engine that every generation path runs on.

``Sampling`` turns a step's logits into tokens (per-row logits processors and samplers,
token histories for penalties). ``prefill`` feeds prompt tokens through the cache in chunks.
``BatchGenerator`` is continuous batching: prompts join a running batch between steps and
finished rows leave it; single-sequence generation (:mod:`._generate`) drives the same
``prefill``/``decode_step`` functions with a batch of one.

Host synchronisation happens once per step (reading the sampled tokens), after the next step
has already been queued with ``mx.async_eval`` so the device never waits for Python.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ._errors import ContextLengthError, InvalidArgumentError
from ._mx_typed import int_list
from ._policy import prefill_step_for
from .cache import KVCache, make_prompt_cache, merge_caches

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
ProgressCallback = Callable[[int, int], None]

__all__ = ["BatchGenerator", "BatchResponse", "Sampling", "decode_step", "prefill"]


_streams = threading.local()  # per thread: device name -> stream


def generation_stream() -> mx.Stream:
    """The stream generation work is queued on, one per device, made on first use.

    Measured on an H200 (tools/bench_cuda.py, Llama-3.2-1B shape, bf16, batch 1): decoding
    on the default stream ran 363 tokens/s, on a dedicated stream 428 (MLX-LM: 429), since
    the host's reads of finished tokens no longer wait behind the queued next step.

    MLX streams belong to the thread that made them, so there is one per thread too (a
    server's engine thread, and its replacement after a restart, get their own).
    """
    device = mx.default_device()
    mine: dict[str, mx.Stream] = _streams.__dict__.setdefault("by_device", {})
    key = str(device)
    if key not in mine:
        mine[key] = mx.new_stream(device)
    return mine[key]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


@dataclass
class _Row:
    sampler: Sampler
    processors: Sequence[LogitsProcessor]
    history: mx.array | None  # prompt + generated tokens, kept only when processors need it


class Sampling:
    """Per-row samplers and logits processors for a batch."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []

    def add(
        self,
        prompt: mx.array,
        sampler: Sampler | None,
        processors: Sequence[LogitsProcessor] | None,
    ) -> None:
        processors = list(processors or [])
        history = prompt if processors else None
        self.rows.append(_Row(sampler or greedy, processors, history))

    def keep(self, rows: Sequence[int]) -> None:
        self.rows = [self.rows[i] for i in rows]

    def __call__(self, logits: mx.array, fed: mx.array | None) -> tuple[mx.array, mx.array]:
        """Tokens (B,) and log-probabilities (B, V) for the last position's ``logits``.

        ``fed`` are the tokens just given to the model (appended to histories first).
        """
        if any(r.processors for r in self.rows):
            out = []
            for i, row in enumerate(self.rows):
                row_logits = logits[i : i + 1]
                if row.processors:
                    assert row.history is not None
                    if fed is not None:
                        row.history = mx.concatenate([row.history, fed[i : i + 1]])
                    for proc in row.processors:
                        row_logits = proc(row.history[None], row_logits)
                out.append(row_logits)
            logits = mx.concatenate(out, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        first = self.rows[0].sampler
        if all(r.sampler is first for r in self.rows):
            if first is greedy:
                # The largest logit is the largest log-probability: the normalisation (an
                # exp over the whole vocabulary per row) stays lazy, done only if read.
                return mx.argmax(logits, axis=-1), logprobs
            return first(logprobs), logprobs
        tokens = [row.sampler(logprobs[i : i + 1]) for i, row in enumerate(self.rows)]
        return mx.concatenate(tokens), logprobs


def prefill(
    model: nn.Module,
    tokens: mx.array,
    cache: Sequence[KVCache],
    *,
    step_size: int | None = None,
    progress: ProgressCallback | None = None,
    done_before: int = 0,
    total: int | None = None,
) -> None:
    """Run ``tokens`` (B, L) through the model to fill ``cache``; logits are discarded.

    ``step_size`` tokens per chunk; None takes the model's execution policy's choice.
    """
    step_size = step_size or prefill_step_for(model)
    length = tokens.shape[1]
    total = total if total is not None else length
    for start in range(0, length, step_size):
        chunk = tokens[:, start : start + step_size]
        model(chunk, cache=cache)
        # A pipeline stage also owes its send to the next rank (see distributed.pipeline).
        pending = model.pending_outputs() if hasattr(model, "pending_outputs") else []
        mx.eval([c.state for c in cache], *pending)
        if progress is not None:
            progress(done_before + start + chunk.shape[1], total)


def decode_step(
    model: nn.Module,
    inputs: mx.array,
    cache: Sequence[KVCache],
    sampling: Sampling,
) -> tuple[mx.array, mx.array]:
    """Feed ``inputs`` (B, L) and sample the next token of every row from the last position."""
    logits = model(inputs, cache=cache)[:, -1, :]
    return sampling(logits, inputs[:, -1])


def check_context(model: nn.Module, n_tokens: int, *, bounded: bool) -> None:
    """Refuse prompts longer than the model's context unless the cache is bounded."""
    limit = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    if limit and not bounded and n_tokens > limit:
        raise ContextLengthError(
            f"prompt has {n_tokens} tokens, more than the model's context of {limit}"
        )


@dataclass
class BatchResponse:
    uid: int
    token: int
    logprobs: mx.array
    finish_reason: str | None  # "stop" (a stop token), "length" (max tokens) or None
    # With ``BatchGenerator(return_caches=True)``: on a finished row, its own cache (one
    # batch-1 cache per layer) holding the prompt and every generated token, this one
    # included, so a server can reuse it for the next request sharing that prefix.
    cache: list[KVCache] | None = None


@dataclass
class _Request:
    uid: int
    prompt: list[int]
    max_tokens: int
    sampler: Sampler | None
    processors: Sequence[LogitsProcessor] | None
    stop_tokens: frozenset[int]
    cache: list[KVCache] | None = None  # a batch-1 cache already holding a prompt prefix
    generated: int = 0


@dataclass
class _Prefill:
    """Admitted requests whose prompts are being fed: fresh prompts together (left-padded),
    or one prompt continuing its prefix cache. ``tokens`` is what is left to feed; its last
    column is the first decode step's input."""

    requests: list[_Request]
    tokens: mx.array
    cache: list[KVCache]
    sampling: Sampling
    fed: int = 0  # prompt tokens fed so far (chunk boundaries count from the start)


@dataclass
class BatchGenerator:
    """Continuous batching over one model.

    ``insert`` queues prompts; each ``next()`` admits waiting prompts (prefilled together,
    then merged into the running batch) and advances every active row by one token.

    While rows are decoding, admitted prompts are fed one chunk (``prefill_step_size``
    tokens) per ``next()``, so a long prompt delays the running rows by a chunk per token
    instead of stalling them for its whole prefill; with nothing decoding it is fed at once.
    Chunk boundaries are the same either way, and so are the results.
    """

    model: nn.Module
    stop_tokens: frozenset[int] = frozenset()
    max_tokens: int = 256
    completion_batch_size: int = 32
    prefill_batch_size: int = 8
    prefill_step_size: int | None = None  # None: the execution policy's
    max_kv_size: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = 64
    return_caches: bool = False
    _waiting: list[_Request] = field(default_factory=list)
    _prefilling: list[_Prefill] = field(default_factory=list)
    _cancelled: set[int] = field(default_factory=set)  # uids removed mid-prefill
    _active: list[_Request] = field(default_factory=list)
    _cache: list[KVCache] | None = None
    _sampling: Sampling = field(default_factory=Sampling)
    _current: tuple[mx.array, mx.array] | None = None
    _next_uid: int = 0

    def insert(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int | Sequence[int] | None = None,
        samplers: Sequence[Sampler | None] | None = None,
        logits_processors: Sequence[Sequence[LogitsProcessor] | None] | None = None,
        stop_tokens: Sequence[Sequence[int] | None] | None = None,
        caches: Sequence[list[KVCache] | None] | None = None,
    ) -> list[int]:
        """Queue prompts (token ids); returns their uids in order.

        ``caches[i]``, if given, is a batch-1 prompt cache (one per layer) that already holds
        the first ``n`` tokens of ``prompts[i]`` (``n = cache[0].offset``, fewer than the
        prompt's length): only the rest is prefilled. The engine takes ownership of it.
        """
        count = len(prompts)
        limits = max_tokens if isinstance(max_tokens, Sequence) else [max_tokens] * count
        samplers = samplers or [None] * count
        processors = logits_processors or [None] * count
        stops = stop_tokens or [None] * count
        given = caches or [None] * count
        uids = []
        for prompt, limit, sampler, procs, stop, cache in zip(
            prompts, limits, samplers, processors, stops, given
        ):
            if not prompt:
                raise InvalidArgumentError("empty prompt: give at least one token")
            limit = self.max_tokens if limit is None else limit
            if limit < 0:
                raise InvalidArgumentError(f"max_tokens must be >= 0, got {limit}")
            check_context(self.model, len(prompt), bounded=self.max_kv_size is not None)
            if cache is not None and not 0 < cache[0].offset < len(prompt):
                raise InvalidArgumentError(
                    f"a prefix cache must hold 1 to {len(prompt) - 1} tokens of its prompt, "
                    f"got {cache[0].offset}"
                )
            stop_set = self.stop_tokens if stop is None else frozenset(stop)
            req = _Request(self._next_uid, list(prompt), limit, sampler, procs, stop_set, cache)
            self._next_uid += 1
            uids.append(req.uid)
            if limit > 0:  # a request for zero tokens is complete as soon as it is made
                self._waiting.append(req)
        return uids

    def remove(self, uids: Sequence[int]) -> None:
        """Drop requests (waiting, being prefilled or running), e.g. when a client leaves."""
        gone = set(uids)
        self._waiting = [r for r in self._waiting if r.uid not in gone]
        # A prefill of only removed rows stops; other removed rows leave once it merges.
        self._prefilling = [
            job for job in self._prefilling if any(r.uid not in gone for r in job.requests)
        ]
        self._cancelled |= {r.uid for j in self._prefilling for r in j.requests} & gone
        keep = [i for i, r in enumerate(self._active) if r.uid not in gone]
        if len(keep) != len(self._active):
            self._keep_rows(keep)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._active)

    def _keep_rows(self, rows: list[int]) -> None:
        self._active = [self._active[i] for i in rows]
        self._sampling.keep(rows)
        if not rows:
            self._cache, self._current = None, None
            return
        assert self._cache is not None and self._current is not None
        for c in self._cache:
            c.filter(rows)
        idx = mx.array(rows)
        self._current = (self._current[0][idx], self._current[1][idx])

    def _admit(self) -> None:
        """Start prefilling the next batch of waiting prompts and feed what is admitted."""
        step = self.prefill_step_size or prefill_step_for(self.model)
        if not self._prefilling and self._waiting:
            room = self.completion_batch_size - len(self._active)
            count = max(0, min(room, self.prefill_batch_size))
            batch, self._waiting = self._waiting[:count], self._waiting[count:]
            # Fresh prompts are fed together, left-padded; a prompt with a prefix cache
            # continues it alone (their caches differ in length).
            fresh = [r for r in batch if r.cache is None]
            self._prefilling = [self._fresh(fresh)] if fresh else []
            self._prefilling += [self._cached(r) for r in batch if r.cache is not None]
        budget = step if self._active else None  # tokens to feed in this step
        while self._prefilling and (budget is None or budget > 0):
            job = self._prefilling[0]
            while job.tokens.shape[1] > 1 and (budget is None or budget > 0):
                n = min(step - job.fed % step, job.tokens.shape[1] - 1)
                prefill(self.model, job.tokens[:, :n], job.cache, step_size=step)
                job.tokens, job.fed = job.tokens[:, n:], job.fed + n
                budget = None if budget is None else budget - n
            if job.tokens.shape[1] > 1:
                return  # the rest in later steps
            self._prefilling.pop(0)
            self._merge(job, decode_step(self.model, job.tokens, job.cache, job.sampling))

    def _fresh(self, batch: list[_Request]) -> _Prefill:
        lengths = [len(r.prompt) for r in batch]
        longest = max(lengths)
        pads = [longest - n for n in lengths]
        tokens = mx.array([[0] * p + r.prompt for p, r in zip(pads, batch)])
        cache = make_prompt_cache(
            self.model,
            max_kv_size=self.max_kv_size,
            kv_bits=self.kv_bits,
            kv_group_size=self.kv_group_size,
            batch_size=len(batch),
            left_padding=pads,
        )
        sampling = Sampling()
        for r in batch:
            sampling.add(mx.array(r.prompt[:-1]), r.sampler, r.processors)
        return _Prefill(batch, tokens, cache, sampling)

    def _cached(self, req: _Request) -> _Prefill:
        cache, req.cache = req.cache, None
        assert cache is not None
        sampling = Sampling()
        sampling.add(mx.array(req.prompt[:-1]), req.sampler, req.processors)
        return _Prefill([req], mx.array([req.prompt[cache[0].offset :]]), cache, sampling)

    def _merge(self, job: _Prefill, first: tuple[mx.array, mx.array]) -> None:
        """Rows whose prompts are fed join the running batch."""
        if self._cache is None:
            self._cache, self._current, self._sampling = job.cache, first, job.sampling
        else:
            assert self._current is not None
            self._cache = merge_caches([self._cache, job.cache])
            self._current = (
                mx.concatenate([self._current[0], first[0]]),
                mx.concatenate([self._current[1], first[1]]),
            )
            self._sampling.rows.extend(job.sampling.rows)
        self._active.extend(job.requests)
        gone = self._cancelled & {r.uid for r in job.requests}
        if gone:
            self._cancelled -= gone
            self._keep_rows([i for i, r in enumerate(self._active) if r.uid not in gone])

    def _row_cache(self, row: int) -> list[KVCache]:
        """A batch-1 copy of one row's cache, its padding dropped."""
        assert self._cache is not None
        out = []
        for c in self._cache:
            copy = type(c).from_state(c.state, c.meta_state)
            copy.filter([row])
            out.append(copy)
        return out

    def next(self) -> list[BatchResponse]:
        """Advance every active request by one token."""
        with mx.stream(generation_stream()):
            if self._prefilling or (
                self._waiting and len(self._active) < self.completion_batch_size
            ):
                self._admit()
            if not self._active:
                return []
            assert self._cache is not None and self._current is not None
            tokens, logprobs = self._current
            # Queue the following step before reading this one, so the device stays busy.
            upcoming = decode_step(self.model, tokens[:, None], self._cache, self._sampling)
            mx.async_eval(upcoming[0])  # log-probabilities are computed if read
        responses, keep = [], []
        for i, (req, token) in enumerate(zip(self._active, int_list(tokens))):
            req.generated += 1
            reason = None
            if token in req.stop_tokens:
                reason = "stop"
            elif req.generated >= req.max_tokens:
                reason = "length"
            else:
                keep.append(i)
            row_cache = self._row_cache(i) if reason and self.return_caches else None
            responses.append(BatchResponse(req.uid, token, logprobs[i], reason, row_cache))
        self._current = upcoming
        if len(keep) != len(self._active):
            self._keep_rows(keep)
        return responses
