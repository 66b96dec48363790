"""Streaming detokenizers against the reference: ``tokenizer.decode`` of the whole sequence.

Every kind must emit, piece by piece, exactly what transformers' ``decode`` returns for the
same ids, for ANY id sequence: random ids (split multi-byte characters, lone byte tokens,
special and added tokens, ids outside the vocabulary) and encodings of random Unicode text
cut at random points. The tokenizers are tiny ones trained in code (see
``_fixtures_tokenizers.py``); the reference is transformers + tokenizers, not our code.
"""

from __future__ import annotations

import _fixtures_tokenizers as fx  # registered by conftest.py
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlxlm_core._detokenizer_select import _probe_ids, make_detokenizer_factory
from mlxlm_core._detokenizers import NaiveStreamingDetokenizer
from mlxlm_core._tokenizer import TokenizerWrapper, load_tokenizer
from tokenizers import decoders

PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SPM_VARIANTS = [*fx.SPM_DECODERS, "llama_class"]


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory) -> TokenizerWrapper:
    return load_tokenizer(fx.build_byte_bpe(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="module")
def spm_all(tmp_path_factory) -> dict[str, TokenizerWrapper]:
    out = {}
    for variant in fx.SPM_DECODERS:
        out[variant] = load_tokenizer(
            fx.build_spm(tmp_path_factory.mktemp(variant), decoder=variant)
        )
    # transformers 5's LlamaTokenizer rebuilds its decoder instead of reading tokenizer.json's.
    llama = fx.build_spm(
        tmp_path_factory.mktemp("llama_class"), config={"tokenizer_class": "LlamaTokenizer"}
    )
    out["llama_class"] = load_tokenizer(llama)
    return out


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory) -> TokenizerWrapper:
    return load_tokenizer(fx.build_wordpiece(tmp_path_factory.mktemp("wp")))


def _interesting_ids(tok: TokenizerWrapper) -> list[int]:
    """Ids that stress a detokenizer: byte pieces, markers, specials, punctuation, ``##``."""
    out = []
    for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if t and (
            len(t) == 1
            or t.startswith(("<", "##", "▁", "Ġ"))
            or t in ("'", ".", ",", "s", "n", "t", "ve")
        ):
            out.append(i)
    return out


def _id_lists(tok: TokenizerWrapper, *, max_size: int = 30):
    ids = st.one_of(
        st.sampled_from(_interesting_ids(tok)),
        st.integers(min_value=0, max_value=len(tok) + 2),  # a few unknown ids too
    )
    return st.lists(ids, max_size=max_size)


def _text_ids(tok: TokenizerWrapper):
    """Random Unicode text, cut into pieces encoded separately, then concatenated."""
    alphabet = st.one_of(st.sampled_from("".join(fx.CORPUS)), st.characters(codec="utf-8"))
    pieces = st.lists(st.text(alphabet, max_size=12), max_size=5)
    return pieces.map(lambda ps: [i for p in ps for i in tok.encode(p, add_special_tokens=False)])


def _stream(det, ids: list[int], reads: list[bool]) -> str:
    """Feed ids, reading ``last_segment`` after the tokens ``reads`` marks, and at the end."""
    out = []
    for k, token in enumerate(ids):
        det.add_token(token)
        if reads[k % len(reads)]:
            out.append(det.last_segment)
    det.finalize()
    out.append(det.last_segment)
    assert det.tokens == ids
    assert det.text == "".join(out)
    return "".join(out)


def _check(tok: TokenizerWrapper, ids: list[int], skip: bool, reads: list[bool]) -> None:
    det = tok.make_detokenizer(skip_special_tokens=skip)
    assert _stream(det, ids, reads) == tok.tokenizer.decode(ids, skip_special_tokens=skip)


READS = st.lists(st.booleans(), min_size=1, max_size=7)


# --- which kind ---------------------------------------------------------------------------


def test_kind_follows_the_live_decoder(byte_bpe, spm_all, wordpiece):
    assert byte_bpe.detokenizer_kind == "bpe"
    assert {name: t.detokenizer_kind for name, t in spm_all.items()} == dict.fromkeys(
        SPM_VARIANTS, "spm"
    )
    assert wordpiece.detokenizer_kind == "naive"
    for tok in (byte_bpe, spm_all["llama"], wordpiece):
        assert type(tok.detokenizer).kind == tok.detokenizer_kind


