"""Sampling and logits processing, outside the model (public submodule).

Names and signatures follow ``mlx_lm.sample_utils``, so code written for MLX-LM ports by
changing the import::

    from mlxlm_core.sampling import make_logits_processors, make_sampler

    sampler = make_sampler(temp=0.7, top_p=0.9, seed=0)
    processors = make_logits_processors(repetition_penalty=1.1)
    for p in processors:
        logits = p(history, logits)          # history (T,) or (B, T); logits (B, V)
    token = sampler(log_softmax(logits))     # (B,)

Reproducibility: a sampler made without ``seed`` draws from MLX's global generator, so call
``mx.random.seed(n)`` before generating; one made with ``seed=n`` owns its generator and
gives the same stream on every run regardless of global state. Bad options raise
:class:`mlxlm_core._errors.InvalidArgumentError` (an ``MlxlmError``) with a one-line message.
"""

from __future__ import annotations

from mlxlm_core._logits_processors import (
    LogitsProcessor,
    make_frequency_penalty,
    make_logit_bias,
    make_logits_processors,
    make_presence_penalty,
    make_repetition_penalty,
)
from mlxlm_core._sampling import (
    Sampler,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    apply_xtc,
    categorical_sampling,
    greedy_sampler,
    log_softmax,
    make_sampler,
    top_logprobs,
)

__all__ = [
    "LogitsProcessor",
    "Sampler",
    "apply_min_p",
    "apply_top_k",
    "apply_top_p",
    "apply_xtc",
    "categorical_sampling",
    "greedy_sampler",
    "log_softmax",
    "make_frequency_penalty",
    "make_logit_bias",
    "make_logits_processors",
    "make_presence_penalty",
    "make_repetition_penalty",
    "make_sampler",
    "top_logprobs",
]
