"""Unit tests of the Gemma, Phi, StarCoder2, GPT-2, GPT-NeoX and Cohere architectures.

Tiny random configs, float32 unless stated. References are independent computations:
the same model without a cache, a cropped input for sliding windows, float weights for the
quantized twins, the unfused adapter for the fused one, the definition of a formula.
Logits parity with the published mlx-lm is tests-integration/tests/test_model_parity_zoo_a.py.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core.adapters import adapter_parameters, apply_lora_layers, fuse_adapters
from mlxlm_core.cache import (
    QuantizedKVCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)
from mlxlm_core.models import SUPPORTED_MODEL_TYPES, get_model_classes
from mlxlm_core.models.base import attention

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": 128,
}
WINDOW = 6
CONFIGS: dict[str, dict[str, Any]] = {
    "gemma": {**_COMMON, "model_type": "gemma", "head_dim": 32},
    "gemma2": {
        **_COMMON,
        "model_type": "gemma2",
        "num_hidden_layers": 4,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 10.0,
        "final_logit_softcapping": 5.0,
        "sliding_window": WINDOW,
    },
    "gemma3_text": {
        **_COMMON,
        "model_type": "gemma3_text",
        "num_hidden_layers": 4,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "sliding_window": WINDOW,
        "sliding_window_pattern": 3,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
    # Phi-3-mini-4k's shape: a window shorter than the context.
    "phi3": {
        **_COMMON,
        "model_type": "phi3",
        "sliding_window": WINDOW,
        "max_position_embeddings": 4096,
    },
    "phi3_longrope": {
        **_COMMON,
        "model_type": "phi3",
        "partial_rotary_factor": 0.75,
        "max_position_embeddings": 512,
        "original_max_position_embeddings": 64,
        "rope_scaling": {"type": "su", "long_factor": [1, 2, 3, 4, 5, 6], "short_factor": [1] * 6},
    },
    "phimoe": {
        **_COMMON,
        "model_type": "phimoe",
        "intermediate_size": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "router_jitter_noise": 0.25,
        "attention_bias": True,
        "lm_head_bias": True,
    },
    "starcoder2": {
        **{k: v for k, v in _COMMON.items() if k != "rms_norm_eps"},
        "model_type": "starcoder2",
        "norm_epsilon": 1e-5,
        "sliding_window": WINDOW,
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 64,
        "n_head": 4,
        "n_layer": 2,
        "n_positions": 64,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": 128,
    },
    "gpt_neox": {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 128,
        "rotary_pct": 0.5,
        "tie_word_embeddings": True,
    },
    "cohere": {
        **{k: v for k, v in _COMMON.items() if k != "rms_norm_eps"},
        "model_type": "cohere",
        "logit_scale": 0.8333,
        "use_qk_norm": True,
    },
}
ARCHS = list(CONFIGS)
SCALE = 4.0  # LoRA scale


def build(name: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    config = {**copy.deepcopy(CONFIGS[name]), **overrides}
    model_cls, args_cls = get_model_classes(config["model_type"])
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    # Random norms and biases: fresh ones (ones/zeros) would hide misplaced ones.
    params = []
    for key, value in tree_flatten(model.parameters()):
        if key.endswith(".bias") or "norm" in key or ".ln_" in key:
            value = mx.random.normal(value.shape) * 0.2 + (0.0 if key.endswith("bias") else 1.0)
        params.append((key, value))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def windows(model: nn.Module) -> list[int | None]:
    return [getattr(c, "max_size", None) for c in make_prompt_cache(model)]


def toks(shape: tuple[int, ...], seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 128, size=shape))


def max_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, build(request.param, seed=ARCHS.index(request.param))


def test_registered() -> None:
    assert {CONFIGS[n]["model_type"] for n in ARCHS} <= set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("name", ARCHS)
def test_forward_shapes_and_dtypes(name: str, dtype: mx.Dtype) -> None:
    model = build(name)
    model.set_dtype(dtype)
    cache = make_prompt_cache(model, batch_size=2)
    logits = model(toks((2, 5)), cache)
    assert logits.shape == (2, 5, 128) and logits.dtype == dtype
    step = model(toks((2, 1), seed=1), cache)
    assert step.shape == (2, 1, 128) and bool(mx.all(mx.isfinite(step)).item())
    assert all(c.size() == 6 for c in cache)


def test_cached_decode_equals_uncached_forward(arch: tuple[str, nn.Module]) -> None:
    """Also the per-layer masks: 14 tokens outgrow the 6-token windows."""
    model = arch[1]
    seq = toks((2, 14), seed=2)
    full = model(seq)
    cache = make_prompt_cache(model, batch_size=2)
    parts = [model(seq[:, :9], cache)] + [model(seq[:, i : i + 1], cache) for i in range(9, 14)]
    assert max_diff(mx.concatenate(parts, axis=1), full) <= 1e-4


def test_trim_then_refeed_gives_same_logits(arch: tuple[str, nn.Module]) -> None:
    model = arch[1]
    prompt, more = toks((1, 10), seed=3), toks((1, 4), seed=4)
    cache = make_prompt_cache(model)
    model(prompt, cache)
    if any(w is not None for w in windows(model)):
        # A window rotates its history out, so it refuses to trim instead of corrupting.
        assert not can_trim_prompt_cache(cache) and trim_prompt_cache(cache, 4) == 0
        return
    first = model(more, cache)
    assert trim_prompt_cache(cache, 4) == 4
    assert all(c.size() == 10 for c in cache)
    assert max_diff(model(more, cache), first) <= 1e-5


def test_max_kv_size_bounds_every_cache(arch: tuple[str, nn.Module]) -> None:
    model = arch[1]
    bound = 8
    cache = make_prompt_cache(model, max_kv_size=bound)
    logits = model(toks((1, 20), seed=5), cache)
    assert all(c.size() <= bound for c in cache)
    for _ in range(30):
        logits = model(mx.argmax(logits[:, -1:], axis=-1), cache)
        assert all(c.size() <= bound for c in cache)
    assert bool(mx.all(mx.isfinite(logits)).item())


WINDOWED = [n for n in ARCHS if CONFIGS[n].get("sliding_window")]


@pytest.mark.parametrize("name", WINDOWED)
def test_sliding_window_matches_cropped_input(name: str) -> None:
    """With one (sliding) layer, position t sees exactly tokens t-w+1..t; rope is relative,
    so the cropped input's last logits equal position t of the windowed run."""
    model = build(name, num_hidden_layers=1)
    assert windows(model) == [WINDOW]
    seq = toks((1, 17), seed=6)
    full = model(seq)
    cache = make_prompt_cache(model)
    cached = mx.concatenate(
        [model(seq[:, :10], cache)] + [model(seq[:, i : i + 1], cache) for i in range(10, 17)],
        axis=1,
    )
    assert all(c.size() <= WINDOW for c in cache)
    for t in range(WINDOW - 1, 17):
        crop = model(seq[:, t - WINDOW + 1 : t + 1])[:, -1]
        assert max_diff(full[:, t], crop) <= 1e-4, t
        assert max_diff(cached[:, t], crop) <= 1e-4, t


