"""The ASGI application: routes, error handlers, middleware, and the engine's lifetime."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from mlxlm_core import CheckpointError, load
from mlxlm_core.cache import load_prompt_cache

from ._auth import ApiKeyMiddleware, BodyLimitMiddleware
from ._config import ServerConfig
from ._engine_bridge import EngineBridge, Slot
from ._errors import install_error_handlers
from ._metrics import Metrics
from ._prefix_cache import PrefixCache
from ._routes_chat import router as chat_router
from ._routes_compat import router as compat_router
from ._routes_completions import router as completions_router
from ._routes_messages import router as messages_router
from ._routes_misc import router as misc_router
from ._state import ServerState

__all__ = ["batched_weights", "create_app", "load_slots"]

log = logging.getLogger("mlxlm_server")


# core's knob for how a packed quantized layer multiplies one row (see its _policy).
MATVEC_ENV = "MLXLM_MATVEC"


@contextmanager
def batched_weights() -> Iterator[None]:
    """Load models for batched decoding (a server decodes many requests per step).

    On CPU, core's ``auto`` weight mode keeps quantized weights packed (plane kernel for one
    or two rows, chunked dequantization into the BLAS for more); a resident dense copy is
    still 1.3-1.6x cheaper per batched step from 4 rows up (8 rows: 82 against 127 ms on
    the default model, core's ``tools/bench_decode_cpu.py --batch``). So, unless
    ``MLXLM_MATVEC`` says otherwise, loads inside this block take auto's
    other rule: a dense float copy where an optimised BLAS runs it and it fits the memory
    budget, packed weights otherwise. An explicit ``--weight-mode`` is left alone.
    """
    if MATVEC_ENV in os.environ:
        yield
        return
    os.environ[MATVEC_ENV] = "mlx"
    try:
        yield
    finally:
        os.environ.pop(MATVEC_ENV, None)


def load_slots(
    config: ServerConfig, *, adapter_path: str | None = None
) -> tuple[dict[str, Slot], str]:
    """Load the base model (and each named adapter on its own copy); returns slots, base name."""
    with batched_weights():
        return _load_slots(config, adapter_path=adapter_path)


def _load_slots(config: ServerConfig, *, adapter_path: str | None) -> tuple[dict[str, Slot], str]:
    model, tokenizer = load(config.model, dtype=config.dtype, adapter_path=adapter_path)
    base = (
        config.served_model_name
        or config.model
        or Path(str(getattr(model, "model_path", "default"))).name
    )
    slots = {base: Slot(base, model, tokenizer)}
    for name, path in config.adapters.items():
        if name in slots:
            raise CheckpointError(f"adapter name {name!r} is already the base model's name")
        adapted, adapted_tok = load(config.model, dtype=config.dtype, adapter_path=path)
        slots[name] = Slot(name, adapted, adapted_tok)
    return slots, base


def _preload(prefix: PrefixCache, base: str, path: str) -> None:
    cache, meta = load_prompt_cache(path, return_metadata=True)
    try:
        tokens = [int(t) for t in json.loads(meta["tokens"])]
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(f"{path}: no token list in the prompt cache's metadata") from None
    if not prefix.store(base, tokens, list(cache), pinned=True):
        raise CheckpointError(f"{path}: this prompt cache cannot be reused (size or cache type)")


class _RequestMetrics:
    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), [500]

        async def watch(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            path = scope.get("path", "")
            route = path if path in _ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - started)


_ROUTES = {
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/v1/responses",
    "/v1/messages", "/health", "/metrics", "/tokenize", "/detokenize",
}  # fmt: skip


def create_app(
    config: ServerConfig,
    slots: dict[str, Slot],
    base: str,
    *,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The server for already-loaded model slots; the engine starts with the app's lifespan."""
    metrics = Metrics()
    prefix = PrefixCache(config.prefix_cache_bytes) if config.prefix_cache_bytes > 0 else None
    if config.prompt_cache_file:
        if prefix is None:
            raise CheckpointError(
                "a prompt cache file needs the prefix cache (prefix_cache_bytes > 0)"
            )
        _preload(prefix, base, config.prompt_cache_file)
    bridge = EngineBridge(
        slots,
        max_batch_size=config.max_batch_size,
        prefill_batch_size=config.prefill_batch_size,
        prefill_step_size=config.prefill_step_size,
        max_queue=config.max_queue,
        prefix_cache=prefix,
        max_restarts=config.max_restarts if config.on_engine_failure == "restart" else 0,
        restart_delay=config.restart_delay,
        stall_timeout=config.stall_timeout,
        on_fatal=on_fatal,
    )
    state = ServerState(config=config, bridge=bridge, slots=slots, base=base, metrics=metrics)

    def live() -> dict[str, Any]:
        p = prefix
        return {
            "up": 1 if bridge.healthy else 0,
            "restarts": bridge.restarts,
            "in_flight": bridge.in_flight,
            "hits": p.hits if p else 0,
            "misses": p.misses if p else 0,
            "reused": p.reused_tokens if p else 0,
            "bytes": p.nbytes if p else 0,
            "entries": len(p) if p else 0,
        }

    metrics.watch(live)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        policy = getattr(slots[base].model, "policy", None)
        if policy is not None:
            log.info("serving %s: %s", base, policy.describe())
        await bridge.start()
        try:
            yield
        finally:
            await bridge.stop()

    app = FastAPI(
        title="mlxlm server",
        version="0.1.0",
        description="OpenAI-compatible (and Anthropic Messages) API over mlxlm's continuous-batching engine.",
        lifespan=lifespan,
    )
    app.state.server = state
    install_error_handlers(app)
    for router in (chat_router, completions_router, compat_router, messages_router, misc_router):
        app.include_router(router)
    # Added innermost first: metrics, keys, CORS (answers preflights before keys are asked
    # for, and labels 401s for browsers), then the body bound outermost.
    app.add_middleware(_RequestMetrics, metrics=metrics)
    if config.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=list(config.api_keys))
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "content-type", "x-api-key"],
        )
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)
    return app
