"""Streaming detokenizers: text out one token at a time, equal to a full decode at the end.

A generation loop wants printable text after every token, but ``tokenizer.decode(tokens)``
over the whole sequence costs O(n) per token. Each detokenizer here mirrors what the
Hugging Face ``tokenizers`` decoder does so that, for ANY id sequence, the concatenation of
what it emits (after :meth:`StreamingDetokenizer.finalize`) is exactly
``tokenizer.decode(ids, skip_special_tokens=...)``, while doing O(1) amortised work per
token. Three kinds, chosen from the decoder the loaded tokenizer really uses:

- ``"bpe"`` (byte-level BPE, ``ByteLevel`` decoder): each token is a run of bytes through
  the GPT-2 byte-to-unicode map; bytes are fed to an incremental UTF-8 decoder, which holds
  back an incomplete character and replaces invalid bytes exactly as Rust's lossy decoding
  does.
- ``"spm"`` (SentencePiece-style: ``Replace ▁`` or ``Metaspace``, optionally ``ByteFallback``,
  ``Fuse``, ``Strip``): ``▁`` becomes a space, runs of ``<0xNN>`` tokens become bytes. A run
  is held until it ends, because ``ByteFallback`` turns a run that is invalid anywhere into
  one U+FFFD per byte token (even its valid prefix).
- ``"naive"`` (anything else): re-decodes a short window of recent tokens and emits the new
  text that appending a probe token would not change, holding back a trailing U+FFFD (an
  incomplete character). Checked exact for WordPiece, BPEDecoder, CTC, no decoder, and
  for the decoders above; best effort for a tokenizer class with its own ``decode``.

Held-back text is at most one character or space pattern for "bpe" and "naive"; "spm" holds
a whole run of byte tokens (Llama 2 spells rare CJK characters and emoji that way).

The ``tokenizers`` library looks every id up (an added token gives its content, special
or not; an id it does not know gives nothing), drops special tokens if asked to, and runs
the decoder once over the whole list: added tokens go through the decoder like any other
token. Transformers may then apply ``clean_up_tokenization_spaces`` to the whole string;
:class:`_SpaceCleaner` streams that. Choosing the kind and building its per-id tables is
``_detokenizer_select.py``'s job.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass

_REPLACEMENT = "\ufffd"
_SPM_MARKER = "▁"

# transformers' clean_up_tokenization, applied in this order with str.replace.
_CLEANUP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
# Proper prefixes of those patterns: text ending in one of them may still change.
_CLEANUP_HOLD = (" n'", " 'v", " 'r", " '", " n", " ")


def _clean(text: str) -> str:
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text


class _SpaceCleaner:
    """Streams ``clean_up_tokenization``: emits a prefix no later text can change.

    Every pattern starts with a space and replacements only delete spaces, so cleaning
    ``A + B`` equals cleaning ``A`` and ``B`` apart whenever ``A`` does not end with a
    proper prefix of a pattern (no match can straddle the cut, at any stage).
    """

    def __init__(self) -> None:
        self._pending = ""

    def push(self, text: str) -> str:
        pending = self._pending + text
        cut = len(pending)
        while cut:
            for suffix in _CLEANUP_HOLD:
                if pending.endswith(suffix, 0, cut):
                    cut -= len(suffix)
                    break
            else:
                break
        self._pending = pending[cut:]
        return _clean(pending[:cut])

    def flush(self) -> str:
        out, self._pending = _clean(self._pending), ""
        return out


@dataclass(frozen=True)
class _Specials:
    """Ids dropped by ``skip_special_tokens``, and whether transformers cleans up spaces."""

    special: frozenset[int]
    cleanup: bool


class StreamingDetokenizer:
    """Common state: emitted text, the unread segment, the optional space cleanup.

    Use: ``reset()`` (or a fresh instance), ``add_token(id)`` per generated token, read
    ``last_segment`` whenever convenient, ``finalize()`` once at the end. After that,
    ``text`` equals ``tokenizer.decode(tokens)``. Tokens added after ``finalize`` continue
    the text as if it had been cut there (a character split across the cut is lost).
    """

    kind = "base"

    def __init__(self, *, cleanup: bool = False) -> None:
        self._cleanup = cleanup
        self.reset()

    def reset(self) -> None:
        """Forget all streamed state (the tables derived from the tokenizer stay)."""
        self.tokens: list[int] = []
        self._chunks: list[str] = []
        self._unread: list[str] = []
        self._cleaner = _SpaceCleaner() if self._cleanup else None
        self._reset_stream()

    def add_token(self, token_id: int) -> None:
        """Consume one token id; its text appears once it can no longer change."""
        token_id = int(token_id)
        self.tokens.append(token_id)
        self._emit(self._add(token_id))

    def finalize(self) -> None:
        """Flush text held back waiting for more tokens (incomplete characters, spaces)."""
        self._emit(self._flush())
        if self._cleaner is not None:
            self._append(self._cleaner.flush())

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks[:] = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def last_segment(self) -> str:
        """Text emitted since the previous read of this property (reading clears it)."""
        out = "".join(self._unread)
        self._unread.clear()
        return out

    def _emit(self, raw: str) -> None:
        if self._cleaner is not None:
            raw = self._cleaner.push(raw)
        self._append(raw)

    def _append(self, text: str) -> None:
        if text:
            self._chunks.append(text)
            self._unread.append(text)

    # Hooks for the kinds.
    def _reset_stream(self) -> None:
        raise NotImplementedError

    def _add(self, token_id: int) -> str:
        raise NotImplementedError

    def _flush(self) -> str:
        raise NotImplementedError


class _TableDetokenizer(StreamingDetokenizer):
    """Shared by the table-driven kinds: drops special tokens when asked to."""

    def __init__(self, specials: _Specials, *, skip_special_tokens: bool = False) -> None:
        self._skip = specials.special if skip_special_tokens else frozenset()
        super().__init__(cleanup=specials.cleanup)

    def _add(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""  # removed before decoding, as if never generated
        return self._add_piece(token_id)

    def _add_piece(self, token_id: int) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class _BPETables:
    specials: _Specials
    pieces: tuple[bytes | None, ...]  # id -> bytes; None: an id the tokenizer does not know


class BPEStreamingDetokenizer(_TableDetokenizer):
    """Byte-level BPE (GPT-2 style ``ByteLevel`` decoder)."""

    kind = "bpe"

    def __init__(self, tables: _BPETables, *, skip_special_tokens: bool = False) -> None:
        self._pieces = tables.pieces
        super().__init__(tables.specials, skip_special_tokens=skip_special_tokens)

    def _reset_stream(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _add_piece(self, token_id: int) -> str:
        piece = self._pieces[token_id] if 0 <= token_id < len(self._pieces) else None
        return self._utf8.decode(piece) if piece else ""

    def _flush(self) -> str:
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


@dataclass(frozen=True)
class _SPMTables:
    specials: _Specials
    raw: tuple[str | None, ...]  # id -> token string (an added token's content)
    pieces: tuple[str | None, ...]  # id -> text with the marker replaced (not the first token)
    bytes_of: dict[int, int]  # ids of <0xNN> tokens (after the marker step) -> byte
    byte_fallback: bool
    first_drops_marker: bool  # Metaspace: the first token loses every marker
    strip: int  # Strip decoder after Fuse: leading spaces removed from the text


def _fallback_byte(piece: str) -> int | None:
    """The byte of a ``<0xNN>`` token, parsed as Rust's ``u8::from_str_radix`` would."""
    if len(piece) != 6 or not piece.startswith("<0x") or not piece.endswith(">"):
        return None
    digits = piece[3:5]
    hexdigits = "0123456789abcdefABCDEF"
    if digits[1] in hexdigits and (digits[0] in hexdigits or digits[0] == "+"):
        return int(digits.lstrip("+"), 16)
    return None


