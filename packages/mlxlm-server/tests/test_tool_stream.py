"""Tool calls read while they are generated: every prefix of a reply reads as a prefix of
the finished reading, and the streamed events add up to the non-streamed parse."""

from __future__ import annotations

import json

import pytest
from mlxlm_server._tools import CallStreamer, get_parser

REPLIES = [
    (
        "hermes",
        'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": [1, 2.5e3, "a\\"b}"]}}\n'
        '</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>',
    ),
    ("hermes", '<tool_call>{"arguments": {"u": "\\u00e9"}, "name": "late"}</tool_call>'),
    ("hermes", '<tool_call>{"name": "s", "arguments": "{\\"a\\": 1}"}</tool_call>'),
    ("hermes", '<tool_call>{"name": "noargs"}</tool_call>'),
    (
        "llama3",
        '<|python_tag|>{"name": "f", "parameters": {"x": "y"}}; {"name": "g", "parameters": {}}',
    ),
    ("llama3", '{"name": "f", "parameters": {"deep": {"a": [true, false, null]}}}'),
    (
        "mistral",
        'ok [TOOL_CALLS][{"name": "f", "arguments": {"a": [1]}}, {"name": "g", "arguments": {}}]',
    ),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 2}[TOOL_CALLS]g_2[ARGS]{"b": {"c": -0.5}}'),
]


@pytest.mark.parametrize(("parser", "text"), REPLIES)
def test_every_prefix_reads_as_a_prefix_of_the_end(parser: str, text: str) -> None:
    p = get_parser(parser)
    final = p.extract(text, final=True)
    assert final is not None and final.calls
    for c in final.calls:  # what the non-streamed reply holds: an object, as written
        assert isinstance(json.loads(c.arguments), dict)
    for n in range(len(text) + 1):
        part = p.extract(text[:n], final=False)
        if part is None:  # only before the first marker
            assert parser != "llama3" and p.start_of_call(text[:n]) is None
            continue
        assert len(part.calls) <= len(final.calls)
        for now, end in zip(part.calls, final.calls):
            assert now.name in (None, end.name)
            assert end.arguments.startswith(now.arguments)


@pytest.mark.parametrize(("parser", "text"), REPLIES)
@pytest.mark.parametrize("step", [1, 3, 7])
def test_streamed_events_add_up_to_the_parse(parser: str, text: str, step: int) -> None:
    p = get_parser(parser)
    content, calls = p.parse(text)  # type: ignore[misc]
    streamer = CallStreamer(p)
    events = []
    for i in range(0, len(text), step):
        events += streamer.feed(text[i : i + step])
    events += streamer.finish()
    opened = [e for e in events if e.kind == "call"]
    assert [(e.index, e.name) for e in opened] == [(i, c.name) for i, c in enumerate(calls)]
    for i, c in enumerate(calls):
        # a call's header comes before its arguments, which concatenate to the parse's
        header = events.index(opened[i])
        fragments = [e for e in events if e.kind == "arguments" and e.index == i]
        assert all(events.index(f) > header for f in fragments)
        assert "".join(f.text for f in fragments) == c.arguments
    streamed = "".join(e.text for e in events if e.kind == "content").strip() or None
    assert streamed == content


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        ("hermes", "<tool_call> true false null"),
        ("hermes", "<tool_call>{not json</tool_call> and more"),
        ("hermes", "Plain words, no call at all."),
        ("llama3", 'Hello {"name": "f", "parameters": {}}'),
        ("mistral", "[TOOL_CALLS][{]"),
    ],
)
def test_text_that_is_no_call_streams_as_text(parser: str, text: str) -> None:
    p = get_parser(parser)
    assert p.parse(text) is None
    streamer = CallStreamer(p)
    events = [e for i in range(0, len(text), 2) for e in streamer.feed(text[i : i + 2])]
    events += streamer.finish()
    assert all(e.kind == "content" for e in events)
    assert "".join(e.text for e in events) == text


def test_a_call_cut_short_keeps_what_was_sent() -> None:
    p = get_parser("hermes")
    text = '<tool_call>{"name": "f", "arguments": {"a": "unfinish'
    assert p.parse(text) is None  # not streamed: plain text
    streamer = CallStreamer(p)
    events = [e for ch in text for e in streamer.feed(ch)] + streamer.finish()
    assert [e.name for e in events if e.kind == "call"] == ["f"]
    assert "".join(e.text for e in events if e.kind == "arguments") == '{"a": "unfinish'
    assert not [e for e in events if e.kind == "content"]


def test_long_arguments_are_read_in_linear_time() -> None:
    p = get_parser("hermes")
    body = json.dumps({"items": [{"k": i, "v": "x" * 20} for i in range(400)]})
    text = '<tool_call>{"name": "f", "arguments": ' + body + "}</tool_call>"
    streamer = CallStreamer(p)
    reads = 0
    original = p.extract

    def counting(t: str, *, final: bool):  # type: ignore[no-untyped-def]
        nonlocal reads
        reads += 1
        return original(t, final=final)

    p.extract = counting  # type: ignore[method-assign]
    events = [e for i in range(0, len(text), 4) for e in streamer.feed(text[i : i + 4])]
    events += streamer.finish()
    assert "".join(e.text for e in events if e.kind == "arguments") == body
    assert reads < 250  # not one full re-read per piece (there are ~4,700 pieces)
