"""AWQ finds, in every block of the default model, the producers MLX-LM's AWQ names by hand.

In tests-integration: it needs the default model, which mlxlm-quant's own (isolated)
environment does not install.

Our AWQ discovers which module's output feeds each group of layers (and so can absorb the
``1/s`` of the scales) by folding random scales and checking the block output is unchanged.
MLX-LM's AWQ lists them per family; for llama (SmolLM2) its table is the reference:
``input_layernorm`` for q/k/v, ``post_attention_layernorm`` for gate/up, ``up_proj`` for
``down_proj``, and nothing for ``o_proj`` (with grouped-query attention no single module
produces its input). The blocks are fed real text, so the late blocks' residual stream
carries its few massive channels: an error measured against the largest value overall let
``down_proj`` (same width as ``o_proj``'s input) pass as ``o_proj``'s producer there.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS
from mlxlm_core import load
from mlxlm_core.quantize import dequantize_model
from mlxlm_quant import calibration_windows
from mlxlm_quant._awq import _discover
from mlxlm_quant._blocks import block_extras, block_inputs, linear_paths, run_block


def _reference(block_prefix: str = "") -> dict[frozenset[str], str | None]:
    """MLX-LM's llama table as ``{group of layer paths: producer path}``, ``o_proj`` added."""
    table: dict[frozenset[str], str | None] = {}
    for conf in AWQ_MODEL_CONFIGS["llama"].scale_configs:
        inner = f"{conf.block}." if conf.block else ""
        table[frozenset(inner + p for p in conf.layers)] = conf.prev
    table[frozenset({"self_attn.o_proj"})] = None  # scaled by no one: only clipped
    return table


def test_default_model_producers_match_mlx_lm() -> None:
    model, tokenizer = load()
    dequantize_model(model)
    assert (
        model.args.num_key_value_heads < model.args.num_attention_heads
    )  # GQA: no o_proj producer
    tokens = calibration_windows(tokenizer, num_samples=1, sequence_length=64)
    extras = block_extras(model, tokens.shape[1])
    hidden = block_inputs(model, tokens, batch_size=1)[0]
    expected = _reference()
    wrong = []
    for i, block in enumerate(model.layers):
        targets = linear_paths(block)
        found = {frozenset(g): p for g, p, _ in _discover(block, hidden, extras[i], targets)}
        if found != expected:
            wrong.append((i, found))
        hidden = run_block(block, [hidden], extras[i])[0]
    # The massive channels the old check missed are really there in the late blocks.
    peak = mx.abs(hidden).max(axis=(0, 1))
    assert float(peak.max()) > 20 * float(mx.median(peak))
    assert not wrong, wrong
