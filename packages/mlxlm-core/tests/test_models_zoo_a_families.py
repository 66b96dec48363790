"""Family-specific unit tests of the zoo A architectures: what each config field means,
checkpoint layouts, and the formulas (soft-capping, sparsemixer, Cohere's block) against
their definitions recomputed here.
"""

from __future__ import annotations

import _zoo as zoo  # registered by conftest.py
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlxlm_core.cache import QuantizedKVCache, make_prompt_cache
from mlxlm_core.models.base import attention

WINDOW = zoo.WINDOW
build, windows, toks, max_diff = zoo.build, zoo.windows, zoo.toks, zoo.max_diff
_args = zoo.model_args


# -- Gemma ----------------------------------------------------------------------------------


def test_gemma_gelu_is_the_tanh_approximation_unless_stated() -> None:
    assert _args("gemma").activation_name == "gelu_pytorch_tanh"
    assert _args("gemma", hidden_act="gelu").activation_name == "gelu_pytorch_tanh"  # legacy
    assert _args("gemma", hidden_activation="gelu").activation_name == "gelu"
    x = mx.array([-2.0, -0.5, 1.0, 3.0])
    layer = build("gemma").layers[0].mlp
    tanh_gelu = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    assert max_diff(layer.act(x), tanh_gelu) <= 1e-6


def test_gemma_embeddings_scaled_and_norms_offset_from_one() -> None:
    model = build("gemma")
    ids = toks((1, 3), seed=11)
    emb = model.model.embed_tokens(ids)
    assert max_diff(model.model.embed(ids, None), emb * 8.0) <= 1e-6  # sqrt(64)
    norm = model.model.norm
    x = mx.random.normal((2, 64))
    want = x / mx.sqrt(mx.mean(x * x, axis=-1, keepdims=True) + norm.eps) * (1 + norm.weight)
    assert max_diff(norm(x), want) <= 1e-5


def test_gemma2_layer_types_and_windows() -> None:
    assert _args("gemma2").layer_types == ["sliding_attention", "full_attention"] * 2
    assert windows(build("gemma2")) == [WINDOW, None, WINDOW, None]
    explicit = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert windows(build("gemma2", layer_types=explicit)) == [None, WINDOW, WINDOW, None]
    assert windows(build("gemma2", sliding_window=None)) == [None] * 4


def test_gemma2_final_logits_stay_inside_the_cap() -> None:
    logits = build("gemma2")(toks((2, 10), seed=12))
    assert float(mx.max(mx.abs(logits)).item()) < 5.0


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized-kv"])
def test_softcapped_attention_matches_its_definition(quantized: bool) -> None:
    """GQA attention with tanh-capped scores and a padded mask, recomputed in float64 numpy
    (on the dequantized keys/values when the cache stores them quantized)."""
    rng = np.random.default_rng(13)
    q = mx.array(rng.normal(size=(2, 4, 3, 32)).astype(np.float32))
    k = mx.array(rng.normal(size=(2, 2, 7, 32)).astype(np.float32)) * 3
    v = mx.array(rng.normal(size=(2, 2, 7, 32)).astype(np.float32))
    mask = mx.array(rng.random((2, 1, 3, 7)) > 0.3) | (mx.arange(7) == 6)
    cache, keys, values = None, k, v
    if quantized:
        cache = QuantizedKVCache(bits=8, group_size=32)
        keys, values = (tuple(mx.quantize(a, group_size=32, bits=8)) for a in (k, v))
        k, v = (mx.dequantize(*a, group_size=32, bits=8) for a in (keys, values))
    out = attention(q, keys, values, cache=cache, scale=0.2, mask=mask, softcap=2.0)
    qn, kn, vn = (
        np.repeat(np.array(a, np.float64), r, axis=1) for a, r in ((q, 1), (k, 2), (v, 2))
    )
    scores = 2.0 * np.tanh(0.2 * qn @ kn.swapaxes(-1, -2) / 2.0)
    scores = np.where(np.array(mask), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    want = (weights / weights.sum(-1, keepdims=True)) @ vn
    np.testing.assert_allclose(np.array(out), want, atol=1e-5)


def test_gemma_residual_is_clipped_in_float16() -> None:
    from mlxlm_core.models.gemma2 import add_residual

    big = mx.array([60000.0, -60000.0, 1.0], dtype=mx.float16)
    out = add_residual(big, big)
    assert out.dtype == mx.float16 and bool(mx.all(mx.isfinite(out)).item())
    assert out.tolist() == [65504.0, -65504.0, 2.0]


def test_gemma3_reads_layer_types_and_nested_rope_parameters() -> None:
    args = _args(
        "gemma3_text",
        num_hidden_layers=7,
        sliding_window_pattern=6,
        rope_scaling=None,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 5e3},
        },
    )
    assert args.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert (args.rope_theta, args.rope_local_base_freq) == (5e5, 5e3)
    assert args.rope_scaling["factor"] == 8.0
    model = build("gemma3_text")
    local, glob = model.layers[0].self_attn.rope, model.layers[2].self_attn.rope
    assert (local.base, local.scale) == (10_000.0, 1.0)
    assert (glob.base, glob.scale) == (1_000_000.0, 0.5)


