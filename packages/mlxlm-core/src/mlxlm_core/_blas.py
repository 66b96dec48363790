"""Put an optimised BLAS under MLX's CPU kernels: mlxlm_core's one import-time side effect.

MLX's Linux CPU wheel links a reference BLAS (~3-5 GFLOP/s float32 matmul on the machine of
BENCHMARKS.md). ``libmlx.so`` looks ``cblas_sgemm`` up in the process's global symbol scope
before its own dependencies, so a library that exports the standard ``cblas_*`` names,
opened with ``RTLD_GLOBAL``, serves every float32 matmul of MLX instead: ~100 GFLOP/s, and
~24 GB/s for a matrix-vector product, on one core with MKL there. Python opens extension
modules with ``RTLD_NOW``, so MLX binds the symbol when ``mlx.core`` is imported: the
library must be loaded before that. ``mlxlm_core/__init__.py`` imports this module first,
and importing it runs :func:`ensure`; nothing else in the package acts at import time, and
this writes no environment variable (MKL's threading layer is set by a function call).
If ``mlx.core`` was imported before ``mlxlm_core``, nothing is loaded (it would not serve).

Choice, by the environment variable ``MLXLM_BLAS``:

- ``auto`` (default, Linux only): Intel MKL from the PyPI package ``mkl`` (installed by
  ``pip install "mlxlm-core[blas]"``, x86-64) if present, else a system OpenBLAS
  (e.g. Debian's ``libopenblas0-pthread``), else MLX's bundled BLAS.
- ``off``: leave MLX's bundled BLAS alone.
- a path: that shared library (it must export ``cblas_sgemm``).

MKL runs with its sequential threading layer unless ``MKL_THREADING_LAYER`` says otherwise,
OpenBLAS with one thread unless ``OPENBLAS_NUM_THREADS`` does (measured in BENCHMARKS.md).
``mlxlm generate --verbose`` prints :func:`blas_info`.
Libraries whose symbols are prefixed (numpy's bundled OpenBLAS, ``scipy-openblas32``:
``scipy_cblas_sgemm``) cannot serve and are not tried.
"""

from __future__ import annotations

import ctypes
import os
import site
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENV_VAR", "BlasInfo", "blas_info", "ensure"]

ENV_VAR = "MLXLM_BLAS"

# MKL's threading layers (mkl_service.h). Sequential keeps MKL on the calling thread (MLX's
# CPU stream): OpenMP workers that spin between calls would compete with that same thread
# on small machines; see BENCHMARKS.md for the measurement behind this choice.
_MKL_SEQUENTIAL = 1


@dataclass(frozen=True)
class BlasInfo:
    """What serves MLX's float32 matmuls on the CPU."""

    name: str  # "mkl", "openblas", "custom", "bundled" or "accelerate"
    path: str | None  # the library loaded, if any
    detail: str  # how it was chosen, or why nothing was loaded

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.name}{where}: {self.detail}"

    @property
    def optimised(self) -> bool:
        return self.name not in ("bundled",)


_info: BlasInfo | None = None
_handles: list[ctypes.CDLL] = []  # keep loaded libraries alive for the process


