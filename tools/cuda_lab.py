"""Experiments behind the CUDA decode kernels (mlxlm_core._cuda_kernels, _cuda_layers).

Run on a CUDA machine (BENCHMARKS.md's GPU section quotes what they found):

    python tools/cuda_lab.py kernels          # every variant vs a float32 reference (JSON lines)
    python tools/cuda_lab.py rope             # the rotary epilogue vs mx.fast.rope
    python tools/cuda_lab.py peaks mlxlm|mlx-lm  # peak memory per phase (prompt, steps)
    python tools/cuda_lab.py hostprof         # a pipelined step: build / encode / wait, cProfile
    python tools/cuda_lab.py decode           # fused vs unfused step: logits, host build time,
                                              # decode tokens/s beside MLX-LM (one process)
    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \
        python tools/cuda_lab.py sweepncu [multi] | sweepq4 | step fused|unfused|fused-q4 \
        > report.csv && python tools/ncu_summary.py report.csv [--order|--wide]

The ncu modes run their kernels once between cudaProfilerStart/Stop after a warm-up.
JSON results are also appended to $OUT/lab.jsonl when OUT is set.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, os.path.dirname(__file__))

from mlxlm_core import _cuda_kernels as ck

BF = mx.bfloat16


def emit(obj: dict) -> None:
    line = json.dumps(obj)
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "lab.jsonl"), "a") as f:
            f.write(line + "\n")


def rel_err(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return float(mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten()))


def ref_norm(x: mx.array, w: mx.array | None, eps: float) -> mx.array:
    x = x.astype(mx.float32)
    if w is None:
        return x
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(mx.float32)


def rnd(*shape: int, scale: float = 1.0) -> mx.array:
    return (mx.random.normal(shape) * scale).astype(BF)


def check_kernels(only_rope: bool = False) -> None:
    eps = 1e-5
    ck.POISON = float("nan")
    tunes = [ck.Tuning(), ck.Tuning(8, 2, 8, 4), ck.Tuning(4, 1, 4, 2)]
    for rows in () if only_rope else (1, 2):
        for k, n in ((2048, 2048), (8192, 2048), (256, 512)):
            x, w = rnd(rows, k), rnd(n, k, scale=k**-0.5)
            nw, res = rnd(k, scale=0.5) + 1, rnd(rows, n)
            for tune in tunes:
                if (k // 256) % tune.ksplit:
                    continue
                for norm, residual in ((None, None), (nw, res)):
                    out = ck.linear(x, w, norm=norm, eps=eps, residual=residual, tune=tune)
                    ref = ref_norm(x, norm, eps) @ w.astype(mx.float32).T
                    if residual is not None:
                        ref = ref + residual.astype(mx.float32)
                    emit(
                        {
                            "check": "linear",
                            "rows": rows,
                            "k": k,
                            "n": n,
                            "tune": str(tune),
                            "norm": norm is not None,
                            "err": rel_err(out, ref),
                            "nan": bool(mx.isnan(out.astype(mx.float32)).any().item()),
                        }
                    )
        x, g, u = rnd(rows, 2048), rnd(8192, 2048, scale=0.02), rnd(8192, 2048, scale=0.02)
        nw = rnd(2048, scale=0.5) + 1
        h = ref_norm(x, nw, eps)
        gg, uu = h @ g.astype(mx.float32).T, h @ u.astype(mx.float32).T
        for tune in (ck.Tuning(4, 1, 8), ck.Tuning(8, 1, 8, 2)):
            out = ck.swiglu(x, g, u, norm=nw, tune=tune)
            emit(
                {
                    "check": "swiglu",
                    "rows": rows,
                    "tune": str(tune),
                    "err": rel_err(out, nn.silu(gg) * uu),
                }
            )
        ws = [rnd(2048, 2048, scale=0.02), rnd(512, 2048, scale=0.02), rnd(512, 2048, scale=0.02)]
        outs = ck.multi_linear(x, ws, norm=nw)
        errs = [rel_err(o, h @ w.astype(mx.float32).T) for o, w in zip(outs, ws)]
        emit({"check": "multi", "rows": rows, "errs": errs})
    # Rotary epilogue against mx.fast.rope (llama3-like periods and plain base).
    x = rnd(1, 2048)
    nw = rnd(2048, scale=0.5) + 1
    h = ref_norm(x, nw, eps)
    ws = [rnd(2048, 2048, scale=0.02), rnd(512, 2048, scale=0.02), rnd(512, 2048, scale=0.02)]
    for trad in (False, True):
        for scale in (1.0, 0.5):
            for pos in (0, 7, 4000):
                periods = 500000.0 ** (mx.arange(0, 64, 2, dtype=mx.float32) / 64)
                periods = periods * (1 + mx.random.uniform(shape=(32,)))
                rot = ck.Rotary(
                    periods, mx.array([pos], dtype=mx.int32), 64, scale=scale, traditional=trad
                )
                shapes = [(1, 32, 1, 64), (1, 8, 1, 64), (1, 8, 1, 64)]
                outs = ck.multi_linear(x, ws, norm=nw, rope=rot, shapes=shapes)
                refs = []
                for w, shp in zip(ws, shapes):
                    y = (h @ w.astype(mx.float32).T).reshape(1, 1, shp[1], 64).transpose(0, 2, 1, 3)
                    refs.append(y)
                refs[0] = mx.fast.rope(
                    refs[0], 64, traditional=trad, base=None, scale=scale, offset=pos, freqs=periods
                )
                refs[1] = mx.fast.rope(
                    refs[1], 64, traditional=trad, base=None, scale=scale, offset=pos, freqs=periods
                )
                emit(
                    {
                        "check": "rope",
                        "trad": trad,
                        "scale": scale,
                        "pos": pos,
                        "errs": [rel_err(o, r) for o, r in zip(outs, refs)],
                        "shapes": [o.shape for o in outs],
                    }
                )
    ck.POISON = None


def bandwidths() -> None:
    from bench_cuda import copy_bandwidth

    emit({"copy_bandwidth_gbs_mlx": copy_bandwidth() / 1e9})
    try:
        import torch

        a = torch.empty(1 << 29, dtype=torch.float32, device="cuda")
        b = torch.empty_like(a)
        best = 0.0
        for _ in range(10):
            torch.cuda.synchronize()
            start = time.perf_counter()
            b.copy_(a)
            torch.cuda.synchronize()
            best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - start))
        emit({"copy_bandwidth_gbs_torch": best / 1e9, "card": torch.cuda.get_device_name()})
        del a, b
    except Exception as e:  # torch is only a second opinion
        emit({"torch": repr(e)})


def decode(check: bool = True) -> None:
    from bench_cuda import LLAMA_1B, build_models, single
    from mlxlm_core._cuda_layers import convert_decode_layers
    from mlxlm_core.cache import make_prompt_cache

    env = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    ours, peer = build_models(None)
    prompt = mx.random.randint(0, LLAMA_1B["vocab_size"], (512,), key=mx.random.key(1))

    def logits_after(model):
        cache = make_prompt_cache(model)
        mx.eval(model(prompt[None, :-1], cache=cache))
        steps = []
        tok = prompt[None, -1:]
        for _ in range(3):
            out = model(tok, cache=cache)
            steps.append(out)
            tok = mx.argmax(out[:, -1:], axis=-1)
        mx.eval(steps)
        return steps

    if check:
        base = logits_after(ours)
        n = convert_decode_layers(ours, enabled=True)
        fused = logits_after(ours)
        emit({"fused_layers": n, "step_errs": [rel_err(a, b) for a, b in zip(fused, base)]})

    cache = make_prompt_cache(ours)
    mx.eval(ours(prompt[None], cache=cache))
    tok = mx.array([[5]])
    for fused_on in (False, True):
        convert_decode_layers(ours, enabled=fused_on)
        builds, steps = [], []
        for _ in range(20):
            start = time.perf_counter()
            out = ours(tok, cache=cache)
            mid = time.perf_counter()
            mx.eval(out)
            end = time.perf_counter()
            builds.append(mid - start)
            steps.append(end - start)
        emit(
            {
                "env": env,
                "fused": fused_on,
                "build_ms": statistics.median(builds) * 1e3,
                "sync_step_ms": statistics.median(steps) * 1e3,
            }
        )

    rows: dict[str, list[float]] = {"peer": [], "unfused": [], "fused": []}
    for run in range(4):
        for name in ("peer", "unfused", "fused") if run % 2 == 0 else ("fused", "unfused", "peer"):
            if name == "peer":
                r = single("mlx-lm", peer, prompt, 128)
            else:
                convert_decode_layers(ours, enabled=name == "fused")
                r = single("mlxlm", ours, prompt, 128)
            if run:
                rows[name].append(r["decode_tps"])
    emit(
        {
            "env": env,
            "decode_tps": {k: statistics.median(v) for k, v in rows.items()},
            "runs": rows,
        }
    )


def _policy_model(bits: int | None) -> nn.Module:
    """The benchmark's model set up as ``load`` would (its execution policy applied)."""
    from bench_cuda import build_ours
    from mlxlm_core._policy import apply_policy, choose_policy

    model = build_ours(bits)
    apply_policy(model, choose_policy(model=model))
    mx.eval(model.parameters())
    return model


