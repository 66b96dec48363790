"""The bridge between asyncio request handlers and the one thread that owns the model.

The engine thread runs mlxlm-core's continuous-batching ``BatchGenerator`` (one per model
slot: the base model and each named adapter). Handlers never touch the model: they
``submit`` a :class:`Job`, read its events from an ``asyncio.Queue`` and ``cancel`` it when
the client goes away. Commands reach the thread through a thread-safe queue; events come
back with ``loop.call_soon_threadsafe``, so neither side ever blocks the other.

Supervision: any exception escaping the loop marks the engine dead at once (``healthy``
turns false, so /health answers 503), fails every job in flight with an error event, and
wakes the supervisor task, which restarts the loop with fresh batch state (the weights
are immutable and reused) up to ``max_restarts`` times, or calls ``on_fatal`` (the CLI
exits non-zero). A loop that has work but makes no step for ``stall_timeout`` seconds is
reported unhealthy too.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from mlxlm_core import BatchGenerator, MlxlmError
from mlxlm_core.sampling import top_logprobs

from ._errors import APIError
from ._prefix_cache import PrefixCache

__all__ = ["EngineBridge", "EngineFailure", "Failed", "Job", "Slot", "TokenEvent"]

log = logging.getLogger("mlxlm_server.engine")


class EngineFailure(RuntimeError):
    """Raised inside the engine loop by :meth:`EngineBridge.inject_failure` (a test hook)."""


@dataclass
class Slot:
    """One servable model: the base model or the base with a named adapter."""

    name: str
    model: Any
    tokenizer: Any
    generator: BatchGenerator | None = None


# Why a sequence ended: the engine's reasons ("stop": a stop token or stop string,
# "length": max tokens); the routes map them onto each API's own vocabulary.
FinishReason = Literal["stop", "length"]


@dataclass
class TokenEvent:
    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None
    finish_reason: FinishReason | None


@dataclass
class Failed:
    error: APIError


@dataclass(eq=False)
class Job:
    """One sequence to generate. ``events`` receives TokenEvents, then maybe a Failed."""

    slot: str
    prompt: list[int]
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    sampler: Callable[..., Any] | None = None
    processors: Sequence[Callable[..., Any]] | None = None
    stop_tokens: frozenset[int] | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's plus the top k
    events: asyncio.Queue[TokenEvent | Failed] = field(default_factory=asyncio.Queue)
    uid: int | None = None
    generated: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    finished: bool = False

    def push(self, event: TokenEvent | Failed) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class EngineBridge:
    def __init__(
        self,
        slots: dict[str, Slot],
        *,
        max_batch_size: int = 16,
        prefill_batch_size: int = 8,
        prefill_step_size: int | None = None,
        max_queue: int = 64,
        prefix_cache: PrefixCache | None = None,
        max_restarts: int = 3,
        restart_delay: float = 1.0,
        stall_timeout: float = 300.0,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.slots = slots
        self.max_batch_size = max_batch_size
        self.prefill_batch_size = prefill_batch_size
        self.prefill_step_size = prefill_step_size
        self.max_queue = max_queue
        self.prefix_cache = prefix_cache
        self.max_restarts = max_restarts
        self.restart_delay = restart_delay
        self.stall_timeout = stall_timeout
        self.on_fatal = on_fatal
        self.restarts = 0
        self.state = "stopped"  # stopped | ok | dead | fatal
        self.last_error: str | None = None
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._jobs: set[Job] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._inject: BaseException | None = None
        self._tick = time.monotonic()
        self._busy = False
        self._dead: asyncio.Event | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.generated_tokens = 0
        # --shard (mlxlm_server._distributed): wraps each generator so the other ranks run
        # the same steps, is closed when the loop stops, and refuses `call` (embeddings).
        self.mirror: Any = None

    # --- lifecycle (called on the event loop) -----------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._dead = asyncio.Event()
        self._spawn()
        self._supervisor = asyncio.create_task(self._supervise())

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        self._commands.put(("stop", None))
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, 10.0)
        self.state = "stopped"

    def _spawn(self) -> None:
        for slot in self.slots.values():
            eos = frozenset(int(i) for i in getattr(slot.tokenizer, "eos_token_ids", ()) or ())
            slot.generator = BatchGenerator(
                slot.model,
                stop_tokens=eos,
                completion_batch_size=self.max_batch_size,
                prefill_batch_size=self.prefill_batch_size,
                prefill_step_size=self.prefill_step_size,
                return_caches=self.prefix_cache is not None,
            )
            if self.mirror is not None:
                slot.generator = self.mirror.wrap(slot.generator)
        self._inject = None
        self._tick = time.monotonic()
        self.state = "ok"
        self._thread = threading.Thread(target=self._run, name="mlxlm-engine", daemon=True)
        self._thread.start()

    async def _supervise(self) -> None:
        assert self._dead is not None
        while True:
            await self._dead.wait()
            self._dead.clear()
            if self.restarts >= self.max_restarts:
                self.state = "fatal"
                log.error("engine failed %d times; giving up", self.restarts + 1)
                if self.on_fatal is not None:
                    self.on_fatal(RuntimeError(self.last_error or "engine failure"))
                return
            await asyncio.sleep(self.restart_delay)
            self.restarts += 1
            log.warning("restarting the engine (restart %d)", self.restarts)
            self._spawn()

    # --- what handlers call -------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        if self.state != "ok":
            return False
        stalled = self._busy and time.monotonic() - self._tick > self.stall_timeout
        return not stalled

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def _check_available(self) -> None:
        if self.state != "ok":
            raise APIError(
                503,
                f"the engine is unavailable ({self.last_error or self.state}); retry later",
                type="server_error",
                code="engine_unavailable",
                headers={"Retry-After": "1"},
            )

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs (all or none); raises APIError 503 (engine down) or 429 (queue full)."""
        self._check_available()
        with self._lock:
            if len(self._jobs) + len(jobs) > self.max_queue:
                raise APIError(
                    429,
                    f"the server is busy ({len(self._jobs)} generations queued or running, "
                    f"limit {self.max_queue}); retry later",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            self._jobs.update(jobs)
        for job in jobs:
            self._commands.put(("submit", job))

    def cancel(self, job: Job) -> None:
        """Stop generating for ``job`` (client gone, stop string seen, timeout)."""
        with self._lock:
            if job not in self._jobs:
                return
            self._jobs.discard(job)
        job.finished = True
        self._commands.put(("cancel", job))

    def release(self, job: Job) -> None:
        """Forget a job whose last event was read."""
        with self._lock:
            self._jobs.discard(job)

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps (it owns the model) and await it."""
        self._check_available()
        if self.mirror is not None:
            self.mirror.check_call()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._commands.put(("call", (fn, future)))
        return await future

    def inject_failure(self, message: str = "injected engine failure") -> None:
        """Test hook: make the engine loop raise on its next iteration."""
        self._inject = EngineFailure(message)
        self._commands.put(("wake", None))

    # --- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        uids: dict[tuple[str, int], Job] = {}
        try:
            while True:
                busy = any(s.generator.has_work for s in self.slots.values() if s.generator)
                self._busy = busy
                if not self._drain(uids, block=not busy):
                    if self.mirror is not None:
                        self.mirror.close()
                    return
                if self._inject is not None:
                    raise self._inject
                for slot in self.slots.values():
                    gen = slot.generator
                    if gen is None or not gen.has_work:
                        continue
                    responses = gen.next()
                    self._tick = time.monotonic()
                    _deliver([self._dispatch(slot, uids, r) for r in responses])
        except BaseException as exc:
            self._die(exc, uids)

    def _drain(self, uids: dict[tuple[str, int], Job], *, block: bool) -> bool:
        while True:
            try:
                kind, payload = (
                    self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
                )
            except queue.Empty:
                if block:
                    return True  # idle wake-up: lets an injected failure or stop through
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "submit":
                self._insert(payload, uids)
            elif kind == "cancel":
                job = payload
                if job.uid is not None and uids.pop((job.slot, job.uid), None) is not None:
                    gen = self.slots[job.slot].generator
                    assert gen is not None
                    gen.remove([job.uid])
            elif kind == "call":
                fn, future = payload
                try:
                    result = fn()
                except Exception as exc:
                    self._resolve(future, exc=exc)
                else:
                    self._resolve(future, result=result)

    def _resolve(self, future: asyncio.Future[Any], *, result: Any = None, exc: Any = None) -> None:
        def done() -> None:
            if future.done():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(done)

    def _insert(self, job: Job, uids: dict[tuple[str, int], Job]) -> None:
        if job.finished or job.max_tokens == 0:  # cancelled already, or nothing to do
            self.release(job)
            return
        slot = self.slots[job.slot]
        gen = slot.generator
        assert gen is not None
        cache = None
        if self.prefix_cache is not None:
            cache, job.cached_tokens = self.prefix_cache.lookup(job.slot, job.prompt)
        try:
            (uid,) = gen.insert(
                [job.prompt],
                max_tokens=[job.max_tokens],
                samplers=[job.sampler],
                logits_processors=[job.processors],
                stop_tokens=[None if job.stop_tokens is None else list(job.stop_tokens)],
                caches=[cache],
            )
        except MlxlmError as exc:
            self.release(job)
            job.finished = True
            job.push(Failed(APIError(400, str(exc))))
            return
        job.uid = uid
        uids[(job.slot, uid)] = job

    def _dispatch(
        self, slot: Slot, uids: dict[tuple[str, int], Job], r: Any
    ) -> tuple[Job, TokenEvent] | None:
        job = uids.get((slot.name, r.uid))
        if job is None:
            return None
        job.generated.append(r.token)
        self.generated_tokens += 1
        logprob, top = None, None
        if job.logprobs is not None:
            logprob = float(r.logprobs[r.token].item())
            if job.logprobs > 0:
                ids, values = top_logprobs(r.logprobs, job.logprobs)
                # r.logprobs is one row, so ids/values are 1-d: ``tolist`` gives flat lists.
                top = list(
                    zip(cast("list[int]", ids.tolist()), cast("list[float]", values.tolist()))
                )
        if r.finish_reason is not None:
            del uids[(slot.name, r.uid)]
            job.finished = True
            self.release(job)  # its slot in the queue is free even if nobody reads the rest
            if r.cache is not None and self.prefix_cache is not None:
                self.prefix_cache.store(slot.name, job.prompt + job.generated, r.cache)
        return job, TokenEvent(r.token, logprob, top, r.finish_reason)

    def _die(self, exc: BaseException, uids: dict[tuple[str, int], Job]) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.state = "dead"
        log.error("engine failed: %s", self.last_error, exc_info=exc)
        error = APIError(
            503,
            f"the engine failed while generating ({self.last_error})",
            type="server_error",
            code="engine_failure",
        )
        with self._lock:
            jobs = list(self._jobs)
            self._jobs.clear()
        for job in jobs:
            job.finished = True
            job.push(Failed(error))
        while True:  # commands sent to the dead loop: fail them too
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "call":
                self._resolve(payload[1], exc=error)
        for slot in self.slots.values():
            slot.generator = None
        if self._loop is not None and self._dead is not None:
            self._loop.call_soon_threadsafe(self._dead.set)


def _deliver(events: list[tuple[Job, TokenEvent] | None]) -> None:
    """Hand a step's tokens to their handlers with one wake-up of each event loop (not one
    per request: with many requests the wake-ups cost the loop more than the tokens)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, TokenEvent]]] = {}
    for item in events:
        if item is not None:
            by_loop.setdefault(item[0].loop, []).append(item)
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Job, TokenEvent]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)
