"""Logits parity with the published mlx-lm for the second batch of architectures.

Same method as test_model_parity.py: our tiny random model's parameters are written out
under the names a Hugging Face checkpoint uses (experts one tensor each, DeepSeek's
``kv_b_proj`` whole), loaded into our model and mlx-lm's through each library's own
``sanitize``, and both run with their own caches: prefill without and with a cache, 16
cached decode steps, batch 1 and 2, a left-padded batch against each row run alone, and
greedy tokens.

Where mlx-lm's configuration reading differs from transformers' on a field the tiny config
sets, the reference gets an equivalent spelling (``_REF_OVERRIDES``); each is explained there.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as ref_cache
from mlxlm_core import load_model
from mlxlm_core.cache import make_prompt_cache
from mlxlm_core.models import get_model_classes

ARCHS = [
    "qwen2_moe",
    "olmo2",
    "olmo3",
    "granite",
    "minicpm",
    "minicpm_tied",
    "internlm2",
    "internlm3",
    "exaone",
    "glm4",
    "glm4_moe",
    "ernie4_5",
    "smollm3",
    "deepseek_v2",
    "deepseek_v2_grouped",
    "deepseek_v3",
]
TOL = 1e-4

# name -> config changes for mlx-lm only, each the same model in mlx-lm's reading.
_REF_OVERRIDES: dict[str, dict[str, Any]] = {
    # mlx-lm's tied MiniCPM path skips the hidden_size / dim_model_base division; it runs
    # real (tied) MiniCPM checkpoints untied, with the embedding copied into lm_head.
    "minicpm_tied": {"tie_word_embeddings": False},
}

# Checkpoint name of the token embedding, where it is not model.embed_tokens.
_EMBED_KEY: dict[str, str] = {
    "internlm2": "model.tok_embeddings.weight",
    "exaone": "transformer.wte.weight",
}


def perturb_constants(model: nn.Module, *, seed: int) -> nn.Module:
    """Give every still-constant vector (norms conftest's naming misses, router biases)
    random values, so that dropping or misplacing one changes the logits."""
    rng = np.random.default_rng(seed)
    params = []
    for name, value in tree_flatten(model.parameters()):
        if value.ndim == 1 and value.size > 1 and bool(mx.all(value == value[0]).item()):
            noise = mx.array(rng.normal(size=value.shape).astype(np.float32))
            value = value + (0.2 if float(value[0].item()) != 0.0 else 0.05) * noise
        params.append((name, value))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def to_hf_weights(model: nn.Module, config: dict[str, Any]) -> dict[str, mx.array]:
    """Our parameters as a Hugging Face checkpoint names them."""
    weights: dict[str, mx.array] = {}
    multi: dict[str, dict[str, mx.array]] = {}
    for key, value in tree_flatten(model.parameters()):
        if match := re.fullmatch(r"(.+)\.switch_mlp\.(\w+)\.weight", key):
            block, proj = match.groups()
            for e in range(value.shape[0]):
                weights[f"{block}.experts.{e}.{proj}.weight"] = value[e]
        elif match := re.fullmatch(r"(.+)\.(embed_q|unembed_out)\.weight", key):
            multi.setdefault(match[1], {})[match[2]] = value
        else:
            weights[key] = value
    for prefix, parts in multi.items():
        # kv_b_proj rows are, per head, the nope-key rows then the value rows.
        wk = parts["embed_q"].swapaxes(1, 2)  # (heads, nope, rank)
        wv = parts["unembed_out"]  # (heads, v_head_dim, rank)
        weights[f"{prefix}.kv_b_proj.weight"] = mx.concatenate([wk, wv], axis=1).reshape(
            -1, wk.shape[-1]
        )
    return weights


def reference(config: dict[str, Any]) -> nn.Module:
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    return module.Model(module.ModelArgs.from_dict(config))


def load_pair(name: str, config: dict[str, Any], source: nn.Module) -> tuple[nn.Module, nn.Module]:
    hf = to_hf_weights(source, config)
    model_cls, args_cls = get_model_classes(config["model_type"])
    ours = model_cls(args_cls.from_dict(config))
    ours.load_weights(list(ours.sanitize(dict(hf)).items()), strict=True)
    ref = reference({**config, **_REF_OVERRIDES.get(name, {})})
    ref_hf = dict(hf)
    if "lm_head.weight" in dict(tree_flatten(ref.parameters())) and "lm_head.weight" not in hf:
        # A tied checkpoint that still carries the head copy, as many do.
        ref_hf["lm_head.weight"] = hf[_EMBED_KEY.get(name, "model.embed_tokens.weight")]
    if hasattr(ref, "sanitize"):  # some mlx-lm models take checkpoints as they are
        ref_hf = ref.sanitize(ref_hf)
    ref.load_weights(list(ref_hf.items()), strict=True)
    mx.eval(ours.parameters(), ref.parameters())
    return ours, ref


@pytest.fixture(scope="module", params=ARCHS)
def pair(
    request: pytest.FixtureRequest, tiny_config: Callable, tiny_model: Callable
) -> tuple[str, Any, Any]:
    name = request.param
    source = perturb_constants(tiny_model(name, seed=ARCHS.index(name)), seed=ARCHS.index(name))
    ours, ref = load_pair(name, tiny_config(name), source)
    # Loading through checkpoint names and our sanitize() must reproduce the source exactly.
    want, got = tree_flatten(source.parameters()), tree_flatten(ours.parameters())
    assert [k for k, _ in want] == [k for k, _ in got]
    for (key, v1), (_, v2) in zip(want, got, strict=True):
        assert mx.array_equal(v1, v2), key
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
    assert max_diff(ours(prompt, our_cache), ref(prompt, cache=ref_c)) <= TOL
    steps = tokens((batch, 16), seed=10 + batch)
    for i in range(16):
        step = steps[:, i : i + 1]
        diff = max_diff(ours(step, our_cache), ref(step, cache=ref_c))
        assert diff <= TOL, f"decode step {i}: {diff}"


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


def greedy(model: Any, cache: list[Any], prompt: mx.array, n: int) -> list[int]:
    """Greedy decoding that never repeats one of its last 8 tokens (see test_model_parity)."""
    out: list[int] = []
    logits = model(prompt, cache=cache)
    for _ in range(n):
        last = np.array(logits[0, -1].astype(mx.float32))
        last[out[-8:]] = -np.inf
        out.append(int(last.argmax()))
        logits = model(mx.array([[out[-1]]]), cache=cache)
    return out


def test_greedy_tokens_identical(pair) -> None:
    _, ours, ref = pair
    prompt = tokens((1, 7), seed=3)
    got = greedy(ours, make_prompt_cache(ours), prompt, 24)
    assert got == greedy(ref, ref_cache.make_prompt_cache(ref), prompt, 24)


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
def test_mlx_lm_quantized_deepseek_checkpoint_loads(
    name: str, tiny_config: Callable, tiny_model: Callable, tmp_path: Path
) -> None:
    """An 8-bit checkpoint as mlx-lm converts it loads through our loader. mlx-lm's V3
    stores the per-head embed_q/unembed_out we use (same logits); its V2 stores one
    quantized kv_b_proj, which our sanitize dequantizes, splits and quantizes again with
    the same bits and group size (close logits: each part is re-rounded)."""
    config = tiny_config(name)
    # Fixed weights whatever ran before: a token near a routing tie would swap experts
    # under V2's re-rounding and turn a small difference into a large one.
    mx.random.seed(21)
    source = perturb_constants(tiny_model(name, seed=21), seed=21)
    decisive = [(k, 10 * v) for k, v in tree_flatten(source.parameters()) if ".gate.weight" in k]
    source.load_weights(decisive, strict=False)  # trained routers are decisive
    _, ref = load_pair(name, config, source)
    nn.quantize(ref, group_size=32, bits=8)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(ref.parameters())))
    quantized_config = {**config, "quantization": {"group_size": 32, "bits": 8}}
    (tmp_path / "config.json").write_text(json.dumps(quantized_config))
    ours, _ = load_model(tmp_path)
    kinds = {type(m).__name__ for _, m in ours.named_modules()}
    assert "QuantizedMultiLinear" in kinds and "MultiLinear" not in kinds
    prompt = tokens((2, 9), seed=22)
    want = ref(prompt)
    tol = TOL if name == "deepseek_v3" else 0.02 * float(mx.max(mx.abs(want)).item())
    assert max_diff(ours(prompt), want) <= tol
    our_cache, ref_c = make_prompt_cache(ours), ref_cache.make_prompt_cache(ref)
    ours(prompt[:1], our_cache), ref(prompt[:1], cache=ref_c)
    step = tokens((1, 1), seed=23)
    assert max_diff(ours(step, our_cache), ref(step, cache=ref_c)) <= tol


@pytest.mark.parametrize(
    "name",
    ["qwen2_moe", "olmo3", "deepseek_v3", "glm4_moe"],
)
def test_continuous_batching_gives_mlx_lm_greedy_tokens(
    name: str, tiny_config: Callable, tiny_model: Callable
) -> None:
    """Prompts of different lengths, one joining mid-generation, through our engine (left
    padding, cache merging and filtering; the latent cache for DeepSeek, mixed windows for
    OLMo 3) produce what mlx-lm's plain greedy loop gives for each prompt alone."""
    from mlxlm_core import BatchGenerator

    seed = 30 + ARCHS.index(name)
    ours, ref = load_pair(name, tiny_config(name), perturb_constants(tiny_model(name), seed=seed))
    prompts = [tokens((1, n), seed=seed + n)[0].tolist() for n in (5, 9, 3)]
    limits = [10, 7, 8]
    engine = BatchGenerator(ours, completion_batch_size=4)
    uids = engine.insert(prompts[:2], max_tokens=limits[:2])
    got: dict[int, list[int]] = {uid: [] for uid in uids}
    for step in range(40):
        if step == 3:  # the third prompt arrives while the others are decoding
            uids += engine.insert(prompts[2:], max_tokens=limits[2:])
            got[uids[-1]] = []
        for response in engine.next():
            got[response.uid].append(response.token)
        if not engine.has_work:
            break
    for uid, prompt, limit in zip(uids, prompts, limits, strict=True):
        cache = ref_cache.make_prompt_cache(ref)
        logits, want = ref(mx.array([prompt]), cache=cache), []
        for _ in range(limit):
            want.append(int(mx.argmax(logits[0, -1]).item()))
            logits = ref(mx.array([[want[-1]]]), cache=cache)
        assert got[uid] == want, (uid, got[uid], want)
