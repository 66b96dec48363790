"""A strict JSON scanner that also reads unfinished text, for tool calls being generated.

``scan_object(text, i)`` reads the object that opens at ``text[i]`` and reports its
top-level members with the raw spans of their values, so a tool call's arguments can be
streamed as the exact characters the model wrote, and the non-streamed reply (which reads
the finished text with the same function) holds the same string. Text that ends inside the
object is not an error: the members read so far come back with ``end`` None. Text that
cannot continue into valid JSON raises :class:`Invalid` at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["Incomplete", "Invalid", "Member", "ObjectScan", "scan_object", "skip_ws"]

_WS = " \t\r\n"
_HEX = set("0123456789abcdefABCDEF")
_ESCAPES = set('"\\/bfnrtu')


class Invalid(ValueError):
    """The text is not (a prefix of) JSON."""


class Incomplete(Exception):
    """The text ends before the value does."""


@dataclass
class Member:
    key: str
    start: int  # where the value begins
    end: int | None = None  # just past the value; None while it is unfinished


@dataclass
class ObjectScan:
    members: list[Member] = field(default_factory=list)
    end: int | None = None  # just past the closing brace; None while unfinished

    def get(self, key: str) -> Member | None:
        return next((m for m in self.members if m.key == key), None)


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string(text: str, i: int) -> int:
    """Past the string opening at ``text[i]`` (a quote)."""
    i += 1
    while True:
        if i >= len(text):
            raise Incomplete
        c = text[i]
        if c == '"':
            return i + 1
        if c == "\\":
            if i + 1 >= len(text):
                raise Incomplete
            e = text[i + 1]
            if e not in _ESCAPES:
                raise Invalid(f"bad escape \\{e}")
            if e == "u":
                digits = text[i + 2 : i + 6]
                if any(d not in _HEX for d in digits):
                    raise Invalid("bad \\u escape")
                if len(digits) < 4:
                    raise Incomplete
                i += 6
            else:
                i += 2
        elif c < " ":
            raise Invalid("control character in a string")
        else:
            i += 1


def _number(text: str, i: int) -> int:
    start = i
    if i < len(text) and text[i] == "-":
        i += 1
    if i >= len(text):
        raise Incomplete
    if text[i] == "0":
        i += 1
    elif text[i].isdigit() and text[i].isascii():
        while i < len(text) and text[i] in "0123456789":
            i += 1
    else:
        raise Invalid("bad number")
    if i < len(text) and text[i] == ".":
        i += 1
        digits = i
        while i < len(text) and text[i] in "0123456789":
            i += 1
        if i == digits:
            if i >= len(text):
                raise Incomplete
            raise Invalid("bad fraction")
    if i < len(text) and text[i] in "eE":
        i += 1
        if i < len(text) and text[i] in "+-":
            i += 1
        digits = i
        while i < len(text) and text[i] in "0123456789":
            i += 1
        if i == digits:
            if i >= len(text):
                raise Incomplete
            raise Invalid("bad exponent")
    if i >= len(text):
        raise Incomplete  # more digits may follow
    assert i > start
    return i


def _literal(text: str, i: int, word: str) -> int:
    part = text[i : i + len(word)]
    if not word.startswith(part):
        raise Invalid(f"expected {word}")
    if len(part) < len(word):
        raise Incomplete
    return i + len(word)


def _value(text: str, i: int) -> int:
    """Past the value starting at ``text[i]`` (no leading whitespace)."""
    if i >= len(text):
        raise Incomplete
    c = text[i]
    if c == "{":
        scan = scan_object(text, i)
        if scan.end is None:
            raise Incomplete
        return scan.end
    if c == "[":
        return _array(text, i)
    if c == '"':
        return _string(text, i)
    if c == "t":
        return _literal(text, i, "true")
    if c == "f":
        return _literal(text, i, "false")
    if c == "n":
        return _literal(text, i, "null")
    if c == "-" or c in "0123456789":
        return _number(text, i)
    raise Invalid(f"unexpected {c!r}")


def _array(text: str, i: int) -> int:
    i = skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        return i + 1
    while True:
        i = skip_ws(text, _value(text, skip_ws(text, i)))
        if i >= len(text):
            raise Incomplete
        if text[i] == "]":
            return i + 1
        if text[i] != ",":
            raise Invalid("expected , or ]")
        i += 1


def scan_object(text: str, i: int) -> ObjectScan:
    """Members of the object opening at ``text[i]`` (a ``{``), as far as ``text`` goes."""
    if i >= len(text) or text[i] != "{":
        raise Invalid("expected {")
    scan = ObjectScan()
    i = skip_ws(text, i + 1)
    if i < len(text) and text[i] == "}":
        scan.end = i + 1
        return scan
    while True:
        if i >= len(text):
            return scan
        if text[i] != '"':
            raise Invalid("expected a key")
        try:
            key_end = _string(text, i)
        except Incomplete:
            return scan
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= len(text):
            return scan
        if text[i] != ":":
            raise Invalid("expected :")
        i = skip_ws(text, i + 1)
        if i >= len(text):
            return scan
        member = Member(key, i)
        scan.members.append(member)
        try:
            member.end = _value(text, i)
        except Incomplete:
            return scan
        i = skip_ws(text, member.end)
        if i >= len(text):
            return scan
        if text[i] == "}":
            scan.end = i + 1
            return scan
        if text[i] != ",":
            raise Invalid("expected , or }")
        i = skip_ws(text, i + 1)
