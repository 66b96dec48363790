"""Choosing the streaming detokenizer for a loaded Hugging Face tokenizer, and building the
per-id tables it reads (once per tokenizer; every detokenizer made afterwards shares them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from ._detokenizers import (
    _SPM_MARKER,
    BPEStreamingDetokenizer,
    NaiveStreamingDetokenizer,
    SPMStreamingDetokenizer,
    StreamingDetokenizer,
    _BPETables,
    _clean,
    _fallback_byte,
    _Specials,
    _SPMTables,
)

__all__ = ["DetokenizerFactory", "make_detokenizer_factory"]


@dataclass(frozen=True)
class DetokenizerFactory:
    """Makes fresh detokenizers of one kind; the tables behind them are built once."""

    kind: str
    _make: Callable[[bool], StreamingDetokenizer]

    def __call__(self, *, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        return self._make(skip_special_tokens)


def _byte_level_map() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: printable bytes stand for themselves and
    the rest are shifted above U+0100, so every byte has a visible, non-space character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if chr(b) not in table:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _byte_level_bytes(token: str, table: dict[str, int]) -> bytes:
    out = bytearray()
    for ch in token:
        b = table.get(ch)
        if b is None:  # like tokenizers: a token outside the alphabet is taken as UTF-8 text
            return token.encode("utf-8")
        out.append(b)
    return bytes(out)


def _token_strings(backend) -> list[str | None]:
    """id -> the string the decoder receives: an added token's content, else the model's."""
    vocab = backend.get_vocab(with_added_tokens=False)
    added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
    size = max([*vocab.values(), *added], default=-1) + 1
    table: list[str | None] = [None] * size
    for token, i in vocab.items():
        table[i] = token
    for i, content in added.items():
        table[i] = content
    return table


def _decoder_json(backend) -> dict | None:
    decoder = backend.decoder
    return None if decoder is None else json.loads(decoder.__getstate__())


def _spm_options(spec: dict | None) -> dict | None:
    """Recognise ``[Replace ▁→' ' | Metaspace ▁] [ByteFallback] [Fuse] [Strip ' ' n 0]``.

    Strip is only accepted after Fuse, where it acts once on the whole text (before Fuse it
    would strip every token).
    """
    if spec is None:
        return None
    steps = list(spec["decoders"]) if spec.get("type") == "Sequence" else [spec]
    if not steps:
        return None
    head = steps.pop(0)
    if head == {"type": "Replace", "pattern": {"String": _SPM_MARKER}, "content": " "}:
        first_drops = False
    elif head.get("type") == "Metaspace" and head.get("replacement") == _SPM_MARKER:
        first_drops = head.get("prepend_scheme", "always") != "never"
    else:
        return None
    opts = {"first_drops_marker": first_drops, "byte_fallback": False, "strip": 0}
    if steps and steps[0].get("type") == "ByteFallback":
        opts["byte_fallback"] = True
        steps.pop(0)
    fused = bool(steps) and steps[0].get("type") == "Fuse"
    if fused:
        steps.pop(0)
    if fused and steps and steps[0].get("type") == "Strip":
        strip = steps.pop(0)
        if strip.get("content") != " " or strip.get("stop", 0) != 0:
            return None
        opts["strip"] = int(strip.get("start", 0))
    return None if steps else opts


def _is_plain_fast(tokenizer) -> bool:
    """True when ``decode`` is transformers' own: the backend decode plus optional cleanup."""
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    cls = type(tokenizer)
    return (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls._decode is PreTrainedTokenizerFast._decode
        and cls.decode is PreTrainedTokenizerBase.decode
    )


def _cleanup_in_effect(tokenizer, backend) -> bool:
    """Whether ``tokenizer.decode`` applies ``clean_up_tokenization`` by default.

    Transformers 5 ignores the flag for BPE models; rather than trust that rule across
    versions, probe it on a text the cleanup changes, falling back to the rule.
    """
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    ids = tokenizer.encode("a . b", add_special_tokens=False)
    raw = backend.decode(ids, skip_special_tokens=False)
    if _clean(raw) != raw:
        return tokenizer.decode(ids) != raw
    flag = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    return type(backend.model).__name__ != "BPE" or bool(getattr(tokenizer, flag, False))


def _probe_ids(tokenizer) -> tuple[int, ...]:
    """Tokens to append when testing whether the text so far is final: an ordinary one,
    and the byte token ``<0xFF>`` (never valid UTF-8) where the vocabulary has it."""
    probes: list[int] = []
    try:
        ids = tokenizer.encode("a", add_special_tokens=False)
        if len(ids):
            probes.append(int(ids[-1]))
        byte = tokenizer.convert_tokens_to_ids("<0xFF>")
        if isinstance(byte, int) and byte != tokenizer.unk_token_id:
            probes.append(byte)
    except Exception:  # a custom tokenizer may lack these methods; probes are optional
        pass
    return tuple(probes)


def make_detokenizer_factory(tokenizer) -> DetokenizerFactory:
    """Choose the streaming detokenizer kind for a loaded Hugging Face tokenizer.

    The kind comes from the decoder the live tokenizer uses (transformers 5 rebuilds the
    pipeline for classes such as ``LlamaTokenizer``, so ``tokenizer.json`` alone can be
    stale): ``ByteLevel`` → bpe, ``Replace ▁``/``Metaspace`` (+ ``ByteFallback``) → spm,
    anything else, or a tokenizer class with its own ``decode``, → naive.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    probes = _probe_ids(tokenizer)
    if backend is None or not _is_plain_fast(tokenizer):

        def make_custom(skip: bool) -> StreamingDetokenizer:
            special = frozenset(getattr(tokenizer, "all_special_ids", ()))
            return NaiveStreamingDetokenizer(
                lambda ids: tokenizer.decode(ids, skip_special_tokens=skip),
                probes=probes,
                skip_ids=special if skip else frozenset(),
            )

        return DetokenizerFactory("naive", make_custom)

    spec = _decoder_json(backend)
    cleanup = _cleanup_in_effect(tokenizer, backend)
    added = backend.get_added_tokens_decoder()
    specials = _Specials(frozenset(i for i, t in added.items() if t.special), cleanup)
    strings = _token_strings(backend)
    if spec is not None and spec.get("type") == "ByteLevel":
        table = _byte_level_map()
        bpe = _BPETables(
            specials,
            tuple(None if t is None else _byte_level_bytes(t, table) for t in strings),
        )
        return DetokenizerFactory(
            "bpe", lambda skip: BPEStreamingDetokenizer(bpe, skip_special_tokens=skip)
        )

    opts = _spm_options(spec)
    if opts is not None:
        raw = tuple(strings)
        pieces = tuple(None if t is None else t.replace(_SPM_MARKER, " ") for t in raw)
        bytes_of: dict[int, int] = {}
        if opts["byte_fallback"]:
            for i, piece in enumerate(pieces):
                byte = None if piece is None else _fallback_byte(piece)
                if byte is not None:
                    bytes_of[i] = byte
        spm = _SPMTables(specials, raw, pieces, bytes_of, **opts)
        return DetokenizerFactory(
            "spm", lambda skip: SPMStreamingDetokenizer(spm, skip_special_tokens=skip)
        )

    def make_naive(skip: bool) -> StreamingDetokenizer:
        return NaiveStreamingDetokenizer(
            lambda ids: backend.decode(ids, skip_special_tokens=False),
            probes=probes,
            skip_ids=specials.special if skip else frozenset(),
            cleanup=cleanup,
        )

    return DetokenizerFactory("naive", make_naive)
