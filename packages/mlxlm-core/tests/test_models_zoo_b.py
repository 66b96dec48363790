"""Unit tests of further architectures (tiny random configs, float32 unless stated).

Every architecture goes through the same checks as test_models.py's: shapes in float32 and
float16, cached decode against the uncached forward, trimming, a ``max_kv_size`` bound,
quantized weights against the float model holding the dequantized values, a LoRA adapter
(it changes the logits; fused equals unfused) and sharding over one rank. Features that
mlx-lm does not implement (and so tests-integration cannot compare) are checked here
against float64 numpy written from transformers' definitions.
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
from mlxlm_core.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlxlm_core.models import SUPPORTED_MODEL_TYPES, get_model_classes

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2_moe": {
        **_COMMON,
        "model_type": "qwen2_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 96,
        "norm_topk_prob": True,
        "mlp_only_layers": [1],
    },
    "olmo2": {**_COMMON, "model_type": "olmo2"},
    "olmo3": {**_COMMON, "model_type": "olmo3", "num_hidden_layers": 4, "sliding_window": 5},
    "granite": {
        **_COMMON,
        "model_type": "granite",
        "embedding_multiplier": 12.0,
        "logits_scaling": 8.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.015625,
    },
    "minicpm": {
        **_COMMON,
        "model_type": "minicpm",
        "scale_emb": 12.0,
        "scale_depth": 1.4,
        "dim_model_base": 16,
    },
    "internlm2": {**_COMMON, "model_type": "internlm2", "bias": True},
    "internlm3": {
        **_COMMON,
        "model_type": "internlm3",
        "head_dim": 16,
        "qkv_bias": True,  # o_proj and MLP unbiased (bias: False)
        "bias": False,
    },
    "exaone": {**_COMMON, "model_type": "exaone", "attention_bias": True, "mlp_bias": True},
    "glm4": {**_COMMON, "model_type": "glm4", "head_dim": 32},
    "glm4_moe": {
        **_COMMON,
        "model_type": "glm4_moe",
        "head_dim": 32,
        "use_qk_norm": True,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_group": 2,
        "topk_group": 1,
    },
    "ernie4_5": {**_COMMON, "model_type": "ernie4_5", "head_dim": 16, "use_bias": True},
    "smollm3": {**_COMMON, "model_type": "smollm3", "no_rope_layer_interval": 2},
    "deepseek_v2": {
        **_COMMON,
        "model_type": "deepseek_v2",
        "q_lora_rank": None,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "topk_method": "group_limited_greedy",
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 16.0,
        "rope_scaling": {"type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707},
    },
    "deepseek_v3": {
        **_COMMON,
        "model_type": "deepseek_v3",
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "rope_scaling": {"type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
}
ARCHS = list(CONFIGS)


def build(name: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    config = {**copy.deepcopy(CONFIGS[name]), **overrides}
    model_cls, args_cls = get_model_classes(config["model_type"])
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    # Constant vectors (norms, biases) get random values: ones/zeros would hide misuse.
    params = [
        (k, v + 0.2 * mx.random.normal(v.shape) if v.ndim == 1 else v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def toks(shape: tuple[int, ...], seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 128, size=shape))


def max_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


def windows(model: nn.Module) -> list[int | None]:
    """Each layer's sliding window (Llama-derived stacks record them)."""
    stack = getattr(model, "model", None)
    return list(getattr(stack, "windows", None) or [None] * len(model.layers))


def rel_diff(a: mx.array, b: mx.array) -> float:
    return max_diff(a, b) / float(mx.max(mx.abs(b)).item())


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, build(request.param, seed=ARCHS.index(request.param))


def test_every_architecture_is_registered() -> None:
    assert {c["model_type"] for c in CONFIGS.values()} <= set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("name", ARCHS)
def test_forward_shapes_and_dtypes(name: str, dtype: mx.Dtype) -> None:
    model = build(name)
    model.set_dtype(dtype)
    cache = make_prompt_cache(model, batch_size=2)
    logits = model(toks((2, 5)), cache)
    assert logits.shape == (2, 5, 128) and logits.dtype == dtype
    step = model(toks((2, 1), seed=1), cache)
    assert step.shape == (2, 1, 128) and step.dtype == dtype
    assert bool(mx.all(mx.isfinite(step)).item())
    assert [c.size() for c in cache] == [min(6, w or 6) for w in windows(model)]


def test_cached_decode_equals_uncached_forward(arch: tuple[str, nn.Module]) -> None:
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
    if any(windows(model)):
        # A window rotates its history out, so it refuses to trim instead of corrupting.
        assert not can_trim_prompt_cache(cache) and trim_prompt_cache(cache, 4) == 0
        return
    assert can_trim_prompt_cache(cache)
    first = model(more, cache)
    assert trim_prompt_cache(cache, 4) == 4
    assert all(c.size() == 10 for c in cache)
    assert max_diff(model(more, cache), first) <= 1e-5


