"""The training loop: exact resume, accumulation, checkpointing, packing, optimizers."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlxlm_core import InvalidArgumentError, load
from mlxlm_core.adapters import AdapterConfig
from mlxlm_tune import (
    OPTIMIZERS,
    Batcher,
    DataPosition,
    Dataset,
    DatasetSplits,
    Sample,
    Trainer,
    TrainerOptions,
    TrainingCallback,
    TrainingConfig,
    build_optimizer,
    build_schedule,
    collate,
    disable_grad_checkpoint,
    enable_grad_checkpoint,
    prepare_model,
    sft_loss,
    train,
)

RNG = np.random.default_rng(0)


def _samples(n: int, vocab: int = 300, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(6, 30))
        mask = rng.random(length) < 0.7
        mask[0] = False
        out.append(Sample(rng.integers(0, vocab, length).astype(np.int32), mask, f"s{i}"))
    return out


class Recorder(TrainingCallback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_step_end(self, info: dict[str, Any]) -> None:
        self.losses[info["iteration"]] = info["loss"]

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        if info["iteration"] == self.stop_at:
            raise KeyboardInterrupt  # the run dies right after writing its checkpoint


def _config(run: Path, **kw: Any) -> TrainingConfig:
    base: dict[str, Any] = {
        "adapter_path": str(run),
        "iters": 12,
        "batch_size": 3,
        "num_layers": 2,
        "learning_rate": 3e-3,
        "lr_schedule": "cosine",
        "warmup": 3,
        "save_every": 6,
        "steps_per_eval": 6,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.2},
        "grad_accumulation_steps": 2,
        "optimizer": "adamw",
    }
    return TrainingConfig(**{**base, **kw})


def _splits() -> DatasetSplits:
    return DatasetSplits(
        Dataset(_samples(10), "train"), Dataset(_samples(4, seed=1), "valid"), None
    )


def test_resume_is_exact(tiny: Path, tmp_path: Path) -> None:
    """2N steps in one go == N steps, a crash, then resuming for N more."""
    model, tok = load(tiny)
    whole = Recorder()
    train(
        _config(tmp_path / "a"), model=model, tokenizer=tok, datasets=_splits(), callbacks=[whole]
    )
    weights_a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))

    model, tok = load(tiny)
    first = Recorder(stop_at=6)
    with pytest.raises(KeyboardInterrupt):
        train(
            _config(tmp_path / "b"),
            model=model,
            tokenizer=tok,
            datasets=_splits(),
            callbacks=[first],
        )
    model, tok = load(tiny)
    second = Recorder()
    config = _config(tmp_path / "b", resume=str(tmp_path / "b"))
    result = train(config, model=model, tokenizer=tok, datasets=_splits(), callbacks=[second])
    weights_b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))

    assert result.steps == 12 and sorted(second.losses) == list(range(7, 13))
    resumed = {**first.losses, **second.losses}
    assert list(resumed) == list(whole.losses)
    np.testing.assert_allclose(list(resumed.values()), list(whole.losses.values()), rtol=1e-5)
    assert set(weights_a) == set(weights_b)
    for name in weights_a:
        np.testing.assert_allclose(np.array(weights_a[name]), np.array(weights_b[name]), atol=1e-6)
    # and training moved the adapters (so equality is not trivial)
    assert any(np.abs(np.array(v)).max() > 0 for k, v in weights_a.items() if "lora_b" in k)


def test_resume_refuses_another_optimizer(tiny: Path, tmp_path: Path) -> None:
    model, tok = load(tiny)
    train(_config(tmp_path, iters=6), model=model, tokenizer=tok, datasets=_splits(), callbacks=[])
    model, tok = load(tiny)
    config = _config(tmp_path, iters=8, resume=str(tmp_path), optimizer="sgd")
    with pytest.raises(Exception, match="optimizer state does not match"):
        train(config, model=model, tokenizer=tok, datasets=_splits(), callbacks=[])


def _lora_model(tiny: Path) -> nn.Module:
    model, _ = load(tiny)
    mx.random.seed(3)
    prepare_model(model, AdapterConfig(num_layers=2, rank=4))
    # non-zero B, so every factor has a gradient
    for _, m in model.named_modules():
        if "lora_b" in m:
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    return model


def _grads(model: nn.Module, batch: Any) -> dict[str, np.ndarray]:
    (_, _), g = nn.value_and_grad(model, sft_loss)(model, batch)
    return {k: np.array(v) for k, v in tree_flatten(g)}


def test_packing_equals_separate_rows(tiny: Path) -> None:
    model = _lora_model(tiny)
    samples = _samples(6)
    rows = Batcher(
        Dataset(samples), batch_size=6, max_seq_length=64, pack=True, shuffle=False
    ).plan(0)[0]
    assert len(rows) < 6  # several examples share a row
    packed = Batcher(Dataset(samples), batch_size=6, max_seq_length=64, pack=True).make_batch(rows)
    separate = collate([[s] for s in samples])
    (lp, np_), (ls, ns) = sft_loss(model, packed), sft_loss(model, separate)
    assert np_.item() == ns.item() == sum(s.num_targets for s in samples)
    assert lp.item() == pytest.approx(ls.item(), rel=1e-5)
    gp, gs = _grads(model, packed), _grads(model, separate)
    for name in gs:
        np.testing.assert_allclose(gp[name], gs[name], atol=1e-5)


def test_grad_checkpoint_is_per_instance_and_exact(tiny: Path) -> None:
    model, other = _lora_model(tiny), _lora_model(tiny)
    batch = collate([[s] for s in _samples(4)])
    plain = _grads(model, batch)
    cls = type(model.layers[0])
    assert enable_grad_checkpoint(model) == 2
    assert type(model.layers[0]) is not cls and isinstance(model.layers[0], cls)
    assert type(other.layers[0]) is cls  # another model of the same class is untouched
    assert cls.__call__ is type(other.layers[1]).__call__
    checkpointed = _grads(model, batch)
    for name in plain:
        np.testing.assert_allclose(checkpointed[name], plain[name], atol=1e-6)
    disable_grad_checkpoint(model)
    assert type(model.layers[0]) is cls


def test_accumulation_equals_one_big_batch(tiny: Path) -> None:
    samples = _samples(4)
    results = []
    for batches in (
        [collate([[s] for s in samples[:2]]), collate([[s] for s in samples[2:]])],
        [collate([[s] for s in samples])],
    ):
        model = _lora_model(tiny)
        trainer = Trainer(
            model, optim.SGD(learning_rate=0.5), options=TrainerOptions(compile=False)
        )
        loss, count = trainer.train_step(batches)
        results.append((loss, count, dict(tree_flatten(model.trainable_parameters()))))
    (l1, c1, w1), (l2, c2, w2) = results
    assert c1 == c2 and l1 == pytest.approx(l2, rel=1e-5)
    # Two half-batch gradient sums vs one: float32 summation order only (the BLAS picks its
    # own blocking per shape), i.e. a few ulps of the weights' size.
    for name in w1:
        np.testing.assert_allclose(np.array(w1[name]), np.array(w2[name]), rtol=1e-5, atol=1e-6)


def test_batcher_covers_every_example_once_per_epoch() -> None:
    data = Dataset(_samples(23))
    for pack in (False, True):
        batcher = Batcher(data, batch_size=4, max_seq_length=64, pack=pack, seed=5)
        seen = sorted(i for batch in batcher.plan(1) for row in batch for i in row)
        assert seen == list(range(23))
        assert batcher.plan(1) == Batcher(
            data, batch_size=4, max_seq_length=64, pack=pack, seed=5
        ).plan(1)
    # a position restarts the stream exactly there
    batcher = Batcher(data, batch_size=4)
    stream = list(batcher.batches(loop=False))
    again = list(batcher.batches(DataPosition(0, 3), loop=False))
    assert [p for _, p in again] == [p for _, p in stream[3:]]
    assert np.array_equal(np.array(again[0][0].tokens), np.array(stream[3][0].tokens))


def test_bucketing_reduces_padding() -> None:
    data = Dataset(_samples(64))

    def padded(bucket: bool) -> int:
        batcher = Batcher(data, batch_size=8, bucket=bucket)
        return sum(b.tokens.size for b, _ in batcher.batches(loop=False))

    assert padded(True) < padded(False)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_lowers_the_loss(tiny: Path, name: str) -> None:
    model = _lora_model(tiny)
    batch = collate([[s] for s in _samples(3)])
    lr = {"sgd": 0.5, "adafactor": 1e-2, "muon": 2e-2}.get(name, 1e-2)
    trainer = Trainer(model, build_optimizer(name, lr), options=TrainerOptions(compile=False))
    first = trainer.train_step([batch])[0]
    for _ in range(8):
        last = trainer.train_step([batch])[0]
    assert last < first


def test_schedule_warmup_then_cosine() -> None:
    schedule = build_schedule(
        1e-3, name="cosine", total_steps=10, warmup=4, warmup_init=0.0, end=1e-5
    )
    values = [schedule(mx.array(i)).item() for i in range(11)]
    assert values[0] == 0.0 and values[1] == pytest.approx(2.5e-4)
    assert values[4] == pytest.approx(1e-3) and values[10] == pytest.approx(1e-5, rel=1e-3)
    assert all(a >= b for a, b in itertools.pairwise(values[4:]))


def test_bad_optimizer_options_named() -> None:
    with pytest.raises(InvalidArgumentError, match=r"optimizer_config\.adam: unknown option"):
        build_optimizer("adam", 1e-3, {"betas": [0.9, 0.99], "momentum": 0.9})


def test_trainer_takes_any_loss_and_any_trainable_parameters(tiny: Path) -> None:
    """What a learned quantizer needs: its own loss on its own parameters (here the norms)."""
    model, _ = load(tiny)
    batch = collate([[Sample(np.array([1, 2, 3, 4, 5, 6], np.int32), np.ones(6, bool))]])
    batch.extra["target"] = 0.5 * model(batch.tokens)  # a teacher's output, per batch
    model.freeze()
    for block in model.layers:
        block.input_layernorm.unfreeze()

    def distill(m: nn.Module, batch: Any) -> tuple[mx.array, mx.array]:
        out = m(batch.tokens)
        return ((out - batch.extra["target"]) ** 2).mean(), mx.array(1.0)

    trainer = Trainer(
        model,
        optim.Adam(learning_rate=1e-2),
        loss=distill,
        options=TrainerOptions(clear_cache_threshold=1),
    )
    first = trainer.train_step([batch])[0]
    for _ in range(5):
        last = trainer.train_step([batch])[0]
    assert last < first
    # --clear-cache-threshold took effect: only the step's last few scalars are cached
    assert mx.get_cache_memory() < 4096
    trainer.options.clear_cache_threshold = 0
    trainer.train_step([batch])
    assert mx.get_cache_memory() > 4096
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert names and all("input_layernorm" in k for k in names)
