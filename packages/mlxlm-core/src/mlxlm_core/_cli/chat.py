"""``mlxlm chat``: a multi-turn conversation in the terminal (or over a pipe).

The KV cache lives across turns. Each turn renders the whole conversation with the chat
template, finds how much of it the cache already holds (the previous prompt and reply) and
feeds only the rest, so a turn costs its own tokens, not the conversation's. When the
re-rendered history differs from what was generated (a template that rewrites earlier
turns, a reply that re-tokenizes differently) the cache is trimmed back to the common prefix.

Lines ``q`` (or ``/quit``) end the session, ``/reset`` starts a new conversation, end of
input exits. ``--json`` prints one JSON object per reply, for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

from .args import (
    add_cache_args,
    add_model_args,
    add_sampling_args,
    load_from_args,
    make_sampling,
    non_negative_int,
)
from .command import Command, console

_QUIT = ("q", "/quit", "/exit")
_HELP = (
    "Type a message and press Enter. Commands: /reset starts over, q or /quit exits, "
    "Ctrl-D ends input."
)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """One conversation: its messages and the KV cache that holds them."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        system_prompt: str | None = None,
        max_tokens: int = 256,
        cache_options: dict[str, Any] | None = None,
        generation_options: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.cache_options = dict(cache_options or {})
        self.generation_options = dict(generation_options or {})
        self.reused = 0  # prompt tokens the last turn found in the cache
        self.reset()

    def reset(self) -> None:
        from ..cache import make_prompt_cache

        self.messages: list[dict[str, str]] = []
        if self.system_prompt:
            self.messages.append({"role": "system", "content": self.system_prompt})
        self.cache = make_prompt_cache(self.model, **self.cache_options)
        self.cached: list[int] = []  # the token ids the cache holds, in order

    def _reuse(self, prompt: list[int]) -> int:
        """Trim the cache to its longest prefix of ``prompt`` (leaving one token to feed)."""
        from ..cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        keep = min(_common_prefix(self.cached, prompt), len(prompt) - 1)
        if keep < len(self.cached):
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, len(self.cached) - keep)
            else:  # a rotating window cannot forget its newest tokens: start afresh
                self.cache = make_prompt_cache(self.model, **self.cache_options)
                keep = 0
            self.cached = self.cached[:keep]
        return keep

    def reply(self, text: str) -> Iterator[Any]:
        """Stream the assistant's answer to ``text`` (GenerationResponse per token)."""
        import mlx.core as mx

        from .._generate import stream_generate

        messages = [*self.messages, {"role": "user", "content": text}]
        prompt = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        self.reused = keep = self._reuse(prompt)
        pieces: list[str] = []
        generated: list[int] = []
        for response in stream_generate(
            self.model,
            self.tokenizer,
            mx.array(prompt[keep:]),
            max_tokens=self.max_tokens,
            prompt_cache=self.cache,
            **self.cache_options,
            **self.generation_options,
        ):
            generated.append(response.token)
            pieces.append(response.text)
            yield response
        # The cache now holds the prompt and every generated token fed back so far (all of
        # them after a stop token; all but the last after hitting max_tokens).
        self.cached = (prompt + generated)[: self.cache[0].offset]
        messages.append({"role": "assistant", "content": "".join(pieces)})
        self.messages = messages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--system-prompt", default=None, help="system message for the chat")
    parser.add_argument("--max-tokens", "-m", type=non_negative_int, default=256)
    parser.add_argument("--json", action="store_true", help="one JSON object per reply")
    parser.add_argument("--verbose", action="store_true", help="per-turn statistics on stderr")
    add_sampling_args(parser)
    add_cache_args(parser)


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input(">> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def run(args: argparse.Namespace) -> int:
    from .._errors import InvalidArgumentError, MlxlmError

    model, tokenizer = load_from_args(args)
    if not tokenizer.has_chat_template:
        raise InvalidArgumentError("chat needs a model whose tokenizer has a chat template")
    session = ChatSession(
        model,
        tokenizer,
        system_prompt=args.system_prompt,
        max_tokens=args.max_tokens,
        cache_options={
            "max_kv_size": args.max_kv_size,
            "kv_bits": args.kv_bits,
            "kv_group_size": args.kv_group_size,
        },
        generation_options={
            "prefill_step_size": args.prefill_step_size,
            **make_sampling(args, tokenizer),
        },
    )
    interactive = sys.stdin.isatty() and not args.json
    if interactive:
        print(f"[mlxlm] chatting with {getattr(model, 'model_path', args.model)}. {_HELP}")
    failed = False
    while (line := _read_line(interactive)) is not None:
        query = line.strip()
        if query in _QUIT:
            break
        if query == "/reset":
            session.reset()
            if interactive:
                print("[mlxlm] conversation cleared")
            continue
        if query in ("/help", "/?"):
            print(_HELP)
            continue
        if not query:
            continue
        try:
            _turn(session, query, args)
        except MlxlmError as exc:  # one bad turn (e.g. context full) need not end the chat
            failed = True
            print(f"mlxlm chat: error: {exc}", file=sys.stderr)
    return 1 if failed else 0


def _turn(session: ChatSession, query: str, args: argparse.Namespace) -> None:
    last = None
    for last in session.reply(query):
        if not args.json:
            print(last.text, end="", flush=True)
    content = session.messages[-1]["content"]
    if args.json:
        print(
            json.dumps(
                {
                    "role": "assistant",
                    "content": content,
                    "prompt_tokens": last.prompt_tokens if last else 0,
                    "reused_tokens": session.reused,
                    "generation_tokens": last.generation_tokens if last else 0,
                    "finish_reason": last.finish_reason if last else None,
                }
            ),
            flush=True,
        )
    else:
        print(flush=True)
    if args.verbose and last is not None:
        print(
            f"[mlxlm] prompt: {last.prompt_tokens} new tokens ({session.reused} from cache), "
            f"{last.prompt_tps:.1f} tokens-per-sec; generation: {last.generation_tokens} "
            f"tokens, {last.generation_tps:.1f} tokens-per-sec",
            file=sys.stderr,
        )


COMMAND = Command(
    "chat", "chat with a model, keeping the conversation's KV cache", add_arguments, run
)
main = console(COMMAND)
