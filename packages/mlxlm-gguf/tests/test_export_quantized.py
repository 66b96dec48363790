"""export() of MLX-quantized models, refusals, overwrite and atomic writes.

An MLX affine triple is written block for block when a GGUF type has the same grid;
checked by dequantizing the file with the `gguf` package and the model with
`mx.dequantize`. Where the grids differ the tensor is re-quantized and the report says so.
"""

from __future__ import annotations

import json

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlxlm_core import InvalidArgumentError, UnsupportedError, load
from mlxlm_core.adapters import apply_lora_layers, fuse_adapters
from mlxlm_core.quantize import quantize_model
from mlxlm_gguf import export, import_gguf

pytestmark = pytest.mark.timeout(120)


def _file(path) -> dict[str, tuple[np.ndarray, Q]]:
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        out[t.name] = (values.astype(np.float32), Q(t.tensor_type))
    return out


def _dequantized(module: nn.Module) -> np.ndarray:
    w = mx.dequantize(
        module["weight"],
        module["scales"],
        module.get("biases"),
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
    )
    return np.array(w.astype(mx.float32))


@pytest.mark.parametrize(
    ("bits", "group", "mode", "types", "exact"),
    [
        (4, 64, "affine", {Q.Q4_0, Q.Q4_1}, True),
        (4, 32, "affine", {Q.Q4_0, Q.Q4_1}, True),
        (3, 64, "affine", {Q.Q4_0, Q.Q4_1}, True),
        (2, 32, "affine", {Q.Q4_0, Q.Q4_1}, True),
        (5, 64, "affine", {Q.Q5_0, Q.Q5_1}, True),
        (6, 64, "affine", {Q.Q8_0}, False),
        (8, 64, "affine", {Q.Q8_0}, False),
        (4, 32, "mxfp4", {Q.Q8_0}, False),
    ],
)
def test_quantized_layers_become_the_closest_type(
    bits, group, mode, types, exact, model_dir, tmp_path
):
    model, tok = load(model_dir("qwen3"))
    quantize_model(model, bits=bits, group_size=group, mode=mode)
    report = export(model, tok, tmp_path / "m.gguf")
    tensors = _file(report.path)
    q_proj = model.model.layers[0].self_attn.q_proj  # qwen3: no row permutation
    got, qtype = tensors["blk.0.attn_q.weight"]
    assert qtype in types
    want = _dequantized(q_proj)
    if exact:
        # Block for block: equal up to the float16 rounding of scales and biases.
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
        assert report.kept and not report.requantized
        assert "block for block" in report.notes[0]
    else:
        step = np.abs(want).max() / 127
        assert np.abs(got - want).max() <= step
        assert report.requantized and any("re-quantized" in n for n in report.notes)
    assert tensors["blk.0.attn_norm.weight"][1] == Q.F32


def test_permuted_rows_of_a_quantized_llama(model_dir, tmp_path):
    """Q/K permutation moves whole rows of packed weights, scales and biases alike."""
    model, tok = load(model_dir("llama"))
    quantize_model(model, bits=4, group_size=32)
    report = export(model, tok, tmp_path / "m.gguf")
    got, _ = _file(report.path)["blk.1.attn_k.weight"]
    want = _dequantized(model.model.layers[1].self_attn.k_proj)
    heads, head_dim = model.args.num_key_value_heads, model.args.head_dim
    half = head_dim // 2
    for h in range(heads):
        for i in range(half):
            for p in range(2):
                np.testing.assert_allclose(
                    got[h * head_dim + 2 * i + p], want[h * head_dim + p * half + i], atol=2e-3
                )
    # And our importer reads it back to the same function (scales rounded to float16).
    ids = mx.array([[5, 17, 300, 2, 99, 41]])
    back, _ = load(import_gguf(report.path, tmp_path / "back"))
    ours, theirs = np.array(back(ids)), np.array(model(ids))
    assert np.abs(ours - theirs).max() < 2e-3 * np.abs(theirs).max()


def test_forced_type_requantizes_other_grids(model_dir, tmp_path):
    model, tok = load(model_dir("qwen2"))
    quantize_model(model, bits=4, group_size=64)
    report = export(model, tok, tmp_path / "m.gguf", out_type="q4_0")
    assert report.file_type == "MOSTLY_Q4_0" and report.requantized
    report = export(model, tok, tmp_path / "f16.gguf", out_type="f16")
    got, qtype = _file(report.path)["blk.0.ffn_up.weight"]
    assert qtype == Q.F16
    want = _dequantized(model.model.layers[0].mlp.up_proj)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_unfused_adapters_are_refused_and_fused_ones_export(model_dir, tmp_path):
    model, tok = load(model_dir("llama"))
    apply_lora_layers(model, num_layers=1, rank=4)
    with pytest.raises(UnsupportedError, match="fuse"):
        export(model, tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    fuse_adapters(model)
    assert export(model, tok, tmp_path / "m.gguf").path.is_file()


@pytest.mark.parametrize(
    ("arch", "change", "message"),
    [
        ("qwen3_moe", {"mlp_only_layers": [1]}, "every layer"),
        ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 8}}, "beta"),
        ("gemma2", {"query_pre_attn_scalar": 64}, "query_pre_attn_scalar"),
        ("gemma2", {"attn_logit_softcapping": None}, "soft-caps"),
        ("gemma", {"tie_word_embeddings": False}, "ties"),
        ("gemma", {"hidden_activation": "gelu"}, "GELU"),
    ],
)
def test_models_llama_cpp_would_run_differently_are_refused(
    arch, change, message, model_dir, tmp_path
):
    from mlxlm_core.models import get_model_classes

    _, tok = load(model_dir(arch))
    config = json.loads((model_dir(arch) / "config.json").read_text()) | change
    model_cls, args_cls = get_model_classes(config["model_type"])
    model = model_cls(args_cls.from_dict(config))
    with pytest.raises(UnsupportedError, match=message) as e:
        export(model, tok, tmp_path / "m.gguf")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_type_is_refused(model_dir, tmp_path):
    model, tok = load(model_dir("llama"))
    model.model_type = "gpt_neox"
    with pytest.raises(UnsupportedError, match="gpt_neox"):
        export(model, tok, tmp_path / "m.gguf")


def test_existing_file_and_bad_type(model_dir, tmp_path):
    model, tok = load(model_dir("llama"))
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    with pytest.raises(InvalidArgumentError, match="exists"):
        export(model, tok, target)
    assert target.read_bytes() == b"old"
    with pytest.raises(InvalidArgumentError, match="out_type"):
        export(model, tok, tmp_path / "x.gguf", out_type="q3_k")
    export(model, tok, target, overwrite=True)
    assert gguf.GGUFReader(target).fields["general.architecture"].contents() == "llama"


def test_interrupted_write_leaves_nothing(model_dir, tmp_path, monkeypatch):
    model, tok = load(model_dir("llama"))
    real = gguf.GGUFWriter.write_tensors_to_file

    def fail_midway(self, *args, **kwargs):
        real(self, *args, **kwargs)  # the data is on disk in the temporary file...
        raise KeyboardInterrupt  # ...when the process is interrupted

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        export(model, tok, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