class SPMStreamingDetokenizer(_TableDetokenizer):
    """SentencePiece-style pieces: ``▁`` marks a space, ``<0xNN>`` tokens carry bytes."""

    kind = "spm"

    def __init__(self, tables: _SPMTables, *, skip_special_tokens: bool = False) -> None:
        self._t = tables
        super().__init__(tables.specials, skip_special_tokens=skip_special_tokens)

    def _reset_stream(self) -> None:
        self._first = True
        self._run = bytearray()
        self._strip_left = self._t.strip

    def _add_piece(self, token_id: int) -> str:
        t = self._t
        if not 0 <= token_id < len(t.raw) or t.raw[token_id] is None:
            return ""
        if self._first and t.first_drops_marker:
            piece = t.raw[token_id].replace(_SPM_MARKER, "")  # type: ignore[union-attr]
            byte = _fallback_byte(piece) if t.byte_fallback else None
        else:
            piece = t.pieces[token_id]  # type: ignore[assignment]
            byte = t.bytes_of.get(token_id)
        self._first = False
        if byte is not None:
            self._run.append(byte)
            return ""
        return self._stripped(self._close_bytes() + piece)

    def _close_bytes(self) -> str:
        if not self._run:
            return ""
        try:
            out = self._run.decode("utf-8")
        except UnicodeDecodeError:
            out = _REPLACEMENT * len(self._run)  # ByteFallback: the whole run is replaced
        self._run.clear()
        return out

    def _stripped(self, text: str) -> str:
        while self._strip_left and text:
            if text[0] != " ":
                self._strip_left = 0
                break
            text = text[1:]
            self._strip_left -= 1
        return text

    def _flush(self) -> str:
        return self._stripped(self._close_bytes())


