"""import_gguf on tiny GGUF files: config, weights, layouts, atomicity, bad input."""

from __future__ import annotations

import json
import math

import gguf
import mlx.core as mx
import mlxlm_gguf._import as import_module
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlxlm_core import CheckpointError, InvalidArgumentError, UnsupportedError
from mlxlm_gguf import import_gguf

pytestmark = pytest.mark.timeout(60)


def _reference(built, gname: str) -> np.ndarray:
    """The `gguf` package's own dequantization of a stored tensor (GGUF row order)."""
    t = next(t for t in gguf.GGUFReader(built.path).tensors if t.name == gname)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)


def _hf_rows_from_gguf(n_heads: int, head_dim: int) -> np.ndarray:
    """Index map: HF row r of a Q/K projection is GGUF row idx[r] (written out by loops)."""
    half = head_dim // 2
    idx = np.empty(n_heads * head_dim, dtype=np.int64)
    for h in range(n_heads):
        for p in range(2):
            for i in range(half):
                idx[h * head_dim + p * half + i] = h * head_dim + 2 * i + p
    return idx


def _dequant(weights, name: str, bits: int) -> np.ndarray:
    w = mx.dequantize(
        weights[f"{name}.weight"],
        weights[f"{name}.scales"],
        weights[f"{name}.biases"],
        group_size=32,
        bits=bits,
    )
    return np.array(w.astype(mx.float32))


def test_config_matches_metadata(make_gguf, tmp_path):
    built = make_gguf()
    out = import_gguf(built.path, tmp_path / "model")
    cfg = json.loads((out / "config.json").read_text())
    s = built.spec
    expected = {
        "model_type": "llama",
        "hidden_size": s.hidden,
        "num_hidden_layers": s.layers,
        "intermediate_size": s.ffn,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "rms_norm_eps": s.eps,
        "rope_theta": s.theta,
        "max_position_embeddings": s.ctx,
        "vocab_size": len(built.tokens),
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert "rope_scaling" not in cfg
    q = cfg["quantization"]
    assert q["group_size"] == 32 and q["bits"] == 4 and q["mode"] == "affine"
    # Q8_0 tensors keep 8 bits, Q5_1 5 bits; float (F16) and dequantized (MXFP4) layers
    # stay unquantized.
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    for i in range(s.layers):
        assert q[f"model.layers.{i}.self_attn.v_proj"] == {"group_size": 32, "bits": 8}
        assert q[f"model.layers.{i}.mlp.up_proj"] == {"group_size": 32, "bits": 5}
        assert q[f"model.layers.{i}.self_attn.o_proj"] is False
        assert q[f"model.layers.{i}.mlp.down_proj"] is False
        assert f"model.layers.{i}.self_attn.q_proj" not in q
    info = cfg["gguf_import"]
    assert info["dequantized"] == {
        f"model.layers.{i}.mlp.down_proj": "MXFP4" for i in range(s.layers)
    }
    assert info["tensor_types"]["MXFP4"] == s.layers
    assert info["notes"] and "MXFP4" in info["notes"][0]


def test_tensor_names_shapes_and_values(make_gguf, tmp_path):
    built = make_gguf()
    out = import_gguf(built.path, tmp_path / "model")
    weights = mx.load(str(out / "model.safetensors"))
    s = built.spec
    idx_q = _hf_rows_from_gguf(s.heads, s.head_dim)
    idx_k = _hf_rows_from_gguf(s.kv_heads, s.head_dim)
    bits_of = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q8_0: 8}
    for hname, original in built.hf.items():
        gname = built.gguf_names[hname]
        kind = gname.split(".")[-2] if gname.startswith("blk.") else gname.split(".")[0]
        qtype = s.types.get(kind, Q.F32)
        ref = _reference(built, gname)
        if kind == "attn_q":
            ref = ref[idx_q]
        elif kind == "attn_k":
            ref = ref[idx_k]
        module = hname.removesuffix(".weight")
        if qtype in bits_of:
            bits = bits_of[qtype]
            packed = weights[hname]
            assert packed.dtype == mx.uint32
            assert packed.shape == (original.shape[0], original.shape[1] * bits // 32)
            assert weights[f"{module}.scales"].dtype == mx.float32
            got = _dequant(weights, module, bits)
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
            # And close to the original HF rows: proves the row order is HF's.
            assert np.abs(got - original).max() < {4: 0.2, 5: 0.1, 8: 0.02}[bits]
        else:
            got = np.array(weights[hname])
            assert weights[hname].dtype == mx.float32
            assert got.shape == original.shape
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7)
    assert "lm_head.weight" not in weights


