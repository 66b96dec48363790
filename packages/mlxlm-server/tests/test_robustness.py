"""Bad input, bounds, disconnects, engine failure, API keys, CORS and concurrency, against
live servers on loopback (the tiny model)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def post(live: Any, path: str, body: Any, **kw: Any) -> httpx.Response:
    kw.setdefault("timeout", 30)
    return httpx.post(live.url + path, json=body, **kw)


def assert_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    return err


CHAT = {"model": "tiny", "messages": MSG, "max_tokens": 4}
NO_EOS = {"2": -100}  # <|im_end|>: keeps a generation running as long as a test needs


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({**CHAT, "max_tokens": -1}, 400),
        ({**CHAT, "temperature": "hot"}, 400),
        ({**CHAT, "messages": "hi"}, 400),
        ({**CHAT, "messages": []}, 400),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ({**CHAT, "n": 0}, 400),
        ({**CHAT, "n": 50}, 400),
        ({**CHAT, "max_tokens": 100000}, 400),
        ({**CHAT, "top_logprobs": 99, "logprobs": True}, 400),
        ({**CHAT, "logit_bias": {"x": 1}}, 400),
        ({**CHAT, "logit_bias": {"99999": 1}}, 400),
        ({**CHAT, "stop_token_ids": [10**9]}, 400),
        (
            {
                **CHAT,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a"}},
                },
            },
            400,
        ),
        ({**CHAT, "tool_choice": "required"}, 400),
        ({**CHAT, "model": "gpt-4"}, 404),
        ({**CHAT, "model": "/etc/passwd"}, 404),
        ([1, 2], 400),
        ("text", 400),
    ],
)
def test_bad_chat_requests_get_error_bodies(live: Any, body: Any, status: int) -> None:
    assert_error(post(live, "/v1/chat/completions", body), status)


def test_malformed_json_and_other_routes(live: Any) -> None:
    headers = {"content-type": "application/json"}
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/tokenize",
    ):
        r = httpx.post(live.url + path, content=b'{"model": "tiny", ', headers=headers)
        assert_error(r, 400)
    assert_error(
        post(live, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}), 400
    )
    assert_error(post(live, "/v1/completions", {"model": "tiny", "prompt": [10**9]}), 400)
    assert_error(
        post(live, "/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "y"}), 400
    )
    assert_error(post(live, "/v1/embeddings", {"model": "nope", "input": "x"}), 404)
    assert_error(
        post(live, "/v1/messages", {"model": "tiny", "messages": MSG}), 400
    )  # no max_tokens
    assert_error(post(live, "/detokenize", {"tokens": [-1]}), 400)
    assert_error(
        post(live, "/v1/responses", {"model": "tiny", "input": "x", "previous_response_id": "r"}),
        400,
    )
    assert_error(httpx.get(live.url + "/v1/models/nope"), 404)
    assert_error(httpx.get(live.url + "/v1/nothing"), 404)
    assert_error(httpx.get(live.url + "/v1/chat/completions"), 405)


def test_prompt_longer_than_context(live: Any) -> None:
    err = assert_error(
        post(live, "/v1/completions", {"model": "tiny", "prompt": list(range(1, 5)) * 200}), 400
    )
    assert err["code"] == "context_length_exceeded"


def test_oversized_body(serve: Any) -> None:
    with serve(max_body_bytes=2000) as live:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        assert_error(post(live, "/v1/chat/completions", big), 413)

        def chunks() -> Any:  # no content-length: the bound holds while streaming in
            data = json.dumps(big).encode()
            for i in range(0, len(data), 500):
                yield data[i : i + 500]

        r = httpx.post(
            live.url + "/v1/chat/completions",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert_error(r, 413)
        assert post(live, "/v1/chat/completions", CHAT).status_code == 200


def test_queue_full_is_429_and_disconnect_frees_slots(serve: Any) -> None:
    with serve(max_queue=2, max_tokens_limit=20000) as live:
        body = {
            **CHAT,
            "max_tokens": 20000,
            "n": 2,
            "stream": True,
            "temperature": 0,
            "logit_bias": NO_EOS,
        }
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as s:
            lines = s.iter_lines()  # kept: dropping the iterator would close the stream
            next(lines)
            err = assert_error(post(live, "/v1/chat/completions", CHAT), 429)
            assert err["code"] == "queue_full"

        # the client hung up: its generations are cancelled and the slots free again
        # (cancel() forgets a job at once; the engine thread drops its rows on its next step,
        # so both are polled)
        def busy() -> bool:
            slots = live.app.state.server.slots.values()
            return live.bridge.in_flight > 0 or any(s.generator.has_work for s in slots)

        deadline = time.monotonic() + 5
        while busy() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert live.bridge.in_flight == 0
        assert not any(s.generator.has_work for s in live.app.state.server.slots.values())
        assert post(live, "/v1/chat/completions", CHAT).status_code == 200


def test_non_streaming_disconnect_cancels(serve: Any) -> None:
    with serve(max_tokens_limit=4000) as live:
        with pytest.raises(httpx.ReadTimeout):
            post(
                live,
                "/v1/completions",
                {
                    "model": "tiny",
                    "prompt": "x",
                    "max_tokens": 4000,
                    "temperature": 0,
                    "logit_bias": NO_EOS,
                },
                timeout=0.3,
            )

        # (cancel() forgets a job at once; the engine thread drops its rows on its next step,
        # so both are polled)
        def busy() -> bool:
            slots = live.app.state.server.slots.values()
            return live.bridge.in_flight > 0 or any(s.generator.has_work for s in slots)

        deadline = time.monotonic() + 5
        while busy() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert live.bridge.in_flight == 0


def test_engine_failure_turns_health_503_and_fails_requests(serve: Any) -> None:
    with serve(restart_delay=2.0, max_restarts=1, max_tokens_limit=4000) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=30)
        assert httpx.get(live.url + "/health").status_code == 200
        outcome: dict[str, Any] = {}

        def waiting() -> None:
            try:
                client.completions.create(
                    model="tiny", prompt="x", max_tokens=3000, temperature=0, logit_bias=NO_EOS
                )
            except openai.APIStatusError as exc:
                outcome["waiting"] = exc.status_code

        stream = client.chat.completions.create(
            model="tiny",
            messages=MSG,
            max_tokens=3000,
            temperature=0,
            stream=True,
            logit_bias=NO_EOS,
        )
        next(iter(stream))
        worker = threading.Thread(target=waiting)
        worker.start()
        time.sleep(0.1)
        live.bridge.inject_failure()
        t0 = time.monotonic()
        while httpx.get(live.url + "/health").status_code != 503:
            assert time.monotonic() - t0 < 1.0
            time.sleep(0.01)
        health = httpx.get(live.url + "/health").json()
        assert health["status"] == "unavailable" and "injected" in health["detail"]["error"]
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        worker.join(10)
        assert outcome == {"waiting": 503}
        # while it is down, new requests fail fast
        t1 = time.monotonic()
        assert_error(post(live, "/v1/chat/completions", CHAT), 503)
        assert time.monotonic() - t1 < 1.0
        # then the supervisor restarts it
        deadline = time.monotonic() + 10
        while httpx.get(live.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(live.url + "/health").json()["detail"]["restarts"] == 1
        assert (
            client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4)
            .choices[0]
            .message.content
            is not None
        )
        assert "mlxlm_engine_restarts_total 1.0" in httpx.get(live.url + "/metrics").text


def test_api_keys_cover_every_route_but_health(serve: Any) -> None:
    with serve(api_keys=("k1", "k2")) as live:
        spec = httpx.get(live.url + "/openapi.json", headers={"authorization": "Bearer k1"}).json()
        routes = [
            (m.upper(), p.replace("{model_id}", "tiny"))
            for p, ops in spec["paths"].items()
            for m in ops
        ]
        routes += [("GET", "/openapi.json"), ("GET", "/docs")]
        assert len(routes) >= 12
        for method, path in routes:
            bare = httpx.request(method, live.url + path, json={})
            wrong = httpx.request(
                method, live.url + path, json={}, headers={"authorization": "Bearer nope"}
            )
            good = httpx.request(
                method, live.url + path, json={}, headers={"authorization": "Bearer k2"}
            )
            anthropic_style = httpx.request(
                method, live.url + path, json={}, headers={"x-api-key": "k1"}
            )
            if path == "/health":
                assert bare.status_code == 200
                continue
            assert bare.status_code == wrong.status_code == 401, path
            assert bare.json()["error"]["type"] == "authentication_error"
            assert good.status_code != 401 and anthropic_style.status_code != 401, path
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="k1", max_retries=0)
        assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="bad", max_retries=0).models.list()


def test_cors_preflight_refused_unless_configured(live: Any, serve: Any) -> None:
    preflight = {"origin": "http://app.example", "access-control-request-method": "POST"}
    r = httpx.options(live.url + "/v1/chat/completions", headers=preflight)
    assert r.status_code >= 400 and "access-control-allow-origin" not in r.headers
    r = httpx.post(
        live.url + "/v1/chat/completions", json=CHAT, headers={"origin": "http://app.example"}
    )
    assert "access-control-allow-origin" not in r.headers
    with serve(allowed_origins=("http://app.example",)) as open_live:
        r = httpx.options(open_live.url + "/v1/chat/completions", headers=preflight)
        assert (
            r.status_code == 200
            and r.headers["access-control-allow-origin"] == "http://app.example"
        )
        other = httpx.options(
            open_live.url + "/v1/chat/completions",
            headers={**preflight, "origin": "http://evil.example"},
        )
        assert "access-control-allow-origin" not in other.headers


def test_default_bind_is_loopback() -> None:
    from mlxlm_server import ServerConfig

    assert ServerConfig().host == "127.0.0.1" and ServerConfig().allowed_origins == ()


def test_sixteen_streaming_clients_each_get_their_lone_greedy_continuation(serve: Any) -> None:
    with serve(max_batch_size=16, prefix_cache_bytes=0) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=60)
        prompts = [
            [{"role": "user", "content": f"Tell me about boat number {i} and the tide."}]
            for i in range(16)
        ]

        def run(messages: Any) -> str:
            stream = client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=24, temperature=0, stream=True
            )
            return "".join(c.delta.content or "" for ch in stream for c in ch.choices)

        alone = [run(m) for m in prompts]
        assert len(set(alone)) > 4  # the prompts really lead to different continuations
        barrier = threading.Barrier(16)

        def together(messages: Any) -> str:
            barrier.wait()
            return run(messages)

        with ThreadPoolExecutor(16) as pool:
            batched = list(pool.map(together, prompts))
        assert batched == alone
