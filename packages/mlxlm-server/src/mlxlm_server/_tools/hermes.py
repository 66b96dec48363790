"""Hermes / Qwen style: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks."""

from __future__ import annotations

from typing import Any

from .._structured_schema import Compiler
from ._base import Extraction, ToolParser, read_object
from ._scan import Invalid, skip_ws

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_KEYS = ("arguments", "parameters")


class HermesParser(ToolParser):
    name = "hermes"
    markers = (_OPEN,)

    def _read(self, text: str, *, final: bool) -> Extraction | None:
        start = text.find(_OPEN)
        if start < 0:
            return None
        found = Extraction(before=text[:start])
        i = start
        while i < len(text):
            if not text.startswith(_OPEN, i):
                # Text outside the blocks is content; another block may follow it.
                nxt = text.find(_OPEN, i)
                if nxt < 0:
                    rest = text[i:]
                    keep = 0 if final else self.holdback(rest)
                    found.after += rest[: len(rest) - keep]
                    break
                found.after += text[i:nxt]
                i = nxt
            j = skip_ws(text, i + len(_OPEN))
            if j >= len(text):
                if final:
                    raise Invalid("an empty tool-call block")
                break
            if text[j] != "{":
                raise Invalid("a tool call holds a JSON object")
            draft, end = read_object(text, j, _KEYS)
            found.calls.append(draft)
            if end is None:
                break
            k = skip_ws(text, end)
            if text.startswith(_CLOSE, k):
                i = k + len(_CLOSE)
            elif k == len(text) or _CLOSE.startswith(text[k:]):
                break  # the closing tag is still to come (or never: the text ended)
            else:
                raise Invalid("text after a tool call's object inside its block")
        return found

    def build_format(
        self, compiler: Compiler, tools: list[dict[str, Any]], *, parallel: bool
    ) -> int:
        call = compiler.sequence(
            [
                compiler.literal("<tool_call>\n"),
                self._calls_union(compiler, tools, "arguments"),
                compiler.literal("\n</tool_call>"),
            ]
        )
        return compiler.repeat(call, sep=None, max_count=None if parallel else 1)
