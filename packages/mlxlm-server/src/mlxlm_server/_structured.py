"""Constrained decoding: ``response_format`` JSON and forced tool calls, enforced per token.

A :class:`Constraint` pairs an :class:`~._structured_automaton.Automaton` with the
tokenizer's vocabulary as a byte trie. For a state, the allowed tokens are found by one
walk of the trie that abandons a branch at the first byte the automaton rejects; the mask
is memoised per state (states repeat: inside a free string the state does not change), so
a long string costs one walk. End-of-sequence tokens are allowed exactly when the text so
far is a complete document, so generation stops on a valid one. Tokens with no text are
never allowed (they would let the model idle forever).

:func:`json_processor` builds the logits processor core's engine calls per step: it reads
the tokens generated since its last call from the history, advances its state, and masks
everything else to ``-inf``. Output cut short by ``max_tokens`` is incomplete (finish
reason ``length``), as with any generation.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, cast

import mlx.core as mx
import numpy as np

from ._structured_automaton import Automaton
from ._structured_schema import Compiler, SchemaError
from ._vocab import token_bytes

__all__ = ["Constraint", "SchemaError", "compile_constraint", "json_processor"]


class _Trie:
    """The vocabulary's byte strings: ``children[n]`` maps a byte to a node, ``ends[n]``
    lists the tokens spelled by the path to ``n``."""

    def __init__(self, table: list[bytes], skip: Iterable[int]) -> None:
        self.children: list[dict[int, int]] = [{}]
        self.ends: list[list[int]] = [[]]
        banned = set(skip)
        for token, data in enumerate(table):
            if not data or token in banned:
                continue
            node = 0
            for b in data:
                nxt = self.children[node].get(b)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][b] = nxt
                    self.children.append({})
                    self.ends.append([])
                node = nxt
            self.ends[node].append(token)


_TRIES: dict[int, tuple[Any, _Trie]] = {}
_TRIE_LOCK = threading.Lock()


def _trie_for(tokenizer: Any, eos: frozenset[int]) -> _Trie:
    with _TRIE_LOCK:
        found = _TRIES.get(id(tokenizer))
        if found is not None and found[0] is tokenizer:
            return found[1]
        specials = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
        trie = _Trie(token_bytes(tokenizer), specials | set(eos))
        _TRIES[id(tokenizer)] = (tokenizer, trie)
        return trie


class Constraint:
    """An automaton over a tokenizer's vocabulary, with memoised token masks."""

    def __init__(self, automaton: Automaton, tokenizer: Any, eos: Iterable[int]) -> None:
        self.automaton = automaton
        self.eos = frozenset(int(i) for i in eos)
        self.trie = _trie_for(tokenizer, self.eos)
        self.table = token_bytes(tokenizer)
        self._masks: dict[Any, np.ndarray] = {}
        self._lock = threading.Lock()

    def allowed(self, state: frozenset[Any]) -> np.ndarray:
        """Sorted token ids allowed in ``state`` (EOS included iff the document is complete)."""
        with self._lock:
            found = self._masks.get(state)
            if found is not None:
                return found
            ids: list[int] = []
            step = self.automaton.step
            children, ends = self.trie.children, self.trie.ends
            todo = [(0, state)]
            while todo:
                node, here = todo.pop()
                for byte, child in children[node].items():
                    nxt = step(here, byte)
                    if not nxt:
                        continue
                    ids.extend(ends[child])
                    if children[child]:
                        todo.append((child, nxt))
            if self.automaton.can_finish(state):
                ids.extend(self.eos)
            found = np.array(sorted(set(ids)), dtype=np.int64)
            self._masks[state] = found
            return found

    def advance(self, state: frozenset[Any], token: int) -> frozenset[Any]:
        if token in self.eos or token >= len(self.table):
            return state
        return self.automaton.feed(state, self.table[token])


_COMPILED: OrderedDict[str, tuple[Automaton, Any]] = OrderedDict()


def compile_constraint(
    key: str, build: Callable[[Compiler], int], tokenizer: Any, eos: Iterable[int]
) -> Constraint:
    """A constraint for ``build`` (which adds nodes and returns the root), memoised by
    ``key`` so repeated schemas reuse their automaton and masks. Raises SchemaError."""
    eos = frozenset(eos)
    cache_key = f"{id(tokenizer)}|{sorted(eos)}|{key}"
    found = _COMPILED.get(cache_key)
    if found is not None and found[1].table is token_bytes(tokenizer):
        _COMPILED.move_to_end(cache_key)
        return found[1]
    compiler = Compiler()
    root = build(compiler)
    constraint = Constraint(Automaton(compiler.nodes, root), tokenizer, eos)
    _COMPILED[cache_key] = (constraint.automaton, constraint)
    while len(_COMPILED) > 64:
        _COMPILED.popitem(last=False)
    return constraint


def schema_constraint(schema: Any, tokenizer: Any, eos: Iterable[int]) -> Constraint:
    key = json.dumps(schema, sort_keys=True)
    return compile_constraint(key, lambda c: c.schema(schema), tokenizer, eos)


def json_processor(constraint: Constraint) -> Callable[[mx.array, mx.array], mx.array]:
    """A fresh, stateful logits processor for one sequence under ``constraint``."""
    state = constraint.automaton.initial
    seen: list[int | None] = [None]  # history length at the previous call
    masks: dict[Any, mx.array] = {}

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        nonlocal state
        length = tokens.shape[-1]
        if seen[0] is not None and length > seen[0]:
            # A 1-d slice of token ids: ``tolist`` gives ints (MLX's stubs say "list or scalar").
            fresh = cast("list[int]", tokens.reshape(-1)[seen[0] :].tolist())
            for token in fresh:
                state = constraint.advance(state, int(token))
        seen[0] = length
        vocab = logits.shape[-1]
        mask = masks.get(state)
        if mask is None:
            ids = constraint.allowed(state)
            ids = ids[ids < vocab]
            if ids.size == 0:  # a dead end (should not happen): let the sequence end
                ids = np.array(sorted(t for t in constraint.eos if t < vocab), dtype=np.int64)
            row = np.zeros(vocab, dtype=bool)
            row[ids] = True
            mask = mx.array(row)
            masks.clear()
            masks[state] = mask
        return mx.where(mask, logits, mx.array(-mx.inf, dtype=logits.dtype))

    return process
