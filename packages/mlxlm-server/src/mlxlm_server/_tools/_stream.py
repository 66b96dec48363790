"""Tool calls streamed as they are generated, in any parser's format.

:class:`CallStreamer` reads one choice's text piece by piece and says what to send: plain
content (held back only while it may be the start of a call marker), then for each call a
header (its index and name, once the name is complete) followed by fragments of its
arguments as the model writes them. At the end the finished text is read once more, exactly
as a non-streamed reply is parsed, and whatever of it is still unsent goes out: so the
fragments of each call concatenate to the non-streamed arguments.

A reply that turns out not to be a tool call before any header was sent is sent as plain
text, as the non-streamed reply would be. One that breaks after a header was sent (the
model ran out of ``max_tokens`` inside the arguments, say) cannot be taken back: its calls
stay as sent, the rest of its text is dropped, and the finish reason says why it ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._base import Extraction, ToolParser

__all__ = ["CallStreamer", "StreamEvent"]


@dataclass(frozen=True)
class StreamEvent:
    kind: Literal["content", "call", "arguments"]
    text: str = ""  # content, or an arguments fragment
    index: int = 0  # the call's index (call, arguments)
    name: str = ""  # the call's name (call)


class CallStreamer:
    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent = 0  # characters of ``text`` sent as content before the first call
        self.mode: Literal["scan", "calls", "plain", "broken"] = "scan"
        self.arguments: list[str] = []  # per call whose header was sent: arguments sent
        self._read_at = 0  # text length at the last reading

    @property
    def calls(self) -> int:
        """How many calls have been announced."""
        return len(self.arguments)

    def feed(self, piece: str) -> list[StreamEvent]:
        self.text += piece
        if self.mode == "plain":
            return self._content(len(self.text))
        if self.mode == "scan":
            rest = self.text[self.sent :]
            at = self.parser.start_of_call(rest)
            if at is None:
                end = len(self.text) - self.parser.holdback(rest)
                if not self.text[:end].strip():
                    return []  # leading whitespace waits: a call may follow it
                return self._content(end)
            events = self._content(self.sent + at) if self.text[: self.sent + at].strip() else []
            self.mode = "calls"
            return events + self._calls(final=False)
        if self.mode == "calls" and len(self.text) - self._read_at >= self._read_at // 32:
            # Each reading scans the whole text: reading again only after it grew by a
            # share of its length keeps a long call linear (fragments grow with it).
            return self._calls(final=False)
        return []

    def finish(self) -> list[StreamEvent]:
        """What is left to send once generation ended (the text is complete)."""
        if self.mode == "calls":
            return self._calls(final=True)
        if self.mode in ("scan", "plain"):
            return self._content(len(self.text))
        return []

    def _content(self, end: int) -> list[StreamEvent]:
        text, self.sent = self.text[self.sent : end], max(self.sent, end)
        return [StreamEvent("content", text)] if text else []

    def _calls(self, *, final: bool) -> list[StreamEvent]:
        self._read_at = len(self.text)
        found = self.parser.extract(self.text, final=final)
        if found is None:
            if not self.arguments:  # nothing announced: it was plain text all along
                self.mode = "plain"
                return self._content(len(self.text))
            self.mode = "broken"
            return []
        events = self._diff(found)
        if final and self.mode == "calls" and found.after.strip():
            events.append(StreamEvent("content", found.after))
        return events

    def _diff(self, found: Extraction) -> list[StreamEvent]:
        events = []
        for i, call in enumerate(found.calls):
            if i == len(self.arguments):
                if call.name is None:
                    break  # calls are announced in order, each once its name is known
                events.append(StreamEvent("call", index=i, name=call.name))
                self.arguments.append("")
            sent = self.arguments[i]
            if not call.arguments.startswith(sent):  # cannot happen for a sound parser
                self.mode = "broken"
                break
            if len(call.arguments) > len(sent):
                events.append(StreamEvent("arguments", call.arguments[len(sent) :], index=i))
                self.arguments[i] = call.arguments
        return events
