"""export(): tensors, layouts, metadata, quantized models, round trips, refusals, atomicity.

Files are read back with the `gguf` package's own reader and dequantizers (not ours), the
Q/K row order is checked against an index map written out with loops, and round trips go
through our importer and mlxlm-core's loader. llama.cpp itself reads these files in
tests-integration/tests/test_gguf_llamacpp.py.
"""

from __future__ import annotations

import math

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx.utils import tree_flatten
from mlxlm_core import load
from mlxlm_gguf import export, import_gguf

pytestmark = pytest.mark.timeout(120)

ARCHS = [
    "llama",
    "llama_bias",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
]
DENSE = [a for a in ARCHS if a not in ("qwen3_moe", "mixtral")]
# HF module -> llama.cpp block part, as llama.cpp's tensor list names them.
NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.switch_mlp.gate_proj": "ffn_gate_exps",
    "mlp.switch_mlp.up_proj": "ffn_up_exps",
    "mlp.switch_mlp.down_proj": "ffn_down_exps",
    "block_sparse_moe.switch_mlp.gate_proj": "ffn_gate_exps",
    "block_sparse_moe.switch_mlp.up_proj": "ffn_up_exps",
    "block_sparse_moe.switch_mlp.down_proj": "ffn_down_exps",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
# Gemma 2/3 norm around both halves of the block.
SANDWICH = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _tensors(path) -> dict[str, tuple[np.ndarray, Q]]:
    """name -> (values dequantized by the `gguf` package, logical shape, type)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        out[t.name] = (values.astype(np.float32), Q(t.tensor_type))
    return out


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _gguf_row_of_hf_row(n_heads: int, head_dim: int) -> np.ndarray:
    """idx[r] = the GGUF row holding HF row r, for llama.cpp's interleaved rope layout."""
    half = head_dim // 2
    idx = np.empty(n_heads * head_dim, dtype=np.int64)
    for h in range(n_heads):
        for p in range(2):
            for i in range(half):
                idx[h * head_dim + p * half + i] = h * head_dim + 2 * i + p
    return idx


def _logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


