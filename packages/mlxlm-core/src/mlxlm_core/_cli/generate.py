"""``mlxlm generate``: one completion from a prompt, streamed to stdout."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from .args import (
    add_cache_args,
    add_model_args,
    add_sampling_args,
    load_from_args,
    make_sampling,
    non_negative_int,
    positive_int,
    read_prompt,
)
from .command import Command, console

if TYPE_CHECKING:
    from .._generate import GenerationResponse
    from ..cache import KVCache

DEFAULT_PROMPT = "Hello"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="prompt text, '-' for stdin")
    parser.add_argument("--system-prompt", default=None, help="system message for chat models")
    parser.add_argument("--max-tokens", "-m", type=non_negative_int, default=256)
    parser.add_argument(
        "--ignore-chat-template", action="store_true", help="feed the prompt as raw text"
    )
    parser.add_argument(
        "--chat-template-config", default=None, help="JSON of extra chat-template arguments"
    )
    parser.add_argument("--draft-model", default=None, help="draft model for speculative decoding")
    parser.add_argument("--num-draft-tokens", type=positive_int, default=3)
    parser.add_argument("--prompt-cache-file", default=None, help="prompt cache from cache-prompt")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("--verbose", action="store_true", help="show the execution policy")
    add_sampling_args(parser)
    add_cache_args(parser)


def build_prompt(args: argparse.Namespace, tokenizer: Any, text: str) -> list[int]:
    if args.ignore_chat_template or not tokenizer.has_chat_template:
        return tokenizer.encode(text)
    messages = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    messages.append({"role": "user", "content": text})
    extra = json.loads(args.chat_template_config) if args.chat_template_config else {}
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra))


def _suffix_after_cache(prompt: list[int], cached: list[int], cache: list[Any]) -> list[int]:
    """The part of ``prompt`` the cache does not hold yet (at least one token to feed)."""
    from .._errors import InvalidArgumentError
    from ..cache import trim_prompt_cache

    if prompt[: len(cached)] != cached:
        raise InvalidArgumentError("the prompt does not start with the cached prompt's tokens")
    if len(prompt) > len(cached):
        return prompt[len(cached) :]
    # The whole prompt is cached: give the last token back so there is something to feed.
    if trim_prompt_cache(cache, 1) != 1:
        raise InvalidArgumentError("the prompt equals the cached prompt and the cache cannot trim")
    return prompt[-1:]


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from .._generate import stream_generate
    from .._loading import describe_policy, load
    from ..cache import load_prompt_cache

    text = read_prompt(args.prompt)
    model, tokenizer = load_from_args(args)
    if args.verbose:
        from .._blas import blas_info

        print(f"[mlxlm] {describe_policy(model)}", file=sys.stderr)
        print(f"[mlxlm] blas: {blas_info().describe()}", file=sys.stderr)
    prompt_cache: list[KVCache] | None = None
    meta: dict[str, str] = {}
    if args.prompt_cache_file:
        prompt_cache, meta = load_prompt_cache(args.prompt_cache_file, return_metadata=True)
    prompt = build_prompt(args, tokenizer, text)
    if prompt_cache is not None:
        prompt = _suffix_after_cache(prompt, json.loads(meta.get("tokens", "[]")), prompt_cache)
    draft = None
    if args.draft_model:
        draft, _ = load(args.draft_model, dtype=args.dtype, weight_mode=args.weight_mode)
    options: dict[str, Any] = dict(
        max_tokens=args.max_tokens,
        max_kv_size=args.max_kv_size,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        prefill_step_size=args.prefill_step_size,
        prompt_cache=prompt_cache,
        **make_sampling(args, tokenizer),
    )
    if draft is not None:
        options.update(draft_model=draft, num_draft_tokens=args.num_draft_tokens)
    pieces: list[str] = []
    last: GenerationResponse | None = None
    for last in stream_generate(model, tokenizer, mx.array(prompt), **options):
        if not args.json:
            # The banner comes with the first token, so an error (e.g. an over-long prompt)
            # leaves nothing but its one line.
            banner = "==========\n" if not pieces else ""
            print(banner + last.text, end="", flush=True)
        pieces.append(last.text)
    if args.json:
        result: dict[str, Any] = {"text": "".join(pieces)}
        if last is not None:
            result.update(
                prompt_tokens=last.prompt_tokens,
                prompt_tps=last.prompt_tps,
                generation_tokens=last.generation_tokens,
                generation_tps=last.generation_tps,
                peak_memory_gb=last.peak_memory,
                finish_reason=last.finish_reason,
            )
        print(json.dumps(result))
        return 0
    if last is None:
        print("No tokens generated for this prompt")
        return 0
    print("\n==========")
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
    print(f"Peak memory: {last.peak_memory:.3f} GB")
    return 0


COMMAND = Command("generate", "generate text from a prompt", add_arguments, run)
main = console(COMMAND)
