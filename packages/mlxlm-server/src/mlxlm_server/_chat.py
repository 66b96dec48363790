"""Chat messages (OpenAI or Anthropic shapes) to prompt token ids, through the model's
chat template; the template also receives the tools, so the model knows it may call them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mlxlm_core import MlxlmError

from ._errors import bad_request
from ._schemas_chat import ChatMessage, TextPart

__all__ = ["message_dicts", "render_chat", "text_of"]


def text_of(content: str | Sequence[Any] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        part.text for part in content if isinstance(part, TextPart) or hasattr(part, "text")
    )


def _arguments(value: str | dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def message_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The plain dicts chat templates expect (tool-call arguments as objects)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        item: dict[str, Any] = {"role": role, "content": text_of(m.content)}
        if m.name:
            item["name"] = m.name
        if m.tool_calls:
            item["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _arguments(c.function.arguments),
                    },
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id:
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    template_args: dict[str, Any] | None = None,
) -> list[int]:
    """Prompt token ids; a tokenizer without a chat template gets a plain transcript."""
    if not tokenizer.has_chat_template:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return list(tokenizer.encode(text))
    try:
        ids = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, **(template_args or {})
        )
    except MlxlmError as exc:
        raise bad_request(str(exc), param="messages") from None
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as exc:
        raise bad_request(
            f"the chat template cannot render these messages ({exc})", param="messages"
        ) from None
    return list(ids)