def test_qk_unpermute_gives_original_rows_exactly(make_gguf, tmp_path):
    types = {k: Q.F32 for k in ("token_embd", "attn_q", "attn_k", "attn_v", "attn_output")}
    types |= {"ffn_gate": Q.F32, "ffn_up": Q.F32, "ffn_down": Q.F32, "output": Q.F32, "norm": Q.F32}
    built = make_gguf(types=types, tied=False)
    out = import_gguf(built.path, tmp_path / "model")
    weights = mx.load(str(out / "model.safetensors"))
    for hname, original in built.hf.items():
        np.testing.assert_array_equal(np.array(weights[hname]), original, err_msg=hname)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and "quantization" not in cfg


def test_triples_equal_what_mx_load_reads(make_gguf, default_types, tmp_path):
    """MLX's own GGUF reader is the reference for the packed layout (Q4_0/Q4_1/Q8_0 only)."""
    types = default_types | {"ffn_down": Q.Q8_0, "ffn_up": Q.Q4_0}
    types |= {"output": Q.F32, "attn_output": Q.F32}
    built = make_gguf(types=types)
    out = import_gguf(built.path, tmp_path / "model", dtype="float16")
    ours = mx.load(str(out / "model.safetensors"))
    theirs = mx.load(str(built.path))
    checked = 0
    for hname, gname in built.gguf_names.items():
        if "attn_q" in gname or "attn_k" in gname:
            continue  # rows reordered on purpose
        base, ours_base = gname.removesuffix(".weight"), hname.removesuffix(".weight")
        if base + ".scales" not in theirs:
            continue  # a float tensor: cast to `dtype` by design
        for suffix in (".weight", ".scales", ".biases"):
            a, b = ours[ours_base + suffix], theirs[base + suffix]
            assert a.dtype == b.dtype, (hname, suffix)
            assert mx.array_equal(a, b).item(), (hname, suffix)
            checked += 1
    assert checked == 3 * (1 + 4 * built.spec.layers)