def test_max_kv_size_bounds_every_cache(arch: tuple[str, nn.Module]) -> None:
    """The bound holds through a long prompt and generation, and inside the bound the
    rotating cache changes nothing."""
    model = arch[1]
    bound = 8
    cache = make_prompt_cache(model, max_kv_size=bound)
    seq = toks((1, 7), seed=5)
    assert max_diff(model(seq, cache), model(seq)) <= 1e-4  # 7 < bound: nothing dropped
    logits = model(toks((1, 20), seed=6), cache)
    assert all(c.size() <= bound for c in cache)
    for _ in range(24):
        logits = model(mx.argmax(logits[:, -1:], axis=-1), cache)
        assert all(c.size() <= bound for c in cache)
    assert bool(mx.all(mx.isfinite(logits)).item())


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
    """nn.quantize swaps every quantizable layer; the result computes what the float model
    with the dequantized weights computes, and 8 bits stay within 3% of the float logits.
    Routers are made decisive (as trained ones are) so rounding does not swap experts."""
    model = build(name)
    # x3: decisive, yet short of saturating DeepSeek-V3's sigmoid scores into ties.
    decisive = [(k, 3 * v) for k, v in tree_flatten(model.parameters()) if ".gate.weight" in k]
    model.load_weights(decisive, strict=False)
    seq = toks((1, 12), seed=7)
    want = model(seq)
    nn.quantize(model, group_size=32, bits=8)
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert not kinds & {"Linear", "Embedding", "SwitchLinear", "MultiLinear"}, kinds
    got = model(seq, make_prompt_cache(model))
    assert max_diff(got, dequantized_copy(name, model)(seq)) <= 1e-4
    assert rel_diff(got, want) <= 0.03


@pytest.mark.parametrize("name", ARCHS)
def test_lora_adapter_changes_logits_and_fuses(name: str) -> None:
    model = build(name)
    seq = toks((1, 9), seed=8)
    base = model(seq)
    apply_lora_layers(model, num_layers=-1, rank=4, scale=2.0)
    assert max_diff(model(seq), base) <= 1e-5  # fresh adapters: lora_b is zero
    mx.random.seed(3)
    trained = [
        (k, 0.05 * mx.random.normal(v.shape))
        for k, v in adapter_parameters(model).items()
        if k.endswith("lora_b")
    ]
    model.update(tree_unflatten(trained))
    adapted = model(seq)
    assert max_diff(adapted, base) > 1e-3
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


