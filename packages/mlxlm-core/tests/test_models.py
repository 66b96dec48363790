"""Unit tests of the Gemma, Phi, StarCoder2, GPT-2, GPT-NeoX and Cohere architectures:
what every architecture must do (shapes and dtypes, caches, windows, quantized weights,
LoRA, sharding). Family-specific behaviour is in test_models_zoo_a_families.py.

Tiny random configs (_fixtures_zoo_a.py), float32 unless stated. References are
independent computations: the same model without a cache, a cropped input for sliding
windows, float weights for the quantized twins, the unfused adapter for the fused one, the
unsharded model for the sharded one. Logits parity with the published mlx-lm is
tests-integration/tests/test_model_parity_zoo_a.py.
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
    name = "_fixtures_zoo_a"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("_fixtures_zoo_a.py")
        )
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


fx = _fixtures()
ARCHS, CONFIGS, WINDOW, SCALE = fx.ARCHS, fx.CONFIGS, fx.WINDOW, fx.SCALE
build, windows, toks, max_diff = fx.build, fx.windows, fx.toks, fx.max_diff


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


# -- tensor parallelism over two real ranks -------------------------------------------------

_SHARD_WORKER = """
import json, sys
import mlx.core as mx
from _fixtures_zoo_a import ARCHS, build, max_diff, toks
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
