"""``mlxlm cache-prompt``: run a long prompt once and save its KV cache to a file.

``mlxlm generate --prompt-cache-file F`` then skips the cached tokens of any prompt that
starts with them. The file's metadata records what the cache holds: ``tokens`` (a JSON list
of the token ids in the cache), ``model`` (the model directory) and ``chat_template``.

With a chat template the prompt is rendered as an unfinished user message
(``continue_final_message``), so it is a prefix of the same message rendered with a
generation prompt, or with more text after it. The cache keeps every prompt token but the
last: a later prompt must feed at least one token of its own, and the last token is the
one most likely to merge with text that follows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .args import add_cache_args, add_model_args, load_from_args, read_prompt
from .command import Command, console
from .progress import progress_bar


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--prompt", "-p", required=True, help="prompt text, '-' for stdin")
    parser.add_argument(
        "--prompt-cache-file", required=True, help="where to write the cache (.safetensors)"
    )
    parser.add_argument("--system-prompt", default=None, help="system message for chat models")
    parser.add_argument(
        "--ignore-chat-template", action="store_true", help="cache the prompt as raw text"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    add_cache_args(parser)


def prompt_tokens(args: argparse.Namespace, tokenizer: Any, text: str) -> tuple[list[int], bool]:
    """The prompt's token ids and whether the chat template rendered them."""
    if args.ignore_chat_template or not tokenizer.has_chat_template:
        return list(tokenizer.encode(text)), False
    messages = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    messages.append({"role": "user", "content": text})
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    return list(ids), True


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from .._engine import check_context, prefill
    from .._errors import InvalidArgumentError
    from ..cache import make_prompt_cache, save_prompt_cache

    target = Path(args.prompt_cache_file)
    if target.suffix != ".safetensors":
        raise InvalidArgumentError("--prompt-cache-file must end in .safetensors")
    if not target.parent.is_dir():  # fail before the slow part, not after it
        raise InvalidArgumentError(f"{target.parent}: no such directory for --prompt-cache-file")
    text = read_prompt(args.prompt)
    model, tokenizer = load_from_args(args)
    tokens, templated = prompt_tokens(args, tokenizer, text)
    cached = tokens[:-1]
    if not cached:
        raise InvalidArgumentError("the prompt is a single token; there is nothing to cache")
    check_context(model, len(tokens), bounded=args.max_kv_size is not None)
    cache = make_prompt_cache(
        model, max_kv_size=args.max_kv_size, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size
    )
    bar = progress_bar(len(cached), unit="tok", desc="prompt")
    last = 0

    def advance(done: int, _total: int) -> None:
        nonlocal last
        if bar is not None:
            bar.update(done - last)
        last = done

    mx.reset_peak_memory()
    start = time.perf_counter()
    try:
        prefill(
            model, mx.array([cached]), cache, step_size=args.prefill_step_size, progress=advance
        )
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    metadata = {
        "tokens": json.dumps(cached),
        "model": str(getattr(model, "model_path", args.model)),
        "chat_template": json.dumps(templated),
    }
    try:
        save_prompt_cache(args.prompt_cache_file, cache, metadata)
    except (OSError, RuntimeError) as exc:  # MLX reports I/O failures as RuntimeError
        raise InvalidArgumentError(f"cannot write {target}: {exc}") from None
    summary = {
        "prompt_cache_file": str(args.prompt_cache_file),
        "cached_tokens": len(cached),
        "prompt_tps": len(cached) / max(seconds, 1e-9),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"Cached {len(cached)} tokens ({summary['prompt_tps']:.1f} tokens-per-sec) "
            f"in {args.prompt_cache_file}"
        )
        print(f"Peak memory: {summary['peak_memory_gb']:.3f} GB", file=sys.stdout)
    return 0


COMMAND = Command(
    "cache-prompt", "save the KV cache of a prompt for reuse by generate", add_arguments, run
)
main = console(COMMAND)
