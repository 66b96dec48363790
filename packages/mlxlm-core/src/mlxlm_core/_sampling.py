"""Token samplers: filters over log-probabilities, then a categorical draw.

Everything here works on the last axis of a ``(..., V)`` array of log-probabilities, so a
batch ``(B, V)`` is handled in one set of array operations: no Python loop over the
vocabulary or the batch, and no host synchronisation (nothing calls ``.item()`` or
``mx.eval``), so the engine can pipeline sampling with ``mx.async_eval``.

The filters and their composition order follow MLX-LM (``top_p → min_p → xtc → top_k``, all
measured on the temperature-1 distribution, then one draw at ``temp``), so for the same
settings and the same ``mx.random.seed`` our sampler draws the same tokens as MLX-LM's.
A filter "removes" a token by setting its log-probability to ``-inf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlx.core as mx

from mlxlm_core._errors import InvalidArgumentError

Sampler = Callable[[mx.array], mx.array]
"""Maps log-probabilities ``(B, V)`` to token ids ``(B,)``."""

_NEG_INF = float("-inf")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    # `not (lo <= v <= hi)` is also true for NaN, which must be refused too.
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise InvalidArgumentError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def greedy_sampler(logprobs: mx.array) -> mx.array:
    """The most probable token of each row (what ``temp=0`` means)."""
    return mx.argmax(logprobs, axis=-1)


def categorical_sampling(
    logprobs: mx.array, temp: float, *, key: mx.array | None = None
) -> mx.array:
    """Draw one token per row from ``softmax(logprobs / temp)``.

    Multiplying by ``1 / temp`` (rather than dividing) is deliberate: it is the exact
    arithmetic MLX-LM uses, so seeded draws agree bit for bit.
    """
    return mx.random.categorical(logprobs * (1.0 / temp), key=key)


def apply_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    """Keep the ``top_k`` most probable tokens of each row.

    Exactly ``top_k`` survive (ties at the boundary are broken arbitrarily). Unlike MLX-LM,
    which raises when ``top_k >= V``, a ``top_k`` that covers the vocabulary keeps everything:
    the user asked for no more than ``top_k`` candidates, and there are fewer.
    """
    _check_int("top_k", top_k, 1)
    vocab = logprobs.shape[-1]
    if top_k >= vocab:
        return logprobs
    drop = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., top_k:]
    return mx.put_along_axis(logprobs, drop, mx.array(_NEG_INF, logprobs.dtype), axis=-1)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Nucleus filter: keep the smallest set of top tokens whose mass reaches ``top_p``.

    Mass is measured relative to what is left (earlier filters may have removed tokens), in
    float32 whatever the input dtype, and every token tied with the last one kept survives.
    """
    _check_range("top_p", top_p, 0.0, 1.0)
    ascending = mx.sort(logprobs, axis=-1)
    probs = mx.exp(ascending.astype(mx.float32))
    # mass_above[i]: probability of all tokens strictly more likely than sorted token i.
    mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    total = mass_above[..., :1] + probs[..., :1]
    # Token i can be dropped when the tokens above it already carry top_p of the mass.
    n_dropped = (mass_above >= top_p * total).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(ascending, n_dropped, axis=-1)
    return mx.where(logprobs < threshold, _NEG_INF, logprobs)


def apply_min_p(logprobs: mx.array, min_p: float, min_tokens_to_keep: int = 1) -> mx.array:
    """Drop tokens less likely than ``min_p`` times the most likely one.

    The ``min_tokens_to_keep`` most likely tokens always survive, whatever ``min_p`` says.
    """
    _check_range("min_p", min_p, 0.0, 1.0)
    _check_int("min_tokens_to_keep", min_tokens_to_keep, 1)
    if min_p == 0.0:
        return logprobs
    cutoff = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    remove = logprobs < cutoff
    keep_n = min(min_tokens_to_keep, logprobs.shape[-1])
    if keep_n > 1:
        top = mx.argpartition(logprobs, kth=-keep_n, axis=-1)[..., -keep_n:]
        remove = mx.put_along_axis(remove, top, mx.array(False), axis=-1)
    return mx.where(remove, _NEG_INF, logprobs)


