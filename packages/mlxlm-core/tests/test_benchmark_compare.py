"""``mlxlm benchmark --compare`` on the tiny model: report fields, bytes per token, errors.

The engines run in worker processes (a few seconds each to start). Speeds are not asserted
(benchmarks never are); the bytes each engine reads per token are checked against the
checkpoint file's own tensor sizes, and bad arguments against the one-line error contract.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlxlm_core import load, save
from mlxlm_core._cli.main import main
from mlxlm_core.quantize import quantize_model


@pytest.fixture(scope="module")
def q4(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer, config = load(tiny, return_config=True)
    block = quantize_model(model, bits=4, group_size=32)
    out = tmp_path_factory.mktemp("bench") / "q4"
    return save(out, model, tokenizer, {**config, "quantization": block})


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_with_mlx_lm_reports_medians_ratios_and_bound(q4: Path, capsys) -> None:
    pytest.importorskip("mlx_lm")
    code, out, err = _run(
        capsys,
        "benchmark", "--model", q4, "-p", "12", "-g", "3", "-n", "2",
        "--compare", "mlx-lm", "--bandwidth", "--weight-mode", "native", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    ours, theirs = report["engines"]["mlxlm"], report["engines"]["mlx-lm"]
    for engine in (ours, theirs):
        assert len(engine["trials"]) == 2 and len(engine["load_avg"]) == 2
        assert engine["prompt_tps"] > 0 and engine["generation_tps"] > 0
        assert engine["peak_memory_gb"] > 0 and engine["peak_rss_gb"] > 0
    # Tied embeddings: a decoding step reads every stored tensor once (packed, as stored).
    stored = sum(a.nbytes for a in mx.load(str(q4 / "model.safetensors")).values())
    assert ours["decode_bytes"] == theirs["decode_bytes"] == stored
    assert report["memory_bandwidth_gbps"] > 0
    bound = report["memory_bandwidth_gbps"] * 1e9 / stored
    assert math.isclose(ours["bandwidth_bound_tps"], bound)
    ratio = report["ratios_mlxlm_over_peer"]["mlx-lm"]
    assert math.isclose(ratio["generation_tps"], ours["generation_tps"] / theirs["generation_tps"])


def test_dense_mode_counts_its_float_copies(q4: Path, capsys) -> None:
    code, out, err = _run(
        capsys,
        "benchmark", "--model", q4, "-p", "8", "-g", "2", "-n", "1",
        "--bandwidth", "--weight-mode", "dense", "--json",
    )  # fmt: skip
    assert code == 0, err
    engine = json.loads(out)["engines"]["mlxlm"]
    model, _ = load(q4, weight_mode="dense")
    norms = sum(m.weight.nbytes for m in model.modules() if isinstance(m, nn.RMSNorm))
    assert engine["decode_bytes"] == model.policy.dense_bytes + norms
    assert "weight_mode=dense" in engine["policy"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--compare", "vllm"], "--compare takes"),
        (["--compare", "mlx-lm", "-b", "2"], "batch size 1 only"),
    ],
)
def test_bad_compare_arguments_are_one_line(q4: Path, capsys, args, needle) -> None:
    code, _out, err = _run(capsys, "benchmark", "--model", q4, *args)
    assert code != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and needle in err
