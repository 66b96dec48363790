"""mlxlm-server against MLX-LM as the oracle, through the official openai client on a live
loopback server: greedy chat continuations (alone and 16 streams at once), embeddings
(mean of MLX-LM's final hidden states) and adapters chosen by name (MLX-LM loading the same
adapter). The real default model runs a few end-to-end checks (module-scoped server)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from mlxlm_server import ServerConfig, create_app, load_slots  # noqa: E402
from mlxlm_server.testing import LiveServer, build_tiny_model  # noqa: E402


def mlx_lm_greedy(
    model_dir: Path, messages: list[dict[str, str]], max_tokens: int, adapter: Path | None = None
) -> str:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tok = mlx_lm.load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = []
    for r in mlx_lm.stream_generate(
        model, tok, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0)
    ):
        if r.token in tok.eos_token_ids:
            break
        out.append(r.token)
    return tok.decode(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("oracle") / "tiny")


@pytest.fixture(scope="module")
def adapter(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) weights, in MLX-LM's file format."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlxlm_core import load
    from mlxlm_core.adapters import (
        AdapterConfig,
        adapter_parameters,
        linear_to_lora_layers,
        save_adapters,
    )

    model, _ = load(tiny)
    config = {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {
            "rank": 4,
            "scale": 20.0,
            "dropout": 0.0,
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        },
    }
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    mx.random.seed(3)
    params = [
        (k, mx.random.normal(v.shape) * 0.5) for k, v in tree_flatten(adapter_parameters(model))
    ]
    model.update(tree_unflatten(params))
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    lora = config["lora_parameters"]
    save_adapters(
        folder, model, AdapterConfig(num_layers=2, rank=4, scale=20.0, keys=tuple(lora["keys"]))
    )
    return folder


@pytest.fixture(scope="module")
def live(tiny: Path, adapter: Path) -> Any:
    config = ServerConfig(
        model=str(tiny),
        served_model_name="tiny",
        adapters={"styled": str(adapter)},
        max_tokens_limit=256,
    )
    slots, base = load_slots(config)
    with LiveServer(create_app(config, slots, base)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: Any) -> Any:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)


CONVERSATIONS = [
    [{"role": "user", "content": f"Tell me about boat {i} and the tide at dawn."}]
    for i in range(16)
]


def test_greedy_chat_matches_mlx_lm(client: Any, tiny: Path) -> None:
    for messages in CONVERSATIONS[:3]:
        r = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=24, temperature=0
        )
        assert r.choices[0].message.content == mlx_lm_greedy(tiny, messages, 24)


def test_sixteen_concurrent_streams_match_mlx_lm(client: Any, tiny: Path) -> None:
    expected = [mlx_lm_greedy(tiny, m, 20) for m in CONVERSATIONS]
    barrier = threading.Barrier(16)

    def stream(messages: Any) -> str:
        barrier.wait()
        chunks = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True
        )
        return "".join(c.delta.content or "" for ch in chunks for c in ch.choices)

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(stream, CONVERSATIONS)) == expected


def test_adapter_by_name_matches_mlx_lm(client: Any, tiny: Path, adapter: Path) -> None:
    messages = CONVERSATIONS[0]
    styled = client.chat.completions.create(
        model="styled", messages=messages, max_tokens=24, temperature=0
    )
    base = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=24, temperature=0
    )
    assert styled.choices[0].message.content == mlx_lm_greedy(tiny, messages, 24, adapter)
    assert styled.choices[0].message.content != base.choices[0].message.content
    assert {m.id for m in client.models.list().data} == {"tiny", "styled"}


def test_embeddings_are_mlx_lm_mean_hidden_states(client: Any, tiny: Path) -> None:
    import mlx_lm

    model, tok = mlx_lm.load(str(tiny))
    texts = ["the tide comes in", "bread needs flour"]
    got = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    for text, item in zip(texts, got.data):
        hidden = model.model(mx.array([tok.encode(text)]))[0]
        ref = np.array(mx.mean(hidden, axis=0))
        ref = ref / np.linalg.norm(ref)
        np.testing.assert_allclose(np.array(item.embedding), ref, rtol=1e-4, atol=1e-5)


# --- the real default model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_live() -> Any:
    config = ServerConfig(served_model_name="smol", max_tokens_limit=128)
    slots, base = load_slots(config)
    with LiveServer(create_app(config, slots, base)) as server:
        yield server


@pytest.mark.slow
def test_default_model_end_to_end(default_live: Any) -> None:
    client = openai.OpenAI(
        base_url=default_live.url + "/v1", api_key="x", max_retries=0, timeout=300
    )
    ask = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    r = client.chat.completions.create(model="smol", messages=ask, max_tokens=8, temperature=0)
    assert "paris" in r.choices[0].message.content.lower()
    chunks = list(
        client.chat.completions.create(
            model="smol",
            messages=ask,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
        == r.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
        },
        "required": ["city", "country"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    j = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        max_tokens=40,
        temperature=0,
        response_format=fmt,
    )
    assert j.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(j.choices[0].message.content), schema)