def test_mlx_lm_runs_the_import_like_the_reference_weights(make_gguf, tmp_path):
    """mlx-lm with our directory = mlx-lm with float weights dequantized by `gguf`."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from mlx_lm.models import llama

    built = make_gguf(tied=False)
    out = import_gguf(built.path, tmp_path / "model")
    model, _ = mlx_lm_utils.load_model(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization"), cfg.pop("quantization_config")
    ref = llama.Model(llama.ModelArgs.from_dict(cfg))
    s = built.spec
    idx = {"attn_q": _hf_rows_from_gguf(s.heads, s.head_dim)}
    idx["attn_k"] = _hf_rows_from_gguf(s.kv_heads, s.head_dim)
    ref_weights = []
    for hname, gname in built.gguf_names.items():
        w = _reference(built, gname)
        kind = gname.split(".")[-2]
        ref_weights.append((hname, mx.array(w[idx[kind]] if kind in idx else w)))
    ref.load_weights(ref_weights)
    tokens = mx.array([[5, 77, 123, 9, 300, 41, 2, 17]])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(ref(tokens)), atol=2e-4, rtol=1e-4)


def test_llama3_rope_freqs_become_rope_scaling(make_gguf, tmp_path):
    """rope_freqs written with llama.cpp's llama3 formula; mlx-lm's Llama3RoPE agrees."""
    factor, lo, hi, old, dims, base = 8.0, 1.0, 4.0, 2048, 16, 10000.0
    divisors = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * base ** (i / dims)
        if wavelen < old / hi:
            divisors.append(1.0)
        elif wavelen > old / lo:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    built = make_gguf(rope_freqs=np.array(divisors), theta=base)
    out = import_gguf(built.path, tmp_path / "model")
    cfg = json.loads((out / "config.json").read_text())
    rs = cfg["rope_scaling"]
    assert rs["rope_type"] == "llama3" and rs["factor"] == factor
    assert rs["original_max_position_embeddings"] == old and rs["high_freq_factor"] == hi
    rope_utils = pytest.importorskip("mlx_lm.models.rope_utils")
    rope = rope_utils.Llama3RoPE(dims, cfg["max_position_embeddings"], False, base, rs)
    expected = base ** (np.arange(0, dims, 2) / dims) * np.array(divisors)
    np.testing.assert_allclose(np.array(rope._freqs), expected, rtol=1e-4)
    assert "rope_freqs.weight" not in mx.load(str(out / "model.safetensors"))


def test_atomic_write_leaves_nothing_after_failure(make_gguf, tmp_path, monkeypatch):
    built = make_gguf()
    parent = tmp_path / "models"
    parent.mkdir()

    def fail(*args, **kwargs):
        raise OSError("disk full (forced)")

    # Fail at the last step, after the weights were written into the temporary directory.
    monkeypatch.setattr(import_module, "write_tokenizer_files", fail)
    with pytest.raises(OSError, match="forced"):
        import_gguf(built.path, parent / "model")
    assert list(parent.iterdir()) == []


def test_existing_directory_needs_overwrite(make_gguf, tmp_path):
    built = make_gguf()
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(InvalidArgumentError, match="overwrite"):
        import_gguf(built.path, out)
    import_gguf(built.path, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", built.path.name]


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("damage", ["magic", "truncate", "garbage_header", "empty"])
def test_corrupt_files_raise_checkpoint_error(make_gguf, tmp_path, damage):
    data = make_gguf().path.read_bytes()
    bad = tmp_path / "bad.gguf"
    if damage == "magic":
        bad.write_bytes(b"GGML" + data[4:])
    elif damage == "truncate":
        bad.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "garbage_header":
        bad.write_bytes(data[:8] + bytes(range(256)) * 4 + data[8 + 1024 :])
    else:
        bad.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        import_gguf(bad, tmp_path / "out")
    assert str(bad) in _one_line(e)
    assert not (tmp_path / "out").exists()


def test_other_architectures_are_refused_by_name(make_gguf, tmp_path):
    built = make_gguf(arch="falcon")
    with pytest.raises(UnsupportedError) as e:
        import_gguf(built.path, tmp_path / "out")
    assert "falcon" in _one_line(e)


def test_bad_dtype(make_gguf, tmp_path):
    with pytest.raises(InvalidArgumentError, match="dtype"):
        import_gguf(make_gguf().path, tmp_path / "out", dtype="int8")


def test_parser_reads_what_the_gguf_package_reads(make_gguf):
    """Our parser against the `gguf` package's reader: every field and every tensor."""
    from mlxlm_gguf._reader import open_gguf

    built = make_gguf(spm=None)
    ours = open_gguf(built.path)
    theirs = gguf.GGUFReader(built.path)
    fields = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == fields.keys()
    for key, value in fields.items():
        if isinstance(value, float) or (
            isinstance(value, list) and value and isinstance(value[0], float)
        ):
            np.testing.assert_allclose(ours.metadata[key], value, rtol=1e-7, err_msg=key)
        else:
            assert ours.metadata[key] == value, key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, t in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == t.tensor_type and mine.n_bytes == t.n_bytes, t.name
        assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist())), t.name
        assert np.array_equal(
            np.asarray(mine.data).view(np.uint8).reshape(-1),
            np.asarray(t.data).view(np.uint8).reshape(-1),
        ), t.name
