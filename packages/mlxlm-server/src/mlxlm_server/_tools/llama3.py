"""Llama 3.x style: the reply is ``{"name": ..., "parameters": {...}}`` (optionally after
``<|python_tag|>``), several calls separated by ``;``."""

from __future__ import annotations

from typing import Any

from .._structured_schema import Compiler
from ._base import Extraction, ToolParser, read_object
from ._scan import Invalid

_TAG = "<|python_tag|>"
_KEYS = ("parameters", "arguments")
_SEPARATORS = " \t\r\n;"


class Llama3Parser(ToolParser):
    name = "llama3"
    markers = (_TAG, '{"name"')

    def _read(self, text: str, *, final: bool) -> Extraction | None:
        i = len(text) - len(text.lstrip())
        if text.startswith(_TAG, i):
            i += len(_TAG)
            i += len(text[i:]) - len(text[i:].lstrip())
        elif not final and _TAG.startswith(text[i:]):
            return Extraction(before="")  # maybe the tag, still arriving
        if i < len(text) and text[i] != "{":
            return None  # the whole reply is calls, or none of it is
        found = Extraction(before="")
        while i < len(text):
            draft, end = read_object(text, i, _KEYS)
            found.calls.append(draft)
            if end is None:
                break
            i = end
            while i < len(text) and text[i] in _SEPARATORS:
                i += 1
            if i < len(text) and text[i] != "{":
                raise Invalid("text after a call")
        return found

    def build_format(
        self, compiler: Compiler, tools: list[dict[str, Any]], *, parallel: bool
    ) -> int:
        call = self._calls_union(compiler, tools, "parameters")
        return compiler.repeat(
            call,
            sep=compiler.literal("; ") if parallel else None,
            max_count=None if parallel else 1,
        )
