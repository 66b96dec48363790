"""Record formats are detected, and bad input is refused with the file, line and field named."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from mlxlm_core import InvalidArgumentError, load_tokenizer
from mlxlm_tune import encode_records, load_dataset, load_jsonl, read_records

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"text": "The tide comes in."}, "text"),
        ({"prompt": "What?", "completion": "Paris."}, "completions"),
        (CHAT, "chat"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "preference"),
    ],
)
def test_format_is_detected(jsonl: Callable[..., Path], row: dict, fmt: str) -> None:
    (record,) = read_records(jsonl([row]))
    assert record.format == fmt
    assert record.source.endswith("train.jsonl:1")


def test_chat_and_tools_records_mix(jsonl: Callable[..., Path]) -> None:
    rows = [CHAT, {**CHAT, "tools": []}]
    assert [r.format for r in read_records(jsonl(rows))] == ["chat", "tools"]


def _error(path: Path) -> str:
    with pytest.raises(InvalidArgumentError) as info:
        read_records(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_malformed_json_names_the_line(jsonl: Callable[..., Path]) -> None:
    path = jsonl([{"text": "a"}, "", {"text": "b"}, '{"text": "c"'])
    assert _error(path).startswith(f"{path}:4: malformed JSON")


def test_chat_without_assistant_names_line_and_field(jsonl: Callable[..., Path]) -> None:
    path = jsonl([CHAT, {"messages": [{"role": "user", "content": "anyone?"}]}])
    message = _error(path)
    assert message.startswith(f"{path}:2:") and "'messages' has no assistant turn" in message


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"messages": [{"content": "x"}]}, "messages[0] has no 'role'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role 'robot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
        ({"messages": "hello"}, "'messages' must be a non-empty list"),
        ({"prompt": "p"}, "missing field 'completion'"),
        ({"prompt": "p", "completion": 5}, "'completion' must be a string"),
        ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
        ({"txt": "typo"}, "unknown record format (keys: txt)"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_fields_are_named(jsonl: Callable[..., Path], row: object, field: str) -> None:
    path = jsonl([row])
    message = _error(path)
    assert message.startswith(f"{path}:1:") and field in message


def test_mixed_formats_refused(jsonl: Callable[..., Path]) -> None:
    path = jsonl([{"text": "a"}, CHAT])
    assert "2: a chat record in a text file" in _error(path)


def test_empty_file_refused(jsonl: Callable[..., Path]) -> None:
    assert "no records" in _error(jsonl([]))


def test_too_long_sequence_names_the_line(tiny: Path, jsonl: Callable[..., Path]) -> None:
    tokenizer = load_tokenizer(tiny)
    path = jsonl([{"text": "short"}, {"text": "The tide comes in twice a day. " * 20}])
    with pytest.raises(InvalidArgumentError, match=rf"^{path}:2: \d+ tokens, longer than .* 64"):
        load_jsonl(path, tokenizer, max_seq_length=64)
    # --truncate keeps it, cut to the limit
    data = load_jsonl(path, tokenizer, max_seq_length=64, truncate=True)
    assert data.lengths.max() == 64


def test_data_directory_splits(tiny: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny)
    for split in ("train", "valid"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(CHAT) + "\n")
    splits = load_dataset(tmp_path, tokenizer)
    assert splits.train is not None and splits.valid is not None and splits.test is None
    with pytest.raises(InvalidArgumentError, match="no such data file"):
        load_dataset(tmp_path / "missing", tokenizer)


def test_hub_dataset_needs_the_extra(tiny: Path) -> None:
    pytest.importorskip("mlxlm_core")
    try:
        import datasets  # noqa: F401

        pytest.skip("datasets is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"mlxlm-tune\[datasets\]"):
        load_dataset("someone/some-dataset", load_tokenizer(tiny))


def test_text_gets_eos_and_all_targets(tiny: Path, jsonl: Callable[..., Path]) -> None:
    tokenizer = load_tokenizer(tiny)
    (sample,) = encode_records(read_records(jsonl([{"text": "Bread needs flour."}])), tokenizer)
    expected = [*tokenizer.encode("Bread needs flour."), tokenizer.eos_token_id]
    assert sample.tokens.tolist() == expected
    assert sample.mask.tolist() == [False] + [True] * (len(expected) - 1)
