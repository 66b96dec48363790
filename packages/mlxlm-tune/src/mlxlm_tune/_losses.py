"""Losses: masked next-token cross-entropy, sequence log-likelihoods, DPO and ORPO.

Every loss has the trainer's signature ``loss(model, batch) -> (loss, num_tokens)``: the
mean over the batch's target tokens (or pairs) and how many there were, so the trainer can
weight micro-batches by their size when it accumulates gradients. Packed batches are run
with block-diagonal attention (:func:`forward`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ._batching import Batch

__all__ = [
    "LossFn",
    "dpo_loss",
    "forward",
    "make_dpo_loss",
    "make_orpo_loss",
    "orpo_loss",
    "sequence_logprobs",
    "sft_loss",
    "token_logprobs",
]

LossFn = Callable[[nn.Module, Batch], tuple[mx.array, mx.array]]


class _SegmentAttention:
    """Stands in for a layer's KV cache during a packed forward pass.

    Models ask their cache for the attention mask (``make_mask``), the rotary offset
    (``positions``) and to store keys/values (``update_and_fetch``). Answering with a
    block-diagonal causal mask, offset 0 and the keys unchanged makes one packed row behave
    as its separate examples, through the model's own code (no per-architecture hook).
    """

    def __init__(self, segments: mx.array) -> None:
        self.segments = segments

    def make_mask(self, n: int, *, window: int | None = None) -> mx.array:
        pos = mx.arange(n)
        mask = pos[:, None] >= pos[None]
        if window is not None:
            mask = mask & (pos[None] > pos[:, None] - window)
        same = self.segments[:, :, None] == self.segments[:, None, :]
        return (mask[None] & same)[:, None]

    def positions(self) -> int:
        return 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


def forward(model: nn.Module, inputs: mx.array, segments: mx.array | None = None) -> mx.array:
    """Logits for ``inputs``; with ``segments``, each packed example attends only to itself."""
    if segments is None:
        return model(inputs)
    shared = _SegmentAttention(segments)
    return model(inputs, cache=[shared] * len(model.layers))


def token_logprobs(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
    """Log-probability of each next token ``(B, L-1)`` and the float mask of targets."""
    tokens = batch.tokens
    segments = None if batch.segments is None else batch.segments[:, :-1]
    logits = forward(model, tokens[:, :-1], segments).astype(mx.float32)
    targets = tokens[:, 1:]
    logps = -nn.losses.cross_entropy(logits, targets)
    mask = batch.mask[:, 1:]
    if batch.segments is not None:
        # A target must belong to the example of the token that predicts it.
        mask = mask & (batch.segments[:, 1:] == batch.segments[:, :-1])
    return logps, mask.astype(mx.float32)


def sft_loss(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the target tokens only (masked turns and padding excluded)."""
    logps, mask = token_logprobs(model, batch)
    ntoks = mask.sum()
    return -(logps * mask).sum() / mx.maximum(ntoks, 1), ntoks


def sequence_logprobs(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
    """Per-row sum of target log-probabilities and per-row target counts."""
    logps, mask = token_logprobs(model, batch)
    return (logps * mask).sum(axis=1), mask.sum(axis=1)


def dpo_loss(
    chosen: mx.array,
    rejected: mx.array,
    ref_chosen: mx.array,
    ref_rejected: mx.array,
    *,
    beta: float = 0.1,
) -> tuple[mx.array, mx.array]:
    """DPO (Rafailov et al. 2023): ``-log sigmoid(beta * (policy margin - reference margin))``.

    Arguments are per-pair sequence log-likelihoods; returns the mean loss and the mean
    implicit reward margin ``beta * ((c - rc) - (r - rr))``.
    """
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -nn.log_sigmoid(margin).mean(), margin.mean()


def orpo_loss(
    chosen_mean: mx.array,
    rejected_mean: mx.array,
    chosen_nll: mx.array,
    *,
    beta: float = 0.1,
) -> tuple[mx.array, mx.array]:
    """ORPO (Hong et al. 2024): chosen NLL plus ``beta`` times the odds-ratio penalty.

    ``chosen_mean`` / ``rejected_mean`` are mean per-token log-likelihoods (log p);
    ``log odds = log p - log(1 - p)``. Returns the loss and the mean log-odds ratio.
    """

    def log_odds(mean_logp: mx.array) -> mx.array:
        # log(1 - exp(x)) for x < 0, computed stably.
        x = mx.minimum(mean_logp, -1e-6)
        return x - mx.log(-mx.expm1(x))

    ratio = log_odds(chosen_mean) - log_odds(rejected_mean)
    return chosen_nll.mean() - beta * nn.log_sigmoid(ratio).mean(), ratio.mean()


def _halves(x: mx.array) -> tuple[mx.array, mx.array]:
    half = x.shape[0] // 2
    return x[:half], x[half:]


def make_dpo_loss(*, beta: float = 0.1) -> LossFn:
    """A trainer loss for preference batches carrying reference log-likelihoods."""

    def loss(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
        if batch.reference is None:
            raise ValueError("DPO batches need reference log-likelihoods (batch.reference)")
        sums, _ = sequence_logprobs(model, batch)
        chosen, rejected = _halves(sums)
        ref_chosen, ref_rejected = _halves(batch.reference)
        value, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
        return value, mx.array(chosen.shape[0], mx.float32)

    return loss


def make_orpo_loss(*, beta: float = 0.1) -> LossFn:
    """A trainer loss for preference batches (no reference model needed)."""

    def loss(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
        sums, counts = sequence_logprobs(model, batch)
        means = sums / mx.maximum(counts, 1)
        chosen_sum, _ = _halves(sums)
        chosen_count, _ = _halves(counts)
        chosen_mean, rejected_mean = _halves(means)
        nll = -chosen_sum / mx.maximum(chosen_count, 1)
        value, _ = orpo_loss(chosen_mean, rejected_mean, nll, beta=beta)
        return value, mx.array(chosen_mean.shape[0], mx.float32)

    return loss


def preference_margin(model: nn.Module, batch: Batch) -> Any:
    """Mean ``log p(chosen) - log p(rejected)`` of a preference batch (an evaluation metric)."""
    sums, _ = sequence_logprobs(model, batch)
    chosen, rejected = _halves(sums)
    return (chosen - rejected).mean()
