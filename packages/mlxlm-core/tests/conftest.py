"""Shared fixtures of mlxlm-core's tests: a tiny llama model directory built in seconds."""

from __future__ import annotations

# First, before anything imports mlx.core: mlxlm_core puts the optimised BLAS under MLX at
# import (mlxlm_core._blas), and the tests should run on what users get.
import mlxlm_core  # noqa: F401

# isort: split

import importlib.util
import json
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def _register_helper(name: str) -> None:
    """Make the sibling helper module ``name`` importable by name from the test modules.

    ``--import-mode=importlib`` keeps the tests folder off ``sys.path``; this conftest is
    imported before any test module, so registering here is enough.
    """
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[name])


for _name in ("_zoo", "_fixtures_tokenizers"):
    _register_helper(_name)

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_CORPUS = [
    "The tide comes in twice a day and the boats go out before dawn.",
    "A small library above the post office opens on Tuesday and Friday afternoons.",
    "Bread needs flour, water, salt, time and a little attention.",
    "What is the capital of France? Paris is the capital of France.",
]
TINY_CONTEXT = 128  # max_position_embeddings of the tiny model


def _build_tokenizer(folder: Path) -> int:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama model directory: random float32 weights, config.json, tokenizer files."""
    from mlxlm_core.models import get_model_classes

    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = _build_tokenizer(folder)
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": TINY_CONTEXT,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    model_cls, args_cls = get_model_classes("llama")
    mx.random.seed(7)
    model = model_cls(args_cls.from_dict(config))
    weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    """The text the tiny tokenizer was trained on."""
    return list(TINY_CORPUS)
