"""``mlxlm gguf import`` / ``export`` as a user runs them: exit status, one-line errors,
nothing left behind on failure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from mlxlm_gguf._cli import main

pytestmark = pytest.mark.timeout(120)


def _run(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mlxlm-gguf", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def _rewrite(src: Path, dst: Path, *, fields=None, tensor=None) -> Path:
    """Copy a GGUF file through the `gguf` package, changing some fields or one tensor.

    `fields`: key -> new value (same GGUF type); `tensor`: (name, raw bytes, type).
    """
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = (fields or {}).get(key, f.contents())
        sub = f.types[-1] if f.types[0] == V.ARRAY else None
        w.add_key_value(key, value, f.types[0], sub_type=sub)
    if fields and "general.architecture" in fields:
        w.kv_data[0]["general.architecture"].value = fields["general.architecture"]
    for t in reader.tensors:
        if tensor is not None and t.name == tensor[0]:
            w.add_tensor(t.name, tensor[1], raw_dtype=tensor[2])
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=Q(t.tensor_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_import_then_export_round_trip(make_gguf, tmp_path, monkeypatch, capsys):
    built = make_gguf()
    code, out, err = _run(monkeypatch, capsys, "import", str(built.path), str(tmp_path / "m"))
    assert code == 0, err
    assert "imported" in out
    code, out, err = _run(
        monkeypatch,
        capsys,
        "export",
        "--model",
        str(tmp_path / "m"),
        "--out",
        str(tmp_path / "again.gguf"),
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["architecture"] == "llama" and Path(summary["path"]).is_file()
    # The file's own Q4_0/Q4_1/Q8_0 blocks come back unchanged.
    assert summary["kept"] and not summary["requantized"]
    ours = {t.name: t for t in gguf.GGUFReader(tmp_path / "again.gguf").tensors}
    for t in gguf.GGUFReader(built.path).tensors:
        if Q(t.tensor_type) in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
            assert Q(ours[t.name].tensor_type) == Q(t.tensor_type)
            assert np.array_equal(np.array(ours[t.name].data), np.array(t.data)), t.name


def _bad_inputs(built: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    data = built.read_bytes()
    (tmp / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (tmp / "magic.gguf").write_bytes(b"GGML" + data[4:])
    reader = gguf.GGUFReader(built)
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    rows, cols = (int(d) for d in reversed(down.shape.tolist()))
    q8_1 = np.zeros((rows, cols // 32 * 40), dtype=np.uint8)  # Q8_1: no reader for it
    return {
        "truncated": (tmp / "truncated.gguf", "truncated"),
        "magic": (tmp / "magic.gguf", "magic"),
        "architecture": (
            _rewrite(built, tmp / "arch.gguf", fields={"general.architecture": "falcon"}),
            "falcon",
        ),
        "tensor type": (
            _rewrite(built, tmp / "type.gguf", tensor=(down.name, q8_1, Q.Q8_1)),
            "Q8_1",
        ),
        "shapes": (
            _rewrite(built, tmp / "shape.gguf", fields={"llama.feed_forward_length": 128}),
            "shape",
        ),
    }


def test_bad_input_gives_one_line_and_no_output(make_gguf, tmp_path, monkeypatch, capsys):
    built = make_gguf()
    for case, (path, word) in _bad_inputs(built.path, tmp_path).items():
        out_dir = tmp_path / f"out-{case.replace(' ', '-')}"
        code, _, err = _run(monkeypatch, capsys, "import", str(path), str(out_dir))
        assert code == 1, case
        assert err.count("\n") == 1 and err.startswith("mlxlm-gguf: error: "), (case, err)
        assert word in err, (case, err)
        assert not out_dir.exists(), case
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_export_errors(make_gguf, tmp_path, monkeypatch, capsys):
    built = make_gguf()
    model = tmp_path / "m"
    assert _run(monkeypatch, capsys, "import", str(built.path), str(model))[0] == 0
    target = tmp_path / "x.gguf"
    target.write_bytes(b"keep")
    code, _, err = _run(monkeypatch, capsys, "export", "--model", str(model), "--out", str(target))
    assert code == 1 and "exists" in err and err.count("\n") == 1
    assert target.read_bytes() == b"keep"
    code, _, err = _run(
        monkeypatch, capsys, "export", "--model", str(model), "--out", "y.gguf", "--out-type", "q2"
    )
    assert code == 2 and "invalid choice" in err
    code, _, err = _run(
        monkeypatch, capsys, "export", "--model", str(tmp_path / "nope"), "--out", "z.gguf"
    )
    assert code == 1 and err.count("\n") == 1
    assert not Path("z.gguf").exists()
