"""DPO and ORPO raise the chosen-vs-rejected log-likelihood margin on held-out pairs."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlxlm_core import load
from mlxlm_tune import (
    Batcher,
    DatasetSplits,
    TrainingConfig,
    dpo_loss,
    encode_records,
    orpo_loss,
    parse_records,
    preference_margin,
    train,
)

WORDS = ["tide", "boats", "library", "bread", "flour", "water", "salt", "France", "Paris", "dawn"]


def _pairs(seed: int, n: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        topic = " ".join(rng.choice(WORDS, 3))
        rows.append(
            {
                "prompt": f"What about the {topic}?",
                "chosen": f"Yes, the {topic} is good.",
                "rejected": f"No, the {topic} is bad.",
            }
        )
    return rows


def _margin(model: object, data: object) -> float:
    batcher = Batcher(data, batch_size=len(data), shuffle=False)  # type: ignore[arg-type]
    (batch, _), *_ = batcher.batches(loop=False)
    return float(preference_margin(model, batch).item())  # type: ignore[arg-type]


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_preference_training_raises_held_out_margin(tiny: Path, tmp_path: Path, loss: str) -> None:
    model, tokenizer = load(tiny)
    train_set = encode_records(parse_records(enumerate(_pairs(0, 16))), tokenizer)  # type: ignore[arg-type]
    held_out = encode_records(parse_records(enumerate(_pairs(1, 6))), tokenizer)  # type: ignore[arg-type]
    assert train_set.is_preference
    before = _margin(model, held_out)
    config = TrainingConfig(
        adapter_path=str(tmp_path),
        loss=loss,
        beta=0.5,
        iters=30,
        batch_size=4,
        num_layers=2,
        learning_rate=5e-3,
        save_every=0,
        lora_parameters={"rank": 8, "scale": 10.0, "dropout": 0.0},
    )
    splits = DatasetSplits(train_set, held_out, None)
    result = train(config, model=model, tokenizer=tokenizer, datasets=splits, callbacks=[])
    after = _margin(model, held_out)
    assert after > before + 1.0, (before, after)
    assert result.val_loss is not None
    if loss == "dpo":
        # the reference was the untrained model: its margins were recorded per pair
        assert held_out.reference is not None and held_out.reference.shape == (6, 2)


def test_dpo_loss_formula() -> None:
    c, r = mx.array([-1.0, -2.0]), mx.array([-3.0, -1.0])
    rc, rr = mx.array([-1.5, -2.0]), mx.array([-2.5, -2.0])
    loss, margin = dpo_loss(c, r, rc, rr, beta=0.1)
    z = 0.1 * ((np.array([-1.0, -2.0]) - [-1.5, -2.0]) - (np.array([-3.0, -1.0]) - [-2.5, -2.0]))
    assert loss.item() == pytest.approx(np.mean(np.log1p(np.exp(-z))), rel=1e-6)
    assert margin.item() == pytest.approx(z.mean(), rel=1e-6)


def test_orpo_loss_formula() -> None:
    cm, rm, nll = mx.array([-0.5]), mx.array([-1.5]), mx.array([0.5])
    loss, ratio = orpo_loss(cm, rm, nll, beta=0.2)
    odds = lambda x: x - np.log1p(-np.exp(x))  # noqa: E731
    expected_ratio = odds(-0.5) - odds(-1.5)
    expected = 0.5 + 0.2 * np.log1p(np.exp(-expected_ratio))
    assert ratio.item() == pytest.approx(expected_ratio, rel=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_sft_on_preference_data_is_refused(tiny: Path, tmp_path: Path) -> None:
    model, tokenizer = load(tiny)
    data = encode_records(parse_records(enumerate(_pairs(0, 4))), tokenizer)  # type: ignore[arg-type]
    config = TrainingConfig(adapter_path=str(tmp_path), iters=1, num_layers=2)
    with pytest.raises(Exception, match="need --loss dpo or orpo"):
        train(config, model=model, tokenizer=tokenizer, datasets=DatasetSplits(data, None, None))