def _lib_dirs() -> list[Path]:
    """Where pip/uv put a wheel's data files (``<prefix>/lib``), most specific first."""
    dirs = [Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"]
    user = site.getuserbase()
    if user:
        dirs.append(Path(user) / "lib")
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def _mkl_candidates() -> list[Path]:
    return [d / name for d in _lib_dirs() for name in ("libmkl_rt.so.3", "libmkl_rt.so.2")]


def _openblas_candidates() -> list[Path]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    roots = [Path("/usr/lib") / multiarch] if multiarch else []
    roots += [Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib")]
    names = [
        "openblas-pthread/libopenblas.so.0",  # Debian/Ubuntu libopenblas0-pthread
        "openblas-openmp/libopenblas.so.0",
        "libopenblas.so.0",
        "libopenblasp.so.0",  # Fedora's pthread build
    ]
    return [root / name for root in roots for name in names]


def _exports_sgemm(path: Path) -> tuple[ctypes.CDLL | None, str]:
    """Open ``path`` privately first, so a library without cblas names never goes global."""
    try:
        private = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    except OSError as exc:
        return None, f"cannot load: {exc}"
    if not hasattr(private, "cblas_sgemm"):
        return None, "does not export cblas_sgemm"
    # Opening it again with RTLD_GLOBAL promotes the same (already loaded) object.
    return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL), ""


def _load(path: Path, name: str) -> tuple[BlasInfo | None, str]:
    lib, why = _exports_sgemm(path)
    if lib is None:
        return None, why
    _handles.append(lib)
    detail = "loaded before mlx.core"
    if name == "mkl":
        if "MKL_THREADING_LAYER" in os.environ:
            detail += f"; threading layer {os.environ['MKL_THREADING_LAYER']} (environment)"
        else:
            lib.MKL_Set_Threading_Layer(ctypes.c_int(_MKL_SEQUENTIAL))
            detail += "; sequential threading layer"
    elif name == "openblas" and hasattr(lib, "openblas_set_num_threads"):
        # Same reasoning as MKL's sequential layer: one thread measured as fast for these
        # shapes, and OpenBLAS's spinning pthreads collapse under load (BENCHMARKS.md).
        if "OPENBLAS_NUM_THREADS" in os.environ:
            detail += f"; {os.environ['OPENBLAS_NUM_THREADS']} thread(s) (environment)"
        else:
            lib.openblas_set_num_threads(ctypes.c_int(1))
            detail += "; 1 thread"
    return BlasInfo(name, str(path), detail), ""


def _choose() -> BlasInfo:
    setting = os.environ.get(ENV_VAR, "auto").strip() or "auto"
    if sys.platform == "darwin":
        return BlasInfo("accelerate", None, "MLX uses Apple's Accelerate on macOS")
    if setting.lower() in ("off", "0", "none", "bundled"):
        return BlasInfo("bundled", None, f"{ENV_VAR}={setting}")
    if "mlx.core" in sys.modules and sys.platform.startswith("linux"):
        # Python opens extension modules with RTLD_NOW: MLX bound cblas_sgemm at its import.
        return BlasInfo(
            "bundled", None, "mlx.core was imported before mlxlm_core (import mlxlm_core first)"
        )
    if setting.lower() != "auto":
        path = Path(setting).expanduser()
        kind = "mkl" if "libmkl" in path.name else "custom"
        kind = "openblas" if "openblas" in path.name else kind
        info, why = _load(path, kind)
        if info is None:
            warnings.warn(f"{ENV_VAR}={setting}: {why}; using MLX's bundled BLAS", stacklevel=3)
            return BlasInfo("bundled", None, f"{ENV_VAR}={setting} failed: {why}")
        return info
    if not sys.platform.startswith("linux"):
        return BlasInfo("bundled", None, "no optimised BLAS is looked for on this platform")
    tried = []
    for name, candidates in (("mkl", _mkl_candidates()), ("openblas", _openblas_candidates())):
        for path in candidates:
            if not path.exists():
                continue
            info, why = _load(path, name)
            if info is not None:
                return info
            tried.append(f"{path}: {why}")
    hint = 'none found; pip install "mlxlm-core[blas]" (or apt-get install libopenblas0-pthread)'
    return BlasInfo("bundled", None, "; ".join(tried) or hint)


def ensure() -> BlasInfo:
    """Choose and load the BLAS once per process (idempotent); returns what was chosen."""
    global _info
    if _info is None:
        _info = _choose()
    return _info


def blas_info() -> BlasInfo:
    """The BLAS chosen at import, checked against what the symbol lookup now finds."""
    info = ensure()
    if info.path is None or not sys.platform.startswith("linux"):
        return info
    found = _global_sgemm_owner()
    if found is not None and Path(found).resolve() != Path(info.path).resolve():
        return BlasInfo(info.name, info.path, f"{info.detail}; but cblas_sgemm resolves to {found}")
    return info


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _global_sgemm_owner() -> str | None:
    """The file whose ``cblas_sgemm`` the global symbol scope yields (what MLX binds to)."""
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p).value
        dladdr = process.dladdr
    except (AttributeError, OSError):
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    found = _DlInfo()
    if not dladdr(address, ctypes.byref(found)) or not found.dli_fname:
        return None
    return found.dli_fname.decode()


ensure()  # at import: this module exists to run before mlx.core is first imported
