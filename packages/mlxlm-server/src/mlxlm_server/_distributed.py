"""Serving a model sharded over several processes: ``mlxlm server --shard tensor|pipeline``.

Started by ``mlx.launch``, every rank loads its part of the model (core's
:mod:`mlxlm_core.distributed`). A sharded forward pass is a collective: every rank must run
the same engine steps on the same batch, in the same order. So rank 0 alone runs the HTTP
server and the engine bridge, and its batch generator is wrapped in a :class:`Leader` that
tells the other ranks what it does; each other rank runs :func:`follow`, a loop that
applies those decisions to its own ``BatchGenerator`` and never binds a port.

What travels (over ``all_sum``, MLX's own transport: rank 0 contributes the bytes, the
others zeros; a two-int header ``[length, flags]`` first, then the JSON payload if any):

- the generator's settings, when rank 0 makes one;
- each insert: uid, prompt tokens, max tokens, stop tokens, and whether rank 0 samples it;
- each removal (cancellation, disconnect, stop string);
- "step" before each ``next()``, "stop" when the server shuts down, and a heartbeat every
  second while idle, so a follower that died is noticed before the next request.

Sampling parameters never travel: a row that samples (temperature, penalties, logit bias,
structured-output or tool-call constraints, which are stateful processors built from a
schema) has its token chosen on rank 0 and shared with one small ``all_sum`` inside the
step; the followers' copy of that row takes the shared token. Greedy rows without
processors need nothing: every rank holds the same logits. The followers' engines thus
finish rows exactly when rank 0's do.

Ordering: MLX runs each stream on its own thread, and two collectives in flight on two
streams could interleave on the sockets. The engine queues each next step asynchronously on
its generation stream, so every message here is sent on that same stream (learnt from the
model's first call), after whatever the engine queued.

Failure: a peer that vanishes makes a collective raise; rank 0's engine then fails its
requests with 503 and, since the ranks' engines can no longer agree, the server exits
(status 3) instead of restarting the engine; followers exit with one error line when
rank 0 goes away. MLX's ring transport can also leave a collective queued after the one
that failed waiting for ever; so a watchdog gives up on the other ranks when a rank inside
an engine step or a message makes no progress (no model call, no message) for
``--shard-timeout`` seconds: rank 0 fails its requests and exits with status 3, a follower
exits with status 1. The prefix cache, adapters, a prompt-cache file and embeddings (a
forward pass outside the engine's steps) are refused or off under ``--shard``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlxlm_core import BatchGenerator, InvalidArgumentError
from mlxlm_core.distributed import peer_failures, world

from ._config import ServerConfig
from ._engine_bridge import Failed
from ._errors import APIError

__all__ = ["HEARTBEAT_SECONDS", "Leader", "Sharded", "follow"]

STEP, STOP = 1, 2
HEARTBEAT_SECONDS = 1.0
GRACE_SECONDS = 5.0  # after giving up: time for error responses to go out before exiting

log = logging.getLogger("mlxlm_server.shard")

Group = mx.distributed.Group
Sampler = Callable[[mx.array], mx.array]


class _Watchdog:
    """Calls ``expire`` once when this rank is busy in MLX with no progress for ``timeout`` s.

    Busy: inside a message exchange or an engine step. Progress: a model call (each prefill
    chunk and decode step builds one after the previous chunk ran) or a finished exchange.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.expire: Callable[[str], None] = _exit_follower
        self._since: float | None = None
        threading.Thread(target=self._watch, name="mlxlm-shard-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def tick(self) -> None:
        if self._since is not None:
            self._since = time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                self.expire(f"another rank stopped answering (no progress for {self.timeout:g} s)")
                return


def _exit_follower(why: str) -> None:
    sys.stderr.write(f"mlxlm server: error: {why}\n")
    sys.stderr.flush()
    os._exit(1)  # the main thread is stuck inside MLX: nothing else can end it


class _Probe:
    """The stream the engine runs the model on (its thread's generation stream)."""

    stream: mx.Stream | None = None
    watchdog: _Watchdog | None = None


def _probe_stream(model: Any, probe: _Probe) -> None:
    """Record, at every call of ``model``, the stream it is called on (this instance only).

    Pipeline stages also evaluate a call's inputs before building the call. A stage
    receives its activations with ``recv_like``, which takes only the shape of its argument,
    not a data dependency on it: on a receiving rank the graph of step k+1 does not contain
    step k's tokens. Without this, the collectives that produce those tokens (the logits'
    ``all_sum`` when the engine admits a prompt and evaluates two steps as one graph, and
    rank 0's shared samples) could run before the receive on one rank and after it on the
    other, and both ranks would wait for ever.
    """
    base = type(model)
    pipelined = getattr(model, "shard_strategy", None) == "pipeline"

    class _Probed(base):  # type: ignore[misc, valid-type]
        def __call__(self, inputs: mx.array, *args: Any, **kwargs: Any) -> Any:
            probe.stream = mx.default_stream(mx.default_device())
            if probe.watchdog is not None:
                probe.watchdog.tick()
            if pipelined:
                mx.async_eval(inputs)
            return super().__call__(inputs, *args, **kwargs)

    _Probed.__name__ = base.__name__
    model.__class__ = _Probed


class _Channel:
    """Rank 0 to every other rank, over ``all_sum``."""

    def __init__(self, group: Group, probe: _Probe) -> None:
        self.group, self.probe = group, probe
        # The first message waits for the other ranks to finish starting: not watched.
        self.started = False

    @contextlib.contextmanager
    def _on_engine_stream(self) -> Iterator[None]:
        stream = self.probe.stream
        if stream is None:  # the model has not run yet: nothing is queued anywhere
            yield
        else:
            with mx.stream(stream):
                yield

    def _sum(self, values: mx.array) -> np.ndarray:
        with self.busy(), self._on_engine_stream(), peer_failures():
            out = mx.distributed.all_sum(values, group=self.group)
            mx.eval(out)
        self.started = True
        return np.array(out)

    def busy(self) -> contextlib.AbstractContextManager[None]:
        watchdog = self.probe.watchdog
        if watchdog is None or not self.started:
            return contextlib.nullcontext()
        return watchdog.busy()

    def send(self, flags: int, payload: bytes) -> None:
        self._sum(mx.array([len(payload), flags], dtype=mx.int32))
        if payload:
            words = np.frombuffer(payload + b"\0" * (-len(payload) % 4), dtype=np.int32)
            self._sum(mx.array(words))

    def receive(self) -> tuple[int, bytes]:
        length, flags = (int(v) for v in self._sum(mx.zeros((2,), mx.int32)))
        if not length:
            return flags, b""
        words = self._sum(mx.zeros(((length + 3) // 4,), mx.int32))
        return flags, words.astype(np.int32).tobytes()[:length]


# --- the token of a row rank 0 samples -----------------------------------------------------


class _Shared:
    """Shares sampled tokens from rank 0, one ``all_sum`` per row that rank 0 samples.

    Collectives must run in the same order on every rank, and MLX orders a graph's nodes
    only by their data dependencies. So each shared token depends on the row's logits (the
    followers' zeros are ``argmax * 0``, not fresh zeros, which could be summed before the
    model's own collectives), and on the token shared before it (rows in call order).
    """

    def __init__(self, group: Group) -> None:
        self.group = group
        self.last: mx.array | None = None

    def share(self, tokens: mx.array) -> mx.array:
        if self.last is not None:
            tokens = tokens + (self.last.sum() * 0).astype(tokens.dtype)
        self.last = mx.distributed.all_sum(tokens, group=self.group)
        return self.last

    def decided_here(self, sampler: Sampler) -> Sampler:
        """Rank 0: sample (after its logits processors), then share."""

        def sample(logprobs: mx.array) -> mx.array:
            tokens = sampler(logprobs).astype(mx.uint32).reshape(logprobs.shape[:-1])
            return self.share(tokens)

        return sample

    def taken(self) -> Sampler:
        """A follower: contribute zeros, receive rank 0's tokens."""

        def sample(logprobs: mx.array) -> mx.array:
            return self.share((mx.argmax(logprobs, axis=-1) * 0).astype(mx.uint32))

        return sample


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _settings(generator: BatchGenerator) -> dict[str, Any]:
    """The generator's public settings (what a follower needs to batch exactly alike)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(generator):
        if f.init and not f.name.startswith("_") and f.name != "model":
            value = getattr(generator, f.name)
            out[f.name] = sorted(value) if isinstance(value, frozenset) else value
    return out


class Leader:
    """Rank 0's batch generator: does what it is asked and tells the other ranks first."""

    def __init__(self, inner: BatchGenerator, channel: _Channel) -> None:
        if inner.return_caches:
            raise InvalidArgumentError("the prefix cache cannot be used with --shard")
        self.inner, self.channel = inner, channel
        self.shared = _Shared(channel.group)
        self._ops: list[list[Any]] = [["generator", _settings(inner)]]
        self._sent = 0.0

    def insert(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int | Sequence[int] | None = None,
        samplers: Sequence[Sampler | None] | None = None,
        logits_processors: Sequence[Sequence[Any] | None] | None = None,
        stop_tokens: Sequence[Sequence[int] | None] | None = None,
        caches: Sequence[Any] | None = None,
    ) -> list[int]:
        if caches is not None and any(c is not None for c in caches):
            raise InvalidArgumentError("prefix caches cannot be used with --shard")
        count = len(prompts)
        given = list(max_tokens) if isinstance(max_tokens, Sequence) else [max_tokens] * count
        limits = [self.inner.max_tokens if m is None else int(m) for m in given]
        samplers = list(samplers or [None] * count)
        processors = list(logits_processors or [None] * count)
        stops = list(stop_tokens or [None] * count)
        decided = [s is not None or bool(p) for s, p in zip(samplers, processors)]
        wrapped = [
            self.shared.decided_here(s or _greedy) if d else None for s, d in zip(samplers, decided)
        ]
        uids = self.inner.insert(
            prompts,
            max_tokens=limits,
            samplers=wrapped,
            logits_processors=processors,
            stop_tokens=stops,
        )
        self._ops.append(
            [
                "insert",
                uids,
                [list(map(int, p)) for p in prompts],
                limits,
                [None if s is None else list(map(int, s)) for s in stops],
                decided,
            ]
        )
        return uids

    def remove(self, uids: Sequence[int]) -> None:
        self.inner.remove(uids)
        self._ops.append(["remove", list(uids)])

    @property
    def has_work(self) -> bool:
        busy = self.inner.has_work
        if not busy and time.monotonic() - self._sent > HEARTBEAT_SECONDS:
            self._flush(0)  # idle: a heartbeat (and any pending removals)
        return busy

    def next(self) -> list[Any]:
        self._flush(STEP)
        with self.channel.busy(), peer_failures():
            return self.inner.next()

    def close(self) -> None:
        """The server is stopping: the followers leave their loops."""
        self._flush(STOP)

    def _flush(self, flags: int) -> None:
        payload = json.dumps(self._ops, separators=(",", ":")).encode() if self._ops else b""
        self._ops = []
        self.channel.send(flags, payload)
        self._sent = time.monotonic()

    def __getattr__(self, name: str) -> Any:
        # Read-only state passes through; an unmirrored method would desynchronise the ranks.
        if name == "inner":  # not set yet
            raise AttributeError(name)
        value = getattr(self.inner, name)
        if callable(value):
            raise AttributeError(f"{name} is not mirrored to the other ranks under --shard")
        return value


def follow(model: Any, channel: _Channel) -> int:
    """A follower rank: apply rank 0's decisions to a local generator until told to stop."""
    generator: BatchGenerator | None = None
    shared = _Shared(channel.group)
    while True:
        flags, payload = channel.receive()
        for op in json.loads(payload) if payload else []:
            if op[0] == "generator":
                settings = dict(op[1])
                settings["stop_tokens"] = frozenset(settings.get("stop_tokens") or ())
                generator = BatchGenerator(model, **settings)
                shared = _Shared(channel.group)
                continue
            assert generator is not None, "rank 0 sent work before a generator"
            if op[0] == "insert":
                _, uids, prompts, limits, stops, decided = op
                got = generator.insert(
                    prompts,
                    max_tokens=limits,
                    samplers=[shared.taken() if d else None for d in decided],
                    stop_tokens=stops,
                )
                if got != uids:
                    raise RuntimeError(f"ranks out of step: uids {got} here, {uids} on rank 0")
            elif op[0] == "remove":
                generator.remove(op[1])
        if flags & STOP:
            return 0
        if flags & STEP:
            assert generator is not None
            with channel.busy(), peer_failures():
                generator.next()


@dataclasses.dataclass
class Sharded:
    """This process's place in a sharded server (made after the model is loaded)."""

    group: Group
    model: Any
    channel: _Channel

    @classmethod
    def join(cls, model: Any, *, timeout: float = 300.0) -> Sharded:
        group = world()
        if group is None:
            raise InvalidArgumentError(
                "--shard needs several processes: start the server with mlx.launch -n 2 ..."
            )
        if timeout <= 0:
            raise InvalidArgumentError(f"--shard-timeout must be > 0, got {timeout:g}")
        probe = _Probe()
        probe.watchdog = _Watchdog(timeout)
        _probe_stream(model, probe)
        return cls(group, model, _Channel(group, probe))

    @property
    def primary(self) -> bool:
        return self.group.rank() == 0

    def adjust(self, config: ServerConfig) -> ServerConfig:
        """Refuse what cannot be sharded; turn off what would diverge between the ranks."""
        if config.adapters:
            raise InvalidArgumentError("--adapter cannot be combined with --shard")
        if config.prompt_cache_file:
            raise InvalidArgumentError("--prompt-cache-file cannot be combined with --shard")
        # Each rank's cache holds only its shard, so prefix reuse would need the ranks to
        # agree on every lookup; and an engine restarted on rank 0 alone would leave the
        # others mid-collective, so a failure ends the server.
        return dataclasses.replace(config, prefix_cache_bytes=0, on_engine_failure="exit")

    def follow(self) -> int:
        return follow(self.model, self.channel)

    def leader(self, bridge: Any) -> None:
        """Make ``bridge`` (rank 0's engine) tell the other ranks every step."""
        bridge.mirror = mirror = _Mirror(self.channel, bridge)
        if self.channel.probe.watchdog is not None:
            self.channel.probe.watchdog.expire = mirror.give_up


class _Mirror:
    """What the engine bridge asks of a sharded server (its ``mirror`` hook)."""

    def __init__(self, channel: _Channel, bridge: Any) -> None:
        self.channel, self.bridge = channel, bridge
        self.current: Leader | None = None

    def give_up(self, why: str) -> None:
        """The watchdog's verdict on rank 0: fail every request, then exit (status 3).

        The engine thread is stuck inside MLX and cannot fail its own jobs, so this does
        what its failure path would, from the watchdog's thread.
        """
        bridge = self.bridge
        log.error("giving up the sharded engine: %s", why)
        bridge.last_error = why
        bridge.state = "fatal"
        error = APIError(
            503,
            f"the engine failed while generating ({why})",
            type="server_error",
            code="engine_failure",
        )
        with bridge._lock:
            jobs = list(bridge._jobs)
            bridge._jobs.clear()
        for job in jobs:
            job.finished = True
            job.push(Failed(error))
        if bridge.on_fatal is not None:
            bridge.on_fatal(RuntimeError(why))
        # The stuck engine thread can keep the process from ending: end it after a grace.
        threading.Timer(GRACE_SECONDS, os._exit, (3,)).start()

    def wrap(self, generator: BatchGenerator) -> Leader:
        self.current = Leader(generator, self.channel)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()

    def check_call(self) -> None:
        raise APIError(
            400,
            "this endpoint runs the model outside the engine's steps, which a model "
            "sharded over several processes (--shard) cannot do",
            code="unsupported_with_shard",
        )
