"""Loss masking: every assistant turn of a multi-turn chat is a target, nothing else is.

The oracle is transformers' own ``return_assistant_tokens_mask``, which reads the spans the
template marks with ``{% generation %}``; our code never sees those marks (it finds the
turns by rendering prefixes of the conversation), so agreement is not circular.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlxlm_core import InvalidArgumentError, load, load_tokenizer
from mlxlm_tune import (
    Dataset,
    collate,
    encode_records,
    parse_records,
    read_records,
    sft_loss,
)

# The same ChatML rendering, with the assistant spans marked for transformers' oracle.
CHATML_MARKED = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.role == 'assistant' %}{% generation %}{{ message.content }}<|im_end|>\n"
    "{% endgeneration %}{% else %}{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And the tide?"},
        {"role": "assistant", "content": "It comes in twice a day."},
        {"role": "user", "content": "Bread?"},
        {"role": "assistant", "content": "Flour, water, salt and time."},
    ],
    [
        {"role": "user", "content": "What is the weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {}}}],
        },
        {"role": "tool", "content": "Rain, 12 degrees."},
        {"role": "assistant", "content": "Rain and 12 degrees."},
    ],
]


def _oracle(tokenizer: object, messages: list[dict]) -> tuple[list[int], list[bool]]:
    hf = tokenizer.tokenizer  # type: ignore[attr-defined]
    out = hf.apply_chat_template(
        messages,
        chat_template=CHATML_MARKED,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_mask_is_exactly_the_assistant_turns(tiny: Path, index: int) -> None:
    tokenizer = load_tokenizer(tiny)
    messages = CONVERSATIONS[index]
    record = parse_records([("conv", {"messages": messages})])
    (sample,) = encode_records(record, tokenizer)
    ids, assistant = _oracle(tokenizer, messages)
    assert sample.tokens.tolist() == ids
    assert sample.mask.tolist() == assistant
    assert sum(m["role"] == "assistant" for m in messages) >= 2


def test_loss_counts_exactly_the_assistant_tokens(tiny: Path) -> None:
    model, tokenizer = load(tiny)
    samples = []
    expected_positions = []
    for row, messages in enumerate(CONVERSATIONS):
        (sample,) = encode_records(parse_records([("c", {"messages": messages})]), tokenizer)
        samples.append(sample)
        _, assistant = _oracle(tokenizer, messages)
        expected_positions += [(row, i) for i, a in enumerate(assistant) if a]
    batch = collate([[s] for s in samples])
    loss, ntoks = sft_loss(model, batch)
    assert int(ntoks.item()) == len(expected_positions)
    # The same mean, computed directly from the logits at the oracle's positions only.
    logits = model(batch.tokens)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    tokens = np.array(batch.tokens)
    manual = -np.mean([logp[r, i - 1, tokens[r, i]] for r, i in expected_positions])
    assert loss.item() == pytest.approx(manual, rel=1e-5)


def test_unmasked_trains_on_everything(tiny: Path) -> None:
    tokenizer = load_tokenizer(tiny)
    record = parse_records([("c", {"messages": CONVERSATIONS[0]})])
    (sample,) = encode_records(record, tokenizer, mask_prompt=False)
    assert sample.mask.sum() == len(sample) - 1


def test_completions_mask_the_prompt(tiny: Path, jsonl: Callable[..., Path]) -> None:
    tokenizer = load_tokenizer(tiny)
    (sample,) = encode_records(
        read_records(jsonl([{"prompt": "What?", "completion": "Paris."}])), tokenizer
    )
    messages = [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "Paris."}]
    ids, assistant = _oracle(tokenizer, messages)
    assert (sample.tokens.tolist(), sample.mask.tolist()) == (ids, assistant)


def test_prefix_unstable_template_is_refused(tiny: Path) -> None:
    tokenizer = load_tokenizer(tiny)
    # Drops every assistant turn but the last: earlier prefixes do not render as prefixes.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<|im_start|>"
        "{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(InvalidArgumentError, match=r"^conv: the chat template does not render"):
        encode_records(parse_records([("conv", {"messages": CONVERSATIONS[0]})]), tokenizer)


def test_chat_needs_a_template(tiny: Path) -> None:
    tokenizer = load_tokenizer(tiny)
    tokenizer.tokenizer.chat_template = None
    with pytest.raises(InvalidArgumentError, match="need a tokenizer with a chat template"):
        encode_records(parse_records([("c", {"messages": CONVERSATIONS[0]})]), tokenizer)


def test_dataset_from_token_lists() -> None:
    data = Dataset.from_token_lists([[1, 2, 3], [4, 5]])
    assert data.lengths.tolist() == [3, 2] and data[0].num_targets == 2
