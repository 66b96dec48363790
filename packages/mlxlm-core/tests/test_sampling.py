"""Unit tests for mlxlm_core.sampling.

Expected values come from the definitions, recomputed independently in float64 numpy (or
worked by hand for tiny cases); sampled distributions are checked statistically with
tolerances of at least four standard deviations. Parity with MLX-LM itself lives in
tests-integration/tests/test_sampling_parity.py (core's own tests must run without it).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlxlm_core._errors import InvalidArgumentError
from mlxlm_core.sampling import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    apply_xtc,
    log_softmax,
    make_logits_processors,
    make_sampler,
    top_logprobs,
)

N_DRAWS = 20_000  # rows of one batched call; 4 sd of a frequency is <= 4*sqrt(.25/N) = 0.014


@pytest.fixture(autouse=True)
def _fixed_global_seed():
    """Statistical checks draw from the global generator: pin it so no test can flake."""
    mx.random.seed(0)


def np_logprobs(rows: int, vocab: int, seed: int, scale: float = 2.0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, vocab)) * scale
    x = x - x.max(-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)


def kept(filtered: mx.array) -> np.ndarray:
    return np.isfinite(np.array(filtered.astype(mx.float32)))


def draws(sampler, row: np.ndarray, n: int = N_DRAWS) -> np.ndarray:
    """n independent draws from one distribution, in a single batched call."""
    batch = mx.broadcast_to(mx.array(row[None]), (n, row.shape[-1]))
    return np.array(sampler(batch))


def freqs(ids: np.ndarray, vocab: int) -> np.ndarray:
    return np.bincount(ids, minlength=vocab) / len(ids)


# ---------------------------------------------------------------- greedy & temperature


def test_temp_zero_is_argmax_per_row_and_ignores_filters():
    lp = np_logprobs(5, 64, seed=0)
    out = make_sampler(temp=0.0, top_k=3, xtc_probability=1.0, xtc_threshold=0.0)(mx.array(lp))
    assert out.shape == (5,)
    np.testing.assert_array_equal(np.array(out), lp.argmax(-1))


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_draws_follow_softmax_at_temperature(temp):
    lp = np_logprobs(1, 6, seed=1, scale=1.0)[0]
    expected = np.exp(lp.astype(np.float64) / temp)
    expected /= expected.sum()
    got = freqs(draws(make_sampler(temp=temp), lp), 6)
    assert np.abs(got - expected).max() < 0.015


# ---------------------------------------------------------------- top-k


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 40))
def test_top_k_keeps_exactly_the_k_largest(seed, k):
    lp = np_logprobs(3, 40, seed)
    out = apply_top_k(mx.array(lp), k)
    expected = np.zeros_like(lp, dtype=bool)
    np.put_along_axis(expected, np.argsort(-lp, -1)[:, :k], True, -1)
    np.testing.assert_array_equal(kept(out), expected)
    np.testing.assert_array_equal(np.array(out)[expected], lp[expected])  # values untouched


def test_top_k_draws_never_leave_the_top_k():
    lp = np_logprobs(1, 50, seed=2, scale=0.5)[0]  # flat: every top-k token gets drawn
    ids = draws(make_sampler(temp=1.0, top_k=4), lp)
    top = set(np.argsort(-lp)[:4].tolist())
    assert set(ids.tolist()) == top


def test_top_k_covering_the_vocabulary_keeps_everything():
    lp = mx.array(np_logprobs(2, 10, seed=3))
    assert kept(apply_top_k(lp, 10)).all() and kept(apply_top_k(lp, 99)).all()


# ---------------------------------------------------------------- top-p


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.floats(0.05, 0.95))
def test_top_p_keeps_the_smallest_nucleus_reaching_p(seed, p):
    lp = np_logprobs(4, 30, seed)
    keep = kept(apply_top_p(mx.array(lp), p))
    probs = np.exp(lp.astype(np.float64))
    for row in range(4):
        order = np.argsort(-probs[row])
        n = int(keep[row].sum())
        # The kept set is a prefix of the tokens by probability ...
        assert set(np.flatnonzero(keep[row])) == set(order[:n].tolist())
        # ... whose mass reaches p, while one token fewer would not (float32 slack).
        cum = np.cumsum(probs[row][order])
        assert cum[n - 1] >= p - 1e-5
        assert n == 1 or cum[n - 2] < p + 1e-5


def test_top_p_measures_mass_relative_to_what_earlier_filters_left():
    # Remaining (unnormalised) probabilities .4 .2 .1 .1 -> shares .5 .25 .125 .125:
    # p = 0.7 needs the top two of what is left, though they hold only 0.6 of the whole.
    lp = mx.log(mx.array([[0.4, 0.2, 0.1, 0.1, 0.0, 0.0]]))
    assert kept(apply_top_p(lp, 0.7)).tolist() == [[True, True, False, False, False, False]]


def test_top_p_sampler_draws_in_nucleus_renormalised():
    lp = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    got = freqs(draws(make_sampler(temp=1.0, top_p=0.75), lp), 4)
    np.testing.assert_allclose(got, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)


# ---------------------------------------------------------------- min-p


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), min_p=st.floats(0.01, 1.0))
def test_min_p_keeps_tokens_at_least_min_p_of_the_best(seed, min_p):
    lp = np_logprobs(3, 30, seed)
    probs = np.exp(lp.astype(np.float64))
    expected = probs >= min_p * probs.max(-1, keepdims=True)
    got = kept(apply_min_p(mx.array(lp), min_p))
    close = np.isclose(probs, min_p * probs.max(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_array_equal(got[~close], expected[~close])


def test_min_tokens_to_keep_overrides_min_p():
    lp = np_logprobs(2, 30, seed=4)
    got = kept(apply_min_p(mx.array(lp), 1.0, min_tokens_to_keep=5))
    expected = np.zeros_like(got)
    np.put_along_axis(expected, np.argsort(-lp, -1)[:, :5], True, -1)
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------- XTC


def test_xtc_removes_tokens_above_threshold_except_the_least_probable():
    probs = [0.3, 0.25, 0.2, 0.09, 0.08, 0.05, 0.02, 0.01]
    lp = mx.log(mx.array([probs]))
    # Above 0.1: 0.3, 0.25, 0.2. Only 0.2, the least probable of them, survives.
    assert kept(apply_xtc(lp, 1.0, 0.1)).tolist() == [[False, False, True, True] + [True] * 4]
    # A special token (say EOS = 0) is never removed.
    assert kept(apply_xtc(lp, 1.0, 0.1, [0]))[0].tolist()[:3] == [True, False, True]
    # Only one token above the threshold: nothing to exclude.
    assert kept(apply_xtc(lp, 1.0, 0.26)).all()


def test_xtc_on_random_rows_matches_definition():
    lp = np_logprobs(8, 20, seed=5, scale=1.5)
    got = kept(apply_xtc(mx.array(lp), 1.0, 0.05))
    probs = np.exp(lp.astype(np.float64))
    for row in range(8):
        above = probs[row] > 0.05
        expected = np.ones(20, bool)
        if above.sum() >= 2:
            expected[above] = False
            expected[np.flatnonzero(above)[probs[row][above].argmin()]] = True
        np.testing.assert_array_equal(got[row], expected)


def test_xtc_fires_with_its_probability_per_row():
    lp = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    ids = draws(make_sampler(temp=1.0, xtc_probability=0.3, xtc_threshold=0.1), lp)
    # When XTC fires only token 2 survives; otherwise the plain distribution is used.
    expected = 0.3 * np.array([0, 0, 1]) + 0.7 * np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(freqs(ids, 3), expected, atol=0.015)


# ---------------------------------------------------------------- composition


def test_filters_compose_then_sample_at_temperature():
    lp = np.log(np.array([0.3, 0.25, 0.2, 0.1, 0.08, 0.07], dtype=np.float32))
    # top_p=0.9 keeps 5; min_p=0.3 keeps p >= 0.09 (4 tokens); top_k=3 keeps 3.
    sampler = make_sampler(temp=0.5, top_p=0.9, min_p=0.3, top_k=3)
    expected = np.array([0.3, 0.25, 0.2]) ** 2  # temperature 0.5 squares probabilities
    expected = np.concatenate([expected / expected.sum(), [0, 0, 0]])
    np.testing.assert_allclose(freqs(draws(sampler, lp), 6), expected, atol=0.015)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_batch_shapes_and_dtypes(batch, dtype):
    lp = mx.array(np_logprobs(batch, 100, seed=batch)).astype(dtype)
    for sampler in (
        make_sampler(),
        make_sampler(temp=0.8, top_p=0.9, min_p=0.05, top_k=20, xtc_probability=0.5),
        make_sampler(temp=1.0, seed=1),
    ):
        out = sampler(lp)
        assert out.shape == (batch,) and mx.issubdtype(out.dtype, mx.integer)
        assert out.min().item() >= 0 and out.max().item() < 100


# ---------------------------------------------------------------- seeds


def _stream(sampler, lp: mx.array, n: int = 30, disturb: bool = False) -> list[int]:
    out = []
    for i in range(n):
        if disturb:  # someone else using the global generator must not matter
            mx.random.seed(1000 + i)
            mx.eval(mx.random.uniform(shape=(3,)))
        out.append(sampler(lp).item())
    return out


def test_seeded_samplers_give_one_stream_regardless_of_global_state():
    lp = mx.array(np_logprobs(1, 1000, seed=6, scale=0.1))
    kw = dict(temp=1.0, top_p=0.95, xtc_probability=0.5, xtc_threshold=0.001)
    first = _stream(make_sampler(**kw, seed=42), lp, disturb=True)
    assert first == _stream(make_sampler(**kw, seed=42), lp)
    assert first != _stream(make_sampler(**kw, seed=43), lp)


def test_seeded_sampler_does_not_advance_global_state():
    mx.random.seed(7)
    before = np.array(mx.random.state[0])
    _stream(make_sampler(temp=1.0, xtc_probability=0.5, seed=3), mx.array(np_logprobs(1, 50, 7)))
    np.testing.assert_array_equal(np.array(mx.random.state[0]), before)


def test_global_seed_reproduces_unseeded_sampling_and_equals_seed_argument():
    lp = mx.array(np_logprobs(1, 1000, seed=8, scale=0.1))
    runs = []
    for _ in range(2):
        mx.random.seed(99)
        runs.append(_stream(make_sampler(temp=1.0, xtc_probability=0.5), lp))
    assert runs[0] == runs[1]
    assert runs[0] == _stream(make_sampler(temp=1.0, xtc_probability=0.5, seed=99), lp)


# ---------------------------------------------------------------- logprob helpers


def test_log_softmax_is_stable_for_huge_and_masked_logits():
    x = np.array([[1e4, 1e4 - 1.0, 0.0, -np.inf], [-3e4, -3e4 + 2.0, -3e4, -3e4]], np.float32)
    got = np.array(log_softmax(mx.array(x)))
    x64 = x.astype(np.float64)
    shifted = x64 - x64.max(-1, keepdims=True)
    expected = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    assert got[0, 3] == -np.inf and np.isfinite(got[:, :3]).all()
    np.testing.assert_allclose(
        got[np.isfinite(expected)], expected[np.isfinite(expected)], atol=1e-5
    )
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=1e-6)


def test_top_logprobs_sorted_descending_and_capped():
    lp = np_logprobs(3, 50, seed=9)
    ids, vals = top_logprobs(mx.array(lp), 5)
    order = np.argsort(-lp, -1)[:, :5]
    np.testing.assert_array_equal(np.array(ids), order)
    np.testing.assert_array_equal(np.array(vals), np.take_along_axis(lp, order, -1))
    ids, vals = top_logprobs(mx.array(lp[0]), 80)  # 1-D input, k above the vocabulary
    np.testing.assert_array_equal(np.array(ids), np.argsort(-lp[0]))
    assert top_logprobs(mx.array(lp), 0)[0].shape == (3, 0)


# ---------------------------------------------------------------- logits processors


def _one(**kw):
    (processor,) = make_logits_processors(**kw)
    return processor


LOGITS = np.array([[2.0, -1.0, 0.5, -3.0, 1.5, 0.0]], np.float32)


def test_repetition_penalty_is_sign_aware_and_counts_once():
    out = np.array(_one(repetition_penalty=2.0)(mx.array([0, 1, 1, 3]), mx.array(LOGITS)))
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, -6.0, 1.5, 0.0]])


def test_presence_once_and_frequency_per_occurrence():
    history = mx.array([4, 2, 2, 2])
    out = np.array(_one(presence_penalty=0.5)(history, mx.array(LOGITS)))
    np.testing.assert_allclose(out, [[2.0, -1.0, 0.0, -3.0, 1.0, 0.0]])
    out = np.array(_one(frequency_penalty=0.5)(history, mx.array(LOGITS)))
    np.testing.assert_allclose(out, [[2.0, -1.0, -1.0, -3.0, 1.0, 0.0]])


@pytest.mark.parametrize("size,expected_hit", [(2, {2, 5}), (4, {0, 2, 5}), (None, {0, 1, 2, 5})])
def test_context_size_limits_the_window(size, expected_hit):
    history = mx.array([1, 0, 2, 5, 2])  # most recent last
    out = np.array(
        _one(presence_penalty=1.0, presence_context_size=size)(history, mx.array(LOGITS))
    )
    assert set(np.flatnonzero(out[0] != LOGITS[0]).tolist()) == expected_hit


@pytest.mark.parametrize("kind,value", [("repetition", 1.5), ("presence", 0.7), ("frequency", 0.4)])
def test_per_row_histories_with_padding_equal_rows_done_one_by_one(kind, value):
    proc = _one(**{f"{kind}_penalty": value, f"{kind}_context_size": 3})
    logits = mx.array(np_logprobs(3, 12, seed=10) * 3)
    rows = [[1, 4, 4, 7, 9], [2, 2], [11, 0, 11, 3]]
    padded = mx.array(
        [
            [-1, -1, -1, -1, -1, 1, 4, 4, 7, 9],  # left padding
            [2, 2, -1, -1, -1, -1, -1, -1, -1, -1],  # right padding
            [-1, -1, -1, 11, 0, -1, 11, 3, -1, -1],
        ],
        mx.int32,
    )  # either side
    together = proc(padded, logits)
    for r, history in enumerate(rows):
        alone = proc(mx.array(history, mx.uint32), logits[r : r + 1])
        np.testing.assert_array_equal(np.array(together[r : r + 1]), np.array(alone))


def test_processors_share_a_1d_history_and_never_mutate_inputs():
    logits = mx.array(np.repeat(LOGITS, 2, axis=0))
    snapshot = np.array(logits)
    procs = make_logits_processors(
        logit_bias={5: 1.0}, repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1
    )
    assert len(procs) == 4
    out = logits
    for p in procs:
        out = p(mx.array([0, 3]), out)
    np.testing.assert_array_equal(np.array(logits), snapshot)
    np.testing.assert_array_equal(np.array(out[0]), np.array(out[1]))
    assert not np.array_equal(np.array(out), snapshot)
    for p in procs[1:]:  # an empty history changes nothing
        np.testing.assert_array_equal(np.array(p(mx.array([], mx.int32), logits)), snapshot)


def test_logit_bias_adds_and_can_ban_a_token():
    out = _one(logit_bias={0: -math.inf, 3: 10.0})(mx.array([1]), mx.array(LOGITS))
    assert np.array(out)[0, 0] == -np.inf and np.array(out)[0, 3] == 7.0
    assert make_sampler()(out).item() == 3


def test_no_processor_for_absent_or_zero_penalties():
    assert make_logits_processors() == []
    assert make_logits_processors(logit_bias={}, repetition_penalty=0, presence_penalty=0.0) == []


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kw",
    [
        {"temp": -0.1},
        {"temp": math.nan},
        {"temp": math.inf},
        {"top_p": 1.5},
        {"top_p": -0.1},
        {"min_p": 2.0},
        {"top_k": -1},
        {"top_k": 2.5},
        {"min_tokens_to_keep": 0},
        {"xtc_probability": 1.1},
        {"xtc_threshold": 0.6},
        {"xtc_special_tokens": [-1]},
        {"seed": -1},
    ],
)
def test_make_sampler_rejects_bad_arguments_in_one_line(kw):
    with pytest.raises(InvalidArgumentError) as err:
        make_sampler(**kw)
    assert "\n" not in str(err.value) and next(iter(kw)).split("_")[0] in str(err.value)


@pytest.mark.parametrize(
    "kw",
    [
        {"repetition_penalty": -1.0},
        {"repetition_penalty": 1.1, "repetition_context_size": 0},
        {"presence_penalty": math.nan},
        {"frequency_penalty": 0.5, "frequency_context_size": -2},
        {"logit_bias": {-1: 1.0}},
        {"logit_bias": {2: "big"}},
    ],
)
def test_make_logits_processors_rejects_bad_arguments(kw):
    with pytest.raises(InvalidArgumentError, match=r"^[^\n]+$"):
        make_logits_processors(**kw)


def test_call_time_errors_for_vocabulary_and_shapes():
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        _one(logit_bias={6: 1.0})(mx.array([0]), mx.array(LOGITS))
    with pytest.raises(InvalidArgumentError, match="tokens must have shape"):
        _one(presence_penalty=1.0)(mx.zeros((3, 2), mx.int32), mx.zeros((2, 6)))
    with pytest.raises(InvalidArgumentError, match="xtc_special_tokens"):
        apply_xtc(mx.array(LOGITS), 1.0, 0.1, [6])
