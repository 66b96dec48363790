"""Single-sequence and batched generation on top of the engine in :mod:`._engine`."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from ._engine import (
    BatchGenerator,
    LogitsProcessor,
    ProgressCallback,
    Sampler,
    Sampling,
    check_context,
    decode_step,
    generation_stream,
    prefill,
)
from ._errors import InvalidArgumentError
from ._mx_typed import int_list, item_int
from .cache import KVCache, make_prompt_cache

if TYPE_CHECKING:
    from ._tokenizer import TokenizerWrapper

__all__ = [
    "GenerationResponse",
    "batch_generate",
    "generate",
    "generate_step",
    "stream_generate",
]


@dataclass
class GenerationResponse:
    """One step of :func:`stream_generate`.

    ``text`` is the new text this token completed (may be empty mid-character);
    ``logprobs`` the full log-probability vector the token was drawn from.
    """

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    max_kv_size: int | None = None,
    prompt_cache: list[KVCache] | None = None,
    prefill_step_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prompt_progress_callback: ProgressCallback | None = None,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield ``(token, logprobs)`` for a prompt (1-D token ids), one token at a time.

    A ``prompt_cache`` that already holds a prefix is extended with ``prompt``.
    """
    if max_tokens < 0:
        raise InvalidArgumentError(f"max_tokens must be >= 0, got {max_tokens}")
    if prompt.size == 0:
        raise InvalidArgumentError("empty prompt: give at least one token")
    cache = prompt_cache
    if cache is None:
        cache = make_prompt_cache(
            model, max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size
        )
    already = cache[0].offset if cache else 0
    check_context(model, already + prompt.size, bounded=max_kv_size is not None)
    tokens = prompt[None]
    stream = generation_stream()  # only graph building runs on it; the caller's code does not
    with mx.stream(stream):
        prefill(
            model,
            tokens[:, :-1],
            cache,
            step_size=prefill_step_size,
            progress=prompt_progress_callback,
            total=prompt.size,
        )
        sampling = Sampling()
        sampling.add(prompt[:-1], sampler, logits_processors)
        current = decode_step(model, tokens[:, -1:], cache, sampling)
        mx.async_eval(*current)
    if prompt_progress_callback is not None:
        prompt_progress_callback(prompt.size, prompt.size)
    for produced in range(max_tokens):
        with mx.stream(stream):
            # Even the row slice of the log-probabilities stays on the generation stream: an
            # op on the default stream here made the streams wait for each other every step.
            logprobs = current[1][0]
            if produced + 1 < max_tokens:
                upcoming = decode_step(model, current[0][:, None], cache, sampling)
                mx.async_eval(*upcoming)
        yield item_int(current[0]), logprobs
        if produced + 1 < max_tokens:
            current = upcoming


def _as_prompt(tokenizer: TokenizerWrapper, prompt: str | Sequence[int] | mx.array) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        add_bos = tokenizer.bos_token is not None and not prompt.startswith(tokenizer.bos_token)
        return mx.array(tokenizer.encode(prompt, add_special_tokens=add_bos))
    return mx.array(list(prompt))


def stream_generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int] | mx.array,
    *,
    max_tokens: int = 256,
    draft_model: nn.Module | None = None,
    num_draft_tokens: int = 3,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Generate from ``prompt``, yielding a :class:`GenerationResponse` per token.

    Stops at an end-of-sequence token (finish_reason "stop") or after ``max_tokens``
    ("length"). Other keyword arguments go to :func:`generate_step`.
    """
    tokens = _as_prompt(tokenizer, prompt)
    detok = tokenizer.detokenizer
    if draft_model is not None:
        from ._speculative import speculative_generate_step

        steps: Iterator[tuple[int, mx.array, bool]] = speculative_generate_step(
            tokens,
            model,
            draft_model,
            max_tokens=max_tokens,
            num_draft_tokens=num_draft_tokens,
            **kwargs,
        )
    else:
        steps = (
            (t, lp, False)
            for t, lp in generate_step(tokens, model, max_tokens=max_tokens, **kwargs)
        )
    start = time.perf_counter()
    prompt_tps = 0.0
    n = 0
    for n, (token, logprobs, from_draft) in enumerate(steps, 1):
        if n == 1:
            prompt_time = time.perf_counter() - start
            prompt_tps = tokens.size / max(prompt_time, 1e-9)
            start = time.perf_counter()
        finish = None
        if token in tokenizer.eos_token_ids:
            finish = "stop"
        elif n == max_tokens:
            finish = "length"
        if finish != "stop":
            detok.add_token(token)
        if finish is not None:
            detok.finalize()
        elapsed = max(time.perf_counter() - start, 1e-9)
        yield GenerationResponse(
            text=detok.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=int(tokens.size),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
        )
        if finish is not None:
            return


def generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: str | Sequence[int] | mx.array,
    *,
    verbose: bool = False,
    on_response: Callable[[GenerationResponse], None] | None = None,
    **kwargs,
) -> str:
    """Generate and return the completion text (printing it as it comes if ``verbose``)."""
    text = []
    last = None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
        if on_response is not None:
            on_response(last)
    if verbose and last is not None:
        print()
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec"
        )
        print(f"Peak memory: {last.peak_memory:.3f} GB")
    return "".join(text)


@dataclass
class BatchResult:
    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str | None]


def batch_generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_tokens: int | Sequence[int] = 128,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    completion_batch_size: int = 32,
    prefill_batch_size: int = 8,
    prefill_step_size: int | None = None,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
) -> BatchResult:
    """Generate for many prompts at once through the continuous-batching engine."""
    encoded = [int_list(_as_prompt(tokenizer, p)) for p in prompts]
    engine = BatchGenerator(
        model,
        stop_tokens=frozenset(tokenizer.eos_token_ids),
        completion_batch_size=completion_batch_size,
        prefill_batch_size=prefill_batch_size,
        prefill_step_size=prefill_step_size,
        max_kv_size=max_kv_size,
        kv_bits=kv_bits,
    )
    count = len(encoded)
    uids = engine.insert(
        encoded,
        max_tokens=max_tokens,
        samplers=[sampler] * count,
        logits_processors=[logits_processors] * count,
    )
    position = {uid: i for i, uid in enumerate(uids)}
    tokens: list[list[int]] = [[] for _ in encoded]
    reasons: list[str | None] = [None] * count
    while engine.has_work:
        for r in engine.next():
            i = position[r.uid]
            if r.finish_reason != "stop":
                tokens[i].append(r.token)
            reasons[i] = r.finish_reason
    texts = [tokenizer.decode(t) for t in tokens]
    return BatchResult(texts=texts, tokens=tokens, finish_reasons=reasons)
