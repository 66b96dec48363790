"""Tiny tokenizers built in code with the ``tokenizers`` library, saved as model directories.

Three families, one per streaming detokenizer kind: a byte-level BPE (GPT-2 / Llama 3 /
Qwen style), a SentencePiece-style BPE with ``<0xNN>`` byte fallback (Llama 2 / Mistral /
Gemma style, several decoder variants) and a WordPiece (BERT style, decoded naively, with
transformers' space cleanup on). Each trains in milliseconds on a small multilingual text.

Test modules load this file by path: pytest runs with ``--import-mode=importlib``, so the
tests folder is not on ``sys.path``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Isn't it? We're sure, you've seen it!",
    "Héllo wörld, naïve café, crème brûlée, déjà vu, Ångström, façade, jalapeño.",
    "Привет, как дела? Всё хорошо. Ελληνικά γράμματα. שלום עולם. مرحبا بالعالم.",
    "你好，世界！今天天气很好。我们去公园散步吧。日本語のテキストも少し。한국어 문장입니다.",
    "Emoji: 😀 🎉 👍🏽 🇫🇷 👨‍👩‍👧 ❤️ 🚀 — and math: ∑ x² ≤ ∞, π ≈ 3.14159.",
    "def add(a, b):\n    return a + b  # tabs\tand\nnewlines\r\n  indented   spaces",
    "I'm here, he's there, they're gone, don't stop . , ! ? ' ' n't",
]

# A ChatML template with a system prompt and tool definitions, in the style of Qwen 2.5
# (text is emitted by expressions, so whitespace control only trims the template's layout).
CHATML_TEMPLATE = r"""
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- '# Tools\n<tools>' }}
{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
{{- '\n</tools><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if not (loop.first and message.role == 'system') %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _write_dir(
    path: Path,
    tok: Tokenizer,
    config: dict,
    *,
    generation: dict | None = None,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def byte_bpe_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=CHAT_SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    # A non-special added token: decoded verbatim, and it still splits decoder runs.
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    return tok


def build_byte_bpe(path: Path, *, config: dict | None = None) -> Path:
    """Byte-level BPE with ChatML specials; generation_config lists two EOS ids."""
    tok = byte_bpe_tokenizer()
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        **(config or {}),
    }
    generation = {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}
    return _write_dir(path, tok, cfg, generation=generation)


SPM_DECODERS = {
    # Llama 2 / Mistral: the leading space of each decoder run is stripped.
    "llama": lambda: decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    ),
    # Gemma: no strip.
    "gemma": lambda: decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    ),
    # Metaspace then byte fallback: the first token of a run loses its markers.
    "metaspace": lambda: decoders.Sequence(
        [
            decoders.Metaspace(replacement="▁", prepend_scheme="first"),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
    ),
    # T5 style: Metaspace alone, byte tokens print literally.
    "metaspace_plain": lambda: decoders.Metaspace(replacement="▁", prepend_scheme="always"),
}


def spm_tokenizer(decoder: str = "llama") -> Tokenizer:
    """A BPE over ``▁``-marked pieces with the 256 ``<0xNN>`` byte tokens in its vocabulary."""
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainee = Tokenizer(models.BPE(unk_token="<unk>"))
    trainee.pre_tokenizer = pre
    trainee.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    )
    trained = json.loads(trainee.to_str())["model"]
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.pre_tokenizer = pre
    tok.decoder = SPM_DECODERS[decoder]()
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    # Llama-style: encoding with special tokens prepends <s>.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok


def build_spm(path: Path, *, decoder: str = "llama", config: dict | None = None) -> Path:
    tok = spm_tokenizer(decoder)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        **(config or {}),
    }
    return _write_dir(path, tok, cfg)


def wordpiece_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", "[PAD]", *CHAT_SPECIALS], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def build_wordpiece(path: Path, *, config: dict | None = None) -> Path:
    """WordPiece with transformers' ``clean_up_tokenization_spaces`` on (it is not BPE)."""
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "[UNK]",
        "eos_token": "<|im_end|>",
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        **(config or {}),
    }
    return _write_dir(path, wordpiece_tokenizer(), cfg)
