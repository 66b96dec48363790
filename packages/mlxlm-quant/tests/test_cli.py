"""The commands: output loadable with the recipe recorded; bad input is one line on stderr,
a non-zero exit and no output directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlxlm_quant._cli import awq_main, dynamic_main, gptq_main, quantize_main


def _run(main, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["mlxlm-x", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code or 0)


def test_quantize_with_a_recipe_file(tiny: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bits: 3\ngroup_size: 32\nrules:\n  - match: '*.down_proj'\n    bits: 6\n")
    out = tmp_path / "out"
    code = _run(
        quantize_main,
        ["--model", str(tiny), "--mlx-path", str(out), "--recipe", str(recipe), "--json"],
        monkeypatch,
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 3
    assert config["quantization"]["model.layers.0.mlp.down_proj"]["bits"] == 6
    assert config["quantization_recipe"]["recipe"]["rules"][0]["match"] == "*.down_proj"
    assert summary["bits_per_weight"] == config["quantization_recipe"]["bits_per_weight"]


@pytest.mark.parametrize("main", [awq_main, gptq_main])
def test_learned_commands_record_calibration(
    main, tiny: Path, tmp_path: Path, calib_file: Path, monkeypatch
) -> None:
    out = tmp_path / "out"
    code = _run(
        main,
        [
            "--model",
            str(tiny),
            "--mlx-path",
            str(out),
            "--bits",
            "4",
            "--data-path",
            str(calib_file),
            "--num-samples",
            "4",
            "--sequence-length",
            "32",
        ],
        monkeypatch,
    )
    assert code == 0
    recorded = json.loads((out / "config.json").read_text())["quantization_recipe"]
    assert recorded["calibration"] == {"data": str(calib_file), "samples": 4, "sequence_length": 32}


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_dynamic_quant_command(tiny: Path, tmp_path: Path, monkeypatch, quantizer: str) -> None:
    out = tmp_path / "out"
    code = _run(
        dynamic_main,
        [
            "--model",
            str(tiny),
            "--mlx-path",
            str(out),
            "--target-bpw",
            "4",
            "--num-samples",
            "2",
            "--sequence-length",
            "32",
            "--quantizer",
            quantizer,
        ],
        monkeypatch,
    )
    assert code == 0
    recorded = json.loads((out / "config.json").read_text())["quantization_recipe"]
    assert recorded["method"] == f"dynamic+{quantizer}"
    assert recorded["bits_per_weight"] <= 4.0


def test_dynamic_quant_rejects_bad_widths(tiny: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    argv = ["--model", str(tiny), "--mlx-path", str(out), "--target-bpw", "4"]
    code = _run(dynamic_main, [*argv, "--group-sizes", "64,x"], monkeypatch)
    assert code != 0
    assert "--group-sizes takes comma-separated integers" in capsys.readouterr().err
    assert not out.exists()


def _foreign(tiny: Path, tmp_path: Path, block: dict) -> Path:
    folder = tmp_path / "foreign"
    folder.mkdir()
    for f in tiny.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((tiny / "config.json").read_text())
    config["quantization_config"] = block
    (folder / "config.json").write_text(json.dumps(config))
    return folder


BAD = {
    "bits": (["--bits", "7"], "bits=7"),
    "group": (["--bits", "4", "--group-size", "48"], "group_size=48"),
    "mode": (["--mode", "int4"], "'int4'"),
    "mx-bits": (["--mode", "mxfp4", "--bits", "8"], "mxfp4"),
    "layers": (["--keep-float", "*.qkv_proj"], "qkv_proj"),
    "preset": (["--recipe", "mixed_9_9"], "mixed_9_9"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options(case: str, tiny: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    argv, needle = BAD[case]
    out = tmp_path / "out"
    code = _run(quantize_main, ["--model", str(tiny), "--mlx-path", str(out), *argv], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "block",
    [
        {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
        {"quant_method": "compressed-tensors", "format": "float-quantized"},
    ],
    ids=["fp8", "compressed-tensors"],
)
def test_foreign_checkpoints_refused_by_name(
    block: dict, tiny: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    source = _foreign(tiny, tmp_path, block)
    out = tmp_path / "out"
    code = _run(quantize_main, ["--model", str(source), "--mlx-path", str(out)], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert block["quant_method"] in err
    assert not out.exists()


def test_empty_calibration_file(tiny: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    code = _run(
        gptq_main,
        ["--model", str(tiny), "--mlx-path", str(out), "--data-path", str(empty)],
        monkeypatch,
    )
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "empty" in err
    assert not out.exists()


def test_existing_destination_refused_untouched(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _run(quantize_main, ["--model", str(tiny), "--mlx-path", str(out)], monkeypatch) != 0
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_mlxlm_dispatcher_runs_quantize(tiny: Path, tmp_path: Path) -> None:
    """Through the real ``mlxlm`` entry point: the command is found by its entry point, and
    an error exits 1 with one line."""
    exe = Path(sys.executable).with_name("mlxlm")
    bad = subprocess.run(
        [
            str(exe),
            "quantize",
            "--model",
            str(tiny),
            "--bits",
            "7",
            "--mlx-path",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("mlxlm quantize: error:")
    assert len(bad.stderr.strip().splitlines()) == 1
