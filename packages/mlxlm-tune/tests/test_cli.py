"""``mlxlm lora`` and ``mlxlm fuse``: flags, YAML configs, outputs and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlxlm_core import InvalidArgumentError
from mlxlm_core.cli import OneLineParser
from mlxlm_tune import TrainingConfig, load_yaml
from mlxlm_tune._cli_fuse import COMMAND as FUSE
from mlxlm_tune._cli_lora import COMMAND as LORA
from mlxlm_tune._cli_lora import config_from_args

CHAT = {
    "messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital of France."},
    ]
}


def _parse(command: object, argv: list[str]) -> object:
    parser = OneLineParser(prog="mlxlm")
    command.add_arguments(parser)  # type: ignore[attr-defined]
    return parser.parse_args(argv)


def _data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 6), ("valid", 2), ("test", 2)):
        (folder / f"{split}.jsonl").write_text((json.dumps(CHAT) + "\n") * n)
    return folder


def test_lora_command_trains_from_yaml_and_flags(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "lora.yaml"
    config.write_text(
        "fine_tune_type: dora\n"
        "learning_rate: 1e-4\n"  # YAML 1.1 would read this as a string
        "lora_parameters: {rank: 4, scale: 8.0, dropout: 0.0}\n"
        "lr_schedule: {name: cosine_decay, arguments: [1e-4, 4, 1e-6], warmup: 1}\n"
        "iters: 100\n"
    )
    out = tmp_path / "run"
    argv = [
        "--model",
        str(tiny),
        "--data",
        str(_data(tmp_path / "data")),
        "-c",
        str(config),
        "--iters",
        "4",
        "--batch-size",
        "2",
        "--num-layers",
        "2",
        "--save-every",
        "2",
        "--adapter-path",
        str(out),
        "--steps-per-report",
        "2",
        "--rank",
        "2",
    ]
    args = _parse(LORA, argv)
    parsed = config_from_args(args)  # type: ignore[arg-type]
    assert (parsed.iters, parsed.learning_rate, parsed.fine_tune_type) == (4, 1e-4, "dora")
    assert parsed.lora_parameters == {"rank": 2, "scale": 8.0, "dropout": 0.0}  # flag wins
    assert LORA.run(args) == 0  # type: ignore[arg-type]
    printed = capsys.readouterr().out
    assert "Iter 2: Train loss" in printed and "Val loss" in printed
    document = json.loads((out / "adapter_config.json").read_text())
    assert document["fine_tune_type"] == "dora"
    assert document["lora_parameters"]["rank"] == 2
    assert document["mlxlm_tune"]["adapter_format"] == 1
    assert document["base_model"]["hidden_size"] == 64
    for name in (
        "adapters.safetensors",
        "0000002_adapters.safetensors",
        "0000004_state.json",
        "0000004_optimizer.safetensors",
    ):
        assert (out / name).is_file(), name

    # --test alone evaluates the trained adapter, not fresh ones
    argv = [
        "--model",
        str(tiny),
        "--data",
        str(tmp_path / "data"),
        "--test",
        "--adapter-path",
        str(out),
        "--num-layers",
        "2",
        "--batch-size",
        "2",
    ]
    assert LORA.run(_parse(LORA, argv)) == 0  # type: ignore[arg-type]
    tested = capsys.readouterr().out
    assert "Test loss" in tested and "Trained" not in tested

    fused = tmp_path / "fused"
    args = _parse(
        FUSE, ["--model", str(tiny), "--adapter-path", str(out), "--save-path", str(fused)]
    )
    assert FUSE.run(args) == 0  # type: ignore[arg-type]
    assert (fused / "config.json").is_file()


def test_unknown_yaml_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("learnig_rate: 1e-4\n")
    with pytest.raises(InvalidArgumentError, match=r"c\.yaml: unknown option\(s\) learnig_rate"):
        config_from_args(_parse(LORA, ["-c", str(config)]))  # type: ignore[arg-type]
    config.write_text("iters: [1\n")
    with pytest.raises(InvalidArgumentError, match=r"c\.yaml:\d+: invalid YAML"):
        load_yaml(config)


def test_config_values_are_checked_by_name() -> None:
    with pytest.raises(InvalidArgumentError, match=r"^batch_size: must be a positive integer"):
        TrainingConfig(batch_size=0)
    with pytest.raises(InvalidArgumentError, match=r"^lora_parameters\.dropout"):
        TrainingConfig(lora_parameters={"rank": 8, "scale": 1.0, "dropout": 1.5})
    with pytest.raises(InvalidArgumentError, match=r"^warmup"):
        TrainingConfig(iters=10, warmup=20)


def _mlxlm(*argv: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "mlxlm"
    return subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=120)


def test_commands_are_registered_and_errors_are_one_line(tiny: Path, tmp_path: Path) -> None:
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "train.jsonl").write_text(json.dumps(CHAT) + "\n" + '{"messages": [}\n')
    result = _mlxlm("lora", "--model", str(tiny), "--data", str(bad), "--iters", "1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"mlxlm lora: error: {bad / 'train.jsonl'}:2: malformed JSON (Expecting value at column 15)"
    )
    result = _mlxlm("fuse", "--help")
    assert result.returncode == 0 and "--requantize" in result.stdout
