"""Mistral style: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (v3), or
``[TOOL_CALLS]name[ARGS]{...}`` (v11+)."""

from __future__ import annotations

import re
from typing import Any

from .._structured_schema import Arr, Compiler
from ._base import CallDraft, Extraction, ToolParser, read_object
from ._scan import Invalid, scan_object, skip_ws

_MARK, _ARGS = "[TOOL_CALLS]", "[ARGS]"
_KEYS = ("arguments",)
_NAME = re.compile(r"[^\s\[\]{}]+")


class MistralParser(ToolParser):
    name = "mistral"
    markers = (_MARK,)

    def _read(self, text: str, *, final: bool) -> Extraction | None:
        start = text.find(_MARK)
        if start < 0:
            return None
        found = Extraction(before=text[:start])
        i = skip_ws(text, start + len(_MARK))
        if i < len(text) and text[i] == "[":
            self._read_list(text, i, found)
        else:
            self._read_named(text, i, found, final=final)
        return found

    def _read_list(self, text: str, i: int, found: Extraction) -> None:
        i = skip_ws(text, i + 1)
        while i < len(text):
            draft, end = read_object(text, i, _KEYS)
            found.calls.append(draft)
            if end is None:
                return
            i = skip_ws(text, end)
            if i >= len(text):
                return
            if text[i] == "]":
                if skip_ws(text, i + 1) != len(text):
                    raise Invalid("text after the list of calls")
                return
            if text[i] != ",":
                raise Invalid("expected , or ]")
            i = skip_ws(text, i + 1)

    def _read_named(self, text: str, i: int, found: Extraction, *, final: bool) -> None:
        while i < len(text):
            sep = text.find(_ARGS, i)
            if sep < 0:  # the name (or its [ARGS]) is still arriving
                rest = text[i:]
                cut = next((n for n in range(len(_ARGS) - 1, 0, -1) if rest.endswith(_ARGS[:n])), 0)
                if final or not _NAME.fullmatch(rest[: len(rest) - cut] or "x"):
                    raise Invalid("a call without [ARGS]")
                found.calls.append(CallDraft())
                return
            name = text[i:sep].strip()
            if not _NAME.fullmatch(name):
                raise Invalid("a bad tool name")
            draft = CallDraft(name=name)
            found.calls.append(draft)
            j = skip_ws(text, sep + len(_ARGS))
            if j >= len(text):
                return
            end = scan_object(text, j).end
            draft.arguments = text[j : len(text) if end is None else end]
            if end is None:
                return
            draft.done = True
            i = skip_ws(text, end)
            if text.startswith(_MARK, i):
                i = skip_ws(text, i + len(_MARK))
            elif i < len(text):
                if final or not _MARK.startswith(text[i:]):
                    raise Invalid("text after a call")
                return

    def build_format(
        self, compiler: Compiler, tools: list[dict[str, Any]], *, parallel: bool
    ) -> int:
        calls = compiler.add(
            Arr(self._calls_union(compiler, tools, "arguments"), 1, None if parallel else 1)
        )
        return compiler.sequence([compiler.literal(_MARK), calls])
