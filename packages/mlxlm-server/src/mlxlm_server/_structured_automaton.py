"""A byte-level recogniser for the node graph of :mod:`._structured_schema`.

A *state* is a frozenset of stacks (the automaton is nondeterministic: ``anyOf`` branches,
and values such as numbers that may end or go on, are followed side by side). A stack is
a tuple of frames, innermost last; frames are small tuples, so states hash and every
transition and token mask can be memoised. ``step(state, byte)`` is the successor state,
empty when the byte cannot occur; ``can_finish(state)`` says whether the text so far is a
complete document.

Frames (tag first):
  ("V", node, ws)                    a value of ``node`` is expected (ws: whitespace seen)
  ("O", node, seen, phase, key, ws)  inside an object (phase: open/key/colon/value/after/comma)
  ("K", node, buf)                   inside a key of a schema object
  ("A", node, count, phase, ws)      inside an array (phase: open/value/after)
  ("S", node, length, esc, utf)      inside a string (utf: the next UTF-8 continuation
                                     byte's range and how many follow it, or 0)
  ("N", node, phase, digits)         inside a number
  ("L", options, pos)                matching literal byte strings (enum, const, true...)
  ("Q", node, index)                 inside a sequence (tool-call formats)
  ("R", node, count, phase)          inside a repetition (parallel tool calls)
"""

from __future__ import annotations

from typing import Any

from ._structured_schema import ANY, FREE_STRING, AnyValue, Arr, Lit, Num, Obj, Rep, Seq, Str, Union

__all__ = ["Automaton"]

MAX_WS = 6  # whitespace bytes in one gap: room for a newline and indentation, no more
MAX_DIGITS = 20  # digits in one part of a number: a model cannot run on forever
MAX_DEPTH = 24  # nesting of free-form values
_WS = frozenset(b" \n")  # a subset of JSON whitespace: tabs and CRs only invite junk
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_FREE_OBJECT = -1  # node id marking a free-form object (keys are free strings)
_FREE_ARRAY = -2
_NUMBER_END = {"zero", "int", "frac", "exp"}

Stack = tuple[tuple[Any, ...], ...]


def _utf8_lead(byte: int) -> tuple[int, int, int] | int | None:
    """For a byte starting a character: 0 (ASCII) or the range of the next byte and how
    many more follow it (well-formed UTF-8 only: no overlongs, surrogates or > U+10FFFF);
    None if no character starts with it."""
    if byte < 0x80:
        return 0
    if 0xC2 <= byte <= 0xDF:
        return (0x80, 0xBF, 0)
    if byte == 0xE0:
        return (0xA0, 0xBF, 1)
    if 0xE1 <= byte <= 0xEC or 0xEE <= byte <= 0xEF:
        return (0x80, 0xBF, 1)
    if byte == 0xED:
        return (0x80, 0x9F, 1)
    if byte == 0xF0:
        return (0x90, 0xBF, 2)
    if 0xF1 <= byte <= 0xF3:
        return (0x80, 0xBF, 2)
    if byte == 0xF4:
        return (0x80, 0x8F, 2)
    return None


