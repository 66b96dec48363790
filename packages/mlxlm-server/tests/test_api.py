"""The OpenAI-compatible API through the official ``openai`` client, against a live server
on loopback serving the tiny model: chat, completions, streaming, usage, logprobs, n,
seeds, stop strings, embeddings, models, tokenize, Responses and Anthropic Messages."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def chat(client: Any, **kw: Any) -> Any:
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", MSG)
    return client.chat.completions.create(**kw)


def streamed_chat(client: Any, **kw: Any) -> tuple[dict[int, str], Any, list[Any]]:
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}, **kw))
    texts: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    usage = chunks[-1].usage
    return texts, usage, chunks


def test_chat_usage_counts_prompt_and_completion(client: Any, live: Any) -> None:
    r = chat(client, temperature=0, max_tokens=12)
    prompt = httpx.post(live.url + "/tokenize", json={"model": "tiny", "messages": MSG}).json()
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.usage.prompt_tokens == prompt["count"] > 5
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    expected = 12 if c.finish_reason == "length" else r.usage.completion_tokens
    assert r.usage.completion_tokens == expected
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize(
    "options", [{"temperature": 0}, {"temperature": 0.9, "seed": 11, "top_p": 0.9}]
)
def test_chat_stream_equals_non_stream(client: Any, options: dict[str, Any]) -> None:
    whole = chat(client, max_tokens=20, **options)
    texts, usage, chunks = streamed_chat(client, max_tokens=20, **options)
    assert texts[0] == whole.choices[0].message.content
    assert usage.model_dump() == {
        **whole.usage.model_dump(),
        "prompt_tokens_details": usage.prompt_tokens_details,
    }
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []  # the usage chunk


def test_completions_stream_equals_non_stream(client: Any) -> None:
    kw = {"model": "tiny", "prompt": "The tide comes in", "max_tokens": 16, "temperature": 0}
    whole = client.completions.create(**kw)
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    text = "".join(c.text for ch in chunks for c in ch.choices)
    assert text == whole.choices[0].text and whole.object == "text_completion"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert (
        chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == 4
        or whole.usage.prompt_tokens > 0
    )


def test_completions_echo_and_token_prompts(client: Any, live: Any) -> None:
    ids = httpx.post(live.url + "/tokenize", json={"prompt": "Bread needs flour"}).json()["tokens"]
    by_text = client.completions.create(
        model="tiny", prompt="Bread needs flour", max_tokens=6, temperature=0
    )
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    echoed = client.completions.create(
        model="tiny", prompt="Bread needs flour", max_tokens=6, temperature=0, echo=True
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert echoed.choices[0].text == "Bread needs flour" + by_text.choices[0].text
    both = client.completions.create(
        model="tiny", prompt=["Bread needs flour", "The tide"], max_tokens=6, temperature=0, n=2
    )
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == both.choices[1].text == by_text.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_match_returned_text(client: Any, stream: bool) -> None:
    kw = {"temperature": 0, "max_tokens": 16, "logprobs": True, "top_logprobs": 3}
    if stream:
        chunks = list(chat(client, stream=True, **kw))
        content = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
        entries = [e for ch in chunks for c in ch.choices if c.logprobs for e in c.logprobs.content]
    else:
        r = chat(client, **kw)
        content, entries = r.choices[0].message.content, r.choices[0].logprobs.content
    # The tokens' bytes spell the text (the random model emits broken UTF-8, which both
    # sides decode with replacement characters).
    assert (
        entries and b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == content
    )
    for e in entries:
        assert len(e.top_logprobs) == 3
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True)
        # greedy: the chosen token is the most likely one
        assert e.logprob == pytest.approx(values[0]) and e.bytes == e.top_logprobs[0].bytes
        assert np.exp(values).sum() <= 1.0 + 1e-5


def test_completion_logprobs_offsets(client: Any) -> None:
    r = client.completions.create(
        model="tiny", prompt="The tide", max_tokens=8, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs)


def test_n2_choices_and_seeds(client: Any) -> None:
    r = chat(client, n=2, temperature=1.0, seed=5, max_tokens=16)
    assert [c.index for c in r.choices] == [0, 1]
    again = chat(client, n=2, temperature=1.0, seed=5, max_tokens=16)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    assert r.choices[0].message.content != r.choices[1].message.content
    other = chat(client, n=1, temperature=1.0, seed=6, max_tokens=16)
    assert other.choices[0].message.content == r.choices[1].message.content  # choice i: seed + i


def test_seeded_output_does_not_depend_on_batch(client: Any) -> None:
    kw = {"temperature": 1.0, "extra_body": {"top_k": 50}, "seed": 1234, "max_tokens": 24}
    alone = chat(client, **kw).choices[0].message.content
    noise = [
        {
            "temperature": 1.0,
            "max_tokens": 30,
            "messages": [{"role": "user", "content": f"noise {i}"}],
        }
        for i in range(6)
    ]
    with ThreadPoolExecutor(8) as pool:
        others = [pool.submit(chat, client, **n) for n in noise]
        batched = [pool.submit(chat, client, **kw) for _ in range(2)]
        [f.result() for f in others]
    assert [f.result().choices[0].message.content for f in batched] == [alone, alone]


def test_stop_strings_cut_text(client: Any) -> None:
    full = (
        client.completions.create(model="tiny", prompt="The tide", max_tokens=20, temperature=0)
        .choices[0]
        .text
    )
    assert len(full) > 6
    stop = full[3:5]
    first = full.find(stop)
    cut = client.completions.create(
        model="tiny", prompt="The tide", max_tokens=20, temperature=0, stop=[stop, "zzzz"]
    )
    assert cut.choices[0].text == full[:first] and cut.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model="tiny", prompt="The tide", max_tokens=20, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.text for ch in chunks for c in ch.choices) == full[:first]


def test_embeddings_float_and_base64(client: Any) -> None:
    r = client.embeddings.create(
        model="tiny", input=["the tide", "bread and salt"], encoding_format="float"
    )
    a, b = (np.array(d.embedding) for d in r.data)
    assert a.shape == (64,) and np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(a, b) and r.usage.prompt_tokens > 2
    raw = httpx.post(
        str(client.base_url) + "embeddings",
        json={"model": "tiny", "input": "the tide", "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, a, rtol=1e-6, atol=1e-7)
    default = client.embeddings.create(model="tiny", input="the tide")  # the client asks base64
    np.testing.assert_allclose(np.array(default.data[0].embedding), a, rtol=1e-6, atol=1e-7)


def test_models_tokenize_detokenize(client: Any, live: Any) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    tok = httpx.post(live.url + "/tokenize", json={"prompt": "Paris is the capital"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    back = httpx.post(live.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back["prompt"] == "Paris is the capital"


def test_responses_api_stateless(client: Any) -> None:
    r = client.responses.create(
        model="tiny", input="What is the capital of France?", max_output_tokens=10, temperature=0
    )
    ref = chat(client, max_tokens=10, temperature=0)
    assert r.output_text == ref.choices[0].message.content
    assert r.usage.input_tokens == ref.usage.prompt_tokens
    events = list(
        client.responses.create(
            model="tiny",
            input="What is the capital of France?",
            max_output_tokens=10,
            temperature=0,
            stream=True,
        )
    )
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text and events[-1].type in (
        "response.completed",
        "response.incomplete",
    )


def test_anthropic_messages(client: Any, live: Any) -> None:
    body = {"model": "tiny", "max_tokens": 10, "temperature": 0, "messages": MSG}
    r = httpx.post(live.url + "/v1/messages", json=body).json()
    ref = chat(client, max_tokens=10, temperature=0)
    assert r["type"] == "message" and r["content"][0]["text"] == ref.choices[0].message.content
    assert (
        r["stop_reason"] in ("end_turn", "max_tokens")
        and r["usage"]["input_tokens"] == ref.usage.prompt_tokens
    )
    with httpx.stream("POST", live.url + "/v1/messages", json={**body, "stream": True}) as s:
        lines = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: ")]
    text = "".join(e["delta"]["text"] for e in lines if e["type"] == "content_block_delta")
    assert text == r["content"][0]["text"] and lines[-1]["type"] == "message_stop"


def test_prefix_cache_reuses_chat_history(serve: Any) -> None:
    import openai

    turns = [{"role": "system", "content": "Bread needs flour, water, salt and time. " * 4}, *MSG]
    outputs = {}
    for size in (64 << 20, 0):
        with serve(prefix_cache_bytes=size) as live:
            c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
            first = chat(c, messages=turns, temperature=0, max_tokens=8)
            follow = [
                *turns,
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And Spain?"},
            ]
            second = chat(c, messages=follow, temperature=0, max_tokens=8)
            metrics = httpx.get(live.url + "/metrics").text
            outputs[size] = (
                first.choices[0].message.content,
                second.choices[0].message.content,
                second,
                metrics,
            )
    cached, plain = outputs[64 << 20], outputs[0]
    assert cached[:2] == plain[:2]
    assert cached[2].usage.prompt_tokens_details.cached_tokens > 40
    assert "mlxlm_prefix_cache_hits_total 1.0" in cached[3]
    assert "mlxlm_prefix_cache_hits_total 0.0" in plain[3]
