"""The low-level pieces of sharded serving (see :mod:`._distributed`).

- :class:`Channel`: messages from rank 0 to the other ranks over ``all_sum``, on the
  engine's own stream;
- :class:`Shared`: tokens rank 0 samples, shared inside the step, in an order every rank
  agrees on;
- :func:`probe_model`: learns the engine's stream, feeds the watchdog, and keeps pipeline
  stages' collectives in step;
- :class:`Watchdog`: gives up when a rank is stuck inside MLX.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import numpy as np
from mlxlm_core.distributed import peer_failures

__all__ = ["Channel", "Probe", "Shared", "Watchdog", "probe_model"]

Group = mx.distributed.Group
Sampler = Callable[[mx.array], mx.array]


class Watchdog:
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


class Probe:
    """The stream the engine runs the model on (its thread's generation stream)."""

    stream: mx.Stream | None = None
    watchdog: Watchdog | None = None


def probe_model(model: Any, probe: Probe) -> None:
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

    class Probed(base):  # type: ignore[misc, valid-type]
        def __call__(self, inputs: mx.array, *args: Any, **kwargs: Any) -> Any:
            probe.stream = mx.default_stream(mx.default_device())
            if probe.watchdog is not None:
                probe.watchdog.tick()
            if pipelined:
                mx.async_eval(inputs)
            return super().__call__(inputs, *args, **kwargs)

    Probed.__name__ = base.__name__
    model.__class__ = Probed


class Channel:
    """Rank 0 to every other rank, over ``all_sum``."""

    def __init__(self, group: Group, probe: Probe) -> None:
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


class Shared:
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