class Automaton:
    def __init__(self, nodes: list[Any], root: int) -> None:
        self.nodes = nodes
        self.initial: frozenset[Stack] = frozenset({(("V", root, 0),)})
        self._steps: dict[tuple[frozenset[Stack], int], frozenset[Stack]] = {}
        self._finish: dict[frozenset[Stack], bool] = {}

    # --- public ---------------------------------------------------------------------------
    def step(self, state: frozenset[Stack], byte: int) -> frozenset[Stack]:
        key = (state, byte)
        found = self._steps.get(key)
        if found is None:
            out: set[Stack] = set()
            for stack in state:
                if stack:  # an empty stack is a finished document: nothing may follow
                    out.update(self._advance(stack, byte))
            found = frozenset(out)
            self._steps[key] = found
        return found

    def feed(self, state: frozenset[Stack], data: bytes) -> frozenset[Stack]:
        for b in data:
            state = self.step(state, b)
            if not state:
                break
        return state

    def can_finish(self, state: frozenset[Stack]) -> bool:
        found = self._finish.get(state)
        if found is None:
            found = any(self._finishes(s) for s in state)
            self._finish[state] = found
        return found

    # --- completion -----------------------------------------------------------------------
    def _finishes(self, stack: Stack) -> bool:
        if not stack:
            return True
        return self._completable(stack[-1]) and any(self._finishes(s) for s in self._done(stack))

    def _completable(self, frame: tuple[Any, ...]) -> bool:
        tag = frame[0]
        if tag == "N":
            return frame[2] in _NUMBER_END
        if tag == "L":
            return any(len(o) == frame[2] for o in frame[1])
        if tag == "R":
            node = self.nodes[frame[1]]
            return frame[3] == "after" and frame[2] >= node.min_count
        return False

    def _done(self, stack: Stack) -> list[Stack]:
        """The top frame's value is complete: pop it and move its parent on."""
        rest = stack[:-1]
        if not rest:
            return [()]
        parent = rest[-1]
        tag = parent[0]
        if tag == "O":
            _, node, seen, phase, key, _ws = parent
            if phase == "key":
                return [(*rest[:-1], ("O", node, seen, "colon", key, 0))]
            return [(*rest[:-1], ("O", node, seen, "after", None, 0))]
        if tag == "A":
            _, node, count, _phase, _ws = parent
            cap = self._count_cap(node)
            return [(*rest[:-1], ("A", node, min(count + 1, cap), "after", 0))]
        if tag == "Q":
            _, node, index = parent
            parts = self.nodes[node].parts
            if index + 1 == len(parts):
                return self._done(rest)
            return [(*rest[:-1], ("Q", node, index + 1), ("V", parts[index + 1], 0))]
        if tag == "R":
            _, node, count, phase = parent
            if phase == "sep":
                item = self.nodes[node].item
                return [(*rest[:-1], ("R", node, count, "item"), ("V", item, 0))]
            return [(*rest[:-1], ("R", node, count + 1, "after"))]
        raise AssertionError(f"unexpected parent frame {tag}")

    def _count_cap(self, node: int) -> int:
        if node == _FREE_ARRAY:
            return 0
        arr = self.nodes[node]
        if arr.min_items == 0 and arr.max_items is None:
            return 0
        return max(arr.min_items, arr.max_items or 0) + 1

    # --- transitions ----------------------------------------------------------------------
    def _advance(self, stack: Stack, byte: int) -> list[Stack]:
        frame = stack[-1]
        out = self._extend(stack, frame, byte)
        if self._completable(frame):
            for parent in self._done(stack):
                if parent:
                    out.extend(self._advance(parent, byte))
        return out

    def _extend(self, stack: Stack, frame: tuple[Any, ...], byte: int) -> list[Stack]:
        tag = frame[0]
        rest = stack[:-1]
        if tag == "V":
            if byte in _WS and frame[2] < MAX_WS:
                return [(*rest, ("V", frame[1], frame[2] + 1))]
            return self._start(rest, frame[1], byte, len(stack))
        if tag == "S":
            return self._string(stack, frame, byte)
        if tag == "N":
            return self._number(rest, frame, byte)
        if tag == "L":
            _, options, pos = frame
            nxt = tuple(o for o in options if len(o) > pos and o[pos] == byte)
            return [(*rest, ("L", nxt, pos + 1))] if nxt else []
        if tag == "O":
            return self._object(stack, frame, byte)
        if tag == "K":
            return self._key(stack, frame, byte)
        if tag == "A":
            return self._array(stack, frame, byte)
        if tag == "R":
            return self._repeat(stack, frame, byte)
        return []

    def _start(self, rest: Stack, node_id: int, byte: int, depth: int) -> list[Stack]:
        """A value of ``node_id`` starts with ``byte``; ``rest`` is the stack below it."""
        node = self.nodes[node_id]
        if isinstance(node, Union):
            out: list[Stack] = []
            for opt in node.options:
                out.extend(self._start(rest, opt, byte, depth))
            return out
        if isinstance(node, AnyValue):
            if byte == ord("{") and depth < MAX_DEPTH:
                return [(*rest, ("O", _FREE_OBJECT, frozenset(), "open", None, 0))]
            if byte == ord("[") and depth < MAX_DEPTH:
                return [(*rest, ("A", _FREE_ARRAY, 0, "open", 0))]
            if byte == ord('"'):
                return [(*rest, ("S", FREE_STRING, 0, 0, 0))]
            if byte == ord("-") or byte in _DIGITS:
                return self._number(rest, ("N", -1, "start", 0), byte)
            words = ("L", (b"true", b"false", b"null"), 0)
            return self._extend((*rest, words), words, byte)
        if isinstance(node, Obj):
            return (
                [(*rest, ("O", node_id, frozenset(), "open", None, 0))] if byte == ord("{") else []
            )
        if isinstance(node, Arr):
            return [(*rest, ("A", node_id, 0, "open", 0))] if byte == ord("[") else []
        if isinstance(node, Str):
            return [(*rest, ("S", node_id, 0, 0, 0))] if byte == ord('"') else []
        if isinstance(node, Num):
            return self._number(rest, ("N", node_id, "start", 0), byte)
        if isinstance(node, Lit):
            frame = ("L", node.options, 0)
            return self._extend((*rest, frame), frame, byte)
        if isinstance(node, Seq):
            return self._start((*rest, ("Q", node_id, 0)), node.parts[0], byte, depth)
        if isinstance(node, Rep):
            return self._start((*rest, ("R", node_id, 0, "item")), node.item, byte, depth)
        return []

    def _string(self, stack: Stack, frame: tuple[Any, ...], byte: int) -> list[Stack]:
        _, node_id, length, esc, utf = frame
        rest = stack[:-1]
        node = self.nodes[node_id]
        if utf:  # inside a multi-byte UTF-8 character: only its continuation bytes
            lo, hi, more = utf
            if not lo <= byte <= hi:
                return []
            return [(*rest, ("S", node_id, length, 0, (0x80, 0xBF, more - 1) if more else 0))]
        if esc == 1:
            if byte in _ESCAPES:
                return [(*rest, ("S", node_id, length, 0, 0))]
            if byte == ord("u"):
                return [(*rest, ("S", node_id, length, 14, 0))]
            return []
        if esc > 10:
            if byte not in _HEX:
                return []
            return [(*rest, ("S", node_id, length, 0 if esc == 11 else esc - 1, 0))]
        if byte == ord('"'):
            if length < node.min_length:
                return []
            return self._done(stack)
        if byte < 0x20:
            return []
        follow = _utf8_lead(byte)
        if follow is None:
            return []
        if node.min_length > 0 or node.max_length is not None:
            if node.max_length is not None and length + 1 > node.max_length:
                return []
            length = min(length + 1, max(node.min_length, node.max_length or 0))
        return [(*rest, ("S", node_id, length, 1 if byte == ord("\\") else 0, follow))]

    def _number(self, rest: Stack, frame: tuple[Any, ...], byte: int) -> list[Stack]:
        _, node_id, phase, digits = frame
        node = self.nodes[node_id] if node_id >= 0 else Num()
        digit = byte in _DIGITS
        if digit and digits >= MAX_DIGITS:
            return []
        nd = digits + 1 if digit else digits

        def to(p: str, d: int = nd) -> list[Stack]:
            return [(*rest, ("N", node_id, p, d))]

        if phase == "start":
            if byte == ord("-") and not node.nonneg:
                return to("minus", 0)
            phase = "minus"
        if phase == "minus":
            if byte == ord("0"):
                return to("zero")
            return to("int") if digit else []
        if phase in ("zero", "int"):
            if phase == "int" and digit:
                return to("int")
            if node.integer:
                return []
            if byte == ord("."):
                return to("frac0", 0)
            return to("exp0", 0) if byte in b"eE" else []
        if phase in ("frac0", "frac"):
            if digit:
                return to("frac")
            return to("exp0", 0) if phase == "frac" and byte in b"eE" else []
        if phase == "exp0":
            if byte in b"+-":
                return to("exp_sign", 0)
            return to("exp") if digit else []
        if phase in ("exp_sign", "exp"):
            return to("exp") if digit else []
        return []

    def _object(self, stack: Stack, frame: tuple[Any, ...], byte: int) -> list[Stack]:
        _, node_id, seen, phase, key, ws = frame
        rest = stack[:-1]
        if byte in _WS and phase in ("open", "colon", "after", "comma"):
            return [(*rest, ("O", node_id, seen, phase, key, ws + 1))] if ws < MAX_WS else []
        free = node_id == _FREE_OBJECT
        node = None if free else self.nodes[node_id]
        closable = node is None or node.required <= seen
        if phase in ("open", "comma") and byte == ord('"'):
            keyed = ("O", node_id, seen, "key", None, 0)
            if free:
                return [(*rest, keyed, ("S", FREE_STRING, 0, 0, 0))]
            return [(*rest, keyed, ("K", node_id, b""))]
        if phase in ("open", "after") and byte == ord("}") and closable:
            return self._done(stack)
        if phase == "colon" and byte == ord(":"):
            value = ANY if node is None else node.props.get(key, node.additional)
            return [(*rest, ("O", node_id, seen, "value", key, 0), ("V", value, 0))]
        if phase == "after" and byte == ord(","):
            if node is not None and node.additional is None and set(node.props) <= seen:
                return []  # every allowed key is used: nothing may follow
            return [(*rest, ("O", node_id, seen, "comma", None, 0))]
        return []

    def _key(self, stack: Stack, frame: tuple[Any, ...], byte: int) -> list[Stack]:
        _, node_id, buf = frame
        node = self.nodes[node_id]
        obj = stack[-2]
        seen = obj[2]
        rest = stack[:-2]
        if byte == ord('"'):
            if buf in seen:
                return []
            if buf not in node.props and node.additional is None:
                return []
            return [(*rest, ("O", node_id, seen | {buf}, "colon", buf, 0))]
        if byte < 0x20 or byte == ord("\\") or byte >= 0x80:
            return []  # free keys stay printable ASCII (a subset of valid keys)
        nbuf = buf + bytes([byte])
        if node.additional is None and not any(
            k.startswith(nbuf) for k in node.props if k not in seen
        ):
            return []
        return [(*stack[:-1], ("K", node_id, nbuf))]

    def _array(self, stack: Stack, frame: tuple[Any, ...], byte: int) -> list[Stack]:
        _, node_id, count, phase, ws = frame
        rest = stack[:-1]
        free = node_id == _FREE_ARRAY
        lo = 0 if free else self.nodes[node_id].min_items
        hi = None if free else self.nodes[node_id].max_items
        items = ANY if free else self.nodes[node_id].items
        if byte in _WS and phase in ("open", "after"):
            return [(*rest, ("A", node_id, count, phase, ws + 1))] if ws < MAX_WS else []
        if byte == ord("]") and phase in ("open", "after") and count >= lo:
            return self._done(stack)
        if phase == "open" and (hi is None or hi > 0):
            return self._start(
                (*rest, ("A", node_id, count, "value", 0)), items, byte, len(stack) + 1
            )
        if phase == "after" and byte == ord(",") and (hi is None or count < hi):
            return [(*rest, ("A", node_id, count, "value", 0), ("V", items, 0))]
        return []

    def _repeat(self, stack: Stack, frame: tuple[Any, ...], byte: int) -> list[Stack]:
        _, node_id, count, phase = frame
        node = self.nodes[node_id]
        rest = stack[:-1]
        if phase != "after" or (node.max_count is not None and count >= node.max_count):
            return []
        if node.sep is not None:
            return self._start((*rest, ("R", node_id, count, "sep")), node.sep, byte, len(stack))
        return self._start((*rest, ("R", node_id, count, "item")), node.item, byte, len(stack))