def host_profile() -> None:
    """Where a pipelined decode step's time goes: graph building (Python), async_eval
    (encoding into CUDA graphs) and waiting for the GPU; then a cProfile of the building."""
    import cProfile
    import io
    import pstats

    from bench_cuda import LLAMA_1B
    from mlxlm_core.cache import make_prompt_cache

    for bits in (None, 4):
        model = _policy_model(bits)
        prompt = mx.random.randint(0, LLAMA_1B["vocab_size"], (512,), key=mx.random.key(1))
        cache = make_prompt_cache(model)
        mx.eval(model(prompt[None, :-1], cache=cache))

        def step(tok, model=model, cache=cache):
            return mx.argmax(model(tok.reshape(1, 1), cache=cache)[:, -1], axis=-1)

        y = step(prompt[-1:])
        mx.async_eval(y)
        builds, encodes, waits = [], [], []
        for _ in range(100):
            t0 = time.perf_counter()
            nxt = step(y)
            t1 = time.perf_counter()
            mx.async_eval(nxt)
            t2 = time.perf_counter()
            y.item()
            t3 = time.perf_counter()
            builds.append(t1 - t0)
            encodes.append(t2 - t1)
            waits.append(t3 - t2)
            y = nxt
        total = [a + b + c for a, b, c in zip(builds, encodes, waits)]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            nxt = step(y)
            mx.async_eval(nxt)
            y.item()
            y = nxt
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        emit(
            {
                "bits": bits,
                "build_ms": statistics.median(builds) * 1e3,
                "async_eval_ms": statistics.median(encodes) * 1e3,
                "wait_ms": statistics.median(waits) * 1e3,
                "step_ms": statistics.median(total) * 1e3,
            }
        )
        print(text.getvalue()[-6000:])