def test_gemma_untied_config_whose_checkpoint_has_no_head_uses_the_embeddings() -> None:
    source = build("gemma3_text")  # tied: no lm_head among its parameters
    weights = dict(tree_flatten(source.parameters()))
    untied = build("gemma3_text", tie_word_embeddings=False, seed=5)
    untied.load_weights(list(untied.sanitize(weights).items()), strict=True)
    ids = toks((1, 6), seed=17)
    assert "lm_head" in untied and max_diff(untied(ids), source(ids)) <= 1e-6


# -- Phi-3 ----------------------------------------------------------------------------------


def test_phi3_longrope_settings() -> None:
    """``su`` is longrope; the top-level original length reaches the rope; a window as long
    as the context is dropped (a growing, trimmable cache instead of a rotating one)."""
    args = _args("phi3_longrope")
    assert args.rope_scaling["rope_type"] == "longrope"
    assert args.rope_scaling["original_max_position_embeddings"] == 64
    rope = build("phi3_longrope").layers[0].self_attn.rope
    assert rope.dims == 12  # 0.75 of head_dim 16
    base = 10000.0 ** (np.arange(0, 12, 2) / 12)
    np.testing.assert_allclose(np.array(rope._freqs), np.arange(1, 7) * base, rtol=1e-5)
    assert rope.input_scale == pytest.approx(np.sqrt(1 + np.log(8) / np.log(64)))
    assert _args("phi3", sliding_window=4096).sliding_window is None
    assert _args("phi3", sliding_window=2047).sliding_window == 2047


# -- PhiMoE ---------------------------------------------------------------------------------


def _np_sparsemixer(logits: np.ndarray, k: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """transformers' sparsemixer (inference), one token at a time in float64."""
    idx, wts = np.zeros((len(logits), k), int), np.zeros((len(logits), k))
    for t, row in enumerate(logits.astype(np.float64)):
        masked = row.copy()
        for i in range(k):
            best, choice = masked.max(), int(masked.argmax())
            keep = (best - row) / np.maximum(np.abs(row), best) <= 2 * eps
            z = np.where(keep, masked, -np.inf)
            probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            idx[t, i], wts[t, i] = choice, probs[choice]
            masked[choice] = -np.inf
    return idx, wts


def test_sparsemixer_matches_its_definition() -> None:
    from mlxlm_core.models.phimoe import sparsemixer

    logits = np.random.default_rng(14).normal(size=(50, 6)).astype(np.float32) * 2
    for k, eps in ((1, 0.01), (2, 0.01), (2, 0.3), (3, 1.0)):
        got_idx, got_w = sparsemixer(mx.array(logits), top_k=k, jitter_eps=eps)
        want_idx, want_w = _np_sparsemixer(logits, k, eps)
        np.testing.assert_array_equal(np.array(got_idx), want_idx)
        np.testing.assert_allclose(np.array(got_w), want_w, atol=1e-6)
        if (k, eps) == (2, 0.3):  # the band admits some rivals and not others
            assert 0.05 < float(np.mean(want_w < 0.999)) < 0.95


# -- StarCoder2 -----------------------------------------------------------------------------


def test_starcoder2_follows_its_config() -> None:
    model = build("starcoder2")
    layer = model.layers[0]
    assert isinstance(layer.input_layernorm, nn.LayerNorm) and "bias" in layer.input_layernorm
    assert isinstance(model.model.norm, nn.LayerNorm)
    assert "bias" in layer.self_attn.o_proj and "bias" in layer.mlp.c_fc
    assert layer.mlp.act is nn.gelu_approx  # gelu_pytorch_tanh, transformers' default
    plain = build("starcoder2", use_bias=False, hidden_act="gelu").layers[0]
    assert "bias" not in plain.self_attn.q_proj and "bias" not in plain.mlp.c_proj
    assert plain.mlp.act is nn.gelu


# -- GPT-2 ----------------------------------------------------------------------------------


def test_gpt2_reads_conv1d_checkpoints_with_or_without_prefix() -> None:
    """A Hugging Face checkpoint stores (in, out) Conv1D matrices, with buffers, under
    ``transformer.`` (GPT2LMHeadModel) or bare (GPT2Model); both load our exact weights."""
    source = build("gpt2")
    ours = dict(tree_flatten(source.parameters()))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf = {k.removeprefix("model."): (v.T if k.endswith(conv1d) else v) for k, v in ours.items()}
    hf["h.0.attn.bias"] = mx.tril(mx.ones((64, 64)))[None, None]
    for prefix in ("", "transformer."):
        weights = {prefix + k: v for k, v in hf.items()}
        if prefix:
            weights["lm_head.weight"] = ours["model.wte.weight"]
        loaded = build("gpt2", seed=99)
        loaded.load_weights(list(loaded.sanitize(weights).items()), strict=True)
        for key, value in tree_flatten(loaded.parameters()):
            assert mx.array_equal(value, ours[key]), key
    assert set(source.sanitize(dict(ours))) == set(ours)  # converted names pass through


def test_gpt2_positions_are_bounded_by_n_positions() -> None:
    from mlxlm_core import ContextLengthError

    model = build("gpt2")
    cache = make_prompt_cache(model)
    model(toks((1, 60)), cache)
    model(toks((1, 4)), cache)  # positions 60..63: the last ones there are
    with pytest.raises(ContextLengthError, match="64 learned positions"):
        model(toks((1, 1)), cache)
    with pytest.raises(ContextLengthError):
        model(toks((1, 65)))


# -- GPT-NeoX -------------------------------------------------------------------------------


def test_gpt_neox_config_spellings_and_head_major_qkv() -> None:
    old = _args("gpt_neox", rotary_emb_base=5000.0, rotary_pct=0.25)
    new = _args(
        "gpt_neox",
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000.0,
            "partial_rotary_factor": 0.25,
        },
    )
    assert (old.rope_theta, old.rotary_pct) == (new.rope_theta, new.rotary_pct) == (5000.0, 0.25)
    assert old.intermediate_size == 256
    # Head h's values are rows [h*48 + 32, h*48 + 48) of query_key_value: zeroing exactly
    # head 1's value rows must zero head 1's slice of the attention output.
    attn = build("gpt_neox").layers[0].attention
    weight = attn.query_key_value.weight
    rows = mx.arange(weight.shape[0])
    keep = ~((rows >= 48 + 32) & (rows < 96))
    attn.query_key_value.weight = weight * keep[:, None]
    attn.query_key_value.bias = attn.query_key_value.bias * keep
    captured = []
    dense = attn.dense
    attn.dense = lambda out: captured.append(out) or dense(out)
    attn(mx.random.normal((1, 5, 64)), "causal", None)
    out = captured[0].reshape(1, 5, 4, 16)
    assert float(mx.max(mx.abs(out[:, :, 1])).item()) == 0.0
    assert float(mx.min(mx.max(mx.abs(out), axis=(0, 1, 3))[mx.array([0, 2, 3])]).item()) > 0


