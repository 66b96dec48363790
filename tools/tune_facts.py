"""Does fine-tuning learn? Made-up facts, recalled greedily before and after training.

Each fact is a sentence no model can know ("The access code of Vexil station is 4817.");
recall is exact greedy recall of the answer (" 4817.") after the prompt ("The access code
of Vexil station is"), checked teacher-forced: the answer is recalled iff the argmax at
every answer position is the answer's next token, which is exactly when greedy decoding
produces it. Methods on the default model (SmolLM2-135M-Instruct, 4-bit in its GGUF):

- ``lora`` / ``dora``: adapters on the dequantized (float32) model;
- ``qlora``: LoRA on the 4-bit model as shipped;

and for each, the fused model written by ``mlxlm_tune.fuse`` and loaded back must recall
the same. ``tests-integration/tests/test_tune_learning.py`` runs a small version of this
(its facts and recall come from here).

    uv run python tools/tune_facts.py [--facts 100] [--methods lora,dora,qlora] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# isort: off
import mlxlm_core  # first: puts the optimised BLAS under MLX (it must precede mlx.core)
import mlx.core as mx

# isort: on
import numpy as np
from mlxlm_core import load
from mlxlm_core.quantize import dequantize_model

SYLLABLES = [
    "va",
    "xil",
    "tor",
    "mek",
    "quo",
    "ren",
    "dal",
    "sut",
    "bri",
    "zon",
    "fel",
    "kar",
    "lum",
    "nop",
    "gri",
    "sev",
    "hol",
    "tam",
    "wex",
    "yor",
    "pim",
    "cad",
    "ost",
    "ule",
]
THINGS = [
    "access code of {} station",
    "room number of the {} archive",
    "year the {} bridge opened",
    "pin of the {} vault",
]


@dataclass(frozen=True)
class Fact:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def make_facts(n: int, *, seed: int = 0) -> list[Fact]:
    """``n`` facts with distinct made-up names and random 4-digit answers."""
    rng = np.random.default_rng(seed)
    names: set[str] = set()
    facts = []
    while len(facts) < n:
        name = "".join(rng.choice(SYLLABLES, 2)).capitalize()
        if name in names:
            continue
        names.add(name)
        thing = THINGS[len(facts) % len(THINGS)].format(name)
        facts.append(Fact(f"The {thing} is", f" {int(rng.integers(1000, 10000))}."))
    return facts


def recall(model: Any, tokenizer: Any, facts: list[Fact], *, batch: int = 32) -> float:
    """Fraction of facts whose answer greedy decoding reproduces exactly after the prompt."""
    was_training = model.training
    model.eval()
    hits = 0
    for start in range(0, len(facts), batch):
        chunk = facts[start : start + batch]
        rows, spans = [], []
        for fact in chunk:
            prompt = tokenizer.encode(fact.prompt)
            full = tokenizer.encode(fact.text)
            assert full[: len(prompt)] == prompt, "the answer must tokenize after the prompt"
            rows.append(full)
            spans.append((len(prompt), len(full)))
        width = max(len(r) for r in rows)
        tokens = mx.array([r + [0] * (width - len(r)) for r in rows])
        predicted = np.array(mx.argmax(model(tokens), axis=-1))
        for row, (a, b), ids in zip(range(len(rows)), spans, rows):
            hits += all(predicted[row, i - 1] == ids[i] for i in range(a, b))
    model.train(was_training)
    return hits / len(facts)


def write_facts(folder: Path, facts: list[Fact]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f.text}) + "\n" for f in facts))
    return folder


def run_method(
    method: str,
    facts: list[Fact],
    workdir: Path,
    *,
    iters: int,
    learning_rate: float,
    rank: int,
    num_layers: int,
    batch_size: int,
    model_path: str | None = None,
) -> dict[str, Any]:
    """Train one method on ``facts``; recall before, after, and after fuse + reload."""
    from mlxlm_tune import TrainingConfig, fuse, train

    model, tokenizer = load(model_path)
    source = str(model.model_path)  # type: ignore[attr-defined]
    if method in ("lora", "dora"):
        dequantize_model(model)
    before = recall(model, tokenizer, facts)
    adapter = workdir / f"adapter-{method}"
    config = TrainingConfig(
        model=source,
        data=str(write_facts(workdir / "data", facts)),
        fine_tune_type="dora" if method == "dora" else "lora",
        iters=iters,
        batch_size=batch_size,
        num_layers=num_layers,
        learning_rate=learning_rate,
        lr_schedule="cosine",
        warmup=max(iters // 10, 1),
        lora_parameters={"rank": rank, "scale": 20.0, "dropout": 0.0},
        adapter_path=str(adapter),
        save_every=0,
        steps_per_report=max(iters // 5, 1),
        seed=0,
    )
    tic = time.perf_counter()
    result = train(config, model=model, tokenizer=tokenizer, callbacks=[])
    seconds = time.perf_counter() - tic
    after = recall(model, tokenizer, facts)
    fused_dir = workdir / f"fused-{method}"
    fuse(source, adapter, fused_dir, dequantize=method != "qlora", dtype="float32")
    fused_model, fused_tok = load(fused_dir)
    fused = recall(fused_model, fused_tok, facts)
    tokens = sum(len(tokenizer.encode(f.text)) + 1 for f in facts) * iters * batch_size / len(facts)
    return {
        "method": method,
        "facts": len(facts),
        "recall_before": before,
        "recall_after": after,
        "recall_fused": fused,
        "train_seconds": seconds,
        "final_loss": result.train_loss,
        "tokens_per_second": tokens / seconds,
        "trainable_parameters": result.trainable_parameters,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the default model)")
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--methods", default="lora,dora,qlora")
    parser.add_argument("--epochs", type=float, default=16.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=4e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from mlxlm_core._blas import blas_info

    facts = make_facts(args.facts)
    iters = int(args.epochs * args.facts / args.batch_size)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            out = run_method(
                method,
                facts,
                Path(tmp),
                iters=iters,
                learning_rate=args.learning_rate,
                rank=args.rank,
                num_layers=args.num_layers,
                batch_size=args.batch_size,
                model_path=args.model,
            )
            results.append(out)
            if not args.json:
                print(
                    f"{method:6s} {out['facts']} facts, {iters} steps: recall "
                    f"{out['recall_before']:.0%} -> {out['recall_after']:.0%} "
                    f"(fused {out['recall_fused']:.0%}) in {out['train_seconds']:.0f} s, "
                    f"{out['tokens_per_second']:.0f} tok/s",
                    flush=True,
                )
    if args.json:
        print(json.dumps({"blas": blas_info().describe(), "results": results}, indent=2))
    else:
        print(
            f"BLAS: {blas_info().describe()}; MLX {mx.__version__}; mlxlm {mlxlm_core.__version__}"
        )


if __name__ == "__main__":
    main()
