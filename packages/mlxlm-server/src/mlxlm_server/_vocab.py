"""The bytes each token id stands for, for constrained decoding and logprob ``bytes``.

Detokenizing one id at a time loses information (a token holding half a UTF-8 character
decodes to U+FFFD), so the table is rebuilt from the vocabulary itself:

- byte-level BPE (GPT-2 style): each character of a token stands for one byte through the
  fixed byte-to-unicode map (printable Latin-1 stands for itself, the other 68 bytes are
  shifted above U+0100);
- SentencePiece style: ``▁`` is a space and ``<0xNN>`` tokens are raw bytes;
- anything else: the token's decoded text as UTF-8.

Added tokens (special or not) are their own text in every scheme.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

__all__ = ["token_bytes"]

_CACHE: weakref.WeakKeyDictionary[Any, list[bytes]] = weakref.WeakKeyDictionary()
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _unicode_to_byte() -> dict[str, int]:
    kept = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    table = {chr(b): b for b in kept}
    extra = 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _byte_level(piece: str, table: dict[str, int]) -> bytes:
    try:
        return bytes(table[ch] for ch in piece)
    except KeyError:
        return piece.encode("utf-8")


def token_bytes(tokenizer: Any) -> list[bytes]:
    """``table[id]``: the bytes token ``id`` contributes to decoded text."""
    cached = _CACHE.get(tokenizer)
    if cached is not None:
        return cached
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = {int(i) for i in tokenizer.get_added_vocab().values()}
    kind = getattr(tokenizer, "detokenizer_kind", "naive")
    table: list[bytes] = []
    if kind == "bpe":
        mapping = _unicode_to_byte()
        for i, piece in enumerate(pieces):
            if piece is None:
                table.append(b"")
            elif i in added:
                table.append(piece.encode("utf-8"))
            else:
                table.append(_byte_level(piece, mapping))
    elif kind == "spm":
        for i, piece in enumerate(pieces):
            match = _BYTE_TOKEN.match(piece or "")
            if piece is None:
                table.append(b"")
            elif i in added:
                table.append(piece.encode("utf-8"))
            elif match:
                table.append(bytes([int(match.group(1), 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
    else:
        for i in range(size):
            table.append(tokenizer.decode([i]).encode("utf-8"))
    _CACHE[tokenizer] = table
    return table
