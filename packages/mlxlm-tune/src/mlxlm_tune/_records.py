"""Reading training records from jsonl files, with the format detected and every line checked.

One JSON object per line, in one of these formats (MLX-LM's, plus preference pairs):

- ``text``:        ``{"text": "..."}``
- ``completions``: ``{"prompt": "...", "completion": "..."}``
- ``chat``:        ``{"messages": [{"role": ..., "content": ...}, ...]}``
- ``tools``:       a chat record with ``"tools": [<JSON schema>, ...]``; assistant messages
                   may carry ``tool_calls`` and ``tool`` messages hold results
- ``preference``:  ``{"prompt": ..., "chosen": ..., "rejected": ...}`` where each is a
                   string, or ``chosen``/``rejected`` are assistant message lists following
                   a ``prompt`` message list (DPO/ORPO)

The format of a file is that of its first record; every other line must have the same
(``chat`` and ``tools`` mix freely). A problem is reported as ``file:line: what is wrong``,
naming the field, so a bad line in a 100,000-line file is found at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxlm_core import InvalidArgumentError

__all__ = ["FORMATS", "Record", "detect_format", "parse_records", "read_records"]

FORMATS = ("text", "completions", "chat", "tools", "preference")
_ROLES = ("system", "user", "assistant", "tool", "developer", "ipython")


@dataclass(frozen=True)
class Record:
    """One validated training example and where it came from (``file:line``)."""

    format: str
    data: Mapping[str, Any]
    source: str

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self.data["messages"]]

    @property
    def tools(self) -> list[Any] | None:
        return self.data.get("tools")


def detect_format(record: Mapping[str, Any]) -> str | None:
    """Which format a record's keys say it is in, or None."""
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "messages" in record:
        return "tools" if "tools" in record else "chat"
    if "prompt" in record or "completion" in record:
        return "completions"
    if "text" in record:
        return "text"
    return None


def _family(fmt: str) -> str:
    return "chat" if fmt in ("chat", "tools") else fmt


class _Bad(Exception):
    """A problem with one record (the caller adds ``file:line``)."""


def _string(record: Mapping[str, Any], key: str) -> str:
    if key not in record:
        raise _Bad(f"missing field '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise _Bad(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _check_messages(value: Any, field: str, *, need_assistant: bool) -> None:
    if not isinstance(value, list) or not value:
        raise _Bad(f"field '{field}' must be a non-empty list of messages")
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise _Bad(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str):
            raise _Bad(f"{where} has no 'role'")
        if role not in _ROLES:
            raise _Bad(f"{where}.role {role!r} is not one of {', '.join(_ROLES)}")
        content = message.get("content")
        has_calls = bool(message.get("tool_calls"))
        if content is None and not has_calls:
            raise _Bad(f"{where} has no 'content'")
        if content is not None and not isinstance(content, str | list):
            raise _Bad(f"{where}.content must be a string, got {type(content).__name__}")
        if "tool_calls" in message and not isinstance(message["tool_calls"], list):
            raise _Bad(f"{where}.tool_calls must be a list")
    if need_assistant and not any(m.get("role") == "assistant" for m in value):
        raise _Bad(f"field '{field}' has no assistant turn: nothing to learn from")


def _validate(record: Mapping[str, Any], fmt: str) -> None:
    if fmt == "text":
        if not _string(record, "text"):
            raise _Bad("field 'text' is empty")
    elif fmt == "completions":
        _string(record, "prompt")
        if not _string(record, "completion"):
            raise _Bad("field 'completion' is empty")
    elif fmt in ("chat", "tools"):
        _check_messages(record.get("messages"), "messages", need_assistant=True)
        tools = record.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise _Bad("field 'tools' must be a list of tool schemas")
    elif fmt == "preference":
        if "prompt" not in record:
            raise _Bad("missing field 'prompt'")
        for key in ("chosen", "rejected"):
            if key not in record:
                raise _Bad(f"missing field '{key}'")
        if isinstance(record["prompt"], str):
            for key in ("chosen", "rejected"):
                if not _string(record, key):
                    raise _Bad(f"field '{key}' is empty")
        else:
            _check_messages(record["prompt"], "prompt", need_assistant=False)
            for key in ("chosen", "rejected"):
                value = record[key]
                if isinstance(value, str):
                    if not value:
                        raise _Bad(f"field '{key}' is empty")
                else:
                    _check_messages(value, key, need_assistant=True)


def parse_records(
    rows: Iterable[tuple[str, Any]], *, fmt: str | None = None, name: str = "data"
) -> list[Record]:
    """Validate already-decoded ``(source, object)`` rows (from jsonl or Hugging Face)."""
    if fmt is not None and fmt not in FORMATS:
        raise InvalidArgumentError(f"data format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    records: list[Record] = []
    first: tuple[str, str] | None = (fmt, "the requested format") if fmt else None
    for source, obj in rows:
        if not isinstance(obj, Mapping):
            raise InvalidArgumentError(
                f"{source}: expected a JSON object, got {type(obj).__name__}"
            )
        found = detect_format(obj)
        if found is None:
            keys = ", ".join(sorted(map(str, obj))[:6]) or "none"
            raise InvalidArgumentError(
                f"{source}: unknown record format (keys: {keys}); expected 'text', "
                "'prompt'+'completion', 'messages' or 'prompt'+'chosen'+'rejected'"
            )
        if first is None:
            first = (found, source)
        elif _family(found) != _family(first[0]):
            raise InvalidArgumentError(
                f"{source}: a {found} record in a {first[0]} file (format set by {first[1]})"
            )
        try:
            _validate(obj, found)
        except _Bad as exc:
            raise InvalidArgumentError(f"{source}: {exc}") from None
        records.append(Record(found, obj, source))
    if not records:
        raise InvalidArgumentError(f"{name}: no records")
    return records


def _jsonl_rows(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise InvalidArgumentError(f"{path}: cannot read ({exc.strerror})") from None
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(
                f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})"
            ) from None
        yield f"{path}:{number}", obj


def read_records(path: str | Path, *, fmt: str | None = None) -> list[Record]:
    """Every record of a jsonl file, validated; errors name ``file:line`` and the field."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{path}: no such file")
    return parse_records(_jsonl_rows(path), fmt=fmt, name=str(path))


def formats_of(records: Sequence[Record]) -> set[str]:
    return {r.format for r in records}
