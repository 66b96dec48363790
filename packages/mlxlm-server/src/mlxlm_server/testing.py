"""Helpers for testing and benchmarking the server: a tiny model directory built in a
second, and a live uvicorn server on a free loopback port in a background thread (so a
test can reach the engine's failure hook while every request goes over real HTTP)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

__all__ = ["LiveServer", "build_tiny_model", "free_port"]

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
    """A llama model directory: random float32 weights, a byte-level BPE tokenizer trained
    on a few sentences, a ChatML template. Runs anywhere in well under a second."""
    from mlxlm_core.models import get_model_classes
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    params = tree_flatten(model.parameters())
    assert isinstance(params, list)  # (key, array) pairs: no `destination` dict was given
    weights = {k: (v * 3.0 if v.ndim > 1 else v).astype(mx.float32) for k, v in params}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


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
