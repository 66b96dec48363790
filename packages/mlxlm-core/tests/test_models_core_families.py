"""Unit tests of the architectures (tiny random configs, float32 unless stated).

References are independent computations, never a stored output of our own code: the same
model without a cache, a cropped input for sliding windows, numpy loops over experts for
the MoE layers, float weights for their quantized twins. Logits parity with the published
mlx-lm lives in tests-integration/tests/test_model_parity.py (core must run without it).
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core._errors import CheckpointError, InvalidArgumentError, UnsupportedError
from mlxlm_core.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlxlm_core.models import SUPPORTED_MODEL_TYPES, get_model_classes
from mlxlm_core.models.switch_layers import (
    QuantizedSwitchLinear,
    SwitchGLU,
    SwitchLinear,
    stack_experts,
)

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # quantized KV caches need groups of >= 32 along head_dim
    "rms_norm_eps": 1e-5,
    "vocab_size": 128,
    "rope_theta": 10000.0,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {**_COMMON, "model_type": "llama"},
    "mistral": {
        **_COMMON,
        "model_type": "mistral",
        "sliding_window": 6,
        "tie_word_embeddings": False,
    },
    "qwen2": {**_COMMON, "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {**_COMMON, "model_type": "qwen3"},
    "qwen3_moe": {
        **_COMMON,
        "model_type": "qwen3_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "mlp_only_layers": [1],
        "moe_intermediate_size": 32,
    },
    "mixtral": {
        **_COMMON,
        "model_type": "mixtral",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
}
ARCHS = list(CONFIGS)


def build(name: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    config = {**copy.deepcopy(CONFIGS[name]), **overrides}
    model_cls, args_cls = get_model_classes(config["model_type"])
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    # Random norms and biases too: fresh ones (ones/zeros) would hide misplaced ones.
    params = [
        (k, 1 + 0.2 * mx.random.normal(v.shape) if k.endswith("norm.weight") else v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def toks(shape: tuple[int, ...], seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 128, size=shape))


def max_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, build(request.param, seed=ARCHS.index(request.param))


def test_every_listed_architecture_is_available() -> None:
    assert set(CONFIGS) - {"mistral"} <= set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("name", ARCHS)
def test_forward_shapes_and_dtypes(name: str, dtype: mx.Dtype) -> None:
    model = build(name)
    model.set_dtype(dtype)
    cache = make_prompt_cache(model, batch_size=2)
    logits = model(toks((2, 5)), cache)
    assert logits.shape == (2, 5, 128) and logits.dtype == dtype
    step = model(toks((2, 1), seed=1), cache)
    assert step.shape == (2, 1, 128)
    assert bool(mx.all(mx.isfinite(step)).item())
    assert all(c.size() == 6 for c in cache)


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
    if model.args.sliding_window is not None:
        # A window rotates its history out, so it refuses to trim instead of corrupting.
        model(prompt, cache)
        assert not can_trim_prompt_cache(cache)
        assert trim_prompt_cache(cache, 4) == 0
        return
    model(prompt, cache)
    first = model(more, cache)
    assert trim_prompt_cache(cache, 4) == 4
    assert all(c.size() == 10 for c in cache)
    assert max_diff(model(more, cache), first) <= 1e-5


def test_max_kv_size_bounds_every_cache(arch: tuple[str, nn.Module]) -> None:
    """A bound holds for every architecture, through a long prompt and a long generation."""
    model = arch[1]
    bound = 8
    cache = make_prompt_cache(model, max_kv_size=bound)
    logits = model(toks((1, 20), seed=5), cache)
    assert all(c.size() <= bound for c in cache)
    for _ in range(40):
        logits = model(mx.argmax(logits[:, -1:], axis=-1), cache)
        assert all(c.size() <= bound for c in cache)
    assert bool(mx.all(mx.isfinite(logits)).item())


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_sliding_window_matches_cropped_input(name: str) -> None:
    """With one layer, position t sees exactly tokens t-w+1..t: rope is relative, so the
    last logits of the cropped input must equal position t of the windowed full run."""
    window = 6
    model = build(name, num_hidden_layers=1, sliding_window=window)
    seq = toks((1, 17), seed=6)
    full = model(seq)  # no cache: windowed mask
    cache = make_prompt_cache(model)
    cached = mx.concatenate(
        [model(seq[:, :10], cache)] + [model(seq[:, i : i + 1], cache) for i in range(10, 17)],
        axis=1,
    )  # rotating cache of the window's size
    assert all(c.size() <= window for c in cache)
    for t in range(window - 1, 17):
        crop = model(seq[:, t - window + 1 : t + 1])[:, -1]
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
    """nn.quantize swaps every linear, embedding and expert layer for its quantized twin.

    Exact claim: the quantized model computes what a float model holding the dequantized
    weights computes. Loose claim, 8 bits in groups of 32: logits move by at most 3% of
    their range. Routing is discontinuous, and random tiny routers are near uniform, so
    a slightly moved one would swap experts; the routers are made decisive (as trained
    ones are) by scaling them up.
    """
    model = build(name)
    decisive = [
        (k, 10 * v) for k, v in tree_flatten(model.parameters()) if k.endswith(".gate.weight")
    ]
    model.load_weights(decisive, strict=False)
    seq = toks((1, 12), seed=7)
    want = model(seq)
    nn.quantize(model, group_size=32, bits=8)
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert not kinds & {"Linear", "Embedding", "SwitchLinear"}
    assert ("QuantizedSwitchLinear" in kinds) == (name in ("qwen3_moe", "mixtral"))
    got = model(seq, make_prompt_cache(model))
    assert max_diff(got, dequantized_copy(name, model)(seq)) <= 1e-4
    assert max_diff(got, want) <= 0.03 * float(mx.max(mx.abs(want)).item())


def test_quantized_kv_cache_stays_close_to_float(arch: tuple[str, nn.Module]) -> None:
    model = arch[1]
    if model.args.sliding_window is not None:
        with pytest.raises(InvalidArgumentError, match="kv_bits cannot be combined"):
            make_prompt_cache(model, kv_bits=8, kv_group_size=32)
        return
    prompt, steps = toks((2, 10), seed=8), toks((2, 6), seed=9)
    caches = [
        make_prompt_cache(model, batch_size=2),
        make_prompt_cache(model, batch_size=2, kv_bits=8, kv_group_size=32),
    ]
    outs = [[model(prompt, c)] + [model(steps[:, i : i + 1], c) for i in range(6)] for c in caches]
    want, got = (mx.concatenate(o, axis=1) for o in outs)
    assert max_diff(got, want) <= 0.02 * float(mx.max(mx.abs(want)).item())


def test_unsupported_model_type_names_near_matches() -> None:
    with pytest.raises(UnsupportedError) as info:
        get_model_classes("qwen4_moe")
    message = str(info.value)
    assert "qwen4_moe" in message and "qwen3_moe" in message.split("nearest supported:")[1]
    assert "\n" not in message


def test_rope_parameters_spelling_loads_the_same_model() -> None:
    """transformers 5 nests rope_theta (and scaling) under rope_parameters."""
    old = {
        **CONFIGS["qwen3"],
        "rope_theta": 5000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}
    _, args_cls = get_model_classes("qwen3")
    a, b = args_cls.from_dict(old), args_cls.from_dict(new)
    assert a.rope_theta == b.rope_theta == 5000.0
    assert b.rope_scaling is not None and b.rope_scaling["factor"] == 2.0


def test_qwen_sliding_window_only_when_switched_on() -> None:
    _, args_cls = get_model_classes("qwen2")
    off = args_cls.from_dict({**CONFIGS["qwen2"], "sliding_window": 4096})
    assert off.sliding_window is None
    on = {**CONFIGS["qwen2"], "sliding_window": 16, "use_sliding_window": True}
    assert args_cls.from_dict({**on, "max_window_layers": 0}).sliding_window == 16
    with pytest.raises(UnsupportedError):
        args_cls.from_dict({**on, "max_window_layers": 1})  # layer 0 full, layer 1 windowed


def test_qwen3_moe_layer_placement() -> None:
    model = build("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    sparse = ["switch_mlp" in layer.mlp for layer in model.layers]
    assert sparse == [False, True, False, False]


# -- switch layers -----------------------------------------------------------------------


def _np_switch_glu(x: np.ndarray, idx: np.ndarray, glu: SwitchGLU) -> np.ndarray:
    """Per-token, per-expert float64 loop: the definition of a SwiGLU expert."""
    g, u, d = (
        np.array(p.weight, dtype=np.float64) for p in (glu.gate_proj, glu.up_proj, glu.down_proj)
    )
    out = np.zeros((*idx.shape, x.shape[-1]))
    for pos in np.ndindex(*idx.shape):
        e, v = idx[pos], x[pos[:-1]].astype(np.float64)
        a = g[e] @ v
        out[pos] = d[e] @ (a / (1 + np.exp(-a)) * (u[e] @ v))
    return out


@pytest.mark.parametrize("tokens", [3, 40])  # 40 tokens x 2 experts takes the sorted path
def test_switch_glu_matches_per_expert_loop(tokens: int) -> None:
    mx.random.seed(1)
    glu = SwitchGLU(32, 48, 5)
    rng = np.random.default_rng(tokens)
    x = rng.normal(size=(2, tokens, 32)).astype(np.float32)
    idx = np.stack([rng.choice(5, size=2, replace=False) for _ in range(2 * tokens)]).reshape(
        2, tokens, 2
    )
    got = glu(mx.array(x), mx.array(idx))
    assert got.shape == (2, tokens, 2, 32)
    np.testing.assert_allclose(np.array(got), _np_switch_glu(x, idx, glu), atol=1e-4)


def test_quantized_switch_linear_equals_its_dequantized_weights() -> None:
    mx.random.seed(2)
    layer = SwitchLinear(64, 32, 4, bias=True)
    layer.bias = mx.random.normal(layer.bias.shape)
    q = layer.to_quantized(group_size=32, bits=4)
    assert isinstance(q, QuantizedSwitchLinear) and q.weight.dtype == mx.uint32
    assert not q.trainable_parameters()  # frozen, like nn.QuantizedLinear
    back = q.dequantized()
    x = mx.random.normal((3, 1, 1, 64))
    idx = mx.array([[0, 3], [2, 2], [1, 0]])
    assert max_diff(q(x, idx), back(x, idx)) <= 1e-4
    # ... and 4 bits stay near the original float weights.
    # One 4-bit step of a group spanning [-max, max] is 2*max/15.
    assert (
        max_diff(back.weight, layer.weight) <= 2 * float(mx.max(mx.abs(layer.weight)).item()) / 15
    )


def test_stack_experts_per_expert_and_fused_layouts() -> None:
    rng = np.random.default_rng(0)
    per = {
        f"m.experts.{e}.{p}.weight": mx.array(rng.normal(size=(6, 4)))
        for e in range(3)
        for p in ("w1", "w3")
    }
    out = stack_experts(
        {**per, "m.gate.weight": mx.zeros((3, 4))},
        num_experts=3,
        renames={"w1": "gate_proj", "w3": "up_proj"},
    )
    assert set(out) == {
        "m.gate.weight",
        "m.switch_mlp.gate_proj.weight",
        "m.switch_mlp.up_proj.weight",
    }
    assert mx.array_equal(out["m.switch_mlp.up_proj.weight"][2], per["m.experts.2.w3.weight"])
    fused = mx.array(rng.normal(size=(3, 12, 4)))
    out = stack_experts({"m.experts.gate_up_proj": fused}, num_experts=3)
    assert mx.array_equal(out["m.switch_mlp.gate_proj.weight"], fused[:, :6])
    assert mx.array_equal(out["m.switch_mlp.up_proj.weight"], fused[:, 6:])
    del per["m.experts.1.w1.weight"]
    with pytest.raises(CheckpointError):
        stack_experts(per, num_experts=3)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_sanitize_accepts_its_own_output(name: str) -> None:
    """Already-stacked (converted) checkpoints pass through sanitize unchanged."""
    model = build(name)
    weights = dict(tree_flatten(model.parameters()))
    again = model.sanitize(dict(weights))
    assert set(again) == set(weights) - (
        {"lm_head.weight"} if model.args.tie_word_embeddings else set()
    )


def test_shard_on_a_single_rank_keeps_logits(arch: tuple[str, nn.Module]) -> None:
    name, model = arch
    seq = toks((1, 6), seed=10)
    want = model(seq)
    clone = build(name)
    clone.update(model.parameters())
    clone.shard(mx.distributed.init())
    assert max_diff(clone(seq), want) <= 1e-5
