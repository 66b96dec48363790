"""Schemathesis against the served OpenAPI document: generated requests, valid (positive)
and invalid (negative), for every operation. Whatever arrives, the server answers (no
dropped connection) and never with a 5xx; error answers carry the OpenAI-style body.

Driven through hypothesis directly (schemathesis' pytest plugin does not load on this
pytest), one run per operation and generation mode.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES = 75  # per operation and mode (some GETs have no negative cases): > 1,000 requests


@pytest.fixture(scope="module")
def fuzz_server(serve: Any) -> Any:
    # small bounds keep each generation short: max_tokens <= 8, short prompts
    with serve(
        max_tokens_limit=8,
        default_max_tokens=4,
        max_prompt_tokens=256,
        max_n=2,
        prefix_cache_bytes=8 << 20,
    ) as live:
        yield live


def test_generated_requests_never_get_5xx_or_dropped(fuzz_server: Any) -> None:
    api = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10
    sent: list[tuple[str, int]] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                response = case.call(
                    base_url=fuzz_server.url, timeout=30
                )  # a dropped connection raises
                sent.append((case.path, response.status_code))
                assert response.status_code < 500, (
                    f"{case.method} {case.path} {case.body!r}: {response.status_code} {response.text[:300]}"
                )
                if response.status_code >= 400 and case.path != "/health":
                    error = response.json()["error"]
                    assert isinstance(error["message"], str) and error["message"]

            try:
                check()
            except Unsatisfiable:
                # nothing to make invalid (a GET without parameters)
                assert mode is GenerationMode.NEGATIVE
    statuses = [s for _, s in sent]
    assert len(sent) >= 1000, len(sent)
    assert statuses.count(200) > 50 and sum(400 <= s < 500 for s in statuses) > 200
    assert fuzz_server.bridge.healthy and fuzz_server.bridge.in_flight == 0
