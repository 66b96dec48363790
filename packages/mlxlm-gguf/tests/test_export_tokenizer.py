"""Tokenizer metadata written by export(), checked against the Hugging Face tokenizer.

Each tokenizer kind (byte-level BPE under each pre-tokenizer llama.cpp names, and a
SentencePiece BPE converted by transformers from a real `sentencepiece` model) is exported,
read back by the `gguf` reader and re-imported; the imported tokenizer must encode and
decode a multilingual text with emoji exactly as the original does.
"""

from __future__ import annotations

import json

import gguf
import pytest
from mlxlm_core import UnsupportedError, load
from mlxlm_gguf import export, import_gguf
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

pytestmark = pytest.mark.timeout(120)

KINDS = ["gpt-2", "smollm", "llama-bpe", "qwen2", "spm"]
CHAT = [{"role": "user", "content": "Bonjour 👋, ça va? 你好"}]


def _fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    made = {}

    def get(kind: str):
        if kind not in made:
            model, tok = load(model_dir("llama", kind))
            out = tmp_path_factory.mktemp(f"exp-{kind}")
            report = export(model, tok, out / "m.gguf")
            back = import_gguf(report.path, out / "back")
            made[kind] = (tok, report.path, back)
        return made[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_tokenizer_is_identical(kind, exported, builders):
    tok, _, back = exported(kind)
    original = tok.tokenizer
    imported = AutoTokenizer.from_pretrained(back)
    # (Text starting with a space is left out: transformers' SentencePiece conversion adds no
    # dummy prefix there, unlike sentencepiece and llama.cpp, which our import follows.)
    texts = [builders.LONG_TEXT, *builders.CORPUS, "two  spaces ", "🇫🇷👨‍👩‍👧", "<|im_start|>x"]
    for text in texts:
        ids = original(text)["input_ids"]
        assert imported(text)["input_ids"] == ids, text
        assert imported.decode(ids) == original.decode(ids), text
    assert imported.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    ) == original.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert (imported.bos_token_id, imported.eos_token_id) == (
        original.bos_token_id,
        original.eos_token_id,
    )


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_byte_level_metadata(kind, exported, builders):
    tok, path, _ = exported(kind)
    f = _fields(path)
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == kind
    vocab = tok.tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = f["tokenizer.ggml.tokens"]
    assert all(tokens[i] == t for t, i in vocab.items())
    types = f["tokenizer.ggml.token_type"]
    for special in builders.SPECIALS:
        assert types[vocab[special]] == 3  # control
    assert types[vocab["<tool_call>"]] == 4  # user-defined (added, not special)
    merges = json.loads(tok.tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert f["tokenizer.ggml.eos_token_id"] == vocab["<|im_end|>"]
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == builders.CHAT_TEMPLATE


def test_sentencepiece_metadata(exported):
    tok, path, _ = exported("spm")
    f = _fields(path)
    assert f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in f
    tokens, types, scores = (
        f["tokenizer.ggml.tokens"],
        f["tokenizer.ggml.token_type"],
        f["tokenizer.ggml.scores"],
    )
    assert types[tokens.index("<unk>")] == 2
    assert types[tokens.index("<s>")] == 3 and types[tokens.index("</s>")] == 3
    assert types[tokens.index("<0x41>")] == 6  # byte fallback pieces
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_space_prefix"]
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    # A piece made by an earlier merge scores higher (llama.cpp merges best score first).
    merges = json.loads(tok.tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    first, last = (
        "".join(m.split(" ") if isinstance(m, str) else m) for m in (merges[0], merges[-1])
    )
    assert scores[tokens.index(first)] > scores[tokens.index(last)]


def _with_pre(folder, pre_tokenizer) -> PreTrainedTokenizerFast:
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def test_unknown_pre_tokenizer_is_refused_unless_named(model_dir, tmp_path):
    model, _ = load(model_dir("llama"))
    odd = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok = _with_pre(model_dir("llama"), odd)
    with pytest.raises(UnsupportedError, match="pre_tokenizer"):
        export(model, tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    report = export(model, tok, tmp_path / "m.gguf", pre_tokenizer="gpt-2")
    assert _fields(report.path)["tokenizer.ggml.pre"] == "gpt-2"


def test_wordpiece_is_refused(model_dir, tmp_path):
    from tokenizers import models, trainers

    model, _ = load(model_dir("llama"))
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.train_from_iterator(["hello world"], trainers.WordPieceTrainer(special_tokens=["[UNK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]")
    with pytest.raises(UnsupportedError, match="WordPiece"):
        export(model, tok, tmp_path / "m.gguf")


def test_embedding_rows_beyond_the_vocabulary_get_placeholders(model_dir, tmp_path):
    """Models often pad their embedding matrix; llama.cpp needs one token per row."""
    from mlxlm_core.models import get_model_classes

    folder = model_dir("qwen2")
    _, tok = load(folder)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += 11
    model_cls, args_cls = get_model_classes("qwen2")
    model = model_cls(args_cls.from_dict(config))
    f = _fields(export(model, tok, tmp_path / "m.gguf").path)
    assert len(f["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert f["tokenizer.ggml.tokens"][-1] == f"[PAD{config['vocab_size'] - 1}]"
    assert f["tokenizer.ggml.token_type"][-11:] == [5] * 11
