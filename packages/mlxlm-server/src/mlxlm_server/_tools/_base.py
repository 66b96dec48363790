"""What a tool-call parser is: it finds calls in generated text and describes its format
so a forced call (``tool_choice`` required or named) can be enforced while generating."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from .._structured_schema import Compiler

__all__ = ["ParsedCall", "ToolParser", "call_schema", "load_arguments"]


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text


def load_arguments(value: Any) -> str | None:
    """Arguments as a JSON object string, or None if they are not an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    return json.dumps(value, ensure_ascii=False)


def call_schema(tool: dict[str, Any], *, arguments_key: str = "arguments") -> dict[str, Any]:
    """The JSON schema of one call of ``tool`` (an OpenAI function definition)."""
    function = tool["function"]
    params = function.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, arguments_key: params},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


class ToolParser:
    """Base class: subclasses set ``name`` and ``markers`` and implement both methods."""

    name: ClassVar[str] = ""
    # Text that opens a tool call; a streamed reply is held back from the first one.
    markers: ClassVar[tuple[str, ...]] = ()

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]] | None:
        """``(content, calls)`` if ``text`` holds well-formed calls, else None (plain text)."""
        raise NotImplementedError

    def build_format(
        self, compiler: Compiler, tools: list[dict[str, Any]], *, parallel: bool
    ) -> int:
        """Add the nodes of "one or more calls of these tools" and return the root."""
        raise NotImplementedError

    def _calls_union(self, compiler: Compiler, tools: list[dict[str, Any]], key: str) -> int:
        return compiler.union([compiler.schema(call_schema(t, arguments_key=key)) for t in tools])

    def start_of_call(self, text: str) -> int | None:
        """Where the first tool call begins in ``text`` (None: nowhere yet)."""
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def holdback(self, text: str) -> int:
        """How many trailing characters might begin a marker (not yet safe to stream)."""
        best = 0
        for marker in self.markers:
            for n in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:n]):
                    best = max(best, n)
                    break
        return best