class NaiveStreamingDetokenizer(StreamingDetokenizer):
    """Re-decodes a short window of recent tokens; works with any decode function.

    The window keeps a few already-emitted tokens in front of the new ones, so rules that
    depend on position (a first token's prefix, spacing between tokens) see the same
    neighbours as in the full decode; new text is what the window's decode adds after the
    part already emitted. Text is held back while it may still change: a trailing U+FFFD
    (perhaps a character the next token completes) and whatever one of the probe tokens
    appended to the window would rewrite (``BPEDecoder`` treats the last token apart, an
    invalid ``<0xFF>`` turns a whole ``ByteFallback`` run into U+FFFD).
    """

    kind = "naive"
    _CONTEXT = 2
    _MAX_WINDOW = 8

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        *,
        probes: tuple[int, ...] = (),
        skip_ids: frozenset[int] = frozenset(),
        cleanup: bool = False,
    ) -> None:
        self._decode = decode
        self._probes = probes
        self._skip = skip_ids
        super().__init__(cleanup=cleanup)

    def _reset_stream(self) -> None:
        self._window: list[int] = []
        self._done = 0  # characters of decode(window) already emitted

    def _add(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""  # dropped before decoding: it must not count as context either
        window, done = self._window, self._done
        window.append(token_id)
        full = self._decode(window)
        end = len(full)
        for probe in self._probes:
            probed = self._decode([*window, probe])
            stop = min(end, len(probed))
            end = done
            while end < stop and full[end] == probed[end]:
                end += 1
        while end > done and full[end - 1] == _REPLACEMENT:
            end -= 1
        out = full[done:end] if end > done else ""
        self._done = max(done, end)
        if len(window) > self._MAX_WINDOW:
            self._rebase(full)
        return out

    def _rebase(self, full: str) -> None:
        """Drop old tokens when the last few alone still account for the unemitted tail."""
        tail = full[self._done :]
        if _REPLACEMENT in tail:
            return  # an incomplete character may reach further back than the kept tokens
        keep = self._window[-self._CONTEXT :]
        kept = self._decode(keep)
        if len(tail) <= len(kept) and kept.endswith(tail):
            self._window = keep
            self._done = len(kept) - len(tail)

    def _flush(self) -> str:
        full = self._decode(self._window) if self._window else ""
        out, self._done = full[self._done :], max(self._done, len(full))
        return out
