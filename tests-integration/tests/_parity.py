"""Helpers of the logits-parity tests against mlx-lm (test_model_parity.py).

Our tiny random model's parameters are written out the way a Hugging Face checkpoint of
that model type stores them (one tensor per expert, GPT-2's transposed Conv1D matrices,
GPT-NeoX's ``gpt_neox.`` prefix, DeepSeek's whole ``kv_b_proj``, the buffers transformers
saves), then loaded into our model and into mlx-lm's through each library's own
``sanitize``: the comparison covers weight naming, layouts and expert stacking as well as
the forward pass.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core.models import get_model_classes

TOL = 1e-4

# Checkpoints name these experts' projections w1/w2/w3 (the others keep gate/up/down).
_W123_EXPERTS = {"mixtral", "phimoe"}
_W123 = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# Tied models whose checkpoints carry a copy of the head anyway (both sanitizes drop it).
_TIED_HEAD_COPY = {"llama", "qwen2", "qwen3", "qwen3_moe", "gemma3_text"}
# mlx-lm's own remapping of model types.
_REF_MODULE = {"mistral": "llama"}
# name -> config changes for mlx-lm only, each the same model in mlx-lm's reading.
_REF_OVERRIDES: dict[str, dict[str, Any]] = {
    # mlx-lm's tied MiniCPM path skips the hidden_size / dim_model_base division; it runs
    # real (tied) MiniCPM checkpoints untied, with the embedding copied into lm_head.
    "minicpm_tied": {"tie_word_embeddings": False},
}
# Checkpoint name of the token embedding, where it is not model.embed_tokens.
_EMBED_KEY = {"internlm2": "model.tok_embeddings.weight", "exaone": "transformer.wte.weight"}


def tokens(shape: tuple[int, ...], seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 128, size=shape))


def max_diff(a: mx.array, b: mx.array) -> float:
    assert a.shape == b.shape
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


def perturb_constants(model: nn.Module, *, seed: int) -> nn.Module:
    """Give every still-constant vector (norms conftest's naming misses, such as GPT-2's
    ``ln_*``, router biases) random values, so that dropping or misplacing one shows."""
    rng = np.random.default_rng(seed)
    params = []
    for name, value in tree_flatten(model.parameters()):
        if value.ndim == 1 and value.size > 1 and bool(mx.all(value == value[0]).item()):
            noise = mx.array(rng.normal(size=value.shape).astype(np.float32))
            value = value + (0.2 if float(value[0].item()) != 0.0 else 0.05) * noise
        params.append((name, value))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def to_hf_weights(model: nn.Module, config: dict[str, Any]) -> dict[str, mx.array]:
    """Our parameters as a Hugging Face checkpoint of this model type names and lays them out."""
    model_type = config["model_type"]
    weights: dict[str, mx.array] = {}
    latent: dict[str, dict[str, mx.array]] = {}
    for key, value in tree_flatten(model.parameters()):
        if match := re.fullmatch(r"(.+)\.switch_mlp\.(\w+)\.weight", key):
            block, proj = match.groups()
            proj = _W123[proj] if model_type in _W123_EXPERTS else proj
            for e in range(value.shape[0]):
                weights[f"{block}.experts.{e}.{proj}.weight"] = value[e]
        elif match := re.fullmatch(r"(.+)\.(embed_q|unembed_out)\.weight", key):
            latent.setdefault(match[1], {})[match[2]] = value
        elif model_type == "gpt2":
            key = key.removeprefix("model.")
            weights[key] = value.T if _CONV1D.fullmatch(key) else value
        elif model_type == "gpt_neox":
            key = key.replace("model.h.", "gpt_neox.layers.").replace("model.", "gpt_neox.")
            weights[key.replace("gpt_neox.embed_out", "embed_out")] = value
        else:
            weights[key] = value
    for prefix, parts in latent.items():
        # kv_b_proj rows are, per head, the nope-key rows then the value rows.
        wk = parts["embed_q"].swapaxes(1, 2)  # (heads, nope, rank)
        wv = parts["unembed_out"]  # (heads, v_head_dim, rank)
        weights[f"{prefix}.kv_b_proj.weight"] = mx.concatenate([wk, wv], axis=1).reshape(
            -1, wk.shape[-1]
        )
    # Buffers transformers writes into these checkpoints; both loaders must drop them.
    if model_type == "gpt2":
        n = config["n_positions"]
        for i in range(config["n_layer"]):
            weights[f"h.{i}.attn.bias"] = mx.tril(mx.ones((n, n)))[None, None]
    if model_type == "gpt_neox":
        for i in range(config["num_hidden_layers"]):
            weights[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = mx.ones((2,))
            weights[f"gpt_neox.layers.{i}.attention.masked_bias"] = mx.array(-1e9)
    if model_type in _TIED_HEAD_COPY and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


def reference(name: str, config: dict[str, Any]) -> nn.Module:
    """mlx-lm's model of ``config`` (in mlx-lm's reading of ``name``'s fields)."""
    config = {**config, **_REF_OVERRIDES.get(name, {})}
    model_type = config["model_type"]
    module = importlib.import_module(f"mlx_lm.models.{_REF_MODULE.get(model_type, model_type)}")
    return module.Model(module.ModelArgs.from_dict(config))


def load_into(model: nn.Module, weights: dict[str, mx.array]) -> nn.Module:
    if hasattr(model, "sanitize"):  # some mlx-lm models take checkpoints as they are
        weights = model.sanitize(dict(weights))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def load_pair(name: str, config: dict[str, Any], source: nn.Module) -> tuple[nn.Module, Any]:
    """(ours, mlx-lm's), both loaded from the same Hugging Face-named weights."""
    hf = to_hf_weights(source, config)
    model_cls, args_cls = get_model_classes(config["model_type"])
    ours = load_into(model_cls(args_cls.from_dict(config)), hf)
    ref = reference(name, config)
    if "lm_head.weight" in dict(tree_flatten(ref.parameters())) and "lm_head.weight" not in hf:
        # mlx-lm runs this tied model untied: give it the head copy checkpoints often carry.
        hf = {**hf, "lm_head.weight": hf[_EMBED_KEY.get(name, "model.embed_tokens.weight")]}
    return ours, load_into(ref, hf)


def greedy(model: Any, cache: list[Any], prompt: mx.array, n: int) -> list[int]:
    """Greedy decoding that never repeats one of its last 8 tokens.

    Random tiny models with tied embeddings tend to echo one token forever under plain
    argmax, which would make equal tokens a weak check; banning recent tokens keeps the
    choice deterministic but forces it to depend on the whole context.
    """
    out: list[int] = []
    logits = model(prompt, cache=cache)
    for _ in range(n):
        last = np.array(logits[0, -1].astype(mx.float32))
        last[out[-8:]] = -np.inf
        out.append(int(last.argmax()))
        logits = model(mx.array([[out[-1]]]), cache=cache)
    return out
