"""CUDA source of the one-row decode kernels (see :mod:`._cuda_kernels` for what they compute).

One body serves every variant; Python assembles it from pieces (weight format, norm,
residual, rotary epilogue) instead of preprocessor switches, because MLX compiles each
kernel body as the inside of a non-template function, where dead code must still name
only inputs that exist. Template constants come from ``mx.fast.cuda_kernel``'s ``template``:
``T`` (activation dtype), ``K``, ``M`` (input rows), ``R`` (rows per warp), ``N_TOTAL``,
``WARPS``, ``KS`` (warps splitting K), ``UNROLL``, ``N0..`` (multi), ``HD`` (rotary), ``QG``
(4-bit group size).

Layout per warp-step: dense weights, 8 bf16/fp16 per lane (16 bytes), 256 features per
warp; 4-bit weights, 32 nibbles per lane (16 bytes of MLX's packed uint32, little-endian
within a word), 1024 features per warp, one scale and bias per lane (a group holds 32, 64 or
128 features, so a lane's 32 never straddle two).
"""

from __future__ import annotations

__all__ = ["HEADER", "kernel_source"]

HEADER = """
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

// 128 + q as a float for the 4-bit value q in byte b of v (v = w & 0x0F0F0F0F or
// (w >> 4) & 0x0F0F0F0F): one byte permute puts q into the mantissa of 128.0f (no I2F).
__device__ __forceinline__ float mlxlm_q4(unsigned int v, int b) {
  return __uint_as_float(__byte_perm(v, 0x43000000u, 0x7054u | (b << 8)));
}

__device__ __forceinline__ float mlxlm_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
"""

_PROLOGUE = """
  constexpr int STEPS = K / CH;
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
"""

_ACCUMULATORS = """
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
"""

# Every weight load of a batch of U steps is issued before any arithmetic: the streaming
# loads are volatile asm, which the compiler would otherwise keep behind the FMAs.
_DENSE_LOADS = """
      uint4 wv[U][NW][R];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < NW; ++j)
#pragma unroll
          for (int r = 0; r < R; ++r)
            wv[u][j][r] = __ldcs(reinterpret_cast<const uint4*>(
                WP(j) + (size_t)prow[r] * K + (st + u) * 256 + lane * 8));
"""

_DENSE_COMPUTE = """
        const int k = (st + u) * 256 + lane * 8;
        float nf[8];
        NORM_LOAD8
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xf[8];
          mlxlm_unpack8(*reinterpret_cast<const uint4*>(x + m * K + k), xf, x);
          NORM_APPLY8
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
"""

_Q4_LOADS = """
      uint4 wv[U][NW][R];
      float sc[U][NW][R], bi[U][NW][R];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < NW; ++j)
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const size_t row = prow[r];
            wv[u][j][r] = __ldcs(
                reinterpret_cast<const uint4*>(WP(j)) + row * (K / 32) + (st + u) * 32 + lane);
            const size_t g = row * (K / QG) + ((st + u) * 1024 + lane * 32) / QG;
            sc[u][j][r] = static_cast<float>(SP(j)[g]);
            bi[u][j][r] = static_cast<float>(BP(j)[g]);
          }
"""

_Q4_COMPUTE = """
        const int k = (st + u) * 1024 + lane * 32;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xf[32];
#pragma unroll
          for (int c = 0; c < 4; ++c)
            mlxlm_unpack8(*reinterpret_cast<const uint4*>(x + m * K + k + 8 * c), xf + 8 * c, x);
          NORM_APPLY32
          float xs = 0.f;
#pragma unroll
          for (int e = 0; e < 32; ++e) xs += xf[e];
#pragma unroll
          for (int j = 0; j < NW; ++j)
#pragma unroll
            for (int r = 0; r < R; ++r) {
              const unsigned int* q = reinterpret_cast<const unsigned int*>(&wv[u][j][r]);
              float d = 0.f;
#pragma unroll
              for (int c = 0; c < 4; ++c) {
                const unsigned int lo = q[c] & 0x0F0F0F0Fu, hi = (q[c] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
                for (int b = 0; b < 4; ++b)
                  d += xf[8 * c + 2 * b] * mlxlm_q4(lo, b) + xf[8 * c + 2 * b + 1] * mlxlm_q4(hi, b);
              }
              acc[j][r][m] += sc[u][j][r] * (d - 128.f * xs) + bi[u][j][r] * xs;
            }
        }
"""