def apply_xtc(
    logits: mx.array,
    xtc_probability: float,
    xtc_threshold: float,
    xtc_special_tokens: Sequence[int] = (),
    *,
    key: mx.array | None = None,
) -> mx.array:
    """Exclude Top Choices: with probability ``xtc_probability``, remove every token whose
    probability exceeds ``xtc_threshold`` except the least probable of them.

    This pushes generation away from the obvious continuation while keeping one viable
    candidate. Special tokens (EOS and the like) are never removed, so XTC cannot stop a
    sequence from ending. The coin is tossed once per row (MLX-LM tosses one coin for the
    whole batch; for one row the draw is identical).
    """
    _check_range("xtc_probability", xtc_probability, 0.0, 1.0)
    _check_range("xtc_threshold", xtc_threshold, 0.0, 0.5)
    probs = mx.softmax(logits, axis=-1)
    above = mx.where(probs > xtc_threshold, probs, mx.inf)
    remove = probs > above.min(axis=-1, keepdims=True)
    if len(xtc_special_tokens) > 0:
        if max(xtc_special_tokens) >= logits.shape[-1] or min(xtc_special_tokens) < 0:
            raise InvalidArgumentError(
                f"xtc_special_tokens must be ids in [0, {logits.shape[-1]}), "
                f"got {list(xtc_special_tokens)!r}"
            )
        remove[..., mx.array(list(xtc_special_tokens))] = False
    coin = mx.random.uniform(shape=(*logits.shape[:-1], 1), key=key)
    return mx.where(coin > xtc_probability, logits, mx.where(remove, _NEG_INF, logits))


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    xtc_probability: float = 0.0,
    xtc_threshold: float = 0.1,
    xtc_special_tokens: list[int] | None = None,
    *,
    seed: int | None = None,
) -> Sampler:
    """Build a sampler mapping log-probabilities ``(B, V)`` to token ids ``(B,)``.

    ``temp == 0`` is greedy (argmax; the filters cannot change the argmax, and XTC is a
    sampling-only device, so they are skipped). Otherwise the enabled filters run in
    MLX-LM's order ``top_p`` (if ``0 < top_p < 1``), ``min_p`` (if ``> 0``), XTC (if
    ``xtc_probability > 0``), ``top_k`` (if ``> 0``), and one token is drawn per row from
    what is left at temperature ``temp``.

    Randomness: without ``seed`` the sampler draws from MLX's global generator, so
    ``mx.random.seed(n)`` before generating makes a run reproducible (and matches MLX-LM
    draw for draw). With ``seed`` the sampler owns a private key chain, split on every draw:
    two samplers made with the same seed produce the same stream whatever else touches the
    global generator, which they never advance. The chain advances as MLX's global state
    does, so ``seed=n`` draws what ``mx.random.seed(n)`` then unseeded sampling would.

    Every argument is validated here, once, so a bad option fails before any model work.
    """
    _check_range("temp", temp, 0.0, math.inf)
    if math.isinf(temp):
        raise InvalidArgumentError("temp must be finite, got inf")
    _check_range("top_p", top_p, 0.0, 1.0)
    _check_range("min_p", min_p, 0.0, 1.0)
    _check_int("min_tokens_to_keep", min_tokens_to_keep, 1)
    _check_int("top_k", top_k, 0)
    _check_range("xtc_probability", xtc_probability, 0.0, 1.0)
    _check_range("xtc_threshold", xtc_threshold, 0.0, 0.5)
    special = [] if xtc_special_tokens is None else list(xtc_special_tokens)
    for token in special:
        _check_int("xtc_special_tokens entry", token, 0)
    if seed is not None:
        _check_int("seed", seed, 0)

    if temp == 0:
        return greedy_sampler

    # Each filter takes the log-probabilities and a source of PRNG keys (None: MLX's
    # global generator). Only XTC consumes randomness before the final draw.
    filters: list[Callable[[mx.array, Callable[[], mx.array | None]], mx.array]] = []
    if 0.0 < top_p < 1.0:
        filters.append(lambda x, _keys: apply_top_p(x, top_p))
    if min_p > 0.0:
        filters.append(lambda x, _keys: apply_min_p(x, min_p, min_tokens_to_keep))
    if xtc_probability > 0.0:
        filters.append(
            lambda x, keys: apply_xtc(x, xtc_probability, xtc_threshold, special, key=keys())
        )
    if top_k > 0:
        filters.append(lambda x, _keys: apply_top_k(x, top_k))

    if seed is None:

        def global_key() -> mx.array | None:
            return None

        next_key = global_key
    else:
        # A private key chain advanced exactly as MLX advances its global state (split,
        # keep the first half, draw with the second), so `seed=n` gives the same tokens
        # as `mx.random.seed(n)` would in a fresh process, without touching global state.
        chain = [mx.random.key(seed)]

        def private_key() -> mx.array | None:
            chain[0], subkey = mx.random.split(chain[0])
            return subkey

        next_key = private_key

    def sampler(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs, next_key)
        return categorical_sampling(logprobs, temp, key=next_key())

    return sampler


def log_softmax(logits: mx.array, axis: int = -1) -> mx.array:
    """Normalise logits to log-probabilities without overflow or needless rounding.

    Shifting by the row maximum first keeps ``exp`` from overflowing and makes the large
    subtraction exact, so a row of logits near 1e4 keeps float32 precision in its
    log-probabilities (``x - logsumexp(x)`` would round them to ~1e-3). Masked ``-inf``
    entries stay ``-inf``.
    """
    shifted = logits - mx.stop_gradient(mx.max(logits, axis=axis, keepdims=True))
    return shifted - mx.logsumexp(shifted, axis=axis, keepdims=True)


def top_logprobs(logprobs: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The ``k`` most likely tokens of each row and their log-probabilities.

    Returns ``(ids, values)`` of shape ``(..., k)``, most likely first (``k`` is capped at
    the vocabulary size). Uses a partition, then sorts only the ``k`` winners, so the cost
    stays linear in the vocabulary.
    """
    _check_int("k", k, 0)
    vocab = logprobs.shape[-1]
    k = min(k, vocab)
    if k == 0:
        empty = (*logprobs.shape[:-1], 0)
        return mx.zeros(empty, dtype=mx.uint32), mx.zeros(empty, dtype=logprobs.dtype)
    ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)
