"""Logits parity of every architecture with the published mlx-lm (the oracle).

For each tiny config, our model's parameters are written out under Hugging Face names
(experts unstacked, as checkpoints store them), then loaded into both our model and
mlx-lm's through each library's own ``sanitize``: the comparison covers weight naming and
expert stacking as well as the forward pass. Each library then runs with its own caches.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import cache as ref_cache
from mlxlm_core.cache import make_prompt_cache
from mlxlm_core.models import get_model_classes

ARCHS = [
    "llama",
    "mistral",
    "qwen2",
    "qwen2_untied",
    "qwen3",
    "qwen3_moe",
    "qwen3_moe_norm",
    "mixtral",
]
TOL = 1e-4
_MIXTRAL_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_REF_MODULE = {"mistral": "llama"}  # mlx-lm's own remapping of model types


def to_hf_weights(model: nn.Module, model_type: str) -> dict[str, mx.array]:
    """Our parameters as a Hugging Face checkpoint names them (one tensor per expert)."""
    weights: dict[str, mx.array] = {}
    for key, value in tree_flatten(model.parameters()):
        match = re.fullmatch(r"(.+)\.switch_mlp\.(\w+)\.weight", key)
        if match is None:
            weights[key] = value
            continue
        block, proj = match.groups()
        if model_type == "mixtral":
            proj = _MIXTRAL_EXPERT_NAMES[proj]
        for e in range(value.shape[0]):
            weights[f"{block}.experts.{e}.{proj}.weight"] = value[e]
    if "lm_head.weight" not in weights:  # tied: checkpoints often carry the copy anyway
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


def load_pair(name: str, config: dict[str, Any], source: nn.Module) -> tuple[nn.Module, Any]:
    """(ours, mlx-lm's), both loaded from the same Hugging Face-named weights."""
    hf = to_hf_weights(source, config["model_type"])
    model_cls, args_cls = get_model_classes(config["model_type"])
    ours = model_cls(args_cls.from_dict(config))
    ours.load_weights(list(ours.sanitize(dict(hf)).items()), strict=True)
    module = importlib.import_module(
        f"mlx_lm.models.{_REF_MODULE.get(config['model_type'], config['model_type'])}"
    )
    ref = module.Model(module.ModelArgs.from_dict(config))
    ref.load_weights(list(ref.sanitize(dict(hf)).items()), strict=True)
    mx.eval(ours.parameters(), ref.parameters())
    return ours, ref


@pytest.fixture(scope="module", params=ARCHS)
def pair(request: pytest.FixtureRequest, tiny_config: Callable, tiny_model: Callable):
    name = request.param
    source = tiny_model(name, seed=ARCHS.index(name))
    ours, ref = load_pair(name, tiny_config(name), source)
    # Loading through HF names and our sanitize() must reproduce the source exactly.
    for (k1, v1), (k2, v2) in zip(
        tree_flatten(source.parameters()), tree_flatten(ours.parameters()), strict=True
    ):
        assert k1 == k2 and mx.array_equal(v1, v2), k1
    return name, ours, ref


def tokens(shape: tuple[int, ...], seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 128, size=shape))


def max_diff(a: mx.array, b: mx.array) -> float:
    assert a.shape == b.shape
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


@pytest.mark.parametrize("batch", [1, 2])
def test_prefill_and_cached_decode(pair, batch: int) -> None:
    _, ours, ref = pair
    prompt = tokens((batch, 11), seed=batch)
    assert max_diff(ours(prompt), ref(prompt)) <= TOL  # no cache at all

    our_cache, ref_c = make_prompt_cache(ours), ref_cache.make_prompt_cache(ref)
    assert max_diff(ours(prompt, our_cache), ref(prompt, ref_c)) <= TOL
    steps = tokens((batch, 16), seed=10 + batch)
    for i in range(16):
        step = steps[:, i : i + 1]
        diff = max_diff(ours(step, our_cache), ref(step, cache=ref_c))
        assert diff <= TOL, f"decode step {i}: {diff}"


def greedy(model: Any, cache: list[Any], prompt: mx.array, n: int) -> list[int]:
    """Greedy decoding that never repeats one of its last 8 tokens.

    Random tiny models with tied embeddings tend to echo one token forever under plain
    argmax, which would make 64 equal tokens a weak check; banning recent tokens keeps the
    choice deterministic but forces it to depend on the whole context.
    """
    out: list[int] = []
    logits = model(prompt, cache)
    for _ in range(n):
        last = np.array(logits[0, -1].astype(mx.float32))
        last[out[-8:]] = -np.inf
        token = int(last.argmax())
        out.append(token)
        logits = model(mx.array([[token]]), cache)
    return out


def test_greedy_tokens_identical(pair) -> None:
    _, ours, ref = pair
    prompt = tokens((1, 7), seed=3)
    got = greedy(ours, make_prompt_cache(ours), prompt, 64)
    want = greedy(ref, ref_cache.make_prompt_cache(ref), prompt, 64)
    assert got == want


def test_left_padded_batch_matches_rows_alone(pair) -> None:
    """Row 0 is 3 tokens shorter and left-padded; each row must match mlx-lm run alone."""
    _, ours, ref = pair
    pad = 3
    rows = [tokens((1, 9), seed=5), tokens((1, 12), seed=6)]
    batch = mx.concatenate([mx.concatenate([mx.zeros((1, pad), mx.int32), rows[0]], 1), rows[1]])
    cache = make_prompt_cache(ours, batch_size=2, left_padding=[pad, 0])
    logits = ours(batch, cache)
    ref_caches = [ref_cache.make_prompt_cache(ref) for _ in rows]
    alone = [ref(row, cache=c) for row, c in zip(rows, ref_caches)]
    assert max_diff(logits[0:1, pad:], alone[0]) <= TOL
    assert max_diff(logits[1:2], alone[1]) <= TOL
    steps = tokens((2, 6), seed=7)
    for i in range(steps.shape[1]):
        logits = ours(steps[:, i : i + 1], cache)
        for b in range(2):
            want = ref(steps[b : b + 1, i : i + 1], cache=ref_caches[b])
            assert max_diff(logits[b : b + 1], want) <= TOL, f"row {b}, step {i}"


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "mixtral"])
def test_quantized_checkpoint_loads_into_both(name: str, tiny_config, tiny_model) -> None:
    """Our 4-bit model's parameters (QuantizedSwitchLinear included) are an mlx-lm
    quantized checkpoint: same names, same packing, same logits."""
    ours, ref = load_pair(name, tiny_config(name), tiny_model(name, seed=1))
    nn.quantize(ours, group_size=32, bits=4)
    nn.quantize(ref, group_size=32, bits=4)
    ref.load_weights(tree_flatten(ours.parameters()), strict=True)
    prompt = tokens((2, 9), seed=11)
    assert max_diff(ours(prompt), ref(prompt)) <= TOL
    our_cache, ref_c = make_prompt_cache(ours), ref_cache.make_prompt_cache(ref)
    ours(prompt[:1], our_cache), ref(prompt[:1], cache=ref_c)
    step = tokens((1, 1), seed=12)
    assert max_diff(ours(step, our_cache), ref(step, cache=ref_c)) <= TOL
