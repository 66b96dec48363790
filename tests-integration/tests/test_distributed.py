"""Two ranks on loopback (MLX's ring backend): sharded generation equals one process.

Ranks are started the way ``mlx.launch`` starts them (a host file and ``MLX_RANK``), on free
ports, each bounded in time. Claims: tensor- and pipeline-parallel greedy tokens equal the
single-process tokens for the default model (through the ``mlxlm generate --shard`` CLI,
whose 9 heads / 3 KV heads split unevenly) and for a tiny mixture-of-experts model (one
prompt, and continuous batching admitting a prompt while another decodes); and a
rank that dies mid-run ends the other with one clear error line, not a hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _launch import mlxlm_command, rank_envs  # registered by conftest.py

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("mlxlm-cache")
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MLXLM_CACHE_DIR": str(cache),
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }


def _run_ranks(argv: list[str], envs: list[dict[str, str]]) -> list[subprocess.CompletedProcess]:
    procs = [
        subprocess.Popen(argv, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for e in envs
    ]
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung")
        done.append(subprocess.CompletedProcess(argv, p.returncode, out, err))
    return done


@pytest.fixture(scope="module")
def single_answer(env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [*mlxlm_command(), "generate", "--prompt", QUESTION, "--max-tokens", "16", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("strategy", ["tensor", "pipeline"])
def test_default_model_sharded_equals_one_process(strategy, env, single_answer, tmp_path):
    argv = [*mlxlm_command(), "generate", "--prompt", QUESTION, "--max-tokens", "16", "--json"]
    ranks = _run_ranks([*argv, "--shard", strategy], rank_envs(tmp_path, env))
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-2000:] for r in ranks]
    answer = json.loads(ranks[0].stdout.strip().splitlines()[-1])
    assert answer["text"] == single_answer["text"]
    assert "Paris" in answer["text"]
    assert ranks[1].stdout.strip() == ""  # only rank 0 prints


_MOE_WORKER = """
import json, sys
import mlx.core as mx
from mlxlm_core import BatchGenerator, generate_step
from mlxlm_core.distributed import shard_model, world
from mlxlm_core.models import get_model_classes

config = json.loads(sys.argv[1])
model_cls, args_cls = get_model_classes(config["model_type"])
mx.random.seed(3)
model = model_cls(args_cls.from_dict(config))
mx.eval(model.parameters())
prompt = mx.array([5, 9, 17, 33, 2, 71, 8])

def staggered():
    # Continuous batching: a second prompt is admitted (in 4-token chunks) while the
    # first decodes, so steps are built on tokens of steps not yet evaluated.
    gen = BatchGenerator(model, max_tokens=12, prefill_step_size=4)
    uids, out, steps = gen.insert([prompt.tolist()]), {}, 0
    while gen.has_work:
        if steps == 3:
            uids += gen.insert([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]])
        for r in gen.next():
            out.setdefault(r.uid, []).append(r.token)
        steps += 1
    return [out[u] for u in uids]

alone = [t for t, _ in generate_step(prompt, model, max_tokens=16)]
batch_alone = staggered()
group = world(backend="ring")
shard_model(model, group, sys.argv[2])
sharded = [t for t, _ in generate_step(prompt, model, max_tokens=16)]
print(json.dumps({"alone": alone, "sharded": sharded,
                  "batch_alone": batch_alone, "batch_sharded": staggered()}))
"""

TINY_MOE = {
    "model_type": "qwen3_moe",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "vocab_size": 128,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize("strategy", ["tensor", "pipeline"])
def test_tiny_moe_sharded_equals_one_process(strategy, env, tmp_path):
    argv = [sys.executable, "-c", _MOE_WORKER, json.dumps(TINY_MOE), strategy]
    ranks = _run_ranks(argv, rank_envs(tmp_path, env))
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-2000:] for r in ranks]
    for r in ranks:
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["sharded"] == result["alone"]
        assert len(set(result["alone"])) > 1
        assert result["batch_sharded"] == result["batch_alone"]
        assert [len(tokens) for tokens in result["batch_alone"]] == [12, 12]


def test_a_dying_rank_ends_the_other_with_a_clear_error(env, tmp_path):
    argv = [*mlxlm_command(), "generate", "--prompt", QUESTION, "--max-tokens", "4000"]
    # End-of-sequence tokens banned, so generation is still running when rank 1 dies.
    argv += ["--logit-bias", '{"0": -1000, "1": -1000, "2": -1000}', "--shard", "tensor"]
    envs = rank_envs(tmp_path, env)
    procs = [
        subprocess.Popen(argv, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for e in envs
    ]
    try:
        assert procs[0].stdout is not None
        banner = procs[0].stdout.readline()  # the first token has been generated
        assert banner.startswith("=========="), banner
        procs[1].send_signal(signal.SIGKILL)
        started = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1
    ours = [line for line in err.splitlines() if line.startswith("mlxlm generate: error:")]
    assert len(ours) == 1 and "another rank stopped" in ours[0], err[-2000:]
    assert "Traceback" not in err
    assert waited < 60
