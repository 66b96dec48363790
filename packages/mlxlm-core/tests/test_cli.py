"""The ``mlxlm`` subcommands on a tiny random llama with a tiny trained tokenizer.

Commands run in-process through ``mlxlm_core._cli.main.main`` (plus real subprocesses of the
installed ``mlxlm`` script for the happy path and one failure). Outputs are checked against
what the library computes for the same inputs and, where the published ``mlx-lm`` is
installed (the workspace run; not the isolated core run), against it as an oracle. Bad input
must give exactly one line on stderr, a non-zero status and no traceback.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlxlm_core import generate, load
from mlxlm_core._cli.main import main
from tokenizers import Tokenizer

# The tiny model directory (fixture `tiny`, with its corpus and context) is in conftest.py.
PROMPT = "tell me about the boats"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse errors exit from inside the parser
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- generate ----------------------------------------------------------------------------


def test_generate_greedy_equals_library(tiny: Path, cli) -> None:
    code, out, _ = cli(
        "generate", "--model", tiny, "--prompt", PROMPT, "--max-tokens", 12, "--json"
    )
    assert code == 0
    result = json.loads(out)
    model, tokenizer = load(tiny)
    ids = _chat_ids(tokenizer, PROMPT)
    assert result["text"] == generate(model, tokenizer, ids, max_tokens=12)
    assert result["prompt_tokens"] == len(ids)


def test_generate_greedy_equals_mlx_lm(tiny: Path, cli) -> None:
    mlx_lm = pytest.importorskip("mlx_lm")
    code, out, _ = cli("generate", "--model", tiny, "--prompt", PROMPT, "-m", 12, "--json")
    assert code == 0
    ref_model, ref_tokenizer = mlx_lm.load(str(tiny))
    ids = _chat_ids(load(tiny)[1], PROMPT)
    assert json.loads(out)["text"] == mlx_lm.generate(ref_model, ref_tokenizer, ids, max_tokens=12)


def test_installed_script_runs_generate_and_reports_errors(tiny: Path) -> None:
    script = Path(sys.executable).parent / "mlxlm"
    command = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from mlxlm_core._cli.main import entry; entry()"]
    )
    ok = subprocess.run(
        [*command, "generate", "--model", str(tiny), "--prompt", PROMPT, "-m", "6"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "Prompt:" in ok.stdout and "Generation: " in ok.stdout and "Peak memory:" in ok.stdout
    bad = subprocess.run(
        [*command, "generate", "--model", str(tiny / "missing"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_one_line_error(bad.returncode, bad.stderr, "missing")


# --- convert -----------------------------------------------------------------------------


def _logits(model: Any, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))


def test_convert_quantize_round_trip(tiny: Path, tmp_path: Path, cli) -> None:
    dest = tmp_path / "q4"
    code, out, err = cli(
        "convert", "--hf-path", tiny, "--mlx-path", dest, "-q", "--q-group-size", 32, "--json"
    )
    assert code == 0, err
    assert json.loads(out)["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    config = json.loads((dest / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    float_model, tokenizer = load(tiny)
    q_model, q_tokenizer = load(dest)
    ids = _chat_ids(tokenizer, PROMPT)
    assert _chat_ids(q_tokenizer, PROMPT) == ids
    ref, got = _logits(float_model, ids), _logits(q_model, ids)
    # 4-bit weights on random (incompressible) weights: the same function, roughly.
    assert np.corrcoef(got.reshape(-1), ref.reshape(-1))[0, 1] > 0.97
    # Every linear layer and the embedding hold exactly what MLX's own quantizer makes of
    # the float weight.
    saved = mx.load(str(dest / "model.safetensors"))
    floats = mx.load(str(tiny / "model.safetensors"))
    packed = sorted(k[: -len(".scales")] for k in saved if k.endswith(".scales"))
    assert len(packed) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + embed_tokens
    for name in packed:
        expected = mx.quantize(floats[f"{name}.weight"], group_size=32, bits=4)
        for suffix, array in zip(("weight", "scales", "biases"), expected):
            assert bool(mx.array_equal(saved[f"{name}.{suffix}"], array)), f"{name}.{suffix}"

    back = tmp_path / "dequantized"
    code, _, err = cli("convert", "--model", dest, "--mlx-path", back, "--dequantize")
    assert code == 0, err
    assert "quantization" not in json.loads((back / "config.json").read_text())
    d_model, _ = load(back)
    np.testing.assert_allclose(_logits(d_model, ids), got, rtol=1e-5, atol=1e-5)


def test_convert_matches_mlx_lm(tiny: Path, tmp_path: Path, cli) -> None:
    pytest.importorskip("mlx_lm")
    from mlx_lm import load as ref_load
    from mlx_lm.convert import convert as ref_convert

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    code, _, err = cli(
        "convert", "--model", tiny, "--mlx-path", ours, "-q", "--q-bits", 8, "--q-group-size", 64
    )
    assert code == 0, err
    ref_convert(str(tiny), str(theirs), quantize=True, q_bits=8, q_group_size=64)
    mine = mx.load(str(ours / "model.safetensors"))
    ref = {}
    for f in theirs.glob("*.safetensors"):
        ref.update(mx.load(str(f)))
    assert sorted(mine) == sorted(ref)
    for key, value in ref.items():
        assert mine[key].dtype == value.dtype, key
        assert bool(mx.array_equal(mine[key], value)), key
    ours_cfg = json.loads((ours / "config.json").read_text())
    theirs_cfg = json.loads((theirs / "config.json").read_text())
    assert ours_cfg["quantization"] == theirs_cfg["quantization"]
    # MLX-LM reads what we wrote and computes the same logits as our loader.
    ref_model, _ = ref_load(str(ours))
    our_model, tokenizer = load(ours)
    ids = _chat_ids(tokenizer, PROMPT)
    np.testing.assert_allclose(
        _logits(our_model, ids), _logits(ref_model, ids), rtol=1e-4, atol=1e-4
    )


def test_convert_dtype_and_mxfp4(tiny: Path, tmp_path: Path, cli) -> None:
    code, _, err = cli(
        "convert", "--model", tiny, "--mlx-path", tmp_path / "bf16", "--dtype", "bfloat16"
    )
    assert code == 0, err
    weights = mx.load(str(tmp_path / "bf16" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    code, _, err = cli(
        "convert", "--model", tiny, "--mlx-path", tmp_path / "fp4", "-q", "--q-mode", "mxfp4"
    )
    assert code == 0, err
    config = json.loads((tmp_path / "fp4" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    model, tokenizer = load(tmp_path / "fp4")
    assert np.isfinite(_logits(model, _chat_ids(tokenizer, PROMPT))).all()


def test_convert_refuses_bad_requests(tiny: Path, tmp_path: Path, cli) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    _assert_one_line_error(
        *cli("convert", "--model", tiny, "--mlx-path", taken)[::2], "already exists"
    )
    assert (taken / "keep.txt").read_text() == "mine"
    _assert_one_line_error(
        *cli("convert", "--model", tiny, "--mlx-path", tmp_path / "x", "-q", "-d")[::2], "not both"
    )
    _assert_one_line_error(
        *cli("convert", "--model", tiny, "--mlx-path", tmp_path / "y", "-q", "--q-bits", 7)[::2],
        "bits",
    )
    _assert_one_line_error(
        *cli("convert", "--model", tiny, "--mlx-path", tmp_path / "z", "--dequantize")[::2],
        "not quantized",
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


# --- cache-prompt ------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [False, True], ids=["chat-template", "raw"])
def test_cache_prompt_then_generate_matches_uncached(
    tiny: Path, tmp_path: Path, cli, raw: bool
) -> None:
    extra = ["--ignore-chat-template"] if raw else []
    cache_file = tmp_path / "prompt.safetensors"
    code, out, err = cli(
        "cache-prompt",
        "--model",
        tiny,
        "--prompt",
        PROMPT,
        "--prompt-cache-file",
        cache_file,
        "--json",
        *extra,
    )
    assert code == 0, err
    _, meta = mx.load(str(cache_file), return_metadata=True)
    cached = json.loads(meta["tokens"])
    _, tokenizer = load(tiny)
    full = tokenizer.encode(PROMPT) if raw else _chat_ids(tokenizer, PROMPT)
    assert full[: len(cached)] == cached and len(cached) < len(full)
    assert json.loads(out)["cached_tokens"] == len(cached)
    assert meta["model"] == str(tiny)

    args = ["generate", "--model", tiny, "--prompt", PROMPT, "-m", 10, "--json", *extra]
    code, with_cache, err = cli(*args, "--prompt-cache-file", cache_file)
    assert code == 0, err
    code, without, _ = cli(*args)
    assert json.loads(with_cache)["text"] == json.loads(without)["text"]
    # Only the uncached tail went through the model.
    assert json.loads(with_cache)["prompt_tokens"] == len(full) - len(cached)


# --- perplexity --------------------------------------------------------------------------


def _reference_perplexity(
    model_dir: Path, text: str, length: int, samples: int
) -> tuple[float, float]:
    """Windows from the ``tokenizers`` library; logits from mlx-lm when installed."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stream = [*tok.encode(text).ids, tok.token_to_id("<|im_end|>")]
    windows = np.array([stream[i * length : (i + 1) * length] for i in range(samples)])
    try:
        from mlx_lm import load as ref_load

        model, _ = ref_load(str(model_dir))
    except ImportError:
        model, _ = load(model_dir)
    logits = np.array(model(mx.array(windows[:, :-1])).astype(mx.float32), dtype=np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    targets = windows[:, 1:]
    losses = -np.take_along_axis(logprobs, targets[..., None], -1)[..., 0].reshape(-1)
    ppl = math.exp(losses.mean())
    return ppl, ppl * losses.std(ddof=1) / math.sqrt(losses.size)


def test_perplexity_of_a_text_file(tiny: Path, tiny_corpus: list[str], tmp_path: Path, cli) -> None:
    text = " ".join(tiny_corpus * 4)
    data = tmp_path / "eval.txt"
    data.write_text(text)
    code, out, err = cli(
        "perplexity",
        "--model",
        tiny,
        "--data-path",
        data,
        "--sequence-length",
        32,
        "--num-samples",
        3,
        "--batch-size",
        2,
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    ppl, se = _reference_perplexity(tiny, text, 32, 3)
    assert result["samples"] == 3 and result["tokens"] == 3 * 31
    assert result["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert result["standard_error"] == pytest.approx(se, rel=1e-3)
    assert result["tokens_per_second"] > 0

    records = tmp_path / "eval.jsonl"
    records.write_text(json.dumps({"text": text}) + "\n")
    code, out, _ = cli(
        "perplexity",
        "--model",
        tiny,
        "--data-path",
        records,
        "--sequence-length",
        32,
        "--num-samples",
        3,
        "--json",
    )
    assert code == 0 and json.loads(out)["perplexity"] == pytest.approx(ppl, rel=1e-4)


def test_perplexity_builtin_text_and_bad_data(tiny: Path, tmp_path: Path, cli) -> None:
    code, out, err = cli("perplexity", "--model", tiny, "--sequence-length", 64, "--num-samples", 2)
    assert code == 0, err
    assert "Perplexity: " in out and "±" in out and "Tokens per second: " in out
    _assert_one_line_error(
        *cli("perplexity", "--model", tiny, "--data-path", tmp_path / "nope.txt")[::2],
        "no such file",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": 1}\n')
    _assert_one_line_error(
        *cli("perplexity", "--model", tiny, "--data-path", bad)[::2], "bad.jsonl:2"
    )
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    _assert_one_line_error(
        *cli("perplexity", "--model", tiny, "--data-path", short, "--sequence-length", 64)[::2],
        "fewer than one window",
    )


# --- benchmark ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2])
def test_benchmark_json_fields(tiny: Path, cli, batch: int) -> None:
    code, out, err = cli(
        "benchmark", "--model", tiny, "-p", 16, "-g", 5, "-b", batch, "-n", 2, "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert (result["prompt_tokens"], result["generation_tokens"], result["batch_size"]) == (
        16,
        5,
        batch,
    )
    assert result["num_trials"] == 2 and len(result["trials"]) == 2
    for key in ("prompt_tps", "generation_tps", "ttft_s", "peak_memory_gb"):
        assert result[key] > 0, key
    median = sorted(t["generation_tps"] for t in result["trials"])
    assert result["generation_tps"] == pytest.approx(sum(median) / 2)


# --- manage ------------------------------------------------------------------------------


def _fake_cache_repo(hub: Path, repo_id: str) -> Path:
    """The on-disk layout huggingface_hub writes: blobs, a snapshot of links, a ref."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text('{"model_type": "llama"}')
    (repo / "snapshots" / commit).mkdir(parents=True)
    os.symlink("../../blobs/abc123", repo / "snapshots" / commit / "config.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo


def test_manage_scan_and_delete(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, out, err = cli("manage", "--scan", "--json")
    assert code == 0, err
    assert json.loads(out) == {"cache_dir": str(tmp_path / "hf" / "hub"), "repos": []}
    code, out, _ = cli("manage", "--scan")
    assert code == 0 and "No cached models" in out

    kept = _fake_cache_repo(tmp_path / "hf" / "hub", "someone/keep-me")
    doomed = _fake_cache_repo(tmp_path / "hf" / "hub", "mlx-community/tiny-4bit")
    code, out, _ = cli("manage", "--scan", "--json")
    repos = json.loads(out)["repos"]
    assert [r["repo_id"] for r in repos] == ["mlx-community/tiny-4bit", "someone/keep-me"]
    assert all(r["size_on_disk"] > 0 and r["nb_files"] == 1 for r in repos)

    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    code, out, _ = cli("manage", "--delete", "--pattern", "tiny")
    assert code == 0 and "Nothing deleted" in out and doomed.exists()
    code, out, _ = cli("manage", "--delete", "--pattern", "tiny", "--yes")
    assert code == 0 and not doomed.exists() and kept.exists()
    _assert_one_line_error(*cli("manage", "--delete")[::2], "--pattern")


# --- chat --------------------------------------------------------------------------------


def test_chat_two_turns_reuse_the_cache(tiny: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    turns = ["hello there", "what about the bread?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns) + "\n"))
    code, out, err = cli(
        "chat", "--model", tiny, "--max-tokens", 8, "--system-prompt", "be brief", "--json"
    )
    assert code == 0, err
    replies = [json.loads(line) for line in out.splitlines()]
    assert len(replies) == 2

    # Each reply equals a fresh generation over the whole conversation so far.
    model, tokenizer = load(tiny)
    messages = [{"role": "system", "content": "be brief"}]
    for turn, reply in zip(turns, replies):
        messages.append({"role": "user", "content": turn})
        ids = list(tokenizer.apply_chat_template(messages))
        assert reply["content"] == generate(model, tokenizer, ids, max_tokens=8)
        messages.append({"role": "assistant", "content": reply["content"]})
    assert replies[0]["reused_tokens"] == 0
    assert replies[1]["reused_tokens"] > 0
    assert replies[1]["prompt_tokens"] + replies[1]["reused_tokens"] == len(ids)


def test_chat_reset_and_quit(tiny: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("hello there\n/reset\nhello there\nq\nnever read\n")
    )
    code, out, err = cli("chat", "--model", tiny, "-m", 4, "--json")
    assert code == 0, err
    first, second = (json.loads(line) for line in out.splitlines())
    assert second["content"] == first["content"]
    assert second["reused_tokens"] == 0


# --- bad input: one line, non-zero, no traceback ----------------------------------------


def _copy(tiny: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(tiny, dest)
    return dest


def test_missing_model_path(tmp_path: Path, cli) -> None:
    _assert_one_line_error(
        *cli("generate", "--model", tmp_path / "nowhere", "--prompt", "x")[::2], "nowhere"
    )


def test_unknown_repo_offline(tmp_path: Path, tiny: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mlxlm_core._cli.main import entry; entry()",
            "generate",
            "--model",
            "nobody-here/no-such-model-xyz",
            "--prompt",
            "x",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    _assert_one_line_error(proc.returncode, proc.stderr, "nobody-here/no-such-model-xyz")


def test_corrupt_safetensors(tiny: Path, tmp_path: Path, cli) -> None:
    model = _copy(tiny, tmp_path)
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _assert_one_line_error(
        *cli("generate", "--model", model, "--prompt", "x")[::2], "model.safetensors"
    )


def test_truncated_safetensors(tiny: Path, tmp_path: Path, cli) -> None:
    model = _copy(tiny, tmp_path)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    _assert_one_line_error(*cli("generate", "--model", model, "--prompt", "x")[::2])


def test_unknown_model_type_names_nearest(tiny: Path, tmp_path: Path, cli) -> None:
    model = _copy(tiny, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "lama"}))
    _assert_one_line_error(
        *cli("generate", "--model", model, "--prompt", "x")[::2], "'lama'", "llama"
    )


def test_negative_max_tokens(tiny: Path, cli) -> None:
    _assert_one_line_error(
        *cli("generate", "--model", tiny, "--max-tokens", "-3")[::2], "--max-tokens"
    )


def test_prompt_longer_than_context(tiny: Path, cli) -> None:
    context = json.loads((tiny / "config.json").read_text())["max_position_embeddings"]
    long_prompt = " ".join(["boats and bread"] * context)
    for command in ("generate", "cache-prompt"):
        extra = ["--prompt-cache-file", "never.safetensors"] if command == "cache-prompt" else []
        code, _, err = cli(
            command, "--model", tiny, "--prompt", long_prompt, "--ignore-chat-template", *extra
        )
        _assert_one_line_error(code, err, f"context of {context}")


def test_cache_prompt_bad_destination(tiny: Path, tmp_path: Path, cli) -> None:
    code, _, err = cli(
        "cache-prompt", "--model", tiny, "--prompt", PROMPT, "--prompt-cache-file", "x.bin"
    )
    _assert_one_line_error(code, err, ".safetensors")
    nowhere = tmp_path / "missing" / "p.safetensors"
    code, _, err = cli(
        "cache-prompt", "--model", tiny, "--prompt", PROMPT, "--prompt-cache-file", nowhere
    )
    _assert_one_line_error(code, err, "no such directory")


def test_every_command_is_registered(cli) -> None:
    code, out, _ = cli("--help")
    assert code == 0
    for name in (
        "generate",
        "chat",
        "convert",
        "cache-prompt",
        "perplexity",
        "benchmark",
        "manage",
    ):
        assert f"  {name} " in out
