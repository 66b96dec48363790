"""Speculative decoding: a small draft model proposes tokens, the model verifies them.

Each round the draft proposes ``k`` tokens; the model scores them all in one forward pass
and samples its own token at each of the ``k + 1`` positions. Draft tokens are accepted
while they equal the model's own choice, and the model's token at the first mismatch is
emitted too, so the output is exactly what the model alone would produce (greedy: identical
tokens) while the model runs once per round instead of once per token.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import mlx.core as mx
import mlx.nn as nn

from ._engine import LogitsProcessor, ProgressCallback, Sampler, Sampling, decode_step, prefill
from ._errors import InvalidArgumentError
from ._mx_typed import int_list, item_int
from .cache import KVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache


def _sample_positions(
    logits: mx.array,
    history: mx.array,
    fed: mx.array,
    sampler: Sampler,
    processors: Sequence[LogitsProcessor],
) -> tuple[mx.array, mx.array]:
    """Sample at every position of ``logits`` (L, V); position i has seen ``fed[: i + 1]``."""
    if processors:
        rows = []
        for i in range(logits.shape[0]):
            seen = mx.concatenate([history, fed[: i + 1]])[None]
            row = logits[i : i + 1]
            for proc in processors:
                row = proc(seen, row)
            rows.append(row)
        logits = mx.concatenate(rows)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs), logprobs


def speculative_generate_step(
    prompt: mx.array,
    model: nn.Module,
    draft_model: nn.Module,
    *,
    num_draft_tokens: int = 3,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prompt_cache: list[KVCache] | None = None,
    prefill_step_size: int | None = None,
    prompt_progress_callback: ProgressCallback | None = None,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
) -> Generator[tuple[int, mx.array, bool], None, None]:
    """Yield ``(token, logprobs, from_draft)``; same tokens as plain greedy decoding."""
    if max_kv_size is not None:
        raise InvalidArgumentError("speculative decoding needs trimmable caches: drop max_kv_size")
    if num_draft_tokens < 1:
        raise InvalidArgumentError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    processors = list(logits_processors or [])
    cache = prompt_cache or make_prompt_cache(model, kv_bits=kv_bits, kv_group_size=kv_group_size)
    draft_cache = make_prompt_cache(draft_model)
    if not (can_trim_prompt_cache(cache) and can_trim_prompt_cache(draft_cache)):
        raise InvalidArgumentError("speculative decoding needs trimmable caches")
    prefill(
        model,
        prompt[None, :-1],
        cache,
        step_size=prefill_step_size,
        progress=prompt_progress_callback,
        total=prompt.size,
    )
    prefill(draft_model, prompt[None, :-1], draft_cache, step_size=prefill_step_size)

    history = prompt[:-1]  # tokens both caches hold
    pending = prompt[-1:]  # fed to neither model yet
    draft_pending = pending  # fed to the draft model next (may lag the model by one token)
    draft_sampling = Sampling()
    draft_sampling.add(history, sampler, processors)
    produced = 0
    while produced < max_tokens:
        k = min(num_draft_tokens, max_tokens - produced - 1)
        drafts: list[mx.array] = []
        feed = draft_pending
        for _ in range(k):
            token, _ = decode_step(draft_model, feed[None], draft_cache, draft_sampling)
            drafts.append(token)
            feed = token
        proposed = mx.concatenate([pending, *drafts]) if drafts else pending
        logits = model(proposed[None], cache=cache)[0, -(k + 1) :, :]
        chosen, logprobs = _sample_positions(logits, history, proposed, sampler, processors)
        mx.eval(chosen, drafts)
        chosen_list = int_list(chosen)
        draft_list = [item_int(d) for d in drafts]
        accepted = 0
        while accepted < k and draft_list[accepted] == chosen_list[accepted]:
            accepted += 1
        for i in range(accepted):
            yield draft_list[i], logprobs[i], True
        yield chosen_list[accepted], logprobs[accepted], False
        produced += accepted + 1
        if produced >= max_tokens:
            return
        # The model holds pending + k drafts: keep pending + accepted drafts.
        trim_prompt_cache(cache, k - accepted)
        history = mx.concatenate([history, proposed[: 1 + accepted]])
        pending = mx.array([chosen_list[accepted]])
        # The draft holds pending + its first k-1 drafts (the last was never fed).
        fed_to_draft = draft_pending.size + max(k - 1, 0)
        keep_in_draft = draft_pending.size + accepted
        if keep_in_draft <= fed_to_draft:
            trim_prompt_cache(draft_cache, fed_to_draft - keep_in_draft)
            draft_pending = pending
        else:  # every draft accepted: the last one still has to reach the draft model
            draft_pending = mx.array([draft_list[-1], chosen_list[accepted]])
        draft_sampling = Sampling()
        draft_sampling.add(history, sampler, processors)
