"""The tokenizer wrapper and ``load_tokenizer`` on tiny tokenizers saved as model directories.

References: the ``tokenizers`` library reading the same ``tokenizer.json`` (ids), transformers'
own ``apply_chat_template`` (chat ids), and chat prompts written out by hand from the ChatML
format.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import _fixtures_tokenizers as fx  # registered by conftest.py
import pytest
from mlxlm_core._errors import CheckpointError, InvalidArgumentError, ModelNotFoundError
from mlxlm_core._tokenizer import TokenizerWrapper, load_tokenizer
from tokenizers import Tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo du jour",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    return fx.build_byte_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def bpe(bpe_dir) -> TokenizerWrapper:
    return load_tokenizer(bpe_dir)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access during tokenizer loading")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- loading ------------------------------------------------------------------------------


def test_loads_offline_and_encodes_like_tokenizers(bpe_dir, no_network):
    tok = load_tokenizer(bpe_dir)
    reference = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    for text in [*fx.CORPUS, "<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == reference.encode(text).ids
        assert tok.encode(text, add_special_tokens=False) == ids  # no BOS/EOS template
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=False) == text


def test_sizes_and_special_tokens(bpe, bpe_dir):
    reference = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    assert bpe.vocab_size == len(bpe) == reference.get_vocab_size(with_added_tokens=True)
    assert bpe.bos_token is None
    assert bpe.eos_token == "<|im_end|>"  # forwarded to the wrapped tokenizer
    spm = load_tokenizer(fx.build_spm(bpe_dir.parent / "spm_sizes"))
    assert spm.bos_token == "<s>"
    bos = reference_id(bpe_dir.parent / "spm_sizes", "<s>")
    assert spm.encode("hi")[0] == bos
    assert bos not in spm.encode("hi", add_special_tokens=False)


def reference_id(path: Path, token: str) -> int:
    return Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(token)


def test_eos_ids_merge_tokenizer_generation_config_and_explicit(bpe_dir):
    im_end = reference_id(bpe_dir, "<|im_end|>")
    endoftext = reference_id(bpe_dir, "<|endoftext|>")
    im_start = reference_id(bpe_dir, "<|im_start|>")
    assert load_tokenizer(bpe_dir).eos_token_ids == {im_end, endoftext}
    assert load_tokenizer(bpe_dir, eos_token_ids=[im_start]).eos_token_ids == {
        im_end,
        endoftext,
        im_start,
    }


def test_eos_from_a_single_int_and_from_tokenizer_config_override(tmp_path):
    path = fx.build_byte_bpe(tmp_path)
    endoftext = reference_id(path, "<|endoftext|>")
    im_start = reference_id(path, "<|im_start|>")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": im_start}))
    tok = load_tokenizer(path, tokenizer_config={"eos_token": "<|endoftext|>"})
    assert tok.eos_token_ids == {endoftext, im_start}
    (path / "generation_config.json").unlink()
    assert load_tokenizer(path).eos_token_ids == {reference_id(path, "<|im_end|>")}


def test_eos_ids_can_be_added_and_replaced(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    im_start = reference_id(bpe_dir, "<|im_start|>")
    tok.add_eos_token("<|im_start|>")
    assert im_start in tok.eos_token_ids
    tok.eos_token_ids = [7]
    assert tok.eos_token_ids == {7}
    with pytest.raises(InvalidArgumentError):
        tok.add_eos_token("<|not-a-token|>")
    with pytest.raises(InvalidArgumentError):
        tok.add_eos_token(10**9)


def test_attributes_forward_to_the_wrapped_tokenizer(bpe):
    ids = bpe.encode("café")
    assert bpe.convert_ids_to_tokens(ids) == bpe.tokenizer.convert_ids_to_tokens(ids)
    assert bpe.pad_token == "<|endoftext|>"
    assert bpe("café")["input_ids"] == ids
    assert bpe.decode(ids[0]) == bpe.decode([ids[0]]) == bpe.tokenizer.decode([ids[0]])
    with pytest.raises(AttributeError):
        bpe.no_such_attribute  # noqa: B018


# --- chat templates -----------------------------------------------------------------------


MESSAGES = [
    {"role": "system", "content": "Tu es utile."},
    {"role": "user", "content": "Quel temps à Zürich? 😀"},
]


def test_chat_template_with_system_prompt(bpe):
    expected = (
        "<|im_start|>system\nTu es utile.<|im_end|>\n"
        "<|im_start|>user\nQuel temps à Zürich? 😀<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert bpe.has_chat_template
    assert bpe.apply_chat_template(MESSAGES, tokenize=False) == expected
    ids = bpe.apply_chat_template(MESSAGES)
    assert ids == bpe.encode(expected, add_special_tokens=False)
    reference = bpe.tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids == list(reference)
    no_prompt = bpe.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False)
    assert no_prompt == expected.removesuffix("<|im_start|>assistant\n")


def test_chat_template_with_tools(bpe):
    expected = (
        "<|im_start|>system\nTu es utile.\n\n# Tools\n<tools>\n"
        + json.dumps(WEATHER_TOOL, ensure_ascii=False)
        + "\n</tools><|im_end|>\n"
        "<|im_start|>user\nQuel temps à Zürich? 😀<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    text = bpe.apply_chat_template(MESSAGES, tools=[WEATHER_TOOL], tokenize=False)
    assert text == expected
    ids = bpe.apply_chat_template(MESSAGES, tools=[WEATHER_TOOL])
    assert bpe.decode(ids) == expected


def test_chat_template_override_and_jinja_file(tmp_path):
    plain = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    path = fx.build_byte_bpe(tmp_path / "a")
    tok = load_tokenizer(path, chat_template=plain)
    assert tok.apply_chat_template(MESSAGES[1:], tokenize=False) == (
        "[user] Quel temps à Zürich? 😀\n"
    )

    path = fx.build_byte_bpe(tmp_path / "b")
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert not load_tokenizer(path).has_chat_template
    (path / "chat_template.jinja").write_text(plain)
    assert load_tokenizer(path).apply_chat_template(MESSAGES[1:], tokenize=False) == (
        "[user] Quel temps à Zürich? 😀\n"
    )


def test_chat_template_errors(tmp_path, bpe):
    path = fx.build_byte_bpe(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    bare = load_tokenizer(path)
    with pytest.raises(InvalidArgumentError, match="no chat template"):
        bare.apply_chat_template(MESSAGES)
    with pytest.raises(InvalidArgumentError, match="messages"):
        bpe.apply_chat_template("hello")
    with pytest.raises(InvalidArgumentError, match="messages"):
        bpe.apply_chat_template([{"content": "no role"}])
    strict = load_tokenizer(
        path, chat_template="{{ raise_exception('System role not supported') }}"
    )
    with pytest.raises(InvalidArgumentError, match="System role not supported"):
        strict.apply_chat_template(MESSAGES)


# --- clear errors -------------------------------------------------------------------------


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_directory_and_missing_files(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        load_tokenizer(tmp_path / "nowhere")
    assert "nowhere" in _one_line(e)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in _one_line(e)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("tokenizer.json", '{"version": "1.0", "model": '),
        ("tokenizer.json", '{"version": "1.0", "model": {"type": "Nonsense"}}'),
        ("tokenizer_config.json", "{not json"),
        ("generation_config.json", "[1, 2"),
        ("generation_config.json", '{"eos_token_id": "</s>"}'),
    ],
)
def test_corrupt_files_raise_checkpoint_error(tmp_path, name, content):
    path = fx.build_byte_bpe(tmp_path)
    (path / name).write_text(content)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(path)
    message = _one_line(e)
    assert str(path) in message
