"""Rebuild a Hugging Face tokenizer from GGUF metadata with the `tokenizers` library.

transformers can read GGUF tokenizers only with torch installed, which this workspace
never depends on, so we assemble the same pieces ourselves: the BPE model from the
tokens and merges, the pre-tokenizer that `tokenizer.ggml.pre` names (llama.cpp's list of
known tokenizers), control tokens as special added tokens, and the chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxlm_core import CheckpointError, UnsupportedError
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from ._reader import GGUFFile
from ._spm import build_spm_tokenizer

# llama.cpp token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split patterns as the tokenizer.json files spell them (llama.cpp: "llama-bpe", "qwen2").
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = _LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's names for Llama 3's pre-tokenizer.
LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3")
QWEN2_PRES = ("qwen2", "deepseek-r1-qwen")


def _byte_level(*, use_regex: bool) -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, _byte_level(use_regex=False)])


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """(pre-tokenizer, ignore_merges) for a `tokenizer.ggml.pre` value.

    Unknown values are refused rather than guessed: a wrong split gives plausible but
    different ids, which silently degrades every generation.
    """
    if pre in ("default", "gpt-2", "gpt2"):
        return _byte_level(use_regex=True), False
    if pre == "smollm":
        # SmolLM's tokenizer.json: single digits first, then GPT-2's byte-level regex.
        seq = [pre_tokenizers.Digits(individual_digits=True), _byte_level(use_regex=True)]
        return pre_tokenizers.Sequence(seq), False
    if pre in LLAMA3_PRES:
        # Llama 3 looks whole words up in the vocabulary before merging (llama.cpp agrees).
        return _split_then_bytes(_LLAMA3_PATTERN), True
    if pre in QWEN2_PRES:
        return _split_then_bytes(_QWEN2_PATTERN), False
    raise UnsupportedError(f"GGUF pre-tokenizer {pre!r} is not supported")


# What export writes for a byte-level BPE whose pre-tokenizer matches one of ours.
EXPORT_PRES = ("gpt-2", "smollm", "llama-bpe", "qwen2")


def _signature(node: Any) -> Any:
    """A pre-tokenizer's JSON without what cannot change ids (offset trimming)."""
    if isinstance(node, dict):
        if node.get("type") == "Sequence" and len(node.get("pretokenizers", [])) == 1:
            return _signature(node["pretokenizers"][0])
        return {k: _signature(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_signature(v) for v in node]
    return node


def pre_tokenizer_name(pre_json: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, if it is one we know."""
    if pre_json is None:
        return None
    wanted = _signature(pre_json)
    for name in EXPORT_PRES:
        built = json.loads(_pre_tokenizer(name)[0].__getstate__())
        if _signature(built) == wanted:
            return name
    return None


@dataclass
class SpecialTokens:
    """Ids named by the GGUF metadata, with their token strings."""

    bos_id: int | None
    eos_ids: list[int]
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool


def special_tokens(f: GGUFFile, n_tokens: int) -> SpecialTokens:
    def tid(key: str) -> int | None:
        value = f.get(f"tokenizer.ggml.{key}_token_id")
        if value is None:
            return None
        if not 0 <= int(value) < n_tokens:
            raise CheckpointError(
                f"{f.path}: tokenizer.ggml.{key}_token_id {value} is out of range"
            )
        return int(value)

    eos_ids: list[int] = []
    for key in ("eos", "eot", "eom"):
        if (i := tid(key)) is not None and i not in eos_ids:
            eos_ids.append(i)
    model = f.get("tokenizer.ggml.model")
    pre = f.get("tokenizer.ggml.pre") or "default"
    # llama.cpp's defaults when the flag is absent: SentencePiece and the Llama 3 group of
    # BPE pre-tokenizers add BOS, other BPE tokenizers do not.
    bos_by_default = model == "llama" or (model == "gpt2" and pre in LLAMA3_PRES)
    return SpecialTokens(
        bos_id=tid("bos"),
        eos_ids=eos_ids,
        pad_id=tid("padding"),
        unk_id=tid("unknown"),
        add_bos=bool(f.get("tokenizer.ggml.add_bos_token", bos_by_default)),
        add_eos=bool(f.get("tokenizer.ggml.add_eos_token", False)),
    )


def _template(tokens: list[str], sp: SpecialTokens) -> processors.TemplateProcessing | None:
    """A post-processor adding BOS/EOS the way the GGUF flags ask."""
    pre_ids = [sp.bos_id] if sp.add_bos and sp.bos_id is not None else []
    post_ids = sp.eos_ids[:1] if sp.add_eos else []
    if not pre_ids and not post_ids:
        return None
    pre, post = [tokens[i] for i in pre_ids], [tokens[i] for i in post_ids]
    single = [f"{t}:0" for t in pre] + ["$A:0"] + [f"{t}:0" for t in post]
    pair = single + [f"{t}:1" for t in pre] + ["$B:1"] + [f"{t}:1" for t in post]
    ids = {tokens[i]: i for i in pre_ids + post_ids}
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))


def _bpe_tokenizer(f: GGUFFile, tokens: list[str]) -> Tokenizer:
    merges_raw = f.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise CheckpointError(f"{f.path}: BPE tokenizer without tokenizer.ggml.merges")
    merges: list[tuple[str, str]] = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise CheckpointError(f"{f.path}: malformed merge {m!r}")
        merges.append((left, right))
    pre = f.get("tokenizer.ggml.pre") or "default"
    pre_tok, ignore_merges = _pre_tokenizer(pre)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # keep the first id of a duplicated string
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    except Exception as e:  # the Rust library raises a bare Exception (merge of unknown token)
        raise CheckpointError(f"{f.path}: inconsistent BPE vocabulary ({e})") from e
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    if pre in QWEN2_PRES:
        tok.normalizer = normalizers.NFC()  # as Qwen's own tokenizer.json does
    return tok


def build_tokenizer(f: GGUFFile) -> tuple[Tokenizer, SpecialTokens]:
    """The tokenizer the GGUF metadata describes, and its special ids."""
    tokens = f.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{f.path}: no tokenizer.ggml.tokens in the metadata")
    types = f.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"{f.path}: token_type and tokens differ in length")
    sp = special_tokens(f, len(tokens))
    model = f.get("tokenizer.ggml.model")
    if model == "gpt2":
        tok = _bpe_tokenizer(f, tokens)
        byte_level_post: processors.PostProcessor | None = processors.ByteLevel(trim_offsets=False)
    elif model == "llama":
        scores = f.get("tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise CheckpointError(f"{f.path}: SentencePiece tokenizer without one score per token")
        unk = tokens[sp.unk_id] if sp.unk_id is not None else None
        add_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
        tok = build_spm_tokenizer(tokens, scores, types, unk_token=unk, add_prefix_space=add_prefix)
        byte_level_post = None
    else:
        raise UnsupportedError(f"GGUF tokenizer model {model!r} is not supported")

    # Control tokens are matched whole in input text and skipped when decoding with
    # skip_special_tokens; user-defined ones are matched whole but decoded as text.
    added = []
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind == CONTROL or i in (sp.bos_id, sp.unk_id, *sp.eos_ids):
            added.append(AddedToken(t, special=True, normalized=False))
        elif kind == USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
    tok.add_tokens(added)

    template = _template(tokens, sp)
    steps = [p for p in (byte_level_post, template) if p is not None]
    if len(steps) == 1:
        tok.post_processor = steps[0]
    elif steps:
        tok.post_processor = processors.Sequence(steps)
    return tok, sp


def write_tokenizer_files(
    f: GGUFFile, out_dir: Path, *, tokenizer: Tokenizer, special: SpecialTokens, context_length: int
) -> None:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json."""
    tok, sp = tokenizer, special
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    tok.save(str(out_dir / "tokenizer.json"))

    def name(i: int | None) -> str | None:
        return tokens[i] if i is not None else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(sp.bos_id),
        "eos_token": name(sp.eos_ids[0] if sp.eos_ids else None),
        "pad_token": name(sp.pad_id),
        "unk_token": name(sp.unk_id),
        "add_bos_token": sp.add_bos,
        "add_eos_token": sp.add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    if template := f.get("tokenizer.chat_template"):
        config["chat_template"] = template
    config = {k: v for k, v in config.items() if v is not None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    gen: dict[str, Any] = {}
    if sp.bos_id is not None:
        gen["bos_token_id"] = sp.bos_id
    if sp.eos_ids:
        gen["eos_token_id"] = sp.eos_ids[0] if len(sp.eos_ids) == 1 else sp.eos_ids
    if sp.pad_id is not None:
        gen["pad_token_id"] = sp.pad_id
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