def phase_peaks(engine: str) -> None:
    """Peak memory after the prompt, the first and the second decode step (the second grows
    the cache), each phase synchronised, for one engine (run each in its own process)."""
    from bench_cuda import LLAMA_1B, build_peer

    for bits in (None, 4):
        if engine == "mlxlm":
            from mlxlm_core._engine import Sampling, decode_step, prefill
            from mlxlm_core.cache import make_prompt_cache

            model = _policy_model(bits)
        else:
            from mlx_lm.models.cache import make_prompt_cache  # type: ignore[no-redef]

            model = build_peer(bits)
            mx.eval(model.parameters())
        prompt = mx.random.randint(0, LLAMA_1B["vocab_size"], (1, 512), key=mx.random.key(1))
        base = mx.get_active_memory()
        peaks = []
        for _ in range(2):
            cache = make_prompt_cache(model)
            mx.synchronize()
            mx.reset_peak_memory()
            row = {}
            if engine == "mlxlm":
                prefill(model, prompt[:, :-1], cache)
            else:
                model(prompt[:, :-1], cache=cache)
                mx.eval([c.state for c in cache])
            mx.synchronize()
            row["prompt"] = mx.get_peak_memory() - base
            token = prompt[:, -1:]
            for step in ("step1", "step2"):
                mx.reset_peak_memory()
                if engine == "mlxlm":
                    sampling = Sampling()
                    sampling.add(prompt[0, :-1], None, None)
                    y, logprobs = decode_step(model, token, cache, sampling)
                else:
                    logits = model(token, cache=cache)[:, -1, :]
                    logprobs = logits - mx.logsumexp(logits, keepdims=True)
                    y = mx.argmax(logprobs, axis=-1)
                mx.eval(y, logprobs)
                mx.synchronize()
                row[step] = mx.get_peak_memory() - base
                token = y[:, None]
            peaks.append(row)
            del cache
        emit({"engine": engine, "bits": bits, "weights": base, "peaks_above_weights": peaks})
        del model


