"""Tiny MLX model directories with real tokenizers, for the export tests.

Loaded by path (pytest runs with ``--import-mode=importlib``): by this package's conftest
and by tests-integration's llama.cpp tests, which export the same models.

Tokenizers are trained in milliseconds: byte-level BPEs with each pre-tokenizer llama.cpp
knows by name (their tokenizer.json spelled as the real model families spell them), and a
SentencePiece BPE trained by `sentencepiece` and converted by transformers, as a Llama 2
or Mistral checkpoint's tokenizer.json is. Weights are random but with random norms and
biases too, so a misplaced one shows.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Isn't it? We're sure, you've seen it!",
    "Héllo wörld, naïve café, crème brûlée, déjà vu, Ångström, façade, jalapeño.",
    "Привет, как дела? Всё хорошо. Ελληνικά γράμματα. שלום עולם. مرحبا بالعالم.",
    "你好，世界！今天天气很好。我们去公园散步吧。日本語のテキストも少し。한국어 문장입니다.",
    "Emoji: 😀 🎉 👍🏽 🇫🇷 👨‍👩‍👧 ❤️ 🚀 — and math: ∑ x² ≤ ∞, π ≈ 3.14159.",
    "def add(a, b):\n    return a + b  # tabs\tand\nnewlines\r\n  indented   spaces",
    "In 2024 there were 365 days, 12 months and 52 weeks; 1234567 seconds or so.",
]
# A multilingual text with emoji, longer than 256 tokens for every tokenizer here.
LONG_TEXT = " ".join(CORPUS) + "\n" + " ".join(reversed(CORPUS[2:]))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def _byte_level(use_regex: bool) -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=use_regex)


def _split(pattern: str) -> pre_tokenizers.PreTokenizer:
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, _byte_level(False)])


BYTE_LEVEL_PRES = {
    "gpt-2": lambda: _byte_level(True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _byte_level(True)]
    ),
    "llama-bpe": lambda: _split(_LLAMA3),
    "qwen2": lambda: _split(_QWEN2),
}


def byte_bpe(pre: str = "gpt-2", *, vocab_size: int = 420) -> Tokenizer:
    """A byte-level BPE with ChatML specials, split as the named family splits."""
    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = BYTE_LEVEL_PRES[pre]()
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    return tok


def write_byte_bpe(folder: Path, pre: str = "gpt-2") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    byte_bpe(pre).save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def write_spm(folder: Path) -> Path:
    """A SentencePiece BPE (byte fallback) saved as transformers converts Llama's."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10),
        model_writer=buf,
        vocab_size=640,  # ~420 characters (character_coverage=1) + merges
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": True,
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    (folder / "tokenizer.model").unlink()  # tokenizer.json only, as export sees it
    return folder


_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
}
# Every architecture export supports, with the features that distinguish them switched on.
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        **_COMMON,
        "model_type": "llama",
        "tie_word_embeddings": True,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "llama_bias": {
        **_COMMON,
        "model_type": "llama",
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
    "mistral": {
        **_COMMON,
        "model_type": "mistral",
        "tie_word_embeddings": False,
        "rope_theta": 1_000_000.0,
    },
    "qwen2": {
        **_COMMON,
        "model_type": "qwen2",
        "tie_word_embeddings": True,
        # Qwen2.5's long-context setting, with an original length the test text exceeds.
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    },
    "qwen3": {**_COMMON, "model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": True},
    "qwen3_moe": {
        **_COMMON,
        "model_type": "qwen3_moe",
        "head_dim": 16,
        "tie_word_embeddings": False,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
    },
    "mixtral": {
        **_COMMON,
        "model_type": "mixtral",
        "tie_word_embeddings": False,
        "rope_theta": 1_000_000.0,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "gemma": {**_COMMON, "model_type": "gemma", "hidden_act": "gelu_pytorch_tanh"},
    "gemma2": {
        **_COMMON,
        "model_type": "gemma2",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 32,  # short, so the window binds within the test text
    },
    "gemma3_text": {
        **_COMMON,
        "model_type": "gemma3_text",
        "num_hidden_layers": 3,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "sliding_window": 32,
        "sliding_window_pattern": 3,  # two sliding layers, then a global one
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
    "phi3": {
        **_COMMON,
        "model_type": "phi3",
        "tie_word_embeddings": False,
        "partial_rotary_factor": 0.5,
    },
}


# Row norms of the embedding, the output head and MoE routers are log-normal with this
# spread. Gaussian rows make every logit a near tie (the top two of 400 random normals are
# ~0.3 sigma apart), so llama.cpp's activation rounding would flip argmaxes that no trained
# model leaves that close; with a few rows standing out, as in trained models, predictions
# are decided (mean top probability ~0.99, still ~20 different tokens predicted).
SPREAD = 2.0


def randomize(model: Any, *, seed: int) -> Any:
    """Random norms and biases too; matrices keep a fan-in scaled spread (see SPREAD)."""
    mx.random.seed(seed)
    # Gemma stores each norm's scale as an offset from one.
    one = 0.0 if type(model).model_type.startswith("gemma") else 1.0
    params = []
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            value = one + 0.2 * mx.random.normal(value.shape)
        elif name.endswith(".bias"):
            value = 0.2 * mx.random.normal(value.shape)
        elif value.ndim > 1:
            value = mx.random.normal(value.shape) * value.shape[-1] ** -0.5
            if name.endswith(("embed_tokens.weight", "lm_head.weight", ".gate.weight")):
                value = value * mx.exp(SPREAD * mx.random.normal((value.shape[0], 1)))
        params.append((name, value.astype(mx.float32)))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def write_model(folder: Path, name: str, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A model directory: CONFIGS[name] sized to the tokenizer, random float32 weights."""
    import shutil

    from mlxlm_core.models import get_model_classes

    folder.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    config = copy.deepcopy(CONFIGS[name])
    config["vocab_size"] = max([vocab - 1, *(t["id"] for t in added)]) + 1
    model_cls, args_cls = get_model_classes(config["model_type"])
    model = randomize(model_cls(args_cls.from_dict(config)), seed=seed)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    return folder
