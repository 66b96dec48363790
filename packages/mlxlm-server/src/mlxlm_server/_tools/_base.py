"""What a tool-call parser is: it finds calls in generated text, also while the text is
still being generated, and describes its format so a forced call (``tool_choice`` required
or named) can be enforced while generating.

One function reads both finished and unfinished replies (:meth:`ToolParser.extract`), so a
streamed reply's argument fragments concatenate to exactly the arguments of the same reply
not streamed: both are the characters the model wrote for the arguments object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._structured_schema import Compiler
from ._scan import Incomplete, Invalid, ObjectScan, scan_object

__all__ = [
    "CallDraft",
    "Extraction",
    "ParsedCall",
    "ToolParser",
    "call_schema",
    "draft_of",
    "load_arguments",
]


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text


@dataclass
class CallDraft:
    """A call as far as the text goes: ``arguments`` only ever grows (each reading's is a
    prefix of the next), and ``done`` says it is complete."""

    name: str | None = None  # known once its string is complete
    arguments: str = ""
    done: bool = False


@dataclass
class Extraction:
    before: str  # text before the first call
    calls: list[CallDraft] = field(default_factory=list)
    after: str = ""  # text outside calls after the first one (between and after them)

    @property
    def content(self) -> str | None:
        return (self.before + self.after).strip() or None


def draft_of(text: str, scan: ObjectScan, keys: tuple[str, ...]) -> CallDraft:
    """A call object's draft: ``name``, and the raw text of the first of ``keys`` present.

    Raises Invalid when the name is not a string or the arguments are not an object (or a
    string holding one, which is decoded and then counts as written).
    """
    draft = CallDraft()
    name = scan.get("name")
    if name is not None and name.end is not None:
        value = json.loads(text[name.start : name.end])
        if not isinstance(value, str):
            raise Invalid("a tool call's name must be a string")
        draft.name = value
    args = next((m for m in scan.members if m.key in keys), None)
    if args is not None:
        first = text[args.start]
        if first == "{":
            draft.arguments = text[args.start : args.end if args.end is not None else len(text)]
        elif first == '"':
            if args.end is not None:  # a string is given whole, once it is complete
                raw = json.loads(text[args.start : args.end])
                if load_arguments(raw) is None:
                    raise Invalid("tool-call arguments must be an object")
                draft.arguments = raw.strip()
        else:
            raise Invalid("tool-call arguments must be an object")
    if scan.end is not None:
        if draft.name is None:
            raise Invalid("a tool call needs a name")
        draft.arguments = draft.arguments or "{}"
        draft.done = True
    return draft


def read_object(text: str, i: int, keys: tuple[str, ...]) -> tuple[CallDraft, int | None]:
    """The call object at ``text[i]`` and where it ends (None: unfinished)."""
    scan = scan_object(text, i)
    return draft_of(text, scan, keys), scan.end


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

    def extract(self, text: str, *, final: bool) -> Extraction | None:
        """The calls in a reply (all of it so far); None when it is not a tool-call reply.

        Unfinished text (``final`` False) reads as far as it can be a reply with calls; a
        finished one must hold only complete, well-formed calls.
        """
        try:
            found = self._read(text, final=final)
        except (Invalid, Incomplete, RecursionError):
            return None
        if found is not None and final and not (found.calls and all(c.done for c in found.calls)):
            return None
        return found

    def _read(self, text: str, *, final: bool) -> Extraction | None:
        """:meth:`extract` for this format; may raise Invalid."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]] | None:
        """``(content, calls)`` if ``text`` holds well-formed calls, else None (plain text)."""
        found = self.extract(text, final=True)
        if found is None:
            return None
        calls = []
        for c in found.calls:
            if not c.done or c.name is None or load_arguments(c.arguments) is None:
                return None
            calls.append(ParsedCall(c.name, c.arguments))
        return found.content, calls

    def build_format(
        self, compiler: Compiler, tools: list[dict[str, Any]], *, parallel: bool
    ) -> int:
        """Add the nodes of "one or more calls of these tools" and return the root."""
        raise NotImplementedError

    def _calls_union(self, compiler: Compiler, tools: list[dict[str, Any]], key: str) -> int:
        """One call of any of ``tools``: ``{"name": "<name>", "<key>": <arguments>}``.

        The name comes first, as models write it, so a streamed call is announced before
        its arguments arrive; the arguments follow the tool's parameter schema.
        """
        options = []
        for tool in tools:
            function = tool["function"]
            params = function.get("parameters") or {"type": "object"}
            head = f'{{"name": {json.dumps(function["name"])}, {json.dumps(key)}: '
            options.append(
                compiler.sequence(
                    [compiler.literal(head), compiler.schema(params), compiler.literal("}")]
                )
            )
        return compiler.union(options)

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
