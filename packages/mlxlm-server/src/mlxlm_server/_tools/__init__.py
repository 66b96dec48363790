"""Tool-call parsers, by name: a registry so a new format is one class and one line.

``get_parser("auto", chat_template)`` picks the format the chat template speaks (its
template text names the markers), falling back to Hermes, the most common.
"""

from __future__ import annotations

from ._base import Extraction, ParsedCall, ToolParser, call_schema
from ._stream import CallStreamer, StreamEvent
from .hermes import HermesParser
from .llama3 import Llama3Parser
from .mistral import MistralParser

__all__ = [
    "PARSERS",
    "CallStreamer",
    "Extraction",
    "ParsedCall",
    "StreamEvent",
    "ToolParser",
    "call_schema",
    "get_parser",
    "register_parser",
]

PARSERS: dict[str, type[ToolParser]] = {}


def register_parser(cls: type[ToolParser]) -> type[ToolParser]:
    PARSERS[cls.name] = cls
    return cls


for _cls in (HermesParser, Llama3Parser, MistralParser):
    register_parser(_cls)
# Qwen 2.5 / 3 use the Hermes format.
PARSERS["qwen"] = HermesParser


def get_parser(name: str, chat_template: object = None) -> ToolParser:
    if name != "auto":
        if name not in PARSERS:
            known = ", ".join(sorted(PARSERS))
            raise ValueError(f"unknown tool parser {name!r} (known: auto, {known})")
        return PARSERS[name]()
    template = chat_template if isinstance(chat_template, str) else str(chat_template or "")
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3Parser()
    return HermesParser()
