"""Tiny llama GGUF files built in code with the `gguf` package's writer.

The weights are random, the tokenizer is a byte-level BPE trained in a fraction of a
second by the `tokenizers` trainer, and Q/K rows are permuted exactly as llama.cpp's
convert script does (`permute` in convert_hf_to_gguf.py: per head, view the rows as
(2, half) and swap to (half, 2)), so the importer has to undo a layout it did not create.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "In 2024 there were 365 days, 12 months and 52 weeks.",
    "Tokenizers split text into pieces; pieces become ids.",
    "héllo wörld — naïve café, 東京 and ünïcödé.",
    "the theory of the thing: they think that these are there.",
] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_TYPES: dict[str, Q] = {
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q4_1,
    "attn_v": Q.Q8_0,
    "attn_output": Q.F16,
    "ffn_gate": Q.Q4_1,
    "ffn_up": Q.Q5_1,  # kept as MLX 5-bit affine
    "ffn_down": Q.MXFP4,  # not an affine grid: must be dequantized
    "output": Q.BF16,
    "norm": Q.F32,
}

HF_PARTS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


@dataclass
class Spec:
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    ffn: int = 96
    ctx: int = 256
    eps: float = 1e-5
    theta: float = 10000.0
    arch: str = "llama"
    pre: str = "smollm"
    tied: bool = True
    add_bos: bool | None = False  # None: leave the flag out (llama.cpp's default applies)
    types: dict[str, Q] = field(default_factory=lambda: dict(DEFAULT_TYPES))
    rope_freqs: np.ndarray | None = None
    # A SentencePiece vocabulary (tokens, scores, token types) instead of the byte-level BPE.
    spm: tuple[list[str], list[float], list[int]] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class Built:
    path: Path
    spec: Spec
    hf: dict[str, np.ndarray]  # the float weights in Hugging Face row order
    gguf_names: dict[str, str]  # HF name -> GGUF tensor name
    tokens: list[str]
    merges: list[str]


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time permutation of Q/K rows (the layout we must undo)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.fixture
def default_types() -> dict[str, Q]:
    return dict(DEFAULT_TYPES)


@pytest.fixture(scope="session")
def bpe_vocab() -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as "a b") from a byte-level BPE trained on CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    raw_merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    return tokens, merges


def _add(w: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: Q) -> None:
    if qtype == Q.F32:
        w.add_tensor(name, data.astype(np.float32))
    elif qtype == Q.F16:
        w.add_tensor(name, data.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)


@pytest.fixture
def make_gguf(tmp_path: Path, bpe_vocab) -> Callable[..., Built]:
    counter = iter(range(1000))

    def build(spec: Spec | None = None, *, seed: int = 0, **overrides) -> Built:
        spec = spec or Spec(**overrides)
        tokens, merges = bpe_vocab
        rng = np.random.default_rng(seed)
        path = tmp_path / f"tiny-{next(counter)}.gguf"
        w = gguf.GGUFWriter(path, spec.arch)
        w.add_block_count(spec.layers)
        w.add_context_length(spec.ctx)
        w.add_embedding_length(spec.hidden)
        w.add_feed_forward_length(spec.ffn)
        w.add_head_count(spec.heads)
        w.add_head_count_kv(spec.kv_heads)
        w.add_rope_freq_base(spec.theta)
        w.add_layer_norm_rms_eps(spec.eps)
        w.add_rope_dimension_count(spec.head_dim)
        if spec.spm is None:
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(spec.pre)
            w.add_token_list(tokens)
            w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
            w.add_token_merges(merges)
            w.add_bos_token_id(1)
            w.add_eos_token_id(2)
            w.add_unk_token_id(0)
            w.add_pad_token_id(2)
        else:  # SentencePiece ids as llama's trainer sets them: <unk> 0, <s> 1, </s> 2
            tokens, scores, token_types = spec.spm
            merges = []
            w.add_tokenizer_model("llama")
            w.add_token_list(tokens)
            w.add_token_scores(scores)
            w.add_token_types(token_types)
            w.add_bos_token_id(1)
            w.add_eos_token_id(2)
            w.add_unk_token_id(0)
        w.add_vocab_size(len(tokens))
        if spec.add_bos is not None:
            w.add_add_bos_token(spec.add_bos)
        w.add_chat_template(CHAT_TEMPLATE)

        hf: dict[str, np.ndarray] = {}
        names: dict[str, str] = {}

        def tensor(gname: str, hname: str, shape: tuple[int, ...], kind: str, scale=0.1):
            data = (rng.standard_normal(shape) * scale).astype(np.float32)
            if kind == "norm":
                data = 1.0 + data
            hf[hname] = data
            names[hname] = gname
            stored = data
            if kind == "attn_q":
                stored = llamacpp_permute(data, spec.heads)
            elif kind == "attn_k":
                stored = llamacpp_permute(data, spec.kv_heads)
            _add(w, gname, stored, spec.types[kind])

        hd, h = spec.head_dim, spec.hidden
        tensor("token_embd.weight", "model.embed_tokens.weight", (len(tokens), h), "token_embd")
        for i in range(spec.layers):
            shapes = {
                "attn_q": (spec.heads * hd, h),
                "attn_k": (spec.kv_heads * hd, h),
                "attn_v": (spec.kv_heads * hd, h),
                "attn_output": (h, spec.heads * hd),
                "ffn_gate": (spec.ffn, h),
                "ffn_up": (spec.ffn, h),
                "ffn_down": (h, spec.ffn),
                "attn_norm": (h,),
                "ffn_norm": (h,),
            }
            for part, shape in shapes.items():
                kind = "norm" if part.endswith("norm") else part
                tensor(
                    f"blk.{i}.{part}.weight",
                    f"model.layers.{i}.{HF_PARTS[part]}.weight",
                    shape,
                    kind,
                )
        tensor("output_norm.weight", "model.norm.weight", (h,), "norm")
        if not spec.tied:
            tensor("output.weight", "lm_head.weight", (len(tokens), h), "output")
        if spec.rope_freqs is not None:
            w.add_tensor("rope_freqs.weight", spec.rope_freqs.astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return Built(path, spec, hf, names, tokens, merges)

    return build


# --- export side: tiny MLX model directories with real tokenizers (see _builders.py) -----


def _load_builders():
    import importlib.util

    path = Path(__file__).with_name("_builders.py")
    spec = importlib.util.spec_from_file_location("mlxlm_gguf_tests_builders", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def builders():
    return _load_builders()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, builders) -> Callable[[str], Path]:
    """``tokenizer_dir(kind)``: a tokenizer folder; kind is a llama.cpp pre name or "spm"."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            folder = tmp_path_factory.mktemp(f"tok-{kind}")
            made[kind] = (
                builders.write_spm(folder)
                if kind == "spm"
                else builders.write_byte_bpe(folder, kind)
            )
        return made[kind]

    return get


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, builders, tokenizer_dir) -> Callable[..., Path]:
    """``model_dir(arch, tokenizer="gpt-2")``: a tiny float32 MLX model directory."""
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, tokenizer: str = "gpt-2") -> Path:
        key = (arch, tokenizer)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"model-{arch}-{tokenizer}")
            made[key] = builders.write_model(folder, arch, tokenizer_dir(tokenizer))
        return made[key]

    return get