def _cudart():
    import ctypes

    for lib in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(lib)
        except OSError:
            continue
    return None


def sweep_ncu() -> None:
    """Each (shape, tuning) once between cudaProfilerStart/Stop: run under ncu for device times."""
    from mlxlm_core._cuda_layers import DEFAULT_TUNINGS as tn

    tunings = [
        ck.Tuning(*t)
        for t in (
            (4, 2, 8, 1),
            (4, 1, 8, 1),
            (8, 2, 8, 4),
            (8, 2, 8, 2),
            (8, 1, 8, 4),
            (4, 2, 8, 2),
            (8, 4, 4, 4),
            (4, 2, 4, 1),
            (8, 1, 8, 2),
        )
    ]
    x1, x8, nw = rnd(1, 2048), rnd(1, 8192), rnd(2048) + 1
    res = rnd(1, 2048)
    ops = []
    only_multi = len(sys.argv) > 2 and sys.argv[2] == "multi"
    for n, k in () if only_multi else ((2048, 2048), (8192, 2048), (2048, 8192), (3072, 2048)):
        w = rnd(n, k, scale=0.02)
        x = x1 if k == 2048 else x8
        ops.append(lambda w=w, x=x: x @ w.T)
        for tune in tunings:
            if (k // 256) % tune.ksplit == 0:
                ops.append(lambda w=w, x=x, tune=tune: ck.linear(x, w, tune=tune))
    g, u = rnd(8192, 2048, scale=0.02), rnd(8192, 2048, scale=0.02)
    for tune in (
        ck.Tuning(4, 1, 8),
        ck.Tuning(8, 1, 8, 2),
        ck.Tuning(4, 2, 4),
        ck.Tuning(8, 1, 4, 2),
    ):
        ops.append(lambda tune=tune: ck.swiglu(x1, g, u, norm=nw, tune=tune))
    ws = [rnd(2048, 2048, scale=0.02), rnd(512, 2048, scale=0.02), rnd(512, 2048, scale=0.02)]
    rot = ck.Rotary(mx.ones(32) * 100, mx.array([5], dtype=mx.int32), 64)
    shapes = [(1, 32, 1, 64), (1, 8, 1, 64), (1, 8, 1, 64)]

    def multi(tune, rope, fast, norm):
        def op():
            ck.FAST_SINCOS = fast
            return ck.multi_linear(
                x1, ws, norm=norm, rope=rope, shapes=shapes if rope else None, tune=tune
            )

        return op

    for tune in (ck.Tuning(8, 2, 8, 4), ck.Tuning(4, 2, 8, 1)):
        ops += [
            multi(tune, rot, True, nw),
            multi(tune, rot, False, nw),
            multi(tune, None, True, nw),
            multi(tune, None, True, None),
        ]
        ops.append(lambda tune=tune: ck.linear(x1, ws[0], norm=nw, tune=tune))
        ops.append(lambda tune=tune: ck.linear(x1, ws[0], tune=tune))
    ops.append(lambda: ck.linear(x8, rnd(2048, 8192), residual=res, tune=tn.down))
    head = rnd(128256, 2048, scale=0.02)
    ops.append(lambda: x1 @ head.T)
    ops.append(lambda: ck.linear(x1, head, norm=nw))
    for op in ops:
        mx.eval(op())
    mx.synchronize()
    rt = _cudart()
    if rt is not None:
        rt.cudaProfilerStart()
    for op in ops:
        mx.eval(op())
        mx.synchronize()
    if rt is not None:
        rt.cudaProfilerStop()


def sweep_q4() -> None:
    """4-bit kernels (and the rotary qkv with device-made position) under ncu."""
    import mlxlm_core._cuda_layers as cl

    def q4(n, k):
        w = (mx.random.normal((n, k)) * 0.02).astype(BF)
        return ck.Q4(*mx.quantize(w, group_size=64, bits=4), 64)

    x1, x8, nw = rnd(1, 2048), rnd(1, 8192), rnd(2048) + 1
    ops = []
    for (n, k), tunes in (
        ((2048, 2048), ((8, 2, 2, 2), (8, 4, 2, 2), (4, 2, 2, 1), (8, 1, 2, 2))),
        ((2048, 8192), ((8, 2, 2, 4), (8, 4, 2, 4), (8, 2, 4, 2), (4, 2, 8, 1))),
    ):
        w = q4(n, k)
        x = x1 if k == 2048 else x8
        ops.append(
            lambda w=w, x=x: mx.quantized_matmul(
                x, w.weight, w.scales, w.biases, group_size=64, bits=4
            )
        )
        for t in tunes:
            ops.append(lambda w=w, x=x, t=t: ck.linear(x, w, tune=ck.Tuning(*t)))
    g, u = q4(8192, 2048), q4(8192, 2048)
    for t in ((4, 1, 2, 1), (4, 2, 2, 1), (8, 2, 2, 2), (8, 4, 2, 2)):
        ops.append(lambda t=t: ck.swiglu(x1, g, u, norm=nw, tune=ck.Tuning(*t)))
    ws = [q4(2048, 2048), q4(512, 2048), q4(512, 2048)]
    rope = cl.Rope(64, base=500000.0)
    rot = ck.Rotary(cl._periods(rope), cl._offset_array(77), 64)
    shapes = [(1, 32, 1, 64), (1, 8, 1, 64), (1, 8, 1, 64)]
    for t in ((8, 2, 2, 2), (4, 2, 2, 1)):
        ops.append(
            lambda t=t: ck.multi_linear(
                x1, ws, norm=nw, rope=rot, shapes=shapes, tune=ck.Tuning(*t)
            )
        )
    wd = [rnd(2048, 2048, scale=0.02), rnd(512, 2048, scale=0.02), rnd(512, 2048, scale=0.02)]
    for t in ((8, 2, 8, 4), (4, 2, 8, 1)):
        ops.append(
            lambda t=t: ck.multi_linear(
                x1, wd, norm=nw, rope=rot, shapes=shapes, tune=ck.Tuning(*t)
            )
        )
        ops.append(lambda t=t: ck.multi_linear(x1, wd, norm=nw, tune=ck.Tuning(*t)))
    for op in ops:
        mx.eval(op())
    mx.synchronize()
    rt = _cudart()
    if rt is not None:
        rt.cudaProfilerStart()
    for op in ops:
        mx.eval(op())
        mx.synchronize()
    if rt is not None:
        rt.cudaProfilerStop()


def step_for_ncu() -> None:
    """Warm up, then one decode step between cudaProfilerStart/Stop (for ncu)."""

    from bench_cuda import LLAMA_1B, build_models
    from mlxlm_core._cuda_layers import convert_decode_layers
    from mlxlm_core.cache import make_prompt_cache

    fused = sys.argv[2].startswith("fused")
    ours, _ = build_models(4 if sys.argv[2].endswith("q4") else None)
    convert_decode_layers(ours, enabled=fused)
    prompt = mx.random.randint(0, LLAMA_1B["vocab_size"], (64,), key=mx.random.key(1))
    cache = make_prompt_cache(ours)
    mx.eval(ours(prompt[None], cache=cache))
    tok = mx.array([[5]])
    for _ in range(5):
        mx.eval(mx.argmax(ours(tok, cache=cache)[:, -1], axis=-1))
    mx.synchronize()
    rt = _cudart()
    if rt is not None:
        rt.cudaProfilerStart()
    mx.eval(mx.argmax(ours(tok, cache=cache)[:, -1], axis=-1))
    mx.synchronize()
    if rt is not None:
        rt.cudaProfilerStop()


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "kernels":
        check_kernels()
    elif what == "rope":
        check_kernels(only_rope=True)
    elif what == "decode":
        bandwidths()
        decode()
    elif what == "decode-nocheck":
        decode(check=False)
    elif what == "sweepncu":
        sweep_ncu()
    elif what == "sweepq4":
        sweep_q4()
    elif what == "peaks":
        phase_peaks(sys.argv[2])
    elif what == "hostprof":
        host_profile()
    elif what == "step":
        step_for_ncu()