@pytest.fixture(scope="module")
def ids(builders, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir("gpt-2"))
    return tok(builders.LONG_TEXT)["input_ids"][:96]


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_tensors_hold_the_weights_in_llama_cpp_layout(arch, model_dir, tmp_path):
    model, tok = load(model_dir(arch))
    report = export(model, tok, tmp_path / "m.gguf", out_type="f32")
    tensors = _tensors(report.path)
    args = model.args
    assert report.architecture == _fields(report.path)["general.architecture"]
    interleaved = report.architecture == "llama"
    idx_q = _gguf_row_of_hf_row(args.num_attention_heads, args.head_dim)
    idx_k = _gguf_row_of_hf_row(args.num_key_value_heads, args.head_dim)
    names = NAMES | (SANDWICH if arch in ("gemma2", "gemma3_text") else {})
    params = dict(tree_flatten(model.parameters()))
    for hf, value in params.items():
        module, param = hf.rsplit(".", 1)
        if module.startswith("model.layers."):
            _, _, layer, part = module.split(".", 3)
            name = f"blk.{layer}.{names[part]}.{param}"
        else:
            name = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}.get(
                module, "output"
            ) + f".{param}"
        want = np.array(value)
        if arch.startswith("gemma") and hf.endswith("norm.weight"):
            want = want + 1.0  # Gemma's checkpoints store scale - 1; llama.cpp the scale
        if interleaved and name.split(".")[2:3] in (["attn_q"], ["attn_k"]):
            idx = idx_q if ".attn_q." in name else idx_k
            moved = np.empty_like(want)
            moved[idx] = want
            want = moved
        got, qtype = tensors.pop(name)
        assert qtype == Q.F32, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    extra = set(tensors) - {"rope_freqs.weight"}
    assert not extra, extra


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_gives_the_same_logits(arch, model_dir, ids, tmp_path):
    model, tok = load(model_dir(arch))
    ref = _logits(model, ids)
    exact = export(model, tok, tmp_path / "f32.gguf", out_type="f32")
    back, _ = load(import_gguf(exact.path, tmp_path / "f32"))
    np.testing.assert_allclose(_logits(back, ids), ref, rtol=1e-5, atol=1e-5)

    # f16: equal to the original with its matrices rounded to float16 (what the file holds;
    # norms, biases and MoE routers stay float32), and for dense models close to the
    # original itself.
    half = export(model, tok, tmp_path / "f16.gguf", out_type="f16")
    back, _ = load(import_gguf(half.path, tmp_path / "f16"))
    rounded = [
        (k, v.astype(mx.float16).astype(mx.float32))
        if v.ndim >= 2 and not k.endswith(".gate.weight")
        else (k, v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.load_weights(rounded)
    np.testing.assert_allclose(_logits(back, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    if arch in DENSE:  # (a rounded router weight may switch experts: MoE is left out)
        got = _logits(back, ids)
        rel = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert np.median(rel) < 5e-3 and rel.max() < 3e-2, rel
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.98


def test_metadata_llama(model_dir, tmp_path):
    model, tok = load(model_dir("llama"))
    fields = _fields(export(model, tok, tmp_path / "m.gguf", out_type="f16").path)
    a = model.args
    expected = {
        "general.architecture": "llama",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "llama.block_count": a.num_hidden_layers,
        "llama.context_length": a.max_position_embeddings,
        "llama.embedding_length": a.hidden_size,
        "llama.feed_forward_length": a.intermediate_size,
        "llama.attention.head_count": a.num_attention_heads,
        "llama.attention.head_count_kv": a.num_key_value_heads,
        "llama.attention.key_length": a.head_dim,
        "llama.rope.dimension_count": a.head_dim,
        "llama.vocab_size": a.vocab_size,
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(a.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(a.rms_norm_eps)
    # Llama 3 rope scaling: llama.cpp's per-frequency divisors, written out here by loops.
    rs, dims, base = a.rope_scaling, a.head_dim, a.rope_theta
    factor, lo, hi, old = (
        rs["factor"],
        rs["low_freq_factor"],
        rs["high_freq_factor"],
        rs["original_max_position_embeddings"],
    )
    divisors = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * base ** (i / dims)
        if wavelen < old / hi:
            divisors.append(1.0)
        elif wavelen > old / lo:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    got, qtype = _tensors(tmp_path / "m.gguf")["rope_freqs.weight"]
    assert qtype == Q.F32
    np.testing.assert_allclose(got, divisors, rtol=1e-6)


@pytest.mark.parametrize(
    ("arch", "keys"),
    [
        ("llama_bias", {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}),
        ("mixtral", {"llama.expert_count": 4, "llama.expert_used_count": 2}),
        (
            "qwen3_moe",
            {
                "qwen3moe.expert_count": 4,
                "qwen3moe.expert_used_count": 2,
                "qwen3moe.expert_feed_forward_length": 32,
                "qwen3moe.attention.key_length": 16,
            },
        ),
        ("qwen3", {"qwen3.attention.key_length": 32, "qwen3.rope.dimension_count": 32}),
        (
            "gemma2",
            {
                "gemma2.attn_logit_softcapping": 50.0,
                "gemma2.final_logit_softcapping": 30.0,
                "gemma2.attention.sliding_window": 32,
                "gemma2.attention.sliding_window_pattern": 2,
            },
        ),
        (
            "gemma3_text",
            {
                "gemma3.attention.sliding_window": 32,
                "gemma3.attention.sliding_window_pattern": 3,
                "gemma3.rope.freq_base_swa": 10000.0,
                "gemma3.rope.freq_base": 1_000_000.0,
                "gemma3.rope.scaling.type": "linear",
                "gemma3.rope.scaling.factor": 2.0,
            },
        ),
        ("phi3", {"phi3.rope.dimension_count": 8, "phi3.attention.key_length": 16}),
        (
            "qwen2_yarn",
            {
                "qwen2.rope.scaling.type": "yarn",
                "qwen2.rope.scaling.factor": 4.0,
                "qwen2.rope.scaling.original_context_length": 256,
            },
        ),
    ],
)
def test_metadata_per_architecture(arch, keys, model_dir, tmp_path):
    if arch == "qwen2_yarn":  # qwen2 with Qwen2.5's long-context setting
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
        model, tok = load(model_dir("qwen2"), model_config={"rope_scaling": yarn})
        path = export(model, tok, tmp_path / "m.gguf").path
        back, _ = load(import_gguf(path, tmp_path / "back"))
        assert back.args.rope_scaling == yarn
        assert {k: _fields(path)[k] for k in keys} == keys
        return
    model, tok = load(model_dir(arch))
    fields = _fields(export(model, tok, tmp_path / "m.gguf").path)
    assert {k: fields[k] for k in keys} == keys


@pytest.mark.parametrize(
    ("out_type", "qtype", "bound"),
    [
        ("bf16", Q.BF16, 2**-8),
        ("q8_0", Q.Q8_0, 1 / 127),
        ("q5_0", Q.Q5_0, 1 / 15),
        ("q5_1", Q.Q5_1, 1 / 31),
        ("q4_0", Q.Q4_0, 1 / 7),
        ("q4_1", Q.Q4_1, 1 / 15),
    ],
)
def test_out_types(out_type, qtype, bound, model_dir, tmp_path):
    model, tok = load(model_dir("qwen2"))
    report = export(model, tok, tmp_path / "m.gguf", out_type=out_type)
    tensors = _tensors(report.path)
    params = dict(tree_flatten(model.parameters()))
    assert report.file_type == f"MOSTLY_{qtype.name}"
    for name, (values, t) in tensors.items():
        if values.ndim == 1:
            assert t == Q.F32, name  # norms and biases stay exact
            continue
        assert t == qtype, name
    # Error per block bounded by the type's step (relative to the block's largest value).
    emb = np.array(params["model.embed_tokens.weight"])
    err = np.abs(tensors["token_embd.weight"][0] - emb).reshape(-1, 32)
    assert (err <= 1.1 * bound * np.abs(emb).reshape(-1, 32).max(-1, keepdims=True)).all()
