"""Matrix-vector kernels for one-row decoding on MLX's CUDA backend (``mx.fast.cuda_kernel``).

Why: decoding one token at a time is bound by how fast the weights stream from memory and,
on MLX's CUDA backend, by the host cost of every operation (~5 us each, measured on an
H200: a Llama-3.2-1B step is ~450 operations). These kernels stream weights with 16-byte
loads, many in flight per lane, optionally split each row's dot product over several warps
of a block, and fold the neighbouring elementwise work into the same launch:

- ``linear(x, w, norm=, residual=)``: ``residual + rms_norm(x, norm) @ w.T`` (both optional).
  The norm is fused by scaling each dot product afterwards by ``rsqrt(mean(x**2) + eps)``;
- ``swiglu(x, gate, up, norm=)``: ``silu(h @ gate.T) * (h @ up.T)`` in one pass;
- ``multi_linear(x, [wq, wk, wv], norm=, rope=)``: several projections of one input in one
  launch, one output each (the weights stay separate arrays: no concatenated copy), with
  rotary embeddings applied to the leading outputs in the epilogue.

Accumulation is float32; inputs and outputs are the weights' dtype (bfloat16 or float16).
``x`` holds ``rows`` (<= :data:`MAX_ROWS`) rows of ``K`` features, ``K`` a multiple of 256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

__all__ = [
    "CHUNK",
    "MAX_ROWS",
    "Rotary",
    "Tuning",
    "linear",
    "multi_linear",
    "supported",
    "swiglu",
]

MAX_ROWS = 4  # activation rows one launch handles (decoding a batch of one has 1)
CHUNK = 256  # features one warp covers per step: 32 lanes x 8 elements (16 bytes)


@dataclass(frozen=True)
class Tuning:
    """Launch shape.

    ``warps`` per block; ``rows_per_warp`` weight rows each warp accumulates; ``unroll``
    steps of 256 features whose loads are all issued before any arithmetic (so
    ``unroll * rows_per_warp`` 16-byte loads per lane are in flight); ``ksplit`` warps
    sharing one row group's dot products, each over ``K / ksplit`` features, summed through
    shared memory (more warps, hence loads, in flight for matrices with few rows).
    """

    warps: int = 4
    rows_per_warp: int = 2
    unroll: int = 8
    ksplit: int = 1


DEFAULT_TUNING = Tuning()


@dataclass(frozen=True)
class Rotary:
    """Rotary embedding applied by :func:`multi_linear` to its first ``count`` outputs.

    ``periods``: float32 ``(head_dim / 2,)``, the angle of pair ``j`` at position ``p`` being
    ``scale * p / periods[j]`` (what ``mx.fast.rope`` computes from ``base`` or ``freqs``);
    ``offset``: int32 scalar array, the position of the (single) row.
    """

    periods: mx.array
    offset: mx.array
    head_dim: int
    scale: float = 1.0
    traditional: bool = False
    count: int = 2


_HEADER = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ void mlxlm_unpack8(const uint4& v, float* f, const __nv_bfloat16*) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ void mlxlm_unpack8(const uint4& v, float* f, const __half*) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ float mlxlm_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
"""

