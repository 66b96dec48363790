"""Logits parity of every architecture with the published mlx-lm (the oracle).

For each tiny config (conftest.py), our model's random parameters are written out under
Hugging Face names and layouts and loaded into our model and mlx-lm's through each
library's own ``sanitize`` (_parity.py). Each library then runs with its own caches:
prefill without and with a cache and 16 cached decode steps at batch 1 and 2, a
left-padded batch against each row run alone, greedy tokens; and what we save (float and
4-bit) loads into mlx-lm unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import _parity as parity  # registered by conftest.py
import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import cache as ref_cache
from mlxlm_core import load_model
from mlxlm_core.cache import make_prompt_cache
from mlxlm_core.models import get_model_classes

TOL, tokens, max_diff = parity.TOL, parity.tokens, parity.max_diff
load_pair, reference, load_into = parity.load_pair, parity.reference, parity.load_into
perturb_constants, greedy = parity.perturb_constants, parity.greedy

ARCHS = [
    # Llama, Mistral, Qwen 2/3, Qwen3-MoE, Mixtral
    "llama",
    "mistral",
    "qwen2",
    "qwen2_untied",
    "qwen3",
    "qwen3_moe",
    "qwen3_moe_norm",
    "mixtral",
    # Gemma, Phi, StarCoder2, GPT-2, GPT-NeoX, Cohere
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
    # Qwen2-MoE, OLMo, Granite, MiniCPM, InternLM, EXAONE, GLM, ERNIE, SmolLM3, DeepSeek
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

# mlx-lm's gemma2 and starcoder2 never window: their configs' 32-token windows are longer
# than anything compared with them, so greedy decoding stops inside (7 + 24 tokens).
_GREEDY_TOKENS = {"gemma2": 24, "starcoder2": 24}
# Where what we save is not a checkpoint mlx-lm reads (they load from Hugging Face names):
# mlx-lm's DeepSeek-V2 keeps kv_b_proj whole where we split it per head, as its V3 does.
_SAVED_LAYOUT_DIFFERS = {"deepseek_v2", "deepseek_v2_grouped"}
SAVED = [n for n in ARCHS if n not in _SAVED_LAYOUT_DIFFERS]
# mlx-lm runs tied MiniCPM untied, copying the embedding into lm_head as it loads: a
# quantized embedding's scales are not copied, so a 4-bit tied MiniCPM does not load there.
SAVED_QUANTIZED = [n for n in SAVED if n != "minicpm_tied"]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request: pytest.FixtureRequest, tiny_config: Callable, tiny_model: Callable):
    name = request.param
    seed = ARCHS.index(name)
    source = perturb_constants(tiny_model(name, seed=seed), seed=seed)
    config = tiny_config(name)
    ours, ref = load_pair(name, config, source)
    # Loading through checkpoint names and our sanitize() must reproduce the source exactly.
    want, got = tree_flatten(source.parameters()), tree_flatten(ours.parameters())
    assert [k for k, _ in want] == [k for k, _ in got]
    for (key, v1), (_, v2) in zip(want, got, strict=True):
        assert mx.array_equal(v1, v2), key
    return name, config, ours, ref


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


def test_greedy_tokens_identical(pair) -> None:
    _, _, ours, ref = pair
    prompt = tokens((1, 7), seed=3)
    n = _GREEDY_TOKENS.get(pair[0], 64)
    got = greedy(ours, make_prompt_cache(ours), prompt, n)
    assert got == greedy(ref, ref_cache.make_prompt_cache(ref), prompt, n)


@pytest.mark.parametrize("pair", SAVED, indirect=True)
def test_our_parameters_are_an_mlx_lm_checkpoint(pair) -> None:
    """What we save (our parameter names and layouts) loads into mlx-lm unchanged."""
    name, config, ours, _ = pair
    ref = load_into(reference(name, config), dict(tree_flatten(ours.parameters())))
    prompt = tokens((2, 7), seed=9)
    assert max_diff(ours(prompt), ref(prompt)) <= TOL


@pytest.mark.parametrize("pair", SAVED_QUANTIZED, indirect=True)
def test_our_quantized_parameters_are_an_mlx_lm_checkpoint(pair) -> None:
    """4-bit: our packed weights, scales and biases (QuantizedSwitchLinear included) load
    into mlx-lm the way its loader does it (quantize the modules that have scales) and
    give the same logits, prefill and a cached step."""
    name, config, ours, _ = pair
    model_cls, args_cls = get_model_classes(config["model_type"])
    quantized = model_cls(args_cls.from_dict(config))
    quantized.load_weights(tree_flatten(ours.parameters()), strict=True)
    nn.quantize(quantized, group_size=32, bits=4)
    weights = dict(tree_flatten(quantized.parameters()))
    ref = reference(name, config)
    if hasattr(ref, "sanitize"):
        weights = ref.sanitize(weights)
    nn.quantize(ref, group_size=32, bits=4, class_predicate=lambda p, _: f"{p}.scales" in weights)
    ref.load_weights(list(weights.items()), strict=True)
    prompt = tokens((2, 7), seed=13)
    assert max_diff(quantized(prompt), ref(prompt)) <= TOL
    our_cache, ref_c = make_prompt_cache(quantized), ref_cache.make_prompt_cache(ref)
    quantized(prompt[:1], our_cache), ref(prompt[:1], cache=ref_c)
    step = tokens((1, 1), seed=12)
    assert max_diff(quantized(step, our_cache), ref(step, cache=ref_c)) <= TOL


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


@pytest.mark.parametrize("name", ["qwen2_moe", "olmo3", "deepseek_v3", "glm4_moe"])
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
