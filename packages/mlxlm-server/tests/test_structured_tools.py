"""Structured output and tool calls: the constrained decoder's automaton against the
``jsonschema`` validator (the reference), and through the live server with the openai client
(the tiny random model samples at temperature 1, so it wanders everywhere the constraint allows)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlxlm_server._structured_automaton import Automaton
from mlxlm_server._structured_schema import Compiler, SchemaError
from mlxlm_server._tools import get_parser

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["a", "b", 3, None]}, "maxItems": 3},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "v": {"type": "integer"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
            },
            "required": ["v"],
        }
    },
    "$ref": "#/$defs/node",
}
SCHEMAS = [
    PERSON,
    TREE,
    {"type": "object"},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 2},
]


def automaton(schema: Any) -> Automaton:
    c = Compiler()
    return Automaton(c.nodes, c.schema(schema))


def accepts(a: Automaton, text: str) -> bool:
    state = a.feed(a.initial, text.encode("utf-8"))
    return bool(state) and a.can_finish(state)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-1000, 1000)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text("abcxyz", max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=json_values,
    schema_index=st.integers(0, len(SCHEMAS) - 1),
    indent=st.sampled_from([None, 1]),
)
def test_automaton_agrees_with_jsonschema(
    value: Any, schema_index: int, indent: int | None
) -> None:
    """Sound: whatever the automaton accepts validates. Complete on what it promises: every
    valid document is accepted unless it uses an option the compiler narrows (undeclared
    keys, escapes in keys, integers written as floats)."""
    schema = SCHEMAS[schema_index]
    text = json.dumps(value, indent=indent, ensure_ascii=bool(schema_index % 2))
    valid = jsonschema.Draft202012Validator(schema).is_valid(value)
    if accepts(automaton(schema), text):
        assert valid and json.loads(text) == value
    elif valid:
        narrowed = "additionalProperties" not in json.dumps(schema) and isinstance(value, dict)
        assert narrowed or isinstance(value, float) or "\\" in text or len(text) > 200


@pytest.mark.parametrize(
    "text",
    [
        '{"name":"bo","age":3}',
        '{ "age": 0, "name": "\\u00e9", "tags": ["a", 3, null], "score": null, "ok": true }',
        '{"name":"x","age":7,"score":-1.5e+3}',
    ],
)
def test_automaton_accepts_valid(text: str) -> None:
    assert accepts(automaton(PERSON), text)


@pytest.mark.parametrize(
    "text",
    [
        '{"name":"bo"}',
        '{"name":"toolongname","age":1}',
        '{"name":"b","age":-1}',
        '{"name":"b","age":1,"x":1}',
        '{"name":"b","age":1}x',
        '{"name":"b","age":01}',
        '{"name":"\\x","age":1}',
    ],
)
def test_automaton_rejects_invalid(text: str) -> None:
    assert not accepts(automaton(PERSON), text)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "a+"},
        {"type": "integer", "maximum": 3},
        {"not": {}},
        False,
        {"oneOf": [{"type": "integer"}, {"type": "number"}]},
        {"$ref": "http://x/y"},
    ],
)
def test_unenforceable_schemas_are_refused(schema: Any) -> None:
    with pytest.raises(SchemaError):
        Compiler().schema(schema)


@pytest.mark.parametrize(
    ("parser", "text", "calls"),
    [
        (
            "hermes",
            'Sure.<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>',
            [("f", {"x": 1}), ("g", {})],
        ),
        (
            "llama3",
            '<|python_tag|>{"name": "f", "parameters": {"x": "y"}}; {"name": "g", "parameters": {}}',
            [("f", {"x": "y"}), ("g", {})],
        ),
        ("mistral", 'ok [TOOL_CALLS][{"name": "f", "arguments": {"a": [1]}}]', [("f", {"a": [1]})]),
        ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 2}', [("f", {"a": 2})]),
    ],
)
def test_tool_parsers(parser: str, text: str, calls: list[tuple[str, Any]]) -> None:
    parsed = get_parser(parser).parse(text)
    assert parsed is not None
    assert [(c.name, json.loads(c.arguments)) for c in parsed[1]] == calls


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        ("hermes", "<tool_call>{not json</tool_call>"),
        ("hermes", "no calls"),
        ("llama3", "Hello {"),
        ("mistral", "[TOOL_CALLS][{]"),
    ],
)
def test_tool_parsers_fall_back_to_text(parser: str, text: str) -> None:
    assert get_parser(parser).parse(text) is None


def test_parser_auto_detection() -> None:
    assert get_parser("auto", "{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert get_parser("auto", "<|python_tag|> ipython").name == "llama3"
    assert get_parser("auto", "<tool_call>").name == "hermes"


# --- through the server -----------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "days": {"type": "integer", "minimum": 0},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_validates(client: Any, seed: int) -> None:
    schema = SCHEMAS[seed % len(SCHEMAS)] if seed != 2 else PERSON
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    r = client.chat.completions.create(
        model="tiny", messages=ASK, temperature=1.0, seed=seed, max_tokens=200, response_format=fmt
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object_output_parses(client: Any) -> None:
    # Free-form JSON lets a random model wander; every reply that ends must be an object.
    finished = 0
    for seed in range(4):
        r = client.chat.completions.create(
            model="tiny",
            messages=ASK,
            temperature=0.7,
            seed=seed,
            max_tokens=400,
            response_format={"type": "json_object"},
        )
        if r.choices[0].finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert finished >= 1


@pytest.mark.parametrize(("seed", "parallel"), [(0, False), (2, True), (5, False)])
def test_required_tool_calls_streamed_and_not(client: Any, seed: int, parallel: bool) -> None:
    kw = {
        "model": "tiny",
        "messages": ASK,
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 250,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "parallel_tool_calls": parallel,
    }
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    params = {"get_weather": WEATHER, "get_time": TIME}
    for call in choice.message.tool_calls:
        jsonschema.validate(
            json.loads(call.function.arguments),
            params[call.function.name]["function"]["parameters"],
        )
        assert call.id.startswith("call")
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [tc for ch in chunks for c in ch.choices for tc in (c.delta.tool_calls or [])]
    # OpenAI's shape: each call opens with its index, id, type and name (arguments ""),
    # then only argument fragments follow, which concatenate to the non-streamed arguments.
    opened = [d for d in deltas if d.id is not None]
    assert [d.index for d in opened] == list(range(len(choice.message.tool_calls)))
    for d in opened:
        assert d.type == "function" and d.id.startswith("call") and d.function.arguments == ""
    fragments = [d for d in deltas if d.id is None]
    assert all(d.function.name is None and d.function.arguments for d in fragments)
    assert len(fragments) > len(opened)  # the arguments came in pieces, not whole
    streamed = [
        (d.function.name, "".join(f.function.arguments for f in fragments if f.index == d.index))
        for d in opened
    ]
    assert streamed == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    first_fragment = deltas.index(fragments[0])
    assert all(deltas.index(d) < first_fragment for d in opened if d.index == 0)
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == [
        "tool_calls"
    ]
    # The SDK's own accumulator (it merges deltas key by key) rebuilds the same calls.
    with client.beta.chat.completions.stream(**kw) as s:
        final = s.get_final_completion().choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in final] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]


def test_named_tool_choice_and_none(client: Any) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        temperature=1.0,
        seed=1,
        max_tokens=80,
        tools=[WEATHER, TIME],
        tool_choice=named,
    )
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments)["zone"] in ("utc", "cet")
    none = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        temperature=0,
        max_tokens=10,
        tools=[WEATHER],
        tool_choice="none",
    )
    assert (
        none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"
    )


def test_auto_tool_choice_falls_back_to_text(client: Any) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=ASK, temperature=0, max_tokens=10, tools=[WEATHER]
    )
    plain = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=10)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == plain.choices[0].message.content  # ChatML ignores tools