# Shared by every variant. Placeholders filled per variant:
#   SELECT    picks the weight matrix / output of this row group (multi) and its row numbers
#   W_PTR(j)  weight matrix j of the group (two for swiglu)
#   NORM_LOAD loads 8 norm weights into nf (or nothing)
#   EPILOGUE  writes the group's results (acc already scaled by the norm)
_BODY = """
  constexpr int STEPS = K / 256;
  constexpr int GROUPS = WARPS / KS;
  constexpr int KSTEPS = STEPS / KS;
  constexpr int U = KSTEPS < UNROLL ? KSTEPS : UNROLL;
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  const int kpart = wib % KS;
  int row0 = (blockIdx.x * GROUPS + wib / KS) * R;
  const bool active = row0 < N_TOTAL;
  int prow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) prow[r] = row0 + r;
  SELECT
  float acc[NW][R][M];
  float ss[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    ss[m] = 0.f;
#pragma unroll
    for (int j = 0; j < NW; ++j)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[j][r][m] = 0.f;
  }
  if (active) {
#pragma unroll 1
    for (int s0 = kpart * KSTEPS; s0 < (kpart + 1) * KSTEPS; s0 += U) {
      uint4 wv[U][NW][R];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < NW; ++j)
#pragma unroll
          for (int r = 0; r < R; ++r)
            wv[u][j][r] = __ldcs(reinterpret_cast<const uint4*>(
                W_PTR(j) + (size_t)prow[r] * K + (s0 + u) * 256 + lane * 8));
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = (s0 + u) * 256 + lane * 8;
        float nf[8];
        NORM_LOAD
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xf[8];
          mlxlm_unpack8(*reinterpret_cast<const uint4*>(x + m * K + k), xf, x);
          if (HAS_NORM) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              ss[m] += xf[e] * xf[e];
              xf[e] *= nf[e];
            }
          }
#pragma unroll
          for (int j = 0; j < NW; ++j)
#pragma unroll
            for (int r = 0; r < R; ++r) {
              float wf[8];
              mlxlm_unpack8(wv[u][j][r], wf, x);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[j][r][m] += wf[e] * xf[e];
            }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    ss[m] = mlxlm_warp_sum(ss[m]);
#pragma unroll
    for (int j = 0; j < NW; ++j)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[j][r][m] = mlxlm_warp_sum(acc[j][r][m]);
  }
  if (KS > 1) {
    constexpr int SLOTS = NW * R * M + M;
    __shared__ float red[WARPS][SLOTS];
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        red[wib][NW * R * M + m] = ss[m];
#pragma unroll
        for (int j = 0; j < NW; ++j)
#pragma unroll
          for (int r = 0; r < R; ++r) red[wib][(j * R + r) * M + m] = acc[j][r][m];
      }
    }
    __syncthreads();
    if (kpart != 0) return;
#pragma unroll
    for (int p = 1; p < KS; ++p)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        ss[m] += red[wib + p][NW * R * M + m];
#pragma unroll
        for (int j = 0; j < NW; ++j)
#pragma unroll
          for (int r = 0; r < R; ++r) acc[j][r][m] += red[wib + p][(j * R + r) * M + m];
      }
  }
  if (!active || lane != 0) return;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float scale = HAS_NORM ? rsqrtf(ss[m] / K + EPS) : 1.f;
#pragma unroll
    for (int j = 0; j < NW; ++j)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[j][r][m] *= scale;
  }
  EPILOGUE
"""

# multi: renumber rows within the matrix they fall in; rotated matrices take their rows in
# rotation pairs (j, j + head_dim / 2) so that one group holds both halves of a pair.
_STORE = """
#pragma unroll
      for (int r = 0; r < R; ++r) osel[m * nsel + prow[r]] = static_cast<T>(acc[0][r][m]);
"""
_ROTATE = """
    if (roped) {
      const int j = TRAD ? (prow[0] % HD) / 2 : prow[0] % HD;
      const float theta = ROPE_SCALE * (float)(offset[0] + m) / periods[j];
      float sn, cs;
      SINCOS
      const float a = acc[0][0][m], b = acc[0][1][m];
      osel[m * nsel + prow[0]] = static_cast<T>(a * cs - b * sn);
      osel[m * nsel + prow[1]] = static_cast<T>(a * sn + b * cs);
      continue;
    }
"""


# Angles reach ~1e5 rad (position / period): reduced to [-pi, pi] with a two-part 2*pi, then
# the fast intrinsic (~2**-21 absolute error there); ``sincosf``'s slow path for large
# arguments is the alternative.
_SINCOS_FAST = (
    "const float turns = rintf(theta * 0.15915494309189535f);"
    " float red = fmaf(-turns, 6.28318548202514648f, theta);"
    " red = fmaf(turns, 1.7484555314695172e-7f, red);"
    " __sincosf(red, &sn, &cs);"
)
_SINCOS_PRECISE = "sincosf(theta, &sn, &cs);"
FAST_SINCOS = True


def _multi_epilogue(rope: Rotary | None) -> str:
    rotate = ""
    if rope is not None:
        rotate = _ROTATE.replace("SINCOS", _SINCOS_FAST if FAST_SINCOS else _SINCOS_PRECISE)
    return f"#pragma unroll\n  for (int m = 0; m < M; ++m) {{{rotate}{_STORE}  }}\n"


_kernels: dict[tuple, object] = {}

# Tests set this to NaN so that an output element the kernel fails to write shows up.
POISON: float | None = None


def supported(x: mx.array, *weights: mx.array) -> bool:
    """Whether these kernels can take ``x @ w.T`` for every ``w`` (else use MLX's matmul)."""
    if x.dtype not in (mx.bfloat16, mx.float16) or not weights:
        return False
    k = weights[0].shape[-1]
    if k % CHUNK or x.size % k or not 1 <= x.size // k <= MAX_ROWS:
        return False
    return all(w.ndim == 2 and w.shape[1] == k and w.dtype == x.dtype for w in weights)


