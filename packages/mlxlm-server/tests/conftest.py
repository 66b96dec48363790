"""Fixtures: the tiny model directory and live servers built on it (see mlxlm_server.testing)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mlxlm_server.testing import LiveServer, build_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("server-tiny") / "model")


@pytest.fixture(scope="session")
def serve(tiny_dir: Path) -> Callable[..., Any]:
    """``with serve(**config) as live:`` a server for the tiny model (or ``model=``)."""
    from mlxlm_server import ServerConfig, create_app, load_slots

    @contextmanager
    def make(**options: Any) -> Iterator[LiveServer]:
        options.setdefault("model", str(tiny_dir))
        options.setdefault("served_model_name", "tiny")
        options.setdefault("max_tokens_limit", 512)
        options.setdefault("default_max_tokens", 32)
        config = ServerConfig(**options)
        slots, base = load_slots(config)
        with LiveServer(create_app(config, slots, base)) as live:
            yield live

    return make


@pytest.fixture(scope="module")
def live(serve: Callable[..., Any]) -> Iterator[LiveServer]:
    with serve() as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Any:
    import openai

    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
