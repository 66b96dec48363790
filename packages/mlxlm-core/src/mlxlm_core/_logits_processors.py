"""Logits processors: ``(tokens, logits) -> logits`` adjustments applied before sampling.

``tokens`` is the history seen so far (prompt and generated tokens). Two shapes are accepted:

* ``(T,)`` — one history shared by every row of ``logits``; this is what MLX-LM passes, so its
  processors and ours are interchangeable in single-sequence generation;
* ``(B, T)`` — one history per row, for batched decoding. Rows of different lengths are
  padded with a negative id (e.g. ``-1``) on either side; padding is ignored.

``logits`` is ``(B, V)``. The penalties look only at the most recent ``context_size`` real
tokens of each row (``None``: the whole history). The values produced match MLX-LM 0.32.2
bit for bit; unlike MLX-LM's, these processors never modify the caller's ``logits`` in
place, handle per-row histories, and run as a fixed set of array operations (no host sync).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from mlxlm_core._errors import InvalidArgumentError

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
"""Maps ``(tokens, logits)`` to adjusted logits of the same shape."""


def _check_context_size(name: str, size: int | None) -> int | None:
    # MLX-LM slices `tokens[-size:]`, which silently means "everything" for 0 and crashes for
    # None; we make None the explicit "whole history" and refuse sizes that cannot mean
    # anything sensible.
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgumentError(
            f"{name} must be a positive integer or None (whole history), got {size!r}"
        )
    return size


def _check_penalty(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _window(tokens: mx.array, logits: mx.array, context_size: int | None) -> mx.array | None:
    """Per-row history ids ``(B, T)`` restricted to the window, or None if it is empty.

    Ids outside the window, and padding, are replaced by ``V``: an extra, throw-away column
    that the processors append to the logits, so one scatter handles ragged rows.
    """
    if not isinstance(tokens, mx.array):
        tokens = mx.array(tokens)
    if logits.ndim != 2:
        raise InvalidArgumentError(f"logits must have shape (B, V), got {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] not in (1, batch):
        raise InvalidArgumentError(
            f"tokens must have shape (T,) or ({batch}, T) for logits of shape "
            f"{tuple(logits.shape)}, got {tuple(tokens.shape)}"
        )
    if tokens.shape[1] == 0:
        return None
    tokens = mx.broadcast_to(tokens.astype(mx.int32), (batch, tokens.shape[1]))
    valid = tokens >= 0
    if context_size is not None:
        # Rank 1 is the most recent real token of the row, wherever the padding sits.
        recency = mx.cumsum(valid.astype(mx.int32), axis=-1, reverse=True)
        valid = valid & (recency <= context_size)
    return mx.where(valid, tokens, vocab)


def _padded(logits: mx.array) -> mx.array:
    return mx.concatenate([logits, mx.zeros((logits.shape[0], 1), logits.dtype)], axis=-1)


def _seen(ids: mx.array, logits: mx.array) -> mx.array:
    """Boolean ``(B, V)``: which tokens occur in each row's window."""
    batch, vocab = logits.shape
    seen = mx.zeros((batch, vocab + 1), dtype=mx.bool_)
    return mx.put_along_axis(seen, ids, mx.array(True), axis=-1)[:, :vocab]


def make_repetition_penalty(penalty: float, context_size: int | None = 20) -> LogitsProcessor:
    """Make tokens already in the window less likely, once each however often they occur.

    Sign-aware (CTRL, arXiv:1909.05858): a positive logit is divided by ``penalty``, a
    negative one multiplied, so ``penalty > 1`` always lowers the token's probability.
    """
    penalty = _check_penalty("repetition_penalty", penalty)
    if penalty < 0:
        raise InvalidArgumentError(f"repetition_penalty must be >= 0, got {penalty!r}")
    size = _check_context_size("repetition_context_size", context_size)

    def repetition_penalty_processor(tokens: mx.array, logits: mx.array) -> mx.array:
        ids = _window(tokens, logits, size)
        if ids is None:
            return logits
        penalised = mx.where(logits < 0, logits * penalty, logits / penalty)
        return mx.where(_seen(ids, logits), penalised, logits)

    return repetition_penalty_processor


def make_presence_penalty(penalty: float, context_size: int | None = 20) -> LogitsProcessor:
    """Subtract ``penalty`` once from every token present in the window (OpenAI's option)."""
    penalty = _check_penalty("presence_penalty", penalty)
    size = _check_context_size("presence_context_size", context_size)

    def presence_penalty_processor(tokens: mx.array, logits: mx.array) -> mx.array:
        ids = _window(tokens, logits, size)
        if ids is None:
            return logits
        return mx.where(_seen(ids, logits), logits - penalty, logits)

    return presence_penalty_processor


def make_frequency_penalty(penalty: float, context_size: int | None = 20) -> LogitsProcessor:
    """Subtract ``penalty`` once per occurrence of a token in the window (OpenAI's option)."""
    penalty = _check_penalty("frequency_penalty", penalty)
    size = _check_context_size("frequency_context_size", context_size)

    def frequency_penalty_processor(tokens: mx.array, logits: mx.array) -> mx.array:
        ids = _window(tokens, logits, size)
        if ids is None:
            return logits
        rows = mx.arange(logits.shape[0])[:, None]
        # A scatter-subtract applies the penalty once per occurrence, in the same
        # arithmetic as MLX-LM (repeated subtraction, not count * penalty).
        return _padded(logits).at[rows, ids].subtract(penalty)[:, :-1]

    return frequency_penalty_processor


def make_logit_bias(logit_bias: dict[int, float]) -> LogitsProcessor:
    """Add a fixed bias to chosen token ids (``-inf`` bans a token outright)."""
    for token, bias in logit_bias.items():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InvalidArgumentError(f"logit_bias keys must be token ids >= 0, got {token!r}")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or math.isnan(bias):
            raise InvalidArgumentError(f"logit_bias values must be numbers, got {bias!r}")
    indices = mx.array(list(logit_bias.keys()))
    values = mx.array([float(v) for v in logit_bias.values()])
    largest = max(logit_bias)

    def logit_bias_processor(_tokens: mx.array, logits: mx.array) -> mx.array:
        if largest >= logits.shape[-1]:
            raise InvalidArgumentError(
                f"logit_bias token id {largest} is outside the vocabulary (size {logits.shape[-1]})"
            )
        return logits.at[:, indices].add(values)

    return logit_bias_processor


def make_logits_processors(
    logit_bias: dict[int, float] | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = 20,
    presence_penalty: float | None = None,
    presence_context_size: int | None = 20,
    frequency_penalty: float | None = None,
    frequency_context_size: int | None = 20,
) -> list[LogitsProcessor]:
    """Build the processors the options ask for, in MLX-LM's order.

    Order: logit bias, repetition, presence, frequency. A penalty of ``None`` or ``0`` adds
    no processor (for repetition, 0 would divide by zero; 1 is a no-op but still added, as in
    MLX-LM). Presence and frequency penalties may be negative, to encourage repetition.
    """
    processors: list[LogitsProcessor] = []
    if logit_bias:
        processors.append(make_logit_bias(logit_bias))
    wanted = (
        (make_repetition_penalty, repetition_penalty, repetition_context_size),
        (make_presence_penalty, presence_penalty, presence_context_size),
        (make_frequency_penalty, frequency_penalty, frequency_context_size),
    )
    for make, penalty, size in wanted:
        if penalty is not None and penalty != 0:
            processors.append(make(penalty, size))
    return processors