def _multi_select(n_weights: int, rope: Rotary | None) -> str:
    lines = ["const T* wsel = w0; T* osel = out0; int nsel = N0; int msel = 0;"]
    for i in range(1, n_weights):
        lines.append(
            f"if (row0 >= nsel) {{ row0 -= nsel; wsel = w{i}; osel = out{i}; nsel = N{i};"
            f" msel = {i}; }}"
        )
    lines.append("for (int r = 0; r < R; ++r) prow[r] = row0 + r;")
    if rope is not None:
        lines.append(f"const bool roped = msel < {rope.count};")
        if not rope.traditional:
            lines.append(
                "if (roped) { const int lr = row0 / 2; const int base = (lr / (HD / 2)) * HD"
                " + lr % (HD / 2); prow[0] = base; prow[1] = base + HD / 2; }"
            )
    return "\n  ".join(lines)


def _source(
    kind: str, n_weights: int, has_norm: bool, has_res: bool, eps: float, rope: Rotary | None
) -> tuple[list[str], list[str], str]:
    """Input names, output names and body of one variant."""
    names = ["x"] + [f"w{i}" for i in range(n_weights)]
    if has_norm:
        names.append("norm")
    if has_res:
        names.append("res")
    if rope is not None:
        names += ["periods", "offset"]
    if kind == "multi":
        outs = [f"out{i}" for i in range(n_weights)]
        select, w_ptr, nw = _multi_select(n_weights, rope), "wsel", 1
        epilogue = _multi_epilogue(rope)
    elif kind == "swiglu":
        outs, select, w_ptr, nw = ["out"], "", "(j == 0 ? w0 : w1)", 2
        epilogue = (
            "for (int r = 0; r < R; ++r) for (int m = 0; m < M; ++m) {"
            " const float g = acc[0][r][m], u = acc[1][r][m];"
            " out[m * N_TOTAL + prow[r]] = static_cast<T>(g / (1.f + __expf(-g)) * u); }"
        )
    else:
        outs, select, w_ptr, nw = ["out"], "", "w0", 1
        val = "acc[0][r][m]"
        if has_res:
            val = f"static_cast<float>(res[m * N_TOTAL + prow[r]]) + {val}"
        epilogue = (
            "for (int r = 0; r < R; ++r) for (int m = 0; m < M; ++m)"
            f" out[m * N_TOTAL + prow[r]] = static_cast<T>({val});"
        )
    norm_load = (
        "mlxlm_unpack8(*reinterpret_cast<const uint4*>(norm + k), nf, norm);" if has_norm else ""
    )
    body = (
        _BODY.replace("SELECT", select)
        .replace("W_PTR(j)", w_ptr)
        .replace("NORM_LOAD", norm_load)
        .replace("EPILOGUE", epilogue)
    )
    defines = {
        "NW": str(nw),
        "HAS_NORM": str(int(has_norm)),
        "EPS": f"{float(eps)!r}f" if has_norm else "0.f",
        "ROPE": str(int(rope is not None)),
        "TRAD": str(int(rope is not None and rope.traditional)),
        "ROPE_SCALE": f"{float(rope.scale)!r}f" if rope is not None else "1.f",
    }
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    tail = "".join(f"\n#undef {k}" for k in defines)
    return names, outs, head + body + tail + "\n"


def _kernel(
    kind: str, n_weights: int, has_norm: bool, has_res: bool, eps: float, rope: Rotary | None
):
    rope_key = (rope.scale, rope.traditional, rope.count, FAST_SINCOS) if rope else None
    key = (kind, n_weights, has_norm, has_res, float(eps) if has_norm else 0.0, rope_key)
    if key not in _kernels:
        names, outs, body = _source(kind, n_weights, has_norm, has_res, eps, rope)
        # The JIT cache is keyed by name: the name must tell every source apart.
        digest = hashlib.sha1(body.encode()).hexdigest()[:12]
        _kernels[key] = mx.fast.cuda_kernel(
            name=f"mlxlm_{kind}{n_weights}_{digest}",
            input_names=names,
            output_names=outs,
            source=body,
            header=_HEADER,
        )
    return _kernels[key]


