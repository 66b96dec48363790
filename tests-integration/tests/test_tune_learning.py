"""LoRA on the default model learns facts it cannot know, and the fused model keeps them.

A small CI version of ``tools/tune_facts.py`` (whose facts and greedy-recall check it uses):
12 made-up facts, QLoRA on the 4-bit default model as shipped, 30 steps of ~4 facts
(packed rows). Recall must go from
~0% to >= 90%, and the model written by ``mlxlm_tune.fuse`` (adapted layers float16, the
rest 4-bit) and loaded back must recall as well. The >= 100-fact demonstration with LoRA,
DoRA and QLoRA is the tool's (its figures are in the tune package README).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from mlxlm_core import load
from mlxlm_tune import TrainingConfig, fuse, train

# ~1-2 minutes on an idle 2-core machine (30 blocks forward, 8 backward, 30 steps); the
# generous timeout is for a shared, loaded one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _facts_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tune_facts", TOOLS / "tune_facts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tune_facts"] = module
    spec.loader.exec_module(module)
    return module


def test_qlora_learns_made_up_facts_and_fused_model_recalls(tmp_path: Path) -> None:
    tool = _facts_tool()
    facts = tool.make_facts(12)
    model, tokenizer = load()
    source = str(model.model_path)
    assert tool.recall(model, tokenizer, facts) <= 1 / 12  # the base cannot know them
    config = TrainingConfig(
        model=source,
        data=str(tool.write_facts(tmp_path / "data", facts)),
        iters=30,
        batch_size=1,
        pack=True,  # ~4 facts a row, no padding: the cheapest way through 30 blocks on a CPU
        max_seq_length=72,
        num_layers=8,
        learning_rate=2e-4,
        lora_parameters={"rank": 16, "scale": 20.0, "dropout": 0.0},
        adapter_path=str(tmp_path / "adapter"),
        save_every=0,
        seed=0,
    )
    train(config, model=model, tokenizer=tokenizer, callbacks=[])
    learned = tool.recall(model, tokenizer, facts)
    assert learned >= 0.9, learned
    report = fuse(source, tmp_path / "adapter", tmp_path / "fused")
    assert report.mode == "float16-layers"
    fused, fused_tokenizer = load(report.save_path)
    assert tool.recall(fused, fused_tokenizer, facts) >= 0.9
