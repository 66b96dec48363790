"""``mlxlm server --shard tensor|pipeline`` as two ranks on loopback (MLX's ring backend).

Both ranks get the same command line (as ``mlx.launch`` gives it: a host file and
``MLX_RANK``, free ports). Rank 0 serves HTTP; rank 1 follows its engine and never binds.
Claims, through the official openai client, with MLX-LM (one process) as the oracle:

- greedy chat answers equal MLX-LM's greedy generation, alone and two at once (batched);
- a request with a logit bias (a row whose token rank 0 chooses and shares) equals MLX-LM
  with the same bias;
- embeddings (a forward pass outside the engine's steps) are refused with a 400;
- (tensor) SIGTERM to rank 0 ends both ranks cleanly (rank 1 with status 0), rank 1 having
  printed nothing;
- (pipeline) a follower killed mid-generation makes rank 0 fail the streaming request
  within seconds, not hang, and exit with status 3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from _launch import free_ports, mlxlm_command, rank_envs  # registered by conftest.py
from mlxlm_server.testing import build_tiny_model

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ASK = [{"role": "user", "content": "Tell me about the boats and the tide at dawn."}]
ASK_2 = [{"role": "user", "content": "When does the small library open?"}]


def mlx_lm_greedy(
    model_dir: Path, messages: list[dict[str, str]], max_tokens: int, bias: dict[int, float]
) -> tuple[str, list[int]]:
    import mlx_lm
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    model, tok = mlx_lm.load(str(model_dir))
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = []
    for r in mlx_lm.stream_generate(
        model,
        tok,
        prompt,
        max_tokens=max_tokens,
        sampler=make_sampler(0.0),
        logits_processors=make_logits_processors(logit_bias=bias or None),
    ):
        if r.token in tok.eos_token_ids:
            break
        out.append(r.token)
    return tok.decode(out), out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("shard-server") / "tiny")


class Ranks:
    """Two server ranks; always killed on exit."""

    def __init__(self, tiny: Path, strategy: str, tmp: Path, *extra: str) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
        argv = [
            *mlxlm_command(), "server", "--model", str(tiny), "--served-model-name", "tiny",
            "--port", str(self.port), "--shard", strategy, "--shard-timeout", "10",
            "--log-level", "warning", *extra,
        ]  # fmt: skip
        self.procs = [
            subprocess.Popen(argv, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for e in rank_envs(tmp, env)
        ]

    def __enter__(self) -> Ranks:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                self.kill()
                errs = [p.communicate()[1][-2000:] for p in self.procs]
                pytest.fail(f"a rank exited during start-up: {errs}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        pytest.fail("the sharded server did not come up")

    def client(self) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60)

    def wait(self, timeout: float) -> list[tuple[int | None, str, str]]:
        out = []
        for p in self.procs:
            try:
                o, e = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                o, e = p.communicate()
            out.append((p.returncode, o, e))
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def __exit__(self, *exc: object) -> None:
        self.kill()
        for p in self.procs:
            p.communicate()


def _chat(client: Any, messages: list[dict[str, str]], **extra: Any) -> str:
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=24, temperature=0.0, **extra
    )
    return r.choices[0].message.content


def _shut_down(ranks: Ranks) -> None:
    ranks.procs[0].send_signal(signal.SIGTERM)
    (rc0, _, err0), (rc1, out1, err1) = ranks.wait(60)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (status -15); the
    # follower leaving with status 0 shows it was told to stop, not cut off.
    assert rc0 in (0, -signal.SIGTERM) and rc1 == 0, (rc0, rc1, err0[-2000:], err1[-2000:])
    assert "Traceback" not in err0 + err1
    assert out1.strip() == ""  # only rank 0 prints


def _follower_dies(ranks: Ranks) -> None:
    client = ranks.client()
    # End-of-sequence banned: still generating when the follower dies.
    stream = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        max_tokens=4000,
        temperature=0.0,
        logit_bias={"2": -100},
        stream=True,
    )
    assert next(iter(stream)).choices
    ranks.procs[1].send_signal(signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(openai.APIError) as failure:
        for _ in stream:
            pass
    assert time.monotonic() - started < 30
    assert "another rank stopped" in str(failure.value)
    (rc0, _, err0), _ = ranks.wait(60)
    assert rc0 == 3, err0[-2000:]  # the engine cannot restart without its peer
    assert "another rank stopped" in err0


# Each pair of ranks ends one way: two launches keep the file within its time budget.
@pytest.mark.parametrize(
    ("strategy", "ending"), [("tensor", _shut_down), ("pipeline", _follower_dies)]
)
def test_sharded_server_answers_like_one_process(
    tiny: Path, strategy: str, ending: Any, tmp_path: Path
) -> None:
    expected, ids = mlx_lm_greedy(tiny, ASK, 24, {})
    expected_2, _ = mlx_lm_greedy(tiny, ASK_2, 24, {})
    assert expected != expected_2 and len(ids) > 10
    # Ban the greedy answer's most frequent token: the answer must change, as MLX-LM's does.
    common = max(set(ids), key=ids.count)
    biased, _ = mlx_lm_greedy(tiny, ASK, 24, {common: -100.0})
    assert biased != expected

    with Ranks(tiny, strategy, tmp_path) as ranks:
        client = ranks.client()
        assert _chat(client, ASK) == expected
        with ThreadPoolExecutor(2) as pool:  # two at once: one batch on every rank
            both = list(pool.map(lambda m: _chat(client, m), [ASK, ASK_2]))
        assert both == [expected, expected_2]
        assert _chat(client, ASK, logit_bias={str(common): -100}) == biased
        refused = httpx.post(
            ranks.url + "/v1/embeddings", json={"model": "tiny", "input": "hi"}, timeout=30
        )
        assert refused.status_code == 400 and "--shard" in refused.text
        assert _chat(client, ASK_2) == expected_2  # the ranks are still in step
        ending(ranks)
