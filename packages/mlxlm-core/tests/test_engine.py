"""The one engine: batched decoding, single-sequence decoding and speculative decoding agree."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_map
from mlxlm_core._engine import BatchGenerator
from mlxlm_core._errors import ContextLengthError, InvalidArgumentError
from mlxlm_core._generate import generate_step
from mlxlm_core._speculative import speculative_generate_step
from mlxlm_core.cache import make_prompt_cache
from mlxlm_core.models import get_model_classes

CONFIG = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
    vocab_size=97,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def tiny_model(seed: int, *, gain: float = 3.0, **overrides):
    mx.random.seed(seed)
    model_cls, args_cls = get_model_classes("llama")
    model = model_cls(args_cls.from_dict({**CONFIG, **overrides}))
    # Larger-than-default weights make the distribution peaked, so greedy choices are not
    # decided by float rounding between differently shaped (batched) matmuls.
    model.update(tree_map(lambda p: p * gain, model.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


def prompts(count: int) -> list[list[int]]:
    rng = mx.random.key(7)
    lengths = [3, 11, 5, 17, 1, 8, 23, 2][:count]
    out = []
    for i, n in enumerate(lengths):
        out.append(mx.random.randint(1, 97, (n,), key=mx.random.split(rng, 8)[i]).tolist())
    return out


def alone(model, prompt: list[int], max_tokens: int, **kwargs) -> list[int]:
    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kwargs)]


def run_batch(
    engine: BatchGenerator, remove_after: dict[int, int] | None = None
) -> dict[int, list[int]]:
    """Tokens per uid; ``remove_after[k]`` is removed after the k-th step."""
    out: dict[int, list[int]] = {}
    step = 0
    while engine.has_work:
        for r in engine.next():
            out.setdefault(r.uid, []).append(r.token)
        step += 1
        if remove_after and step in remove_after:
            engine.remove([remove_after[step]])
    return out


def test_batch_equals_single_for_eight_prompts_of_different_lengths(model):
    ps = prompts(8)
    engine = BatchGenerator(model, prefill_batch_size=3, completion_batch_size=8)
    uids = engine.insert(ps, max_tokens=[12, 7, 12, 3, 12, 9, 12, 5])
    batched = run_batch(engine)
    for uid, p, n in zip(uids, ps, [12, 7, 12, 3, 12, 9, 12, 5]):
        assert batched[uid] == alone(model, p, n)


def test_requests_joining_a_running_batch_get_the_same_tokens(model):
    ps = prompts(4)
    engine = BatchGenerator(model)
    first = engine.insert(ps[:2], max_tokens=10)
    out: dict[int, list[int]] = {}
    for _ in range(4):
        for r in engine.next():
            out.setdefault(r.uid, []).append(r.token)
    later = engine.insert(ps[2:], max_tokens=10)
    for uid, tokens in run_batch(engine).items():
        out.setdefault(uid, []).extend(tokens)
    for uid, p in zip(first + later, ps):
        assert out[uid] == alone(model, p, 10)


def long_prompt(n: int, seed: int = 3) -> list[int]:
    return mx.random.randint(1, 97, (n,), key=mx.random.key(seed)).tolist()


def test_a_long_prompt_joins_a_chunk_per_step_while_others_decode(model):
    ps = prompts(2)
    engine = BatchGenerator(model, prefill_step_size=16)
    running = engine.insert(ps, max_tokens=30)
    out: dict[int, list[int]] = {}
    for r in engine.next():
        out.setdefault(r.uid, []).append(r.token)
    late = long_prompt(100)
    (uid,) = engine.insert([late], max_tokens=6)
    # 99 prompt tokens to feed, 16 a step: the running rows get a token every step meanwhile
    # (six steps feed it, the seventh's decode gives its first token).
    steps_before_first = 0
    while uid not in out:
        responses = engine.next()
        assert {r.uid for r in responses} >= set(running)
        for r in responses:
            out.setdefault(r.uid, []).append(r.token)
        steps_before_first += 1
    assert steps_before_first == 7
    for r_uid, tokens in run_batch(engine).items():
        out.setdefault(r_uid, []).extend(tokens)
    assert out[uid] == alone(model, late, 6)
    for r_uid, p in zip(running, ps):
        assert out[r_uid] == alone(model, p, 30)


def test_alone_a_long_prompt_is_fed_at_once_and_prefix_caches_continue(model):
    late = long_prompt(100)
    engine = BatchGenerator(model, prefill_step_size=16)
    (uid,) = engine.insert([late], max_tokens=5)
    first = engine.next()
    assert [r.uid for r in first] == [uid]  # nobody waits: no interleaving
    # While that row decodes: a prompt continuing a prefix cache, and two fresh prompts fed
    # together, one of them removed while its prompt is being fed.
    prefix = make_prompt_cache(model)
    model(mx.array([late[:40]]), cache=prefix)
    mx.eval([c.state for c in prefix])
    others = [late[:90], long_prompt(60, 5), long_prompt(30, 6)]
    cached, dropped, kept = engine.insert(others, max_tokens=4, caches=[prefix, None, None])
    out = run_batch(engine, remove_after={2: dropped})
    assert [first[0].token, *out[uid]] == alone(model, late, 5)
    assert out[cached] == alone(model, late[:90], 4)
    assert out[kept] == alone(model, others[2], 4)
    assert dropped not in out


def test_stop_tokens_end_a_row_with_reason_stop(model):
    p = prompts(1)[0]
    expected = alone(model, p, 8)
    stop = expected[3]
    engine = BatchGenerator(model, stop_tokens=frozenset({stop}))
    engine.insert([p], max_tokens=8)
    responses = []
    while engine.has_work:
        responses.extend(engine.next())
    cut = expected.index(stop)
    assert [r.token for r in responses] == expected[: cut + 1]
    assert responses[-1].finish_reason == "stop"


def test_bounded_cache_in_batch_matches_single(model):
    ps = prompts(3)
    engine = BatchGenerator(model, max_kv_size=16)
    uids = engine.insert(ps, max_tokens=20)
    batched = run_batch(engine)
    for uid, p in zip(uids, ps):
        assert batched[uid] == alone(model, p, 20, max_kv_size=16)


def test_max_kv_size_bounds_every_layer_cache(model):
    cache = make_prompt_cache(model, max_kv_size=12)
    list(generate_step(mx.array(prompts(7)[6]), model, max_tokens=30, prompt_cache=cache))
    assert all(c.size() <= 12 for c in cache)
    assert cache[0].offset == 23 + 30 - 1


def test_quantized_kv_generation_stays_close_to_float():
    model = tiny_model(1, gain=1.0)
    p = mx.array(prompts(7)[6])
    ref = [lp for _, lp in generate_step(p, model, max_tokens=8)]
    quant = [lp for _, lp in generate_step(p, model, max_tokens=8, kv_bits=8, kv_group_size=32)]
    # Stated tolerance: with 8-bit keys/values every step's distribution is within 0.01
    # total-variation distance of the float cache's, and the greedy path is the same.
    assert [int(mx.argmax(a)) for a in ref] == [int(mx.argmax(b)) for b in quant]
    for a, b in zip(ref, quant):
        assert float(mx.abs(mx.exp(a) - mx.exp(b)).sum()) / 2 < 0.01
    quant4 = [lp for _, lp in generate_step(p, model, max_tokens=8, kv_bits=4, kv_group_size=32)]
    tv4 = max(float(mx.abs(mx.exp(a) - mx.exp(b)).sum()) / 2 for a, b in zip(ref, quant4))
    tv8 = max(float(mx.abs(mx.exp(a) - mx.exp(b)).sum()) / 2 for a, b in zip(ref, quant))
    assert tv8 < tv4  # fewer bits, larger error: the cache really is quantized


def test_speculative_greedy_equals_plain(model):
    # A draft that agrees sometimes: the same architecture with perturbed weights.
    draft = tiny_model(0)
    noise = tree_map(lambda p: p + 0.5 * mx.random.normal(p.shape), draft.parameters())
    draft.update(noise)
    for p in prompts(4):
        plain = alone(model, p, 20)
        for k in (1, 3, 5):
            spec = list(
                speculative_generate_step(
                    mx.array(p), model, draft, num_draft_tokens=k, max_tokens=20
                )
            )
            assert [t for t, _, _ in spec] == plain
    drafted = [d for _, _, d in speculative_generate_step(mx.array(p), model, model, max_tokens=20)]
    assert sum(drafted) > 10  # the model as its own draft: most tokens come from the draft


def test_bad_arguments_are_clear(model):
    with pytest.raises(InvalidArgumentError):
        list(generate_step(mx.array([1, 2]), model, max_tokens=-1))
    with pytest.raises(ContextLengthError, match="more than the model's context"):
        list(generate_step(mx.array(list(range(1, 90)) * 6), model, max_tokens=1))
    with pytest.raises(InvalidArgumentError):
        BatchGenerator(model).insert([[]])


def test_parameters_unchanged_by_generation(model):
    before = {k: mx.array(v) for k, v in tree_flatten(model.parameters())}
    alone(model, [1, 2, 3], 4)
    after = dict(tree_flatten(model.parameters()))
    assert all(mx.array_equal(before[k], after[k]) for k in before)
