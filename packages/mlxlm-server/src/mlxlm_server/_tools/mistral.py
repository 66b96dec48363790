"""Mistral style: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (v3), or
``[TOOL_CALLS]name[ARGS]{...}`` (v11+)."""

from __future__ import annotations

import json
from typing import Any

from .._structured_schema import Arr, Compiler
from ._base import ParsedCall, ToolParser, load_arguments

_MARK = "[TOOL_CALLS]"


class MistralParser(ToolParser):
    name = "mistral"
    markers = (_MARK,)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]] | None:
        start = text.find(_MARK)
        if start < 0:
            return None
        content = text[:start].strip() or None
        rest = text[start + len(_MARK) :].strip()
        calls: list[ParsedCall] = []
        if rest.startswith("["):
            try:
                data = json.loads(rest)
            except ValueError:
                return None
            if not isinstance(data, list):
                return None
            for item in data:
                if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                    return None
                arguments = load_arguments(item.get("arguments", {}))
                if arguments is None:
                    return None
                calls.append(ParsedCall(item["name"], arguments))
        else:
            for chunk in [c for c in rest.split(_MARK) if c.strip()]:
                name, sep, args = chunk.partition("[ARGS]")
                arguments = load_arguments(args.strip()) if sep else None
                if not name.strip() or arguments is None:
                    return None
                calls.append(ParsedCall(name.strip(), arguments))
        return (content, calls) if calls else None

    def build_format(
        self, compiler: Compiler, tools: list[dict[str, Any]], *, parallel: bool
    ) -> int:
        calls = compiler.add(
            Arr(self._calls_union(compiler, tools, "arguments"), 1, None if parallel else 1)
        )
        return compiler.sequence([compiler.literal(_MARK), calls])
