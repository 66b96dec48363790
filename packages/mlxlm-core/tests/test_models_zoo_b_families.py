"""Family-specific unit tests of the zoo B architectures: what their config fields mean,
and the features mlx-lm does not implement (so tests-integration cannot compare them),
checked against float64 numpy written from transformers' definitions.
"""

from __future__ import annotations

import _zoo as zoo  # registered by conftest.py
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlxlm_core import UnsupportedError
from mlxlm_core.cache import make_prompt_cache
from mlxlm_core.models import get_model_classes

CONFIGS, build, toks, max_diff = zoo.CONFIGS, zoo.build, zoo.toks, zoo.max_diff
_np = zoo.to_numpy
COMMON = zoo.configs.B_COMMON


# -- Qwen2-MoE ---------------------------------------------------------------------------


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
    args = args_cls.from_dict({**COMMON, "model_type": "internlm3", "attention_bias": True})
    assert args.qkv_bias and args.attention_bias and not args.mlp_bias


# -- OLMo 3 --------------------------------------------------------------------------


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
