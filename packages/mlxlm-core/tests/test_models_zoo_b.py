"""Unit tests of further architectures (tiny random configs, float32 unless stated).

Every architecture goes through the same checks as test_models.py's: shapes in float32 and
float16, cached decode against the uncached forward, trimming, a ``max_kv_size`` bound,
quantized weights against the float model holding the dequantized values, a LoRA adapter
(it changes the logits; fused equals unfused) and sharding over one rank. What each
family's own fields mean is tested in test_models_zoo_b_families.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core.adapters import adapter_parameters, apply_lora_layers, fuse_adapters
from mlxlm_core.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlxlm_core.models import SUPPORTED_MODEL_TYPES


def _fixtures():
    """The shared helpers module (tests are imported by path, not as a package)."""
    name = "_fixtures_zoo_b"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("_fixtures_zoo_b.py")
        )
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


_f = _fixtures()
CONFIGS, build, toks = _f.CONFIGS, _f.build, _f.toks
max_diff, rel_diff, windows = _f.max_diff, _f.rel_diff, _f.windows
ARCHS = list(CONFIGS)


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
