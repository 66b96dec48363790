"""Fixtures: a tiny llama model directory (random weights, a trained byte-level BPE
tokenizer with a ChatML template) and live servers on free loopback ports.

The server runs in this process (uvicorn in a thread), so tests can reach the engine's
failure hook, yet every request goes over real HTTP, through the official clients.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    'The tide comes in twice a day and the boats go out before dawn. {"name": "tide"}',
    "A small library above the post office opens on Tuesday and Friday afternoons.",
    "Bread needs flour, water, salt, time and a little attention. [1, 2, 3]",
    "What is the capital of France? Paris is the capital of France. <tool_call> true false null",
]


def build_tiny_model(folder: Path, *, seed: int = 7, context: int = 512) -> Path:
    from mlxlm_core.models import get_model_classes

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML,
                "clean_up_tokenization_spaces": False,
            }
        )
    )
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": context,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    }
    model_cls, args_cls = get_model_classes("llama")
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    # Larger-than-default weights give a peaked, input-dependent next-token distribution.
    weights = {
        k: (v * 3.0 if v.ndim > 1 else v).astype(mx.float32)
        for k, v in tree_flatten(model.parameters())
    }
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("server-tiny") / "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def bridge(self) -> Any:
        return self.app.state.server.bridge

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="session")
def serve(tiny_dir: Path) -> Callable[..., Any]:
    """``with serve(**config) as live:`` a server for the tiny model (or ``model=``)."""
    from mlxlm_server import ServerConfig, create_app, load_slots

    @contextmanager
    def make(**options: Any) -> Iterator[LiveServer]:
        options.setdefault("model", str(tiny_dir))
        options.setdefault("served_model_name", "tiny")
        options.setdefault("max_tokens_limit", 256)
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
