"""Llama 3.x style: the reply is ``{"name": ..., "parameters": {...}}`` (optionally after
``<|python_tag|>``), several calls separated by ``;``."""

from __future__ import annotations

import json
from typing import Any

from .._structured_schema import Compiler
from ._base import ParsedCall, ToolParser, load_arguments


class Llama3Parser(ToolParser):
    name = "llama3"
    markers = ("<|python_tag|>", '{"name"')

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]] | None:
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>") :].strip()
        if not body.startswith("{"):
            return None
        decoder = json.JSONDecoder()
        calls, pos = [], 0
        while pos < len(body):
            try:
                data, pos = decoder.raw_decode(body, pos)
            except ValueError:
                return None
            if not isinstance(data, dict) or not isinstance(data.get("name"), str):
                return None
            arguments = load_arguments(data.get("parameters", data.get("arguments", {})))
            if arguments is None:
                return None
            calls.append(ParsedCall(data["name"], arguments))
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return (None, calls) if calls else None

    def build_format(
        self, compiler: Compiler, tools: list[dict[str, Any]], *, parallel: bool
    ) -> int:
        call = self._calls_union(compiler, tools, "parameters")
        return compiler.repeat(
            call,
            sep=compiler.literal("; ") if parallel else None,
            max_count=None if parallel else 1,
        )
