"""Logits parity with the published mlx-lm for the Gemma, Phi, StarCoder2, GPT-2, GPT-NeoX
and Cohere families (the model-zoo share of test_model_parity.py).

Each tiny config's random parameters are written out the way a Hugging Face checkpoint
stores them (GPT-2's transposed Conv1D matrices, GPT-NeoX's ``gpt_neox.`` prefix, one
tensor per expert, the buffers transformers saves), then loaded into our model and into
mlx-lm's through each library's own ``sanitize``. Each library then runs with its own
caches: prefill and 16 cached decode steps at batch 1 and 2, and a left-padded batch against
each row run alone by mlx-lm.
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
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as ref_cache
from mlxlm_core.cache import make_prompt_cache
from mlxlm_core.models import get_model_classes

ARCHS = [
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "phi3_longrope",
    "phimoe",
    "starcoder2",
    "gpt2",
    "gpt_neox",
    "gpt_neox_sequential",
    "cohere",
    "cohere_qk_norm",
]
TOL = 1e-4
# Checkpoints of tied models that carry a copy of the head (mlx-lm's sanitize drops it).
_TIED_HEAD_COPY = {"gemma3_text"}
_PHIMOE_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")


def randomize_unit_weights(model: nn.Module, *, seed: int) -> None:
    """Norm scales the shared fixture leaves at one (GPT-2's ``ln_*``) get random values."""
    mx.random.seed(seed)
    params = [
        (k, 1.0 + 0.2 * mx.random.normal(v.shape))
        for k, v in tree_flatten(model.parameters())
        if v.ndim == 1 and k.endswith(".weight") and bool(mx.all(v == 1).item())
    ]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def to_hf_weights(model: nn.Module, config: dict[str, Any]) -> dict[str, mx.array]:
    """Our parameters as a Hugging Face checkpoint of this model type names and lays them out."""
    model_type = config["model_type"]
    weights: dict[str, mx.array] = {}
    for key, value in tree_flatten(model.parameters()):
        if match := re.fullmatch(r"(.+)\.switch_mlp\.(\w+)\.weight", key):
            block, proj = match.groups()
            for e in range(value.shape[0]):
                weights[f"{block}.experts.{e}.{_PHIMOE_EXPERT_NAMES[proj]}.weight"] = value[e]
        elif model_type == "gpt2":
            key = key.removeprefix("model.")
            weights[key] = value.T if _CONV1D.fullmatch(key) else value
        elif model_type == "gpt_neox":
            key = key.replace("model.h.", "gpt_neox.layers.").replace("model.", "gpt_neox.")
            weights[key.replace("gpt_neox.embed_out", "embed_out")] = value
        else:
            weights[key] = value
    # Buffers transformers writes into these checkpoints; both loaders must drop them.
    if model_type == "gpt2":
        n = config["n_positions"]
        for i in range(config["n_layer"]):
            weights[f"h.{i}.attn.bias"] = mx.tril(mx.ones((n, n)))[None, None]
    if model_type == "gpt_neox":
        for i in range(config["num_hidden_layers"]):
            weights[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = mx.ones((2,))
            weights[f"gpt_neox.layers.{i}.attention.masked_bias"] = mx.array(-1e9)
    if model_type in _TIED_HEAD_COPY and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


def reference(config: dict[str, Any]) -> nn.Module:
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    return module.Model(module.ModelArgs.from_dict(config))


def load_into(model: nn.Module, weights: dict[str, mx.array]) -> nn.Module:
    if hasattr(model, "sanitize"):
        weights = model.sanitize(dict(weights))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def load_pair(config: dict[str, Any], source: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(ours, mlx-lm's), both loaded from the same Hugging Face-named weights."""
    hf = to_hf_weights(source, config)
    model_cls, args_cls = get_model_classes(config["model_type"])
    ours = load_into(model_cls(args_cls.from_dict(config)), hf)
    return ours, load_into(reference(config), hf)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request: pytest.FixtureRequest, tiny_config: Callable, tiny_model: Callable):
    name = request.param
    seed = 100 + ARCHS.index(name)
    source = tiny_model(name, seed=seed)
    randomize_unit_weights(source, seed=seed)
    config = tiny_config(name)
    ours, ref = load_pair(config, source)
    # Loading through HF names and our sanitize() must reproduce the source exactly.
    for (k1, v1), (k2, v2) in zip(
        tree_flatten(source.parameters()), tree_flatten(ours.parameters()), strict=True
    ):
        assert k1 == k2 and mx.array_equal(v1, v2), k1
    return name, config, ours, ref


def tokens(shape: tuple[int, ...], seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 128, size=shape))


def max_diff(a: mx.array, b: mx.array) -> float:
    assert a.shape == b.shape
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


@pytest.mark.parametrize("batch", [1, 2])
def test_prefill_and_cached_decode(pair, batch: int) -> None:
    _, _, ours, ref = pair
    prompt = tokens((batch, 11), seed=batch)
    assert max_diff(ours(prompt), ref(prompt)) <= TOL  # no cache at all

    our_cache, ref_c = make_prompt_cache(ours), ref_cache.make_prompt_cache(ref)
    assert max_diff(ours(prompt, our_cache), ref(prompt, cache=ref_c)) <= TOL
    steps = tokens((batch, 16), seed=10 + batch)
    for i in range(16):
        step = steps[:, i : i + 1]
        diff = max_diff(ours(step, our_cache), ref(step, cache=ref_c))
        assert diff <= TOL, f"decode step {i}: {diff}"


def test_left_padded_batch_matches_rows_alone(pair) -> None:
    """Row 0 is 3 tokens shorter and left-padded; each row must match mlx-lm run alone."""
    _, _, ours, ref = pair
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


def test_our_parameters_are_an_mlx_lm_checkpoint(pair) -> None:
    """What we save (our parameter names and layouts) loads into mlx-lm unchanged."""
    _, config, ours, _ = pair
    ref = load_into(reference(config), dict(tree_flatten(ours.parameters())))
    prompt = tokens((2, 7), seed=9)
    assert max_diff(ours(prompt), ref(prompt)) <= TOL


def test_our_quantized_parameters_are_an_mlx_lm_checkpoint(pair) -> None:
    """4-bit: our packed weights, scales and biases load into mlx-lm the way its loader
    does it (quantize the modules that have scales) and give the same logits."""
    _, config, ours, _ = pair
    model_cls, args_cls = get_model_classes(config["model_type"])
    quantized = model_cls(args_cls.from_dict(config))
    quantized.load_weights(tree_flatten(ours.parameters()), strict=True)
    nn.quantize(quantized, group_size=32, bits=4)
    weights = dict(tree_flatten(quantized.parameters()))
    ref = reference(config)
    if hasattr(ref, "sanitize"):
        weights = ref.sanitize(weights)
    nn.quantize(ref, group_size=32, bits=4, class_predicate=lambda p, _: f"{p}.scales" in weights)
    ref.load_weights(list(weights.items()), strict=True)
    prompt = tokens((2, 7), seed=13)
    assert max_diff(quantized(prompt), ref(prompt)) <= TOL
