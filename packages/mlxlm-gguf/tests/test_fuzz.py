"""The importer's parser on 10,000 mutated GGUF files: errors, never crashes.

A small but complete GGUF file (a one-layer llama with a byte-level BPE vocabulary, F32,
F16, Q8_0 and Q4_0 tensors and a chat template) is damaged by hypothesis: bytes
overwritten, bytes inserted, the file cut short. Everything import reads before it touches
tensor data (header, metadata, tokenizer, config, tensor records and shapes) must either
succeed or raise one of our one-line errors; any other exception is a bug.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlxlm_core import MlxlmError
from mlxlm_gguf._import import parse_gguf
from mlxlm_gguf._reader import open_gguf

pytestmark = pytest.mark.timeout(240)

TOKENS = ["<s>", "</s>", "a", "b", "c", "Ġ", "ab", "Ġa", "abc", "Ċ", "1", "2"]
MERGES = ["a b", "Ġ a", "ab c"]


def _seed_file() -> bytes:
    hidden, ffn, vocab = 32, 32, len(TOKENS)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed.gguf"
        w = gguf.GGUFWriter(path, "llama")
        w.add_block_count(1)
        w.add_context_length(64)
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(ffn)
        w.add_head_count(2)
        w.add_head_count_kv(1)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(TOKENS)
        w.add_token_types([3, 3] + [1] * (vocab - 2))
        w.add_token_merges(MERGES)
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_add_bos_token(True)
        w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

        def add(name: str, shape: tuple[int, ...], qtype: Q) -> None:
            data = rng.standard_normal(shape).astype(np.float32)
            if qtype in (Q.F32, Q.F16):
                w.add_tensor(name, data.astype(np.float32 if qtype == Q.F32 else np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

        add("token_embd.weight", (vocab, hidden), Q.Q8_0)
        add("output_norm.weight", (hidden,), Q.F32)
        add("blk.0.attn_norm.weight", (hidden,), Q.F32)
        add("blk.0.ffn_norm.weight", (hidden,), Q.F32)
        add("blk.0.attn_q.weight", (hidden, hidden), Q.Q4_0)
        add("blk.0.attn_k.weight", (hidden // 2, hidden), Q.Q4_0)
        add("blk.0.attn_v.weight", (hidden // 2, hidden), Q.F16)
        add("blk.0.attn_output.weight", (hidden, hidden), Q.F16)
        add("blk.0.ffn_gate.weight", (ffn, hidden), Q.Q8_0)
        add("blk.0.ffn_up.weight", (ffn, hidden), Q.Q8_0)
        add("blk.0.ffn_down.weight", (hidden, ffn), Q.Q4_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


SEED = _seed_file()
_FD, _SCRATCH = tempfile.mkstemp(suffix=".gguf")
os.close(_FD)
SCRATCH = Path(_SCRATCH)


def _parse(data: bytes) -> None:
    SCRATCH.write_bytes(data)
    try:
        parse_gguf(open_gguf(SCRATCH))
    except MlxlmError as e:
        assert "\n" not in str(e)


def test_the_seed_file_parses():
    _parse(SEED)


# Mutations aimed where they hurt: the header and metadata come first in the file, so most
# edits land in the first few hundred bytes, where counts, lengths and types live.
_offsets = st.one_of(st.integers(0, 400), st.integers(0, len(SEED) - 1))
_edits = st.lists(st.tuples(_offsets, st.integers(0, 255)), min_size=1, max_size=6)
_cut = st.one_of(st.none(), st.integers(0, len(SEED)))
_insert = st.one_of(st.none(), st.tuples(_offsets, st.binary(min_size=1, max_size=16)))


@settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
@given(edits=_edits, cut=_cut, insert=_insert)
def test_mutated_files_never_crash_the_parser(edits, cut, insert):
    data = bytearray(SEED)
    for offset, value in edits:
        data[offset] = value
    if insert is not None:
        data[insert[0] : insert[0]] = insert[1]
    if cut is not None:
        del data[cut:]
    _parse(bytes(data))
