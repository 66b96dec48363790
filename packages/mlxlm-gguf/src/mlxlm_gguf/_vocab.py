"""A Hugging Face tokenizer -> GGUF tokenizer metadata (export direction).

Two kinds are written, the two llama.cpp implements for the models we export:

- byte-level BPE (``tokenizer.ggml.model = "gpt2"``): the vocabulary in id order, the
  merges, and the pre-tokenizer by llama.cpp's name. The name is found by comparing the
  tokenizer.json pre-tokenizer with the ones the importer builds for each name (one table,
  `_tokenizer`), never guessed: an unknown split is refused unless the caller names it.
- SentencePiece-style BPE with byte fallback (``"llama"``): pieces, one score per piece and
  token types. tokenizer.json keeps merges but no scores, and llama.cpp's SentencePiece
  tokenizer merges the adjacent pair whose concatenation scores highest, so each piece
  scores minus the rank of the first merge producing it: the same merge order.

Special ids, the add-BOS/EOS behaviour (measured by encoding with and without special
tokens, so it holds whatever mechanism the tokenizer uses) and the chat template go along.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import gguf
from mlxlm_core import InvalidArgumentError, TokenizerWrapper, UnsupportedError

from ._tokenizer import (
    BYTE,
    CONTROL,
    EXPORT_PRES,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    pre_tokenizer_name,
)

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
SPACE = "▁"


@dataclass
class Vocab:
    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    special: dict[str, int]  # "bos"/"eos"/"eot"/"unknown"/"padding" -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | dict[str, str] | None


def _hf(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside a TokenizerWrapper (or the argument itself)."""
    inner = getattr(tokenizer, "tokenizer", None)
    hf = inner if inner is not None and hasattr(inner, "backend_tokenizer") else tokenizer
    if not hasattr(hf, "backend_tokenizer"):
        raise UnsupportedError(
            f"GGUF export needs a fast (tokenizer.json) tokenizer; got {type(tokenizer).__name__}"
        )
    return hf


def _types_of(spec: dict[str, Any]) -> tuple[str, bool]:
    """("byte-level" | "sentencepiece", add_space_prefix) from the tokenizer.json parts."""
    parts = [spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")]
    text = json.dumps(parts, ensure_ascii=False)
    if '"ByteLevel"' in text:
        return "byte-level", False
    if spec["model"].get("byte_fallback") or SPACE in text:
        prefix = '"Prepend"' in text or any(
            f'"prepend_scheme": "{p}"' in text for p in ("first", "always")
        )
        return "sentencepiece", prefix
    raise UnsupportedError(
        "GGUF export supports byte-level BPE and SentencePiece-style BPE tokenizers; "
        "this tokenizer is neither"
    )


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for m in model.get("merges") or []:
        left, right = (m.split(" ", 1) if isinstance(m, str) else m)[:2]
        out.append((left, right))
    return out


def _adds(hf: Any, token_id: int | None, *, first: bool) -> bool:
    """Whether encoding with special tokens puts `token_id` at the start (or end)."""
    if token_id is None:
        return False
    plain = list(hf.encode("a", add_special_tokens=False))
    full = list(hf.encode("a", add_special_tokens=True))
    if len(full) <= len(plain):
        return False
    return (full[0] if first else full[-1]) == token_id


def vocab_from_tokenizer(
    tokenizer: Any, *, vocab_size: int, pre_tokenizer: str | None = None
) -> Vocab:
    """Everything GGUF needs to rebuild `tokenizer`, for a model with `vocab_size` rows."""
    hf = _hf(tokenizer)
    spec = json.loads(hf.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(
            f"GGUF export of {model.get('type', 'unknown')} tokenizers is not supported (BPE only)"
        )
    kind, add_space_prefix = _types_of(spec)
    ids: dict[str, int] = hf.backend_tokenizer.get_vocab(with_added_tokens=True)
    n = max(ids.values(), default=-1) + 1
    if n > vocab_size:
        raise InvalidArgumentError(
            f"the tokenizer has ids up to {n - 1} but the model has only {vocab_size} embeddings"
        )
    # Models often pad their embedding matrix; those rows get placeholder tokens.
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, i in ids.items():
        tokens[i], types[i] = token, NORMAL
    added = {t["id"]: bool(t.get("special")) for t in spec.get("added_tokens") or []}
    unk_id = hf.unk_token_id
    for i, is_special in added.items():
        if 0 <= i < vocab_size:
            types[i] = CONTROL if is_special else USER_DEFINED
    if unk_id is not None and kind == "sentencepiece":
        # (byte-level BPE never produces its "unknown" token: it stays a control token, as
        # llama.cpp's converter writes it)
        types[unk_id] = UNKNOWN

    merges = _merges(model)
    scores: list[float] | None = None
    pre = None
    if kind == "byte-level":
        pre = pre_tokenizer or pre_tokenizer_name(spec.get("pre_tokenizer"))
        if pre is None:
            raise UnsupportedError(
                "this byte-level tokenizer's pre-tokenizer matches none llama.cpp knows by "
                f"name here ({', '.join(EXPORT_PRES)}); pass pre_tokenizer=NAME if you "
                "know which one it is"
            )
        merge_lines: list[str] | None = [f"{a} {b}" for a, b in merges]
    else:
        merge_lines = None
        scores = [0.0] * vocab_size
        rank_of: dict[str, int] = {}
        for rank, (a, b) in enumerate(merges):
            rank_of.setdefault(a + b, rank)
        for token, i in ids.items():
            if types[i] != NORMAL:
                continue
            if model.get("byte_fallback") and _BYTE_PIECE.match(token):
                types[i] = BYTE
            elif token in rank_of:
                scores[i] = -float(rank_of[token])
            else:  # a single character (or an unreachable piece): below every merge
                scores[i] = -float(len(merges) + i)

    special: dict[str, int] = {}
    for key, value in (
        ("bos", hf.bos_token_id),
        ("eos", hf.eos_token_id),
        ("unknown", unk_id),
        ("padding", hf.pad_token_id),
    ):
        if value is not None:
            special[key] = int(value)
    # Chat models often end a turn on a token other than EOS (generation_config.json); the
    # wrapper knows them. llama.cpp takes one end-of-turn id.
    eos_ids = tokenizer.eos_token_ids if isinstance(tokenizer, TokenizerWrapper) else set()
    extra = sorted(set(eos_ids) - {hf.eos_token_id})
    if len(extra) == 1:
        special["eot"] = int(extra[0])
    template = getattr(tokenizer, "chat_template", None)
    return Vocab(
        model="gpt2" if kind == "byte-level" else "llama",
        pre=pre,
        tokens=tokens,
        types=types,
        scores=scores,
        merges=merge_lines,
        special=special,
        add_bos=_adds(hf, hf.bos_token_id, first=True),
        add_eos=_adds(hf, hf.eos_token_id, first=False),
        add_space_prefix=add_space_prefix if kind == "sentencepiece" else None,
        chat_template=template if isinstance(template, (str, dict)) else None,
    )


def write_vocab(w: gguf.GGUFWriter, v: Vocab) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre is not None:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges is not None:
        w.add_token_merges(v.merges)
    setters = {
        "bos": w.add_bos_token_id,
        "eos": w.add_eos_token_id,
        "eot": w.add_eot_token_id,
        "unknown": w.add_unk_token_id,
        "padding": w.add_pad_token_id,
    }
    for key, token_id in v.special.items():
        setters[key](token_id)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if isinstance(v.chat_template, dict):
        w.add_chat_template([{"name": k, "template": t} for k, t in v.chat_template.items()])
    elif v.chat_template:
        w.add_chat_template(v.chat_template)