def test_gpt_neox_sanitize_maps_hf_names_and_drops_buffers() -> None:
    source = build("gpt_neox", tie_word_embeddings=False)
    ours = dict(tree_flatten(source.parameters()))
    hf = {
        k.replace("model.h.", "gpt_neox.layers.")
        .replace("model.embed_in", "gpt_neox.embed_in")
        .replace("model.final_layer_norm", "gpt_neox.final_layer_norm")
        .replace("model.embed_out", "embed_out"): v
        for k, v in ours.items()
    }
    hf["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = mx.ones((4,))
    hf["gpt_neox.layers.1.attention.bias"] = mx.ones((1, 1, 8, 8))
    assert set(source.sanitize(hf)) == set(ours)
    tied = build("gpt_neox")
    assert "embed_out" not in tied.model and "model.embed_out.weight" not in tied.sanitize(hf)


# -- Cohere ---------------------------------------------------------------------------------


def test_cohere_parallel_block_and_logit_scale() -> None:
    """The block is x + attn(norm(x)) + mlp(norm(x)); logits are the tied head times
    logit_scale; the q/k norms are per-head, bias-free LayerNorms."""
    model = build("cohere")
    layer = model.layers[0]
    assert "post_attention_layernorm" not in layer and "bias" not in layer.input_layernorm
    x = mx.random.normal((1, 4, 64))
    h = layer.input_layernorm(x)
    want = x + layer.self_attn(h, "causal", None) + layer.mlp(h)
    assert max_diff(layer(x, "causal", None), want) <= 1e-5
    q = mx.random.normal((1, 4, 4, 16))
    norm = layer.self_attn.q_norm
    mean, var = mx.mean(q, -1, keepdims=True), mx.var(q, -1, keepdims=True)
    assert max_diff(norm(q), (q - mean) / mx.sqrt(var + 1e-5) * norm.weight) <= 1e-5
    ids = toks((1, 5), seed=15)
    hidden = model.model(ids)
    assert max_diff(model(ids), model.model.embed_tokens.as_linear(hidden) * 0.8333) <= 1e-5
