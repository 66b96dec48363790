"""llama.cpp (llama-cpp-python) runs what mlxlm-gguf exports, as we run it.

For every architecture export supports (tiny random models built by mlxlm-gguf's test
builders) and every output type, llama.cpp loads the file and its teacher-forced next-token
predictions (argmax at each position of a ~740-token multilingual text) are compared with
ours: the original model for float files, our import of the same file for quantized ones
(llama.cpp and we then run identical weights; against the float original the figure would
measure quantization instead). Thresholds are the issue's: f32 99 %, f16/bf16 98 %,
quantized 95 %. llama.cpp keeps its KV cache in float32 here, so only its own activation
rounding (float16 / 8-bit inside quantized dot products) separates the two.

Figures: ``pytest -s`` prints one line per architecture.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlxlm_gguf_test_builders as builders  # registered by conftest.py
import numpy as np
import pytest
from mlxlm_core import load
from mlxlm_core.quantize import quantize_model
from mlxlm_gguf import export, import_gguf

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.timeout(600)

OUT_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]
EXTRA_TYPES = {"llama": ["q5_0", "q5_1"]}  # cheap extras, checked on one architecture
N_TOKENS = 320  # of the ~740-token text: >= 256, and half the llama.cpp time
THRESHOLD = {"f32": 0.99, "f16": 0.98, "bf16": 0.98}  # quantized types: 0.95
GGML_TYPE_F32 = 0


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits of every position, read with llama_get_logits_ith."""
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=1024,
        n_batch=1024,
        n_threads=2,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        verbose=False,
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


def _logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return builders.write_byte_bpe(tmp_path_factory.mktemp("tok"), "gpt-2")


@pytest.mark.parametrize("arch", list(builders.CONFIGS))
def test_llama_cpp_agrees_on_every_export(arch, tokenizer_dir, tmp_path):
    folder = builders.write_model(tmp_path / "model", arch, tokenizer_dir)
    model, tok = load(folder)
    ids = tok.encode(builders.LONG_TEXT)[:N_TOKENS]
    assert len(ids) >= 256
    original = _logits(model, ids)
    figures: dict[str, tuple[float, float]] = {}
    for out_type in OUT_TYPES + EXTRA_TYPES.get(arch, []):
        path = export(model, tok, tmp_path / f"{out_type}.gguf", out_type=out_type).path
        theirs = llama_cpp_logits(path, ids)  # loading at all is the first check
        if out_type in THRESHOLD:
            ours = original
        else:
            back, _ = load(import_gguf(path, tmp_path / f"{out_type}-import"))
            ours = _logits(back, ids)
        figures[out_type] = (_agree(theirs, ours), _agree(theirs, original))
        if out_type == "f32":
            # Same weights, float32 everywhere but llama.cpp's GELU table: logits agree too.
            rel = np.linalg.norm(theirs - ours, axis=-1) / np.linalg.norm(ours, axis=-1)
            assert np.median(rel) < 1e-3, (arch, np.median(rel))
    line = " ".join(f"{t}={a:.3f}({o:.3f})" for t, (a, o) in figures.items())
    print(f"\n{arch:12s} n={len(ids)} agreement with ours (with the float original): {line}")
    failed = {t: a for t, (a, _) in figures.items() if a < THRESHOLD.get(t, 0.95)}
    assert not failed, f"{arch}: {failed} ({line})"


@pytest.mark.parametrize(
    ("arch", "bits"), [("llama", 4), ("qwen3_moe", 4), ("gemma3_text", 4), ("qwen2", 8)]
)
def test_llama_cpp_runs_mlx_quantized_models(arch, bits, tokenizer_dir, tmp_path):
    """An MLX-quantized model exported as the closest GGUF type.

    4-bit layers are written block for block (Q4_1), so llama.cpp is compared with the
    quantized model itself; 8-bit ones are re-quantized to Q8_0 (MLX's 8-bit grid is not
    symmetric), so with our import of the file.
    """
    folder = builders.write_model(tmp_path / "model", arch, tokenizer_dir)
    model, tok = load(folder)
    quantize_model(model, bits=bits, group_size=64)
    ids = tok.encode(builders.LONG_TEXT)[:N_TOKENS]
    report = export(model, tok, tmp_path / "m.gguf")
    if bits == 4:
        assert report.kept and not report.requantized
        ours = _logits(model, ids)
    else:
        assert report.requantized
        ours = _logits(load(import_gguf(report.path, tmp_path / "back"))[0], ids)
    agree = _agree(llama_cpp_logits(report.path, ids), ours)
    print(f"\n{arch} MLX {bits}-bit -> {report.file_type}: agreement {agree:.3f}")
    assert agree >= 0.95


CHAT = "<|im_start|>user\nBonjour, ça va? 😀<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "llama-bpe", "qwen2", "spm"])
def test_llama_cpp_tokenizes_like_the_original(kind, tmp_path):
    tok_dir = tmp_path / "tok"
    if kind == "spm":
        builders.write_spm(tok_dir)
    else:
        builders.write_byte_bpe(tok_dir, kind)
    model, tok = load(builders.write_model(tmp_path / "model", "llama", tok_dir))
    path = export(model, tok, tmp_path / "m.gguf").path
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in [builders.LONG_TEXT, *builders.CORPUS]:
            expected = tok.encode(text)  # with the tokenizer's own BOS, if it adds one
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == expected, text
            if kind != "spm":  # (SentencePiece decoding drops the leading space)
                assert llm.detokenize(expected).decode() == text
        if kind != "spm":
            assert llm.tokenize(CHAT.encode(), add_bos=True, special=True) == tok.encode(CHAT)
    finally:
        llm.close()
