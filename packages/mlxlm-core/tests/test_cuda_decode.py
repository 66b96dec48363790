"""The fused CUDA decode path (mlxlm_core._cuda_kernels / _cuda_layers) and its policy.

On every machine: which blocks the policy may switch to the fused path, that switching is
reversible and leaves every non-fusable call (CPU, float32, prompts, adapters) computing what
the block computed before, and the CUDA graph limits set at import. Where MLX's CUDA backend
exists, the kernels are checked against float32 references (NaN-poisoned outputs: an unwritten
element fails) and a fused model's decode logits against MLX-LM's llama on the same weights.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlxlm_core import InvalidArgumentError, UnsupportedError
from mlxlm_core import _cuda_kernels as ck
from mlxlm_core._cuda_env import GRAPH_LIMITS, configure_graph_limits
from mlxlm_core._cuda_layers import FusedDecoderLayer, convert_decode_layers, eligible
from mlxlm_core._policy import apply_policy, choose_policy
from mlxlm_core.adapters import linear_to_lora_layers
from mlxlm_core.cache import make_prompt_cache
from mlxlm_core.models import get_model_classes
from mlxlm_core.quantize import quantize_model

CUDA = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs MLX's CUDA backend")

# Smallest llama the 4-bit kernels take too: every K (hidden 1024, 16 x 64 heads, MLP 2048)
# is a multiple of 1024; llama3 rope scaling as in Llama-3.2.
CONFIG = {
    "model_type": "llama",
    "hidden_size": 1024,
    "num_hidden_layers": 2,
    "intermediate_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
}


def _model(model_type: str = "llama", dtype: mx.Dtype = mx.bfloat16, **overrides) -> nn.Module:
    model_cls, args_cls = get_model_classes(model_type)
    mx.random.seed(3)
    model = model_cls(args_cls.from_dict({**CONFIG, "model_type": model_type, **overrides}))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


# -- policy and dispatch (every machine) ---------------------------------------------------


def test_policy_choice_and_refusals(monkeypatch) -> None:
    monkeypatch.setenv("MLXLM_DECODE_KERNELS", "mlx")
    assert choose_policy().decode_kernels == "mlx"  # the environment overrides auto
    monkeypatch.delenv("MLXLM_DECODE_KERNELS")
    policy = choose_policy()
    assert policy.decode_kernels == ("fused" if policy.backend == "cuda" else "mlx")
    assert "decode=" in policy.describe()
    assert choose_policy(decode_kernels="mlx").decode_kernels == "mlx"
    with pytest.raises(InvalidArgumentError):
        choose_policy(decode_kernels="fast")
    if policy.backend != "cuda":
        with pytest.raises(UnsupportedError):
            choose_policy(decode_kernels="fused")


def test_eligible_blocks_switch_and_switch_back() -> None:
    model = _model()
    assert convert_decode_layers(model, enabled=True) == 2
    assert all(type(layer) is FusedDecoderLayer for layer in model.layers)
    assert convert_decode_layers(model, enabled=True) == 2  # idempotent
    assert convert_decode_layers(model, enabled=False) == 0
    assert not any(type(layer) is FusedDecoderLayer for layer in model.layers)


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("qwen3", {}),  # q/k norms
        ("llama", {"attention_bias": True}),  # biases
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),  # stateful rope
        ("gemma", {"head_dim": 64}),  # (1 + w) norms, GeGLU
    ],
)
def test_blocks_the_kernels_do_not_reproduce_stay(model_type: str, overrides: dict) -> None:
    model = _model(model_type, **overrides)
    assert convert_decode_layers(model, enabled=True) == 0
    assert not any(eligible(layer) for layer in model.layers)


def test_4bit_blocks_switch_other_quantizations_stay() -> None:
    model = _model()
    quantize_model(model, bits=4, group_size=64)
    assert convert_decode_layers(model, enabled=True) == 2
    model = _model()
    quantize_model(model, bits=8, group_size=64)
    assert convert_decode_layers(model, enabled=True) == 0
    model = _model()  # one projection left dense: the block's formats differ
    quantize_model(model, bits=4, group_size=64)
    model.layers[0].mlp.down_proj = nn.Linear(2048, 1024, bias=False)
    assert convert_decode_layers(model, enabled=True) == 1


def test_4bit_tied_head_switches_with_the_blocks() -> None:
    from mlxlm_core._cuda_layers import FusedQuantizedEmbedding

    model = _model()
    quantize_model(model, bits=4, group_size=64)
    convert_decode_layers(model, enabled=True)
    assert type(model.model.embed_tokens) is FusedQuantizedEmbedding
    convert_decode_layers(model, enabled=False)
    assert type(model.model.embed_tokens) is nn.QuantizedEmbedding


def test_native_mode_keeps_mlx_quantized_classes() -> None:
    """No policy subclass (and its per-call Python) where it would change nothing."""
    model = _model(dtype=mx.float32)
    quantize_model(model, bits=4, group_size=64)
    apply_policy(model, choose_policy("keep", "quantized"))
    assert type(model.layers[0].mlp.up_proj) is not nn.QuantizedLinear
    apply_policy(model, choose_policy("keep", "native", decode_kernels="mlx"))
    assert type(model.layers[0].mlp.up_proj) is nn.QuantizedLinear
    assert type(model.model.embed_tokens) is nn.QuantizedEmbedding


def test_rope_positions_are_derived_on_the_device() -> None:
    from mlxlm_core._cuda_layers import _offset_array

    first = _offset_array(40)
    assert _offset_array(40) is first
    following = [_offset_array(p) for p in (41, 42)]
    restart = _offset_array(7)
    arrays = (first, *following, restart, _offset_array(mx.array([3, 5])))
    assert [a[0].item() for a in arrays] == [40, 41, 42, 7, 3]
    assert all(a.nbytes > 8 and a.dtype == mx.int32 for a in arrays)  # not MLX's scalar pool


def _decode_logits(model: nn.Module, steps: int = 3) -> list[mx.array]:
    cache = make_prompt_cache(model)
    outs = [model(mx.array([[5, 17, 42, 8, 99, 3]]), cache=cache)]
    for token in (9, 77, 4)[:steps]:
        outs.append(model(mx.array([[token]]), cache=cache))
    mx.eval(outs)
    return outs


def test_calls_the_kernels_cannot_take_run_the_block_unchanged() -> None:
    """Float32 (and, on CPU, every) call falls back: bit-identical to the unconverted model."""
    model = _model(dtype=mx.float32)
    before = _decode_logits(model)
    convert_decode_layers(model, enabled=True)
    after = _decode_logits(model)
    assert all(mx.array_equal(a, b).item() for a, b in zip(before, after, strict=True))


def test_adapters_added_after_conversion_take_the_block_path() -> None:
    """LoRA wrapped around the projections after conversion: the block's own code runs them
    (in bfloat16 on CPU the fused path could not run at all, so a miss would raise)."""
    model = _model()
    assert convert_decode_layers(model, enabled=True) == 2
    mx.random.seed(5)
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 1.0, "dropout": 0.0})
    for layer in model.layers:  # non-zero adapters, so that they change the result
        for proj in (layer.self_attn.q_proj, layer.mlp.down_proj):
            proj.update({"lora_b": mx.random.normal(proj["lora_b"].shape) * 0.1})
    fused = _decode_logits(model)
    assert all(layer._checked and not layer._checked[1] for layer in model.layers)
    convert_decode_layers(model, enabled=False)
    plain = _decode_logits(model)
    assert all(mx.array_equal(a, b).item() for a, b in zip(fused, plain, strict=True))


def test_apply_policy_records_fused_blocks() -> None:
    model = _model(dtype=mx.float32)
    policy = apply_policy(model, choose_policy(decode_kernels="mlx"))
    assert policy.fused_layers == 0
    assert not any(type(layer) is FusedDecoderLayer for layer in model.layers)


def test_graph_limits_only_with_cuda_and_never_over_the_users() -> None:
    assert configure_graph_limits({}, cuda=False) == {}
    env: dict[str, str] = {"MLX_MAX_OPS_PER_BUFFER": "12"}
    changed = configure_graph_limits(env, cuda=True)
    assert changed == {"MLX_MAX_MB_PER_BUFFER": GRAPH_LIMITS["MLX_MAX_MB_PER_BUFFER"]}
    assert env["MLX_MAX_OPS_PER_BUFFER"] == "12"
    assert configure_graph_limits({"MLXLM_CUDA_GRAPH_LIMITS": "0"}, cuda=True) == {}


def test_kernel_variants_declare_their_inputs() -> None:
    from mlxlm_core._cuda_kernel_source import kernel_source

    def source(kind, n, **kw):
        opts = {"quant_group": None, "norm": False, "residual": False, "eps": 1e-5, "rope": None}
        return kernel_source(kind, n, **{**opts, **kw})

    names, outs, body = source("multi", 3, norm=True)
    assert names == ["x", "w0", "w1", "w2", "norm"] and outs == ["out0", "out1", "out2"]
    assert "#define EPS 1e-05f" in body
    names, _, body = source("multi", 3, norm=True, rope=(False, 2, 1.0))
    assert names[-2:] == ["periods", "offset"] and "__sincosf" in body
    names, outs, body = source("multi", 3, rope=(False, 2, 1.0), cache_write=True)
    assert names[-2:] == ["kcache", "vcache"] and outs == ["out0"] and "kcache_shape" in body
    with pytest.raises(ValueError, match="cache writes"):
        source("multi", 3, cache_write=True)  # no rotary: not the q/k/v launch
    names, outs, _ = source("linear", 1, residual=True)
    assert names == ["x", "w0", "res"] and outs == ["out"]
    names, _, body = source("swiglu", 2, quant_group=64)
    assert names == ["x", "w0", "s0", "b0", "w1", "s1", "b1"] and "mlxlm_q4" in body


# -- kernels and the fused model (CUDA only) ------------------------------------------------


def _rel(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten())).item()


def _normed(x: mx.array, w: mx.array | None, eps: float = 1e-5) -> mx.array:
    x = x.astype(mx.float32)
    if w is None:
        return x
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(mx.float32)


@pytest.fixture
def poisoned():
    ck.POISON = float("nan")  # any element a kernel leaves unwritten stays NaN
    yield
    ck.POISON = None


@needs_cuda
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("tune", [ck.Tuning(), ck.Tuning(8, 2, 8, 4), ck.Tuning(4, 1, 4, 2)])
def test_linear_and_swiglu_match_float32(rows: int, tune: ck.Tuning, poisoned) -> None:
    for k, n in ((2048, 512), (1024, 256)):
        x, w = mx.random.normal((rows, k)).astype(mx.bfloat16), mx.random.normal((n, k)) * 0.03
        w = w.astype(mx.bfloat16)
        norm = (mx.random.normal((k,)) * 0.5 + 1).astype(mx.bfloat16)
        res = mx.random.normal((rows, n)).astype(mx.bfloat16)
        out = ck.linear(x, w, norm=norm, residual=res, tune=tune)
        ref = _normed(x, norm) @ w.astype(mx.float32).T + res.astype(mx.float32)
        assert _rel(out, ref) < 1e-2
        assert _rel(ck.linear(x, w, tune=tune), _normed(x, None) @ w.astype(mx.float32).T) < 1e-2
    gate = (mx.random.normal((512, 1024)) * 0.03).astype(mx.bfloat16)
    up = (mx.random.normal((512, 1024)) * 0.03).astype(mx.bfloat16)
    x = mx.random.normal((rows, 1024)).astype(mx.bfloat16)
    h = _normed(x, norm[:1024])
    ref = nn.silu(h @ gate.astype(mx.float32).T) * (h @ up.astype(mx.float32).T)
    out = ck.swiglu(x, gate, up, norm=norm[:1024], tune=ck.Tuning(tune.warps, 1, 8, tune.ksplit))
    assert _rel(out, ref) < 1e-2


@needs_cuda
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("position", [0, 9, 70000])
def test_qkv_with_rotary_matches_mlx_rope(traditional: bool, position: int, poisoned) -> None:
    x = mx.random.normal((1, 1, 512)).astype(mx.bfloat16)
    norm = (mx.random.normal((512,)) * 0.5 + 1).astype(mx.bfloat16)
    ws = [(mx.random.normal((n, 512)) * 0.05).astype(mx.bfloat16) for n in (512, 256, 256)]
    periods = 10000.0 ** (mx.arange(0, 64, 2, dtype=mx.float32) / 64)
    rot = ck.Rotary(periods, mx.array([position], dtype=mx.int32), 64, traditional=traditional)
    shapes = [(1, 8, 1, 64), (1, 4, 1, 64), (1, 4, 1, 64)]
    outs = ck.multi_linear(x, ws, norm=norm, rope=rot, shapes=shapes, tune=ck.Tuning(8, 2, 8, 2))
    h = _normed(x, norm)
    for i, (out, w, shape) in enumerate(zip(outs, ws, shapes, strict=True)):
        ref = (h @ w.astype(mx.float32).T).reshape(1, 1, shape[1], 64).transpose(0, 2, 1, 3)
        if i < 2:
            ref = mx.fast.rope(
                ref,
                64,
                traditional=traditional,
                base=None,
                scale=1.0,
                offset=position,
                freqs=periods,
            )
        assert out.shape == shape
        assert _rel(out, ref) < 1e-2


@needs_cuda
@pytest.mark.parametrize("slot", [0, 37])
def test_qkv_cache_write_puts_k_and_v_in_the_slot_and_nothing_else(slot: int) -> None:
    x = mx.random.normal((1, 1, 512)).astype(mx.bfloat16)
    ws = [(mx.random.normal((n, 512)) * 0.05).astype(mx.bfloat16) for n in (512, 256, 256)]
    rot = ck.Rotary(
        10000.0 ** (mx.arange(0, 64, 2, dtype=mx.float32) / 64),
        mx.full((16,), slot, dtype=mx.int32),
        64,
    )
    shapes = [(1, 8, 1, 64), (1, 4, 1, 64), (1, 4, 1, 64)]
    tune = ck.Tuning(8, 2, 8, 2)
    q, k, v = ck.multi_linear(x, ws, rope=rot, shapes=shapes, tune=tune)
    filler = [mx.random.normal((1, 4, 40, 64)).astype(mx.bfloat16) for _ in range(2)]
    buffers = [f + 0 for f in filler]  # fresh copies the kernel may write
    mx.eval(buffers, q, k, v, filler)
    (q_in_place,) = ck.multi_linear(x, ws, rope=rot, shapes=shapes, tune=tune, cache=buffers)
    mx.eval(q_in_place)
    assert mx.array_equal(q_in_place, q)
    for buffer, before, new in zip(buffers, filler, (k, v), strict=True):
        assert mx.array_equal(buffer[:, :, slot : slot + 1], new)
        others = [i for i in range(40) if i != slot]
        assert mx.array_equal(buffer[:, :, others], before[:, :, others])


def _q4(n: int, k: int, group: int = 64) -> tuple[ck.Q4, mx.array]:
    """A random 4-bit weight and its float32 dequantized value (the reference)."""
    w = mx.random.normal((n, k)) * 0.05
    packed, scales, biases = mx.quantize(w.astype(mx.bfloat16), group_size=group, bits=4)
    dense = mx.dequantize(packed, scales, biases, group_size=group, bits=4)
    return ck.Q4(packed, scales, biases, group), dense.astype(mx.float32)


@needs_cuda
@pytest.mark.parametrize("group", [32, 64, 128])
def test_4bit_kernels_match_dequantized_float32(group: int, poisoned) -> None:
    for k, n, tune in ((2048, 512, ck.Tuning(8, 2, 8, 4)), (4096, 256, ck.Tuning(4, 1, 8, 1))):
        w, dense = _q4(n, k, group)
        x = mx.random.normal((1, k)).astype(mx.bfloat16)
        norm = (mx.random.normal((k,)) * 0.5 + 1).astype(mx.bfloat16)
        res = mx.random.normal((1, n)).astype(mx.bfloat16)
        out = ck.linear(x, w, norm=norm, residual=res, tune=tune)
        assert _rel(out, _normed(x, norm) @ dense.T + res.astype(mx.float32)) < 1e-2
    (gate, g_ref), (up, u_ref) = _q4(512, 1024, group), _q4(512, 1024, group)
    x = mx.random.normal((2, 1024)).astype(mx.bfloat16)
    ref = nn.silu(_normed(x, norm[:1024]) @ g_ref.T) * (_normed(x, norm[:1024]) @ u_ref.T)
    assert _rel(ck.swiglu(x, gate, up, norm=norm[:1024], tune=ck.Tuning(4, 1)), ref) < 1e-2
    ws = [_q4(n, 1024, group) for n in (512, 256, 256)]
    rot = ck.Rotary(10000.0 ** (mx.arange(0, 64, 2) / 64), mx.array([33], dtype=mx.int32), 64)
    shapes = [(1, 8, 1, 64), (1, 4, 1, 64), (1, 4, 1, 64)]
    x = x[:1]
    outs = ck.multi_linear(x, [w for w, _ in ws], norm=norm[:1024], rope=rot, shapes=shapes)
    h = _normed(x, norm[:1024])
    for i, (out, (_, dense), shape) in enumerate(zip(outs, ws, shapes, strict=True)):
        ref = (h @ dense.T).reshape(1, 1, shape[1], 64).transpose(0, 2, 1, 3)
        if i < 2:
            ref = mx.fast.rope(
                ref, 64, traditional=False, base=None, scale=1.0, offset=33, freqs=rot.periods
            )
        assert _rel(out, ref) < 1e-2


@needs_cuda
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("prompt_length", [6, 254])
def test_fused_decode_matches_mlx_lm(bits: int | None, prompt_length: int) -> None:
    """The policy's fused model against MLX-LM's llama on the same weights, bf16 and 4-bit;
    the longer prompt makes the decode steps outgrow the cache's first 256-slot buffer."""
    from mlx_lm.models import llama as peer_llama
    from mlx_lm.models.cache import make_prompt_cache as peer_cache

    ours = _model()
    peer = peer_llama.Model(peer_llama.ModelArgs.from_dict(CONFIG))
    if bits:
        quantize_model(ours, bits=bits, group_size=64)
        nn.quantize(peer, group_size=64, bits=bits)
    peer.load_weights(list(tree_flatten(ours.parameters())))
    policy = apply_policy(ours, choose_policy())
    assert policy.decode_kernels == "fused" and policy.fused_layers == 2

    prompt = mx.random.randint(0, CONFIG["vocab_size"], (1, prompt_length), key=mx.random.key(2))

    def run(model, cache):
        outs, buffers = [model(prompt, cache=cache)], []
        for token in (9, 77, 4, 300):
            outs.append(model(mx.array([[token]]), cache=cache))
            mx.eval(outs[-1])
            buffers.append(cache[0].keys)
        return outs, buffers

    cache = make_prompt_cache(ours)
    (mine, buffers), (theirs, _) = run(ours, cache), run(peer, peer_cache(peer))
    assert all(layer._checked[1] is not None for layer in ours.layers)  # the fused path ran
    # Written in place: the steps keep one buffer (two when they outgrow the first), where
    # slice updates would have made a new array every step.
    assert len({id(b) for b in buffers}) == (1 if prompt_length == 6 else 2)
    assert all(c.length == prompt_length + 4 for c in cache)
    for a, b in zip(mine, theirs, strict=True):
        assert _rel(a, b) < 3e-2
