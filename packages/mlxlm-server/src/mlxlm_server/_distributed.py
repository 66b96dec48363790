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

The channel, the shared samples, the stream probe and the watchdog live in
:mod:`._distributed_sync`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
from mlxlm_core import BatchGenerator, InvalidArgumentError
from mlxlm_core.distributed import peer_failures, world

from ._config import ServerConfig
from ._distributed_sync import Channel, Probe, Shared, Watchdog, probe_model
from ._engine_bridge import Failed
from ._errors import APIError

__all__ = ["HEARTBEAT_SECONDS", "Leader", "Sharded", "follow"]

STEP, STOP = 1, 2
HEARTBEAT_SECONDS = 1.0
GRACE_SECONDS = 5.0  # after giving up: time for error responses to go out before exiting

log = logging.getLogger("mlxlm_server.shard")

Sampler = Callable[[mx.array], mx.array]


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

    def __init__(self, inner: BatchGenerator, channel: Channel) -> None:
        if inner.return_caches:
            raise InvalidArgumentError("the prefix cache cannot be used with --shard")
        self.inner, self.channel = inner, channel
        self.shared = Shared(channel.group)
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


def follow(model: Any, channel: Channel) -> int:
    """A follower rank: apply rank 0's decisions to a local generator until told to stop."""
    generator: BatchGenerator | None = None
    shared = Shared(channel.group)
    while True:
        flags, payload = channel.receive()
        for op in json.loads(payload) if payload else []:
            if op[0] == "generator":
                settings = dict(op[1])
                settings["stop_tokens"] = frozenset(settings.get("stop_tokens") or ())
                generator = BatchGenerator(model, **settings)
                shared = Shared(channel.group)
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

    group: mx.distributed.Group
    model: Any
    channel: Channel

    @classmethod
    def join(cls, model: Any, *, timeout: float = 300.0) -> Sharded:
        group = world()
        if group is None:
            raise InvalidArgumentError(
                "--shard needs several processes: start the server with mlx.launch -n 2 ..."
            )
        if timeout <= 0:
            raise InvalidArgumentError(f"--shard-timeout must be > 0, got {timeout:g}")
        probe = Probe()
        probe.watchdog = Watchdog(timeout)
        probe_model(model, probe)
        return cls(group, model, Channel(group, probe))

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

    def __init__(self, channel: Channel, bridge: Any) -> None:
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