def dequantized_copy(name: str, quantized: nn.Module) -> nn.Module:
    """A float model holding exactly the values the quantized model computes with."""
    weights = dict(tree_flatten(quantized.parameters()))
    for path, module in quantized.named_modules():
        if "scales" in module:
            prefix = f"{path}." if path else ""
            for leaf in ("scales", "biases"):
                weights.pop(prefix + leaf, None)
            weights[prefix + "weight"] = mx.dequantize(
                module["weight"],
                module["scales"],
                module.get("biases"),
                group_size=module.group_size,
                bits=module.bits,
                mode=module.mode,
            )
    model = build(name)
    model.load_weights(list(weights.items()), strict=True)
    return model


@pytest.mark.parametrize("name", ARCHS)
def test_quantized_weights(name: str) -> None:
    """Exactly the dequantized float model; close to the original (8 bits, groups of 32:
    within 5% in relative L2 norm; random tiny models with sandwich norms and sharp softmaxes
    amplify the ~0.7% per-weight error, a broken layout gives ~100%). Routers are made
    decisive, as trained ones are."""
    model = build(name)
    decisive = [(k, 10 * v) for k, v in tree_flatten(model.parameters()) if ".gate.weight" in k]
    model.load_weights(decisive, strict=False)
    seq = toks((1, 12), seed=7)
    want = model(seq)
    nn.quantize(model, group_size=32, bits=8)
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert not kinds & {"Linear", "Embedding", "SwitchLinear"}
    got = model(seq, make_prompt_cache(model))
    assert max_diff(got, dequantized_copy(name, model)(seq)) <= 1e-4
    assert float((mx.linalg.norm(got - want) / mx.linalg.norm(want)).item()) <= 0.05