_NORM_LOAD8 = "mlxlm_unpack8(*reinterpret_cast<const uint4*>(norm + k), nf, norm);"
_NORM_APPLY8 = """
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            ss[m] += xf[e] * xf[e];
            xf[e] *= nf[e];
          }
"""
_NORM_APPLY32 = """
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            float nf[8];
            mlxlm_unpack8(*reinterpret_cast<const uint4*>(norm + k + 8 * c), nf, norm);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              ss[m] += xf[8 * c + e] * xf[8 * c + e];
              xf[8 * c + e] *= nf[e];
            }
          }
"""

_MAIN_LOOP = """
  if (active) {
#pragma unroll 1
    for (int st = kpart * KSTEPS; st < (kpart + 1) * KSTEPS; st += U) {
LOADS
#pragma unroll
      for (int u = 0; u < U; ++u) {
COMPUTE
      }
    }
  }
"""

# Warp sums, then (KS > 1) the partial sums of a row group's warps through shared memory,
# then the norm's scale; lane 0 of the group's first warp writes.
_REDUCE = """
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
"""

_STORE = """
#pragma unroll
    for (int r = 0; r < R; ++r) osel[OIDX(m * nsel + prow[r])] = static_cast<T>(acc[0][r][m]);
"""

# Rotated outputs: one row group holds both halves of a rotation pair (see _multi_select).
_ROTATE = """
    if (roped) {
      const int j = TRAD ? (prow[0] % HD) / 2 : prow[0] % HD;
      const float theta = ROPE_SCALE * (float)(offset[0] + m) / periods[j];
      float sn, cs;
      SINCOS
      const float a = acc[0][0][m], b = acc[0][1][m];
      osel[OIDX(m * nsel + prow[0])] = static_cast<T>(a * cs - b * sn);
      osel[OIDX(m * nsel + prow[1])] = static_cast<T>(a * sn + b * cs);
      continue;
    }
"""

# Angles reach ~1e5 rad (position / period): reduced to [-pi, pi] with a two-part 2*pi, then
# the fast intrinsic (~2**-21 absolute error there).
_SINCOS = (
    "const float turns = rintf(theta * 0.15915494309189535f);"
    " float ang = fmaf(-turns, 6.28318548202514648f, theta);"
    " ang = fmaf(turns, 1.7484555314695172e-7f, ang);"
    " __sincosf(ang, &sn, &cs);"
)


def _multi_select(
    n_weights: int, quant: bool, rope: tuple[bool, int] | None, cache_write: bool
) -> str:
    """Pick the matrix (and output) of this row group and renumber its rows within it.

    Rotated matrices take their rows in rotation pairs: ``(j, j + HD / 2)`` of a head
    (non-traditional) or ``(2j, 2j + 1)`` (traditional, already adjacent). With
    ``cache_write`` the second and third outputs (keys, values) go into the cache buffers.
    """
    head = "const WT* wsel = w0; T* osel = out0; int nsel = N0; int msel = 0;"
    if quant:
        head += " const T* ssel = s0; const T* bsel = b0;"
    lines = [head]
    for i in range(1, n_weights):
        target = f"out{i}"
        if cache_write:
            # The kernel writes the cache in place: see _cuda_kernels.multi_linear.
            target = f"const_cast<T*>({'kcache' if i == 1 else 'vcache'})"
        body = f"row0 -= nsel; wsel = w{i}; osel = {target}; nsel = N{i}; msel = {i};"
        if quant:
            body += f" ssel = s{i}; bsel = b{i};"
        lines.append(f"if (row0 >= nsel) {{ {body} }}")
    lines.append("for (int r = 0; r < R; ++r) prow[r] = row0 + r;")
    if rope is not None:
        traditional, count = rope
        lines.append(f"const bool roped = msel < {count};")
        if not traditional:
            lines.append(
                "if (roped) { const int lr = row0 / 2; const int base = (lr / (HD / 2)) * HD"
                " + lr % (HD / 2); prow[0] = base; prow[1] = base + HD / 2; }"
            )
    return "\n  ".join(lines)


