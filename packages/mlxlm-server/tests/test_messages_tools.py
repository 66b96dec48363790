"""Anthropic /v1/messages with client tools, over HTTP with httpx (the anthropic SDK is not
a dependency): tool_use blocks and stop_reason, the streamed event sequence, partial_json
that adds up to the non-streamed input, tool_result turns, tool_choice and its refusals."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest

WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 6},
            "days": {"type": "integer", "minimum": 0},
        },
        "required": ["city"],
    },
}
TIME = {
    "name": "get_time",
    "input_schema": {
        "type": "object",
        "properties": {"zone": {"enum": ["utc", "cet"]}},
        "required": ["zone"],
    },
}
SCHEMAS = {t["name"]: t["input_schema"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def post(live: Any, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(live.url + "/v1/messages", json=body, timeout=60)


def stream(live: Any, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of a streamed reply."""
    out, name = [], None
    with httpx.stream("POST", live.url + "/v1/messages", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == name  # the event line names the data's type
                out.append((name, data))
    return out


@pytest.mark.parametrize(
    ("seed", "choice"),
    [
        (0, {"type": "any"}),
        (2, {"type": "any"}),
        (3, {"type": "any", "disable_parallel_tool_use": True}),
        (1, {"type": "tool", "name": "get_time"}),
    ],
)
def test_forced_tool_use_streamed_and_not(live: Any, seed: int, choice: dict[str, Any]) -> None:
    body = {
        "model": "tiny",
        "max_tokens": 250,
        "temperature": 1.0,
        "seed": seed,
        "messages": ASK,
        "tools": [WEATHER, TIME],
        "tool_choice": choice,
    }
    r = post(live, body)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["stop_reason"] == "tool_use" and reply["stop_sequence"] is None
    uses = [b for b in reply["content"] if b["type"] == "tool_use"]
    assert uses and all(b["id"].startswith("toolu_") for b in uses)
    for b in uses:
        jsonschema.validate(b["input"], SCHEMAS[b["name"]])
    if choice["type"] == "tool":
        assert [b["name"] for b in uses] == ["get_time"]
    if choice.get("disable_parallel_tool_use"):
        assert len(uses) == 1

    events = stream(live, body)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"]["output_tokens"] == reply["usage"]["output_tokens"]
    # Blocks: start, deltas, stop, one after another, indexed 0, 1, ...
    blocks: list[dict[str, Any]] = []
    for n, data in events[1:-2]:
        if n == "content_block_start":
            assert data["index"] == len(blocks)
            blocks.append({**data["content_block"], "json": "", "open": True})
        elif n == "content_block_delta":
            block = blocks[data["index"]]
            assert block["open"] and data["index"] == len(blocks) - 1
            if block["type"] == "tool_use":
                assert data["delta"]["type"] == "input_json_delta"
                block["json"] += data["delta"]["partial_json"]
        else:
            assert n == "content_block_stop" and blocks[data["index"]]["open"]
            blocks[data["index"]]["open"] = False
    assert not any(b["open"] for b in blocks)
    streamed = [b for b in blocks if b["type"] == "tool_use"]
    assert all(b["input"] == {} and b["id"].startswith("toolu_") for b in streamed)
    assert [(b["name"], json.loads(b["json"])) for b in streamed] == [
        (b["name"], b["input"]) for b in uses
    ]
    deltas = [d for n, d in events if n == "content_block_delta"]
    assert len(deltas) > len(streamed)  # the input came in fragments


def test_tool_result_turns_render_like_openai_tool_messages(live: Any) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"},
                {"type": "text", "text": "Thanks!"},
            ],
        },
    ]
    body = {
        "model": "tiny",
        "max_tokens": 8,
        "temperature": 0,
        "messages": history,
        "tools": [WEATHER],
    }
    r = post(live, body)
    assert r.status_code == 200, r.text
    openai_history = [
        *ASK,
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny, 21 C"},
        {"role": "user", "content": "Thanks!"},
    ]
    ref = httpx.post(
        live.url + "/v1/chat/completions",
        json={"model": "tiny", "max_tokens": 8, "temperature": 0, "messages": openai_history},
    ).json()
    reply = r.json()
    assert reply["usage"]["input_tokens"] == ref["usage"]["prompt_tokens"]
    # ChatML ignores tools, so auto falls back to the same text as OpenAI's plain reply
    assert reply["content"] == [{"type": "text", "text": ref["choices"][0]["message"]["content"]}]
    assert reply["stop_reason"] in ("end_turn", "max_tokens")


def test_tool_choice_none_and_refusals(live: Any) -> None:
    base = {"model": "tiny", "max_tokens": 6, "temperature": 0, "messages": ASK}
    none = post(live, {**base, "tools": [WEATHER], "tool_choice": {"type": "none"}}).json()
    assert [b["type"] for b in none["content"]] == ["text"] and none["stop_reason"] != "tool_use"
    bad = [
        {**base, "tools": [WEATHER], "tool_choice": {"type": "tool"}},
        {**base, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
        {**base, "tool_choice": {"type": "any"}},
        {**base, "tools": [{"name": "bad name!", "input_schema": {}}]},
        {
            **base,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}],
                }
            ],
        },
    ]
    for body in bad:
        r = post(live, body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["message"]
