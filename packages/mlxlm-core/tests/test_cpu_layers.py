"""The CPU stand-ins for rope and RMS norm (mlxlm_core._cpu_layers) against MLX's own ops.

``mx.fast.rope`` and ``mx.fast.rms_norm`` (MLX's CPU fallbacks) are the references; the
stand-ins must give the same values bit for bit on every rope variant the model zoo builds,
fall back to MLX for what they do not cover, and be applied by the policy exactly where it
says (CPU, not the ``native`` mode).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlxlm_core import load
from mlxlm_core._cpu_layers import CompiledRMSNorm, SharedRope, convert_cpu_layers
from mlxlm_core.models.rope import DynamicNTKRope, Rope, make_rope

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _reference(rope: Rope, x: mx.array, offset: int) -> mx.array:
    return mx.fast.rope(
        x,
        rope.dims,
        traditional=rope.traditional,
        base=rope.base,
        scale=rope.scale,
        offset=offset,
        freqs=getattr(rope, "_freqs", None),
    )


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize(
    ("dims", "scaling"),
    [
        (64, None),
        (32, None),  # partial rotary: the other half passes through
        (64, {"rope_type": "linear", "factor": 3.0}),
        (64, LLAMA3),  # explicit frequencies
    ],
)
def test_shared_rope_equals_mlx_rope(traditional: bool, dims: int, scaling) -> None:
    rope = make_rope(dims, base=100000.0, traditional=traditional, scaling=scaling)
    assert type(rope) is Rope
    rope.__class__ = SharedRope
    for offset in (0, 5, 511, 4097):
        q = mx.random.normal((1, 9, 1, 64), key=mx.random.key(offset))
        k = mx.random.normal((1, 3, 1, 64), key=mx.random.key(offset + 1))
        for x in (q, k):  # the second call reuses the step's tables
            assert mx.array_equal(rope(x, offset), _reference(rope, x, offset))


def test_shared_rope_falls_back_where_it_does_not_apply() -> None:
    rope = make_rope(64, base=10000.0)
    rope.__class__ = SharedRope
    prompt = mx.random.normal((1, 9, 7, 64), key=mx.random.key(1))  # several tokens
    assert mx.array_equal(rope(prompt, 3), _reference(rope, prompt, 3))
    rows = mx.random.normal((2, 9, 1, 64), key=mx.random.key(2))
    offsets = mx.array([4, 9])  # per-row offsets (a padded batch)
    ref = mx.fast.rope(rows, 64, traditional=False, base=10000.0, scale=1.0, offset=offsets)
    assert mx.array_equal(rope(rows, offsets), ref)


def test_compiled_rms_norm_equals_mlx() -> None:
    norm = nn.RMSNorm(576, eps=1e-5)
    norm.weight = mx.random.normal((576,), key=mx.random.key(3))
    xs = [mx.random.normal(shape, key=mx.random.key(4)) for shape in ((1, 1, 576), (1, 37, 576))]
    refs = [norm(x) for x in xs]
    norm.__class__ = CompiledRMSNorm
    for x, ref in zip(xs, refs):
        assert mx.array_equal(norm(x), ref)


def test_convert_swaps_exact_classes_only_and_back() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rope = make_rope(64, base=10000.0)
            self.ntk = DynamicNTKRope(64, traditional=False, base=10000.0, factor=2.0, max_len=64)
            self.norm = nn.RMSNorm(64)
            self.layer_norm = nn.LayerNorm(64)

    block = Block()
    assert convert_cpu_layers(block, enabled=True) == {"rope": 1, "rms_norm": 1}
    assert type(block.rope) is SharedRope and type(block.norm) is CompiledRMSNorm
    assert type(block.ntk) is DynamicNTKRope and type(block.layer_norm) is nn.LayerNorm
    assert convert_cpu_layers(block, enabled=False) == {"rope": 0, "rms_norm": 0}
    assert type(block.rope) is Rope and type(block.norm) is nn.RMSNorm


def test_policy_applies_them_except_in_native_mode(tiny: Path) -> None:
    model, _ = load(tiny)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.rope, SharedRope)
    assert isinstance(layer.input_layernorm, CompiledRMSNorm)
    assert "shared ropes" in model.policy.describe()
    native, _ = load(tiny, weight_mode="native")
    assert type(native.model.layers[0].self_attn.rope) is Rope
    assert type(native.model.layers[0].input_layernorm) is nn.RMSNorm
    assert native.policy.cpu_layers == "none" and native.policy.malloc == "default"
    # The same model both ways: identical logits for a prompt and cached one-token steps.
    from mlxlm_core.cache import make_prompt_cache

    outs = []
    for m in (model, native):
        cache = make_prompt_cache(m)
        steps = [m(mx.array([[3, 14, 15, 92, 65]]), cache=cache)]
        steps += [m(mx.array([[t]]), cache=cache) for t in (35, 89, 79)]
        mx.eval(steps)
        outs.append(steps)
    for a, b in zip(*outs):
        assert mx.array_equal(a, b)
