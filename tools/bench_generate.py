"""Prompt-processing and decoding speed of mlxlm vs MLX-LM and llama.cpp, same run.

A thin front over ``mlxlm benchmark --compare`` (mlxlm_core/_cli/_bench_compare.py), so the
tool and the command measure the same way: every engine in a worker process of its own, the
same random prompt token ids, greedy decoding of exactly ``-g`` tokens, trials alternating
between engines, medians of ``-n`` trials, ratios mlxlm / peer, peak memory (MLX's allocator
and the process's RSS), and the memory-bandwidth bound (large-copy bandwidth / bytes of
weights read per token). Defaults: the default model, 512-token prompt, 128 generated
tokens, 3 trials, MLX-LM with its defaults (MLX's bundled BLAS), llama.cpp on the same GGUF
with 2 threads (reported as pending where ``llama-cpp-python`` is not installed).

    uv run python tools/bench_generate.py [--model DIR_OR_GGUF] [-p 512] [-g 128] [-n 3]
        [--weight-mode auto|native|quantized|dense] [--peer-blas default|same] [--json]

The load average of the machine is recorded with every trial (``load_avg`` in the JSON);
on a shared machine, re-run when it is high.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt-tokens", "-p", default="512")
    parser.add_argument("--generation-tokens", "-g", default="128")
    parser.add_argument("--num-trials", "-n", default="3")
    parser.add_argument("--weight-mode", default="auto")
    parser.add_argument("--peer-blas", default="default")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    peers = ["mlx-lm"]
    if importlib.util.find_spec("llama_cpp") is not None:
        peers.append("llama.cpp")
    else:
        print("llama.cpp: pending (llama-cpp-python is not installed here)", file=sys.stderr)
    argv = ["benchmark", "--compare", ",".join(peers), "--bandwidth"]
    argv += ["-p", args.prompt_tokens, "-g", args.generation_tokens, "-n", args.num_trials]
    argv += ["--weight-mode", args.weight_mode, "--peer-blas", args.peer_blas]
    if args.model:
        argv += ["--model", args.model]
    if args.json:
        argv.append("--json")
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    from mlxlm_core._cli.main import main as mlxlm_main  # the `mlxlm` command itself

    return mlxlm_main(argv)


if __name__ == "__main__":
    sys.exit(main())
