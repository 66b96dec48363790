"""Fixtures of mlxlm-quant's tests: tiny model directories with a real tokenizer, built in
seconds, and calibration text."""

from __future__ import annotations

# First, before anything imports mlx.core: mlxlm_core puts the optimised BLAS under MLX at
# import (mlxlm_core._blas), and the tests should run on what users get.
import mlxlm_core  # noqa: F401

# isort: split

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = [
    "The tide comes in twice a day and the boats go out before dawn.",
    "A small library above the post office opens on Tuesday and Friday afternoons.",
    "Bread needs flour, water, salt, time and a little attention.",
    "What is the capital of France? Paris is the capital of France.",
]


def _tokenizer(folder: Path) -> int:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def write_tiny(folder: Path, *, layers: int = 2, tied: bool = True, seed: int = 7) -> Path:
    """A llama directory: hidden 128 (groups of 32, 64 and 128 fit), random float32 weights with
    non-trivial norms so that a misplaced scale shows."""
    from mlxlm_core.models import get_model_classes

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(folder)
    config = {
        "model_type": "llama",
        "hidden_size": 128,
        "num_hidden_layers": layers,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "eos_token_id": 0,
    }
    model_cls, args_cls = get_model_classes("llama")
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    params = []
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            value = 1.0 + 0.3 * mx.random.normal(value.shape)
        params.append((name, value.astype(mx.float32)))
    model.update(tree_unflatten(params))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("q") / "tiny")


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    def make(**kwargs: object) -> Path:
        return write_tiny(tmp_path_factory.mktemp("q") / "tiny", **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(" ".join(TEXT * 20))
    return path
