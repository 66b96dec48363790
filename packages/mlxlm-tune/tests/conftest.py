"""Shared fixtures of mlxlm-tune's tests: a tiny llama model directory with a chat tokenizer.

The tokenizer is a byte-level BPE trained on a few sentences with ChatML special tokens;
the model is random (2 blocks, hidden 64), built in well under a second.
"""

from __future__ import annotations

# First, before anything imports mlx.core: mlxlm_core puts the optimised BLAS under MLX at
# import (mlxlm_core._blas), and the tests should run on what users get.
import mlxlm_core  # noqa: F401

# isort: split

import json
from collections.abc import Callable, Iterable
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
    "The tide comes in twice a day and the boats go out before dawn.",
    "A small library above the post office opens on Tuesday and Friday afternoons.",
    "Bread needs flour, water, salt, time and a little attention.",
    "What is the capital of France? Paris is the capital of France.",
    "user assistant system tool yes no good bad answer question 0123456789",
]


def build_tokenizer(folder: Path, *, chat_template: str | None = CHATML) -> int:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def build_model_dir(folder: Path, *, seed: int = 7, layers: int = 2, hidden: int = 64) -> Path:
    from mlxlm_core.models import get_model_classes

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    model_cls, args_cls = get_model_classes("llama")
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama model directory (random float32 weights, ChatML tokenizer)."""
    return build_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another architecture size (hidden 32, 3 blocks): adapters of `tiny` do not fit it."""
    return build_model_dir(tmp_path_factory.mktemp("tiny-other"), layers=3, hidden=32)


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def jsonl(tmp_path: Path) -> Callable[..., Path]:
    """``jsonl(rows, name="train.jsonl")``: write rows (objects or raw lines) to a file."""
    return lambda rows, name="train.jsonl": write_jsonl(tmp_path / name, rows)