def _launch(
    kind: str,
    x: mx.array,
    weights: Sequence[mx.array],
    *,
    norm: mx.array | None,
    eps: float,
    residual: mx.array | None,
    rope: Rotary | None,
    shapes: list[tuple[int, ...]],
    tune: Tuning,
) -> list[mx.array]:
    k = weights[0].shape[1]
    rows = x.size // k
    n_out = [w.shape[0] for w in weights]
    per_warp = tune.rows_per_warp
    if any(n % per_warp for n in n_out):
        raise ValueError(f"output sizes {n_out} must be multiples of {per_warp}")
    if (k // CHUNK) % tune.ksplit or tune.warps % tune.ksplit:
        raise ValueError(f"ksplit {tune.ksplit} must divide {tune.warps} warps and K / 256")
    if rope is not None and (per_warp != 2 or rows != 1):
        raise ValueError("rotary outputs need 2 rows per warp and a single input row")
    total = n_out[0] if kind == "swiglu" else sum(n_out)
    kernel = _kernel(kind, len(weights), norm is not None, residual is not None, eps, rope)
    inputs = [x, *weights]
    if norm is not None:
        inputs.append(norm)
    if residual is not None:
        inputs.append(residual)
    template: list[tuple[str, object]] = [
        ("T", x.dtype),
        ("K", k),
        ("M", rows),
        ("R", per_warp),
        ("N_TOTAL", total),
        ("WARPS", tune.warps),
        ("KS", tune.ksplit),
        ("UNROLL", tune.unroll),
    ]
    if kind == "multi":
        template += [(f"N{i}", n) for i, n in enumerate(n_out)]
    if rope is not None:
        inputs += [rope.periods, rope.offset]
        template.append(("HD", rope.head_dim))
    groups = tune.warps // tune.ksplit
    blocks = -(-(total // per_warp) // groups)
    return kernel(  # type: ignore[operator]
        inputs=inputs,
        template=template,
        grid=(blocks * tune.warps * 32, 1, 1),
        threadgroup=(tune.warps * 32, 1, 1),
        output_shapes=shapes,
        output_dtypes=[x.dtype] * len(shapes),
        init_value=POISON,
    )


def _out_shape(x: mx.array, k: int, n: int) -> tuple[int, ...]:
    return (*x.shape[:-1], n) if x.shape[-1] == k else (x.size // k, n)


def linear(
    x: mx.array,
    w: mx.array,
    *,
    norm: mx.array | None = None,
    eps: float = 1e-5,
    residual: mx.array | None = None,
    tune: Tuning = DEFAULT_TUNING,
) -> mx.array:
    """``residual + rms_norm(x, norm, eps) @ w.T`` (norm and residual optional).

    ``x`` may be any contiguous array of ``rows * K`` elements (an attention output laid out
    as ``(1, heads, 1, head_dim)``, say); the result has the residual's shape if one is given.
    """
    shape = residual.shape if residual is not None else _out_shape(x, w.shape[1], w.shape[0])
    return _launch(
        "linear",
        x,
        [w],
        norm=norm,
        eps=eps,
        residual=residual,
        rope=None,
        shapes=[shape],
        tune=tune,
    )[0]


def swiglu(
    x: mx.array,
    gate: mx.array,
    up: mx.array,
    *,
    norm: mx.array | None = None,
    eps: float = 1e-5,
    tune: Tuning = DEFAULT_TUNING,
) -> mx.array:
    """``silu(h @ gate.T) * (h @ up.T)`` with ``h = rms_norm(x, norm, eps)`` (norm optional)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {gate.shape} and up {up.shape} differ")
    shape = _out_shape(x, gate.shape[1], gate.shape[0])
    return _launch(
        "swiglu",
        x,
        [gate, up],
        norm=norm,
        eps=eps,
        residual=None,
        rope=None,
        shapes=[shape],
        tune=tune,
    )[0]


def multi_linear(
    x: mx.array,
    weights: Sequence[mx.array],
    *,
    norm: mx.array | None = None,
    eps: float = 1e-5,
    rope: Rotary | None = None,
    shapes: Sequence[tuple[int, ...]] | None = None,
    tune: Tuning = DEFAULT_TUNING,
) -> list[mx.array]:
    """``[h @ w.T for w in weights]`` with ``h = rms_norm(x, norm, eps)``, in one launch.

    ``rope`` rotates the first ``rope.count`` outputs (one input row only); ``shapes`` gives
    each output's shape (same sizes), e.g. ``(1, heads, 1, head_dim)`` for attention.
    """
    k = weights[0].shape[1]
    out_shapes = (
        list(shapes) if shapes is not None else [_out_shape(x, k, w.shape[0]) for w in weights]
    )
    return _launch(
        "multi",
        x,
        list(weights),
        norm=norm,
        eps=eps,
        residual=None,
        rope=rope,
        shapes=out_shapes,
        tune=tune,
    )