# -- Qwen2-MoE ---------------------------------------------------------------------------


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _np_swiglu(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    a = x @ gate.T
    return (a / (1 + np.exp(-a)) * (x @ up.T)) @ down.T


def test_qwen2_moe_block_matches_transformers_definition() -> None:
    """Softmax over all experts, top-k renormalised (norm_topk_prob), plus the shared
    expert scaled by sigmoid(shared_expert_gate) (transformers' Qwen2MoeSparseMoeBlock)."""
    model = build("qwen2_moe")
    moe = model.layers[0].mlp
    x = mx.random.normal((5, 64), key=mx.random.key(1))
    got = _np(moe(x))
    xs = _np(x)
    logits = xs @ _np(moe.gate.weight).T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    sw = moe.switch_mlp
    want = np.zeros_like(xs)
    for t in range(xs.shape[0]):
        top = np.argsort(-probs[t])[:2]
        weights = probs[t, top] / probs[t, top].sum()
        for e, w in zip(top, weights, strict=True):
            want[t] += w * _np_swiglu(
                xs[t],
                _np(sw.gate_proj.weight[e]),
                _np(sw.up_proj.weight[e]),
                _np(sw.down_proj.weight[e]),
            )
    se = moe.shared_expert
    shared = _np_swiglu(
        xs, _np(se.gate_proj.weight), _np(se.up_proj.weight), _np(se.down_proj.weight)
    )
    want += shared / (1 + np.exp(-(xs @ _np(moe.shared_expert_gate.weight).T)))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_qwen2_moe_layer_placement() -> None:
    model = build("qwen2_moe", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    assert ["switch_mlp" in layer.mlp for layer in model.layers] == [False, True, False, False]


# -- OLMo 2 ------------------------------------------------------------------------------


def test_olmo2_sharded_norm_on_one_rank_is_the_full_norm() -> None:
    from mlxlm_core.models.olmo2 import ShardedRMSNorm

    norm = nn.RMSNorm(64, eps=1e-6)
    norm.weight = 1 + 0.2 * mx.random.normal((64,), key=mx.random.key(2))
    x = mx.random.normal((3, 64), key=mx.random.key(3))
    one = ShardedRMSNorm.split(norm, mx.distributed.init())
    assert max_diff(one(x), norm(x)) <= 1e-5
    assert max_diff(one(x.astype(mx.float16)), norm(x)) <= 1e-2


# -- Granite, MiniCPM --------------------------------------------------------------------


def test_granite_scales_caller_embeddings_too() -> None:
    model = build("granite")
    seq = toks((1, 6), seed=11)
    assert max_diff(model(seq, input_embeddings=model.model.embed_tokens(seq)), model(seq)) == 0


def test_minicpm_scales_only_looked_up_embeddings() -> None:
    model = build("minicpm")
    seq = toks((1, 6), seed=12)
    scaled = model.model.embed_tokens(seq) * 12.0
    assert max_diff(model(seq, input_embeddings=scaled), model(seq)) <= 1e-6


def test_minicpm_untied_config_over_a_headless_checkpoint_uses_the_embedding() -> None:
    tied = build("minicpm", tie_word_embeddings=True)
    weights = dict(tree_flatten(tied.parameters()))
    model_cls, args_cls = get_model_classes("minicpm")
    untied = model_cls(args_cls.from_dict({**CONFIGS["minicpm"], "tie_word_embeddings": False}))
    untied.load_weights(list(untied.sanitize(weights).items()), strict=True)
    seq = toks((1, 6), seed=13)
    assert max_diff(untied(seq), tied(seq)) <= 1e-5


# -- SmolLM3 -----------------------------------------------------------------------------


def test_smollm3_nope_layers_and_their_sliding_windows() -> None:
    """transformers' reading: every interval-th block has no rope; with use_sliding_window
    those blocks (or the ones layer_types marks) attend within the window."""
    from mlxlm_core.models.smollm3 import NoRope

    model = build("smollm3", num_hidden_layers=4, no_rope_layer_interval=2)
    assert [isinstance(layer.self_attn.rope, NoRope) for layer in model.layers] == [
        False,
        True,
        False,
        True,
    ]
    assert model.model.windows == (None,) * 4  # sliding_window alone does nothing
    windowed = build(
        "smollm3",
        num_hidden_layers=4,
        no_rope_layer_interval=2,
        use_sliding_window=True,
        sliding_window=5,
    )
    assert windowed.model.windows == (None, 5, None, 5)
    types = ["sliding_attention", "full_attention", "full_attention", "full_attention"]
    explicit = build(
        "smollm3", use_sliding_window=True, sliding_window=5, num_hidden_layers=4, layer_types=types
    )
    assert explicit.model.windows == (5, None, None, None)
    # Mixed windows: each layer's rotating cache and mask still give the uncached forward.
    seq = toks((2, 13), seed=14)
    cache = make_prompt_cache(windowed, batch_size=2)
    parts = [windowed(seq[:, :8], cache)] + [
        windowed(seq[:, i : i + 1], cache) for i in range(8, 13)
    ]
    assert max_diff(mx.concatenate(parts, axis=1), windowed(seq)) <= 1e-4
    assert [c.size() for c in cache] == [13, 5, 13, 5]


# -- DeepSeek ----------------------------------------------------------------------------


def _np_v3_route(logits: np.ndarray, bias: np.ndarray, *, k: int, groups: int, keep: int):
    """transformers' DeepseekV3TopkRouter, one token: (chosen experts, their weights)."""
    scores = 1 / (1 + np.exp(-logits))
    choice = scores + bias
    per_group = choice.reshape(groups, -1)
    group_scores = np.sort(per_group, axis=-1)[:, -2:].sum(-1)
    kept = np.argsort(-group_scores)[:keep]
    mask = np.full_like(per_group, -np.inf)
    mask[kept] = 0
    chosen = np.argsort(-(per_group + mask).reshape(-1))[:k]
    weights = scores[chosen] / (scores[chosen].sum() + 1e-20)
    return chosen, weights


def _np_v2_grouped_route(logits: np.ndarray, *, k: int, groups: int, keep: int):
    """transformers' DeepseekV2TopkRouter (group_limited_greedy), one token."""
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    per_group = scores.reshape(groups, -1).copy()
    per_group[np.argsort(-per_group.max(-1))[keep:]] = 0.0
    masked = per_group.reshape(-1)
    chosen = np.argsort(-masked)[:k]
    return chosen, masked[chosen]


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_router_matches_transformers_definition(name: str) -> None:
    model = build(name)
    router = model.layers[1].mlp.gate
    rng = np.random.default_rng(4)
    router.weight = mx.array(rng.normal(size=router.weight.shape).astype(np.float32))
    if name == "deepseek_v3":
        # Negative biased scores: experts of excluded groups must lose even to those.
        bias = 0.5 * rng.normal(size=8) - 2.0
        router.e_score_correction_bias = mx.array(bias.astype(np.float32))
    x = mx.array(rng.normal(size=(2, 7, 64)).astype(np.float32))
    indices, weights = router(x)
    logits = _np(x) @ _np(router.weight).T
    for pos in np.ndindex(2, 7):
        if name == "deepseek_v3":
            bias = _np(router.e_score_correction_bias)
            chosen, want = _np_v3_route(logits[pos], bias, k=2, groups=4, keep=2)
            want = want * router.scaling  # routed_scaling_factor (2.5 by default)
        else:
            chosen, want = _np_v2_grouped_route(logits[pos], k=3, groups=2, keep=1)
            want = want * 16.0
        got = dict(zip(np.array(indices[pos]).tolist(), np.array(weights[pos]).tolist()))
        assert sorted(got) == sorted(chosen.tolist()), pos
        np.testing.assert_allclose([got[e] for e in chosen], want, rtol=1e-5)


def test_deepseek_sanitize_drops_prediction_heads_and_refuses_kv_bits() -> None:
    from mlxlm_core._errors import UnsupportedError

    model = build("deepseek_v3")
    weights = dict(tree_flatten(model.parameters()))
    extra = {"model.layers.2.eh_proj.weight": mx.zeros((64, 128))}  # an MTP block
    assert set(model.sanitize({**weights, **extra})) == set(weights)
    with pytest.raises(UnsupportedError, match="kv_bits"):
        make_prompt_cache(model, kv_bits=8)


def test_deepseek_cache_holds_the_latent_only() -> None:
    """Per token and layer the cache keeps kv_lora_rank + qk_rope_head_dim numbers."""
    model = build("deepseek_v3")
    cache = make_prompt_cache(model)
    model(toks((1, 5)), cache)
    keys, values = cache[0].state
    assert keys.shape == (1, 1, 5, 32) and values.shape == (1, 1, 5, 16)


def test_internlm3_bias_switches() -> None:
    model = build("internlm3")
    params = dict(tree_flatten(model.parameters()))
    assert "model.layers.0.self_attn.q_proj.bias" in params
    assert "model.layers.0.self_attn.o_proj.bias" not in params
    assert "model.layers.0.mlp.up_proj.bias" not in params
    # transformers' spelling alone (no InternLM keys) means the same thing.
    _, args_cls = get_model_classes("internlm3")
    args = args_cls.from_dict({**_COMMON, "model_type": "internlm3", "attention_bias": True})
    assert args.qkv_bias and args.attention_bias and not args.mlp_bias


# -- Sliding windows (OLMo 3, Qwen2-MoE, SmolLM3) -----------------------------------------

_ONE_WINDOWED_LAYER = {
    "olmo3": {"layer_types": ["sliding_attention"]},
    "qwen2_moe": {"use_sliding_window": True, "max_window_layers": 0, "mlp_only_layers": []},
    "smollm3": {"use_sliding_window": True, "no_rope_layers": [0]},
}


@pytest.mark.parametrize("name", list(_ONE_WINDOWED_LAYER))
def test_sliding_window_matches_cropped_input(name: str) -> None:
    """With one windowed layer, position t sees exactly tokens t-w+1..t (rope is relative),
    so the last logits of the cropped input equal position t of the full run, uncached
    (windowed mask) and cached (a rotating cache of the window's size)."""
    window = 6
    model = build(name, num_hidden_layers=1, sliding_window=window, **_ONE_WINDOWED_LAYER[name])
    assert windows(model) == [window]
    seq = toks((1, 17), seed=6)
    full = model(seq)
    cache = make_prompt_cache(model)
    cached = mx.concatenate(
        [model(seq[:, :10], cache)] + [model(seq[:, i : i + 1], cache) for i in range(10, 17)],
        axis=1,
    )
    assert all(c.size() <= window for c in cache)
    for t in range(window - 1, 17):
        crop = model(seq[:, t - window + 1 : t + 1])[:, -1]
        assert max_diff(full[:, t], crop) <= 1e-4, t
        assert max_diff(cached[:, t], crop) <= 1e-4, t


def test_olmo3_reads_per_layer_type_rope_parameters() -> None:
    """transformers 5 nests the rope per layer type; both spellings give one model."""
    yarn = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}
    old = {**CONFIGS["olmo3"], "rope_theta": 5000.0, "rope_scaling": yarn}
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {
        "full_attention": {**yarn, "rope_theta": 5000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
    }
    a = build("olmo3", rope_theta=5000.0, rope_scaling=yarn)
    model_cls, args_cls = get_model_classes("olmo3")
    b = model_cls(args_cls.from_dict(new))
    b.update(a.parameters())
    seq = toks((1, 12), seed=15)
    assert max_diff(a(seq), b(seq)) == 0
    # Only the full layer (the fourth) carries the yarn scaling.
    assert [layer.self_attn.rope.input_scale != 1.0 for layer in b.layers] == [
        False,
        False,
        False,
        True,
    ]