def test_unrecognised_decoder_falls_back_to_naive(tmp_path):
    tok = load_tokenizer(fx.build_wordpiece(tmp_path))
    tok.backend_tokenizer.decoder = decoders.BPEDecoder(suffix="##")
    assert make_detokenizer_factory(tok.tokenizer).kind == "naive"


# --- the decode-equality property, one per kind ---------------------------------------------


@PROPERTY
@given(data=st.data(), skip=st.booleans(), reads=READS)
def test_bpe_random_ids(byte_bpe, data, skip, reads):
    _check(byte_bpe, data.draw(_id_lists(byte_bpe)), skip, reads)


@PROPERTY
@given(data=st.data(), reads=READS)
def test_bpe_random_text(byte_bpe, data, reads):
    _check(byte_bpe, data.draw(_text_ids(byte_bpe)), False, reads)


@pytest.mark.parametrize("variant", SPM_VARIANTS)
@PROPERTY
@given(data=st.data(), skip=st.booleans(), reads=READS)
def test_spm_random_ids(spm_all, variant, data, skip, reads):
    tok = spm_all[variant]
    _check(tok, data.draw(_id_lists(tok)), skip, reads)


@pytest.mark.parametrize("variant", ["llama", "metaspace"])
@PROPERTY
@given(data=st.data(), reads=READS)
def test_spm_random_text(spm_all, variant, data, reads):
    tok = spm_all[variant]
    _check(tok, data.draw(_text_ids(tok)), False, reads)


@PROPERTY
@given(data=st.data(), skip=st.booleans(), reads=READS)
def test_naive_random_ids_with_space_cleanup(wordpiece, data, skip, reads):
    assert wordpiece.tokenizer.clean_up_tokenization_spaces  # the cleanup is streamed too
    _check(wordpiece, data.draw(_id_lists(wordpiece)), skip, reads)


@PROPERTY
@given(data=st.data(), reads=READS)
def test_naive_random_text(wordpiece, data, reads):
    _check(wordpiece, data.draw(_text_ids(wordpiece)), False, reads)


@pytest.mark.parametrize("decoder", ["bpe_decoder", "ctc", "none", "byte_level", "byte_fallback"])
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), reads=READS)
def test_naive_on_other_decoders(byte_bpe, spm_all, tmp_path_factory, decoder, data, reads):
    """The naive kind alone, on decoders that rewrite the last token or merge bytes."""
    if decoder in ("byte_level", "byte_fallback"):
        tok = byte_bpe if decoder == "byte_level" else spm_all["llama"]
    else:
        tok = _swapped_decoder(tmp_path_factory, decoder)
    backend = tok.backend_tokenizer
    det = NaiveStreamingDetokenizer(
        lambda ids: backend.decode(ids, skip_special_tokens=False),
        probes=_probe_ids(tok.tokenizer),
    )
    ids = data.draw(_id_lists(tok, max_size=20))
    assert _stream(det, ids, reads) == backend.decode(ids, skip_special_tokens=False)


_SWAPPED: dict[str, TokenizerWrapper] = {}


def _swapped_decoder(tmp_path_factory, decoder: str) -> TokenizerWrapper:
    if decoder not in _SWAPPED:
        tok = load_tokenizer(fx.build_wordpiece(tmp_path_factory.mktemp(decoder)))
        tok.backend_tokenizer.decoder = {
            "bpe_decoder": lambda: decoders.BPEDecoder(suffix="##"),
            "ctc": lambda: decoders.CTC(pad_token="[PAD]"),
            "none": lambda: None,
        }[decoder]()
        _SWAPPED[decoder] = tok
    return _SWAPPED[decoder]


# --- streaming behaviour, by example --------------------------------------------------------


def test_bpe_holds_an_emoji_until_its_last_byte(byte_bpe):
    ids = byte_bpe.encode("a🐙b", add_special_tokens=False)  # 🐙 is not in the corpus
    det = byte_bpe.detokenizer
    seen = []
    for i in ids:
        det.add_token(i)
        seen.append(det.last_segment)
    det.finalize()
    assert "".join(seen) == "a🐙b"
    assert all("\ufffd" not in s for s in seen)
    assert "🐙" in seen  # emitted whole, by the token carrying its last byte