@pytest.mark.parametrize("name", ARCHS)
def test_lora_adapter_changes_logits_and_fuses(name: str) -> None:
    model = build(name)
    seq = toks((1, 9), seed=8)
    base = model(seq)
    apply_lora_layers(model, num_layers=0, rank=4, scale=SCALE)  # every block, every layer
    assert max_diff(model(seq), base) <= 1e-5  # lora_b starts at zero
    mx.random.seed(9)
    trained = [
        (k, 0.05 * mx.random.normal(v.shape))
        for k, v in adapter_parameters(model).items()
        if k.endswith("lora_b")
    ]
    model.update(tree_unflatten(trained))
    adapted = model(seq)
    assert max_diff(adapted, base) > 1e-2
    fuse_adapters(model)
    assert not adapter_parameters(model)
    assert max_diff(model(seq), adapted) <= 1e-4


def test_shard_on_a_single_rank_keeps_logits(arch: tuple[str, nn.Module]) -> None:
    name, model = arch
    seq = toks((1, 6), seed=10)
    want = model(seq)
    clone = build(name)
    clone.update(model.parameters())
    clone.shard(mx.distributed.init())
    assert max_diff(clone(seq), want) <= 1e-5


# -- Gemma ----------------------------------------------------------------------------------


def _args(name: str, **overrides: Any) -> Any:
    config = {**copy.deepcopy(CONFIGS[name]), **overrides}
    return get_model_classes(config["model_type"])[1].from_dict(config)


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


# -- tensor parallelism over two real ranks -------------------------------------------------

_SHARD_WORKER = """
import json, sys
import mlx.core as mx
from test_models_zoo_a import ARCHS, build, max_diff, toks
from mlxlm_core.cache import make_prompt_cache

group = mx.distributed.init(backend="ring", strict=True)
diffs = {}
for name in ARCHS:
    seq = toks((2, 9), seed=16)
    want = build(name, seed=1)(seq)
    model = build(name, seed=1)
    model.shard(group)
    cache = make_prompt_cache(model, batch_size=2)
    got = mx.concatenate([model(seq[:, :7], cache), model(seq[:, 7:8], cache),
                          model(seq[:, 8:], cache)], axis=1)
    diffs[name] = max_diff(got, want)
if group.rank() == 0:
    print(json.dumps(diffs))
"""


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_shard_over_two_ranks_matches_the_unsharded_model(tmp_path) -> None:
    """Two processes joined by MLX's ring backend over loopback: each architecture split in
    two (heads, fused q/k/v segments, per-head norms, experts' hidden units) gives the
    unsharded logits, for a prefill and cached decode steps."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(2)]))
    env = {
        **os.environ,
        "MLX_HOSTFILE": str(hostfile),
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARD_WORKER],
            env={**env, "MLX_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    diffs = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert set(diffs) == set(ARCHS)
    assert all(d <= 1e-4 for d in diffs.values()), diffs
