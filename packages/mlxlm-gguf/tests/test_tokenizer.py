"""Tokenizers rebuilt from GGUF metadata, checked against independently built references."""

from __future__ import annotations

import io
import json

import pytest
from mlxlm_core import UnsupportedError
from mlxlm_gguf import import_gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

pytestmark = pytest.mark.timeout(60)

TEXTS = [
    "Hello world! The quick brown fox.",
    "In 2024 there were 365 days; 1234567 seconds?",
    "héllo wörld — naïve café, 東京 ünïcödé ✓ 𝔘",
    "  leading spaces and trailing   ",
    "line one\nline two\r\n\ttabbed\n\n",
    "I'LL say they're here, isn't it?",
    "the theory of the thing: they think that these are there.",
]
CHAT_TEXT = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def _imported(make_gguf, tmp_path, **spec) -> tuple[Tokenizer, object, object]:
    built = make_gguf(**spec)
    out = import_gguf(built.path, tmp_path / "model")
    return Tokenizer.from_file(str(out / "tokenizer.json")), out, built


def _direct(built, pre) -> Tokenizer:
    """The byte-level BPE built straight from the vocabulary, as the test knows it."""
    vocab = {t: i for i, t in enumerate(built.tokens)}
    merges = [tuple(m.split(" ")) for m in built.merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in built.tokens[:3]])
    return tok


def test_smollm_pre_tokenizer_matches_direct_build(make_gguf, tmp_path):
    ours, _, built = _imported(make_gguf, tmp_path, pre="smollm")
    ref = _direct(
        built,
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        ),
    )
    for text in [*TEXTS, CHAT_TEXT]:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text
    # Digits one per token, each the vocabulary's own entry for that digit.
    assert ours.encode("2024").ids == [built.tokens.index(d) for d in "2024"]
    # Control tokens are matched whole in text: ids straight from the metadata's list.
    ids = ours.encode(CHAT_TEXT).ids
    assert ids[0] == built.tokens.index("<|im_start|>") == 1
    assert built.tokens.index("<|im_end|>") in ids


def test_default_pre_tokenizer_matches_transformers_gpt2(make_gguf, tmp_path):
    from transformers import GPT2Tokenizer

    ours, _, built = _imported(make_gguf, tmp_path, pre="default")
    # GPT-2's own file format: vocab.json + merges.txt, read by transformers.
    ref_dir = tmp_path / "gpt2"
    ref_dir.mkdir()
    (ref_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(built.tokens)}))
    (ref_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(built.merges) + "\n")
    ref = GPT2Tokenizer.from_pretrained(ref_dir)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids and ids == ref(text)["input_ids"], text


# Llama 3's pre-tokenizer as its tokenizer.json spells it.
LLAMA3_PRE_JSON = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {
                "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}


def test_llama_bpe_pre_tokenizer_matches_llama3_json(make_gguf, tmp_path):
    ours, _, _ = _imported(make_gguf, tmp_path, pre="llama-bpe")
    spec = json.loads(ours.to_str())
    spec["pre_tokenizer"] = LLAMA3_PRE_JSON
    spec["model"]["ignore_merges"] = True
    ref = Tokenizer.from_str(json.dumps(spec))
    for text in TEXTS:
        assert ours.encode(text).ids == ref.encode(text).ids, text
    # Numbers split in groups of three, each group a plain byte-level BPE word.
    pieces = ours.pre_tokenizer.pre_tokenize_str("1234567")
    assert [p for p, _ in pieces] == ["123", "456", "7"]


def test_transformers_loads_the_directory(make_gguf, tmp_path):
    from transformers import AutoTokenizer

    ours, out, built = _imported(make_gguf, tmp_path, pre="smollm")
    hf = AutoTokenizer.from_pretrained(out)
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    for text in TEXTS:
        assert hf(text)["input_ids"] == ours.encode(text).ids
    msgs = [{"role": "user", "content": "hello"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == CHAT_TEXT
    ids = hf(CHAT_TEXT)["input_ids"]
    assert "<|im_start|>" not in hf.decode(ids, skip_special_tokens=True)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False and cfg["model_max_length"] == built.spec.ctx


def test_add_bos_token_flag(make_gguf, tmp_path):
    ours, out, built = _imported(make_gguf, tmp_path, add_bos=True)
    plain = _direct(
        built,
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        ),
    )
    assert ours.encode("Hello world").ids == [1, *plain.encode("Hello world").ids]
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


@pytest.mark.parametrize(("pre", "adds_bos"), [("llama-bpe", True), ("smollm", False)])
def test_missing_add_bos_flag_follows_llama_cpp_defaults(make_gguf, tmp_path, pre, adds_bos):
    ours, out, _ = _imported(make_gguf, tmp_path, pre=pre, add_bos=None)
    ids = ours.encode("Hello world").ids
    assert (ids[0] == 1) is adds_bos
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is adds_bos


def test_unknown_pre_tokenizer_is_refused(make_gguf, tmp_path):
    built = make_gguf(pre="made-up-pre")
    with pytest.raises(UnsupportedError, match="made-up-pre"):
        import_gguf(built.path, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def _train_spm():
    spm = pytest.importorskip("sentencepiece")
    corpus = [t for t in TEXTS[:3] + TEXTS[5:]] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        vocab_size=330,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        # llama.cpp's convert maps SentencePiece piece kinds to these token types.
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.is_unused(i):
            types.append(5)
        else:
            types.append(1)
    return sp, (tokens, scores, types)


@pytest.mark.parametrize("add_bos", [False, True])
def test_sentencepiece_tokenizer_matches_sentencepiece(make_gguf, tmp_path, add_bos):
    sp, vocab = _train_spm()
    ours, _, _ = _imported(make_gguf, tmp_path, spm=vocab, add_bos=add_bos)
    # Includes characters the trainer never saw: both sides must fall back to byte pieces.
    for text in [*TEXTS, "unseen ☃ and ß€ here"]:
        expected = ([sp.bos_id()] if add_bos else []) + sp.encode(text)
        ids = ours.encode(text).ids
        assert ids == expected, text
        assert ours.decode(ids) == sp.decode(expected), text
