"""Family-specific unit tests of the first architectures (Llama, Mistral, Qwen 2/3,
Qwen3-MoE, Mixtral) and of the switch (expert) layers: config spellings, layer placement,
and the experts against per-expert loops in numpy. What every architecture must do is in
test_models.py.
"""

from __future__ import annotations

import _zoo as zoo  # registered by conftest.py
import mlx.core as mx
import numpy as np
import pytest
from mlxlm_core._errors import CheckpointError, UnsupportedError
from mlxlm_core.models import get_model_classes
from mlxlm_core.models.switch_layers import (
    QuantizedSwitchLinear,
    SwitchGLU,
    SwitchLinear,
    stack_experts,
)

CONFIGS, build, max_diff = zoo.CONFIGS, zoo.build, zoo.max_diff


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