def kernel_source(
    kind: str,
    n_weights: int,
    *,
    quant_group: int | None,
    norm: bool,
    residual: bool,
    eps: float,
    rope: tuple[bool, int, float] | None,
    cache_write: bool = False,
) -> tuple[list[str], list[str], str]:
    """Input names, output names and body of one variant.

    ``kind``: "linear", "swiglu" (two weights) or "multi" (one output per weight);
    ``quant_group``: 4-bit weights with this group size (None: dense); ``rope``:
    ``(traditional, count, scale)`` for multi's rotated leading outputs; ``cache_write``
    (multi, three weights, rope): keys and values are written into the ``kcache`` and
    ``vcache`` inputs, ``(1, kv_heads, capacity, HD)``, at slot ``offset[0]``, and only
    the queries are an output.
    """
    if cache_write and (kind != "multi" or n_weights != 3 or rope is None):
        raise ValueError("cache writes need multi with q, k, v and rotary")
    quant = quant_group is not None
    names = ["x"]
    for i in range(n_weights):
        names += [f"w{i}", f"s{i}", f"b{i}"] if quant else [f"w{i}"]
    names += ["norm"] if norm else []
    names += ["res"] if residual else []
    names += ["periods", "offset"] if rope is not None else []
    names += ["kcache", "vcache"] if cache_write else []
    oidx = "(p)"
    if kind == "multi":
        outs = ["out0"] if cache_write else [f"out{i}" for i in range(n_weights)]
        select = _multi_select(n_weights, quant, rope[:2] if rope else None, cache_write)
        if cache_write:  # element p of a (1, kv_heads, 1, HD) output, placed at the slot
            oidx = "(msel == 0 ? (p) : ((p) / HD) * (kcache_shape[2] * HD) + offset[0] * HD + (p) % HD)"
        wp, sp, bp, nw = "wsel", "ssel", "bsel", 1
        rotate = _ROTATE.replace("SINCOS", _SINCOS) if rope is not None else ""
        epilogue = f"#pragma unroll\n  for (int m = 0; m < M; ++m) {{{rotate}{_STORE}  }}\n"
    elif kind == "swiglu":
        outs, select, nw = ["out"], "", 2
        wp, sp, bp = "(j == 0 ? w0 : w1)", "(j == 0 ? s0 : s1)", "(j == 0 ? b0 : b1)"
        epilogue = (
            "for (int r = 0; r < R; ++r) for (int m = 0; m < M; ++m) {"
            " const float g = acc[0][r][m], u = acc[1][r][m];"
            " out[m * N_TOTAL + prow[r]] = static_cast<T>(g / (1.f + __expf(-g)) * u); }\n"
        )
    else:
        outs, select, nw = ["out"], "", 1
        wp, sp, bp = "w0", "s0", "b0"
        val = "acc[0][r][m]"
        if residual:
            val = f"static_cast<float>(res[m * N_TOTAL + prow[r]]) + {val}"
        epilogue = (
            "for (int r = 0; r < R; ++r) for (int m = 0; m < M; ++m)"
            f" out[m * N_TOTAL + prow[r]] = static_cast<T>({val});\n"
        )
    if quant:
        loads, compute = (
            _Q4_LOADS,
            _Q4_COMPUTE.replace("NORM_APPLY32", _NORM_APPLY32 if norm else ""),
        )
    else:
        compute = _DENSE_COMPUTE.replace("NORM_LOAD8", _NORM_LOAD8 if norm else "")
        compute = compute.replace("NORM_APPLY8", _NORM_APPLY8 if norm else "")
        loads = _DENSE_LOADS
    loop = _MAIN_LOOP.replace("LOADS", loads).replace("COMPUTE", compute)
    loop = loop.replace("WP(j)", wp).replace("SP(j)", sp).replace("BP(j)", bp)
    defines = {
        "CH": "1024" if quant else "256",
        "NW": str(nw),
        "HAS_NORM": str(int(norm)),
        "EPS": f"{float(eps)!r}f" if norm else "0.f",
        "TRAD": str(int(bool(rope and rope[0]))),
        "ROPE_SCALE": f"{float(rope[2])!r}f" if rope else "1.f",
        "WT": "unsigned int" if quant else "T",
        "OIDX(p)": oidx,
    }
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    tail = "".join(f"#undef {k.split('(')[0]}\n" for k in defines)
    body = _PROLOGUE + select + "\n" + _ACCUMULATORS + loop + _REDUCE + epilogue
    return names, outs, head + body + tail
