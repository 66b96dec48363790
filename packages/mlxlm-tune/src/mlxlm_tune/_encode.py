"""Records to token ids with a loss mask: which tokens the model is trained to predict.

Chat records are rendered with the tokenizer's own chat template. Every assistant turn is
a target, every other turn (system, user, tool results) is context only. Where each
assistant turn starts and ends is found by rendering prefixes of the conversation through
the same template: the tokens before turn ``i`` are ``render(messages[:i],
add_generation_prompt=True)`` and the turn ends where ``render(messages[:i + 1])`` ends,
so the turn's own text and its end-of-turn token are targets while the header that
introduces it is not. Templates that rewrite earlier turns (so a prefix does not render
as a prefix) are refused rather than masked wrongly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlxlm_core import InvalidArgumentError

from ._records import Record

__all__ = ["PreferenceSample", "Sample", "encode_preference", "encode_record"]


@dataclass(frozen=True)
class Sample:
    """Token ids and a boolean mask of the same length: ``mask[i]`` trains ``tokens[i]``.

    ``mask[0]`` is always False: the first token has nothing before it to predict it from.
    """

    tokens: np.ndarray  # int32 (n,)
    mask: np.ndarray  # bool (n,)
    source: str = ""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class PreferenceSample:
    """A prompt with a preferred and a rejected answer, each a full :class:`Sample`."""

    chosen: Sample
    rejected: Sample
    source: str = ""

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def _make(
    tokens: Sequence[int] | np.ndarray, mask: Sequence[bool] | np.ndarray, source: str
) -> Sample:
    ids = np.asarray(tokens, dtype=np.int32)
    m = np.asarray(mask, dtype=bool).copy()
    if m.size:
        m[0] = False
    return Sample(ids, m, source)


def _eos(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return None if eos is None else int(eos)


def _render(
    tokenizer: Any, messages: list[dict[str, Any]], tools: Any, *, generation: bool
) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation, tokenize=True
        )
    )


def _chat_tokens(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: Any,
    *,
    source: str,
    mask_prompt: bool,
) -> Sample:
    full = _render(tokenizer, messages, tools, generation=False)
    if not mask_prompt:
        return _make(full, np.ones(len(full), bool), source)
    mask = np.zeros(len(full), bool)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], tools, generation=True) if i else []
        through = _render(tokenizer, messages[: i + 1], tools, generation=False)
        if full[: len(through)] != through or through[: len(before)] != before:
            raise InvalidArgumentError(
                f"{source}: the chat template does not render messages[{i}] as a prefix of "
                "the conversation, so its assistant tokens cannot be located; "
                "pass --no-mask-prompt or a prefix-stable chat template"
            )
        mask[len(before) : len(through)] = True
    return _make(full, mask, source)


def _plain_completion(tokenizer: Any, prompt: str, completion: str, source: str) -> Sample:
    head = tokenizer.encode(prompt)
    tail = tokenizer.encode(completion, add_special_tokens=False)
    eos = _eos(tokenizer)
    if eos is not None:
        tail = [*tail, eos]
    return _make(head + tail, [False] * len(head) + [True] * len(tail), source)


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "has_chat_template", False)) or bool(
        getattr(tokenizer, "chat_template", None)
    )


def encode_record(
    record: Record, tokenizer: Any, *, mask_prompt: bool = True, use_chat_template: bool = True
) -> Sample:
    """Tokens and loss mask of one text, completions, chat or tools record.

    ``mask_prompt=False`` trains on every token (MLX-LM's default); otherwise only the
    completion / every assistant turn is a target. Completions use the chat template when
    the tokenizer has one (as MLX-LM does) and plain ``prompt + completion + eos`` if not.
    """
    data, source = record.data, record.source
    if record.format == "text":
        tokens = tokenizer.encode(data["text"])
        eos = _eos(tokenizer)
        if eos is not None and (not tokens or tokens[-1] != eos):
            tokens = [*tokens, eos]
        return _make(tokens, np.ones(len(tokens), bool), source)
    if record.format == "completions":
        if use_chat_template and _has_template(tokenizer):
            messages = [
                {"role": "user", "content": data["prompt"]},
                {"role": "assistant", "content": data["completion"]},
            ]
            return _chat_tokens(
                tokenizer, messages, data.get("tools"), source=source, mask_prompt=mask_prompt
            )
        sample = _plain_completion(tokenizer, data["prompt"], data["completion"], source)
        if not mask_prompt:
            return _make(sample.tokens, np.ones(len(sample), bool), source)
        return sample
    if record.format in ("chat", "tools"):
        if not _has_template(tokenizer):
            raise InvalidArgumentError(
                f"{source}: chat records need a tokenizer with a chat template"
            )
        return _chat_tokens(
            tokenizer, record.messages, record.tools, source=source, mask_prompt=mask_prompt
        )
    raise InvalidArgumentError(
        f"{source}: a {record.format} record is not a supervised example (use --loss dpo/orpo)"
    )


def encode_preference(
    record: Record, tokenizer: Any, *, use_chat_template: bool = True
) -> PreferenceSample:
    """Chosen and rejected sequences sharing one prompt; only the answers are targets."""
    if record.format != "preference":
        raise InvalidArgumentError(
            f"{record.source}: preference training needs 'prompt', 'chosen' and 'rejected'"
        )
    data, source = record.data, record.source
    prompt = data["prompt"]
    pair = []
    for key in ("chosen", "rejected"):
        answer = data[key]
        if isinstance(prompt, str) and not (use_chat_template and _has_template(tokenizer)):
            pair.append(_plain_completion(tokenizer, prompt, answer, f"{source} ({key})"))
            continue
        messages = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        )
        if isinstance(answer, str):
            answer = [{"role": "assistant", "content": answer}]
        conversation = [dict(m) for m in [*messages, *answer]]
        # Only the answer's assistant turns are targets, not any in the shared prompt.
        sample = _chat_tokens(
            tokenizer, conversation, data.get("tools"), source=source, mask_prompt=True
        )
        start = len(
            _render(tokenizer, [dict(m) for m in messages], data.get("tools"), generation=True)
        )
        mask = sample.mask.copy()
        mask[:start] = False
        pair.append(_make(sample.tokens, mask, f"{source} ({key})"))
    return PreferenceSample(pair[0], pair[1], source)