def test_spm_byte_run_is_held_until_it_ends(spm_all):
    tok = spm_all["llama"]
    ids = tok.encode("x🐙 y", add_special_tokens=False)
    tokens = tok.convert_ids_to_tokens(ids)
    k = tokens.index("<0xF0>")
    assert tokens[k : k + 4] == ["<0xF0>", "<0x9F>", "<0x90>", "<0x99>"]  # byte fallback
    det = tok.detokenizer
    for i in ids[:k]:
        det.add_token(i)
    assert det.last_segment == "x"
    for i in ids[k : k + 4]:
        det.add_token(i)
        assert det.last_segment == ""
    for i in ids[k + 4 :]:
        det.add_token(i)
    det.finalize()
    assert det.last_segment.startswith("🐙")
    assert det.text == tok.decode(ids) == "x🐙 y"


def test_spm_invalid_run_becomes_one_replacement_per_byte(spm_all):
    tok = spm_all["gemma"]
    ids = [tok.convert_tokens_to_ids(t) for t in ["<0xC3>", "<0xA9>", "<0xE4>"]]
    det = tok.detokenizer
    for i in ids:
        det.add_token(i)
    det.finalize()
    # ByteFallback replaces the whole run, the valid "é" prefix included.
    assert det.text == tok.decode(ids) == "\ufffd" * 3


def test_detokenizer_is_new_each_time_and_resets(byte_bpe):
    a, b = byte_bpe.detokenizer, byte_bpe.detokenizer
    assert a is not b
    ids = byte_bpe.encode("héllo", add_special_tokens=False)
    for i in ids:
        a.add_token(i)
    assert b.tokens == [] and b.text == ""
    a.finalize()
    assert a.text == "héllo"
    a.reset()
    assert (a.tokens, a.text, a.last_segment) == ([], "", "")


def test_last_segment_clears_on_read(byte_bpe):
    det = byte_bpe.detokenizer
    for i in byte_bpe.encode("the fox", add_special_tokens=False):
        det.add_token(i)
    det.finalize()
    assert det.last_segment == "the fox"
    assert det.last_segment == ""
    assert det.text == "the fox"


def test_skip_special_tokens(byte_bpe):
    ids = byte_bpe.apply_chat_template([{"role": "user", "content": "café"}])
    det = byte_bpe.make_detokenizer(skip_special_tokens=True)
    for i in ids:
        det.add_token(i)
    det.finalize()
    assert det.text == "user\ncafé\nassistant\n"
    assert det.text == byte_bpe.decode(ids, skip_special_tokens=True)


def test_tokens_after_finalize_continue_the_text(spm_all):
    tok = spm_all["llama"]
    ids = tok.encode("the quick brown fox", add_special_tokens=False)
    det = tok.detokenizer
    for i in ids[:2]:
        det.add_token(i)
    det.finalize()
    for i in ids[2:]:
        det.add_token(i)
    det.finalize()
    assert det.text == tok.decode(ids) == "the quick brown fox"


def test_wordpiece_cleanup_is_applied_like_decode(wordpiece):
    text = "I'm here, he's there . don't stop !"
    ids = wordpiece.encode(text, add_special_tokens=False)
    det = wordpiece.detokenizer
    for i in ids:
        det.add_token(i)
    det.finalize()
    assert det.text == wordpiece.decode(ids)
    assert det.text == "I'm here, he's there. don't stop!"  # transformers' cleanup rules


# --- MLX-LM, where it is exact --------------------------------------------------------------


def test_matches_mlx_lm_on_natural_text(tmp_path):
    """MLX-LM's detokenizers agree with ours on ordinary text (they trim or drop in corner
    cases, so random ids are compared with ``decode`` above instead)."""
    mlx_tok = pytest.importorskip("mlx_lm.tokenizer_utils")
    dirs = [fx.build_byte_bpe(tmp_path / "bpe"), fx.build_wordpiece(tmp_path / "wp")]
    dirs += [fx.build_spm(tmp_path / v, decoder=v) for v in fx.SPM_DECODERS]
    for d in dirs:
        ours, theirs = load_tokenizer(d), mlx_tok.load(d)
        for text in [*fx.CORPUS, "\n".join(fx.CORPUS)]:
            ids = ours.encode(text, add_special_tokens=False)
            a, b = ours.detokenizer, theirs.detokenizer
            for i in ids:
                a.add_token(i)
                b.add_token(i)
            a.finalize()
            b.finalize()
            assert a.text == b.text, (d.name, text)
