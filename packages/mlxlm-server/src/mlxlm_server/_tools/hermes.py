"""Hermes / Qwen style: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks."""

from __future__ import annotations

import json
import re
from typing import Any

from .._structured_schema import Compiler
from ._base import ParsedCall, ToolParser, load_arguments

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]] | None:
        start = text.find("<tool_call>")
        if start < 0:
            return None
        calls = []
        for match in _BLOCK.finditer(text, start):
            try:
                data = json.loads(match.group(1))
            except ValueError:
                return None
            if not isinstance(data, dict) or not isinstance(data.get("name"), str):
                return None
            arguments = load_arguments(data.get("arguments", data.get("parameters", {})))
            if arguments is None:
                return None
            calls.append(ParsedCall(data["name"], arguments))
        if not calls:
            return None
        content = (text[:start] + _BLOCK.sub("", text[start:])).strip()
        return content or None, calls

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
