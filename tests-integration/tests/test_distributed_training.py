"""Two ranks on loopback (MLX's ring backend): data-parallel LoRA equals one process.

``mlxlm lora`` started as two ranks (the way ``mlx.launch`` starts them: a host file and
``MLX_RANK``, free ports, bounded time) with a global ``--batch-size 4`` (2 rows per rank)
must train like one process with ``--batch-size 4``: the same loss at every step, the same
validation loss, and the same adapter weights at the end. The data is sized so that the
last batch of each epoch has one row (rank 1's slice is empty) and validation ends on a
one-row batch too. Only rank 0 writes files and prints: each rank runs in its own working
directory with the same relative ``--adapter-path``, and rank 1's stays empty.

Tolerance: the ranks sum token-weighted gradients in a different order than one process
(two half-batch forward passes, then an ``all_sum``), so values agree to float32 rounding,
not bit for bit: losses within a relative 1e-5, adapter weights within 1e-5 absolute.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from _launch import mlxlm_command, rank_envs  # registered by conftest.py
from mlxlm_server.testing import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LOSS_RTOL = 1e-5  # relative, per step train loss and validation loss
WEIGHT_ATOL = 1e-4  # absolute, final adapter weights
STEPS = 8
SENTENCE = (
    "the tide comes in twice a day and boats go out before dawn small library above post "
    "office opens on tuesday friday afternoons bread needs flour water salt time attention"
)


def _write_data(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    # 17 training rows: batches of 4, 4, 4, 4, 1 per epoch; 5 validation rows: 4, 1.
    for split, n in (("train", 17), ("valid", 5)):
        rows = [
            {"text": " ".join(rng.choice(SENTENCE.split(), int(rng.integers(4, 20))))}
            for _ in range(n)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dp")
    return {
        "model": build_tiny_model(root / "model"),
        "data": _write_data(root / "data"),
        "root": root,
    }


def _argv(setup: dict[str, Path]) -> list[str]:
    return [
        *mlxlm_command(), "lora", "--model", str(setup["model"]), "--data", str(setup["data"]),
        "--iters", str(STEPS), "--batch-size", "4", "--optimizer", "adam", "--learning-rate", "1e-3",
        "--num-layers", "2", "--rank", "4", "--steps-per-report", "1", "--steps-per-eval", "4",
        "--val-batches", "-1", "--save-every", "4", "--report-to", "jsonl",
        "--adapter-path", "adapters", "--seed", "0",
    ]  # fmt: skip


def _metrics(run: Path) -> tuple[list[float], list[float]]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e["train_loss"] for e in events if e["event"] == "train"]
    val = [e["val_loss"] for e in events if e["event"] == "val"]
    return train, val


def test_two_ranks_train_like_one_process_with_the_doubled_batch(setup, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    dirs = [tmp_path / name for name in ("single", "rank0", "rank1")]
    for d in dirs:
        d.mkdir()
    envs = [env, *rank_envs(tmp_path, env)]
    # All three at once: the single process does not wait for the pair.
    procs = [
        subprocess.Popen(
            _argv(setup), cwd=d, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for d, e in zip(dirs, envs)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=200)
            outputs.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail("a training process hung")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [o[0] for o in outputs] == [0, 0, 0], [o[2][-2000:] for o in outputs]

    single, rank0, rank1 = dirs
    # Files and output: rank 0 only.
    assert not any(rank1.iterdir()), sorted(p.name for p in rank1.rglob("*"))
    assert outputs[2][1].strip() == ""
    assert f"Trained {STEPS} steps" in outputs[1][1]
    written = sorted(p.name for p in (rank0 / "adapters").iterdir())
    assert written == sorted(p.name for p in (single / "adapters").iterdir())
    assert "adapters.safetensors" in written and "0000004_optimizer.safetensors" in written

    # The loss curve, step by step, and validation.
    train_1, val_1 = _metrics(single / "adapters")
    train_2, val_2 = _metrics(rank0 / "adapters")
    assert len(train_1) == len(train_2) == STEPS
    np.testing.assert_allclose(train_2, train_1, rtol=LOSS_RTOL)
    assert len(val_1) == len(val_2) == 3  # before training, at step 4, at the end
    np.testing.assert_allclose(val_2, val_1, rtol=LOSS_RTOL)
    assert train_1[-1] < train_1[0] - 0.1  # it learned: the compared curve is not flat

    # The same adapter at the end.
    w1 = mx.load(str(single / "adapters" / "adapters.safetensors"))
    w2 = mx.load(str(rank0 / "adapters" / "adapters.safetensors"))
    assert isinstance(w1, dict) and isinstance(w2, dict) and w1.keys() == w2.keys()
    for name in w1:
        np.testing.assert_allclose(np.array(w2[name]), np.array(w1[name]), atol=WEIGHT_ATOL)
