"""The optimised BLAS under MLX's CPU kernels (``mlxlm_core._blas``), in fresh interpreters.

What is loaded depends on what is installed (the ``blas`` extra's MKL, a system OpenBLAS):
each case runs ``import mlxlm_core`` in a subprocess with its own ``MLXLM_BLAS`` and reports
what it chose, where the process's ``cblas_sgemm`` resolves, and what importing changed.
Results of float32 matmuls are checked against numpy in float64, whichever BLAS serves them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from mlxlm_core._blas import _openblas_candidates

PROBE = r"""
import json, logging, os, sys, warnings
env_before = dict(os.environ)
handlers_before = list(logging.getLogger().handlers)
if "--mlx-first" in sys.argv:
    import mlx.core
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mlxlm_core
from mlxlm_core._blas import _global_sgemm_owner, blas_info
info = blas_info()
out = {
    "name": info.name, "path": info.path, "detail": info.detail,
    "env_changed": dict(os.environ) != env_before,
    "handlers_changed": logging.getLogger().handlers != handlers_before,
    "owner": _global_sgemm_owner(),
    "warnings": [str(w.message) for w in caught if "MLXLM_BLAS" in str(w.message)],
}
if info.name == "openblas":
    import ctypes
    out["threads"] = ctypes.CDLL(info.path).openblas_get_num_threads()
if "--matmul" in sys.argv:
    import mlx.core as mx
    import numpy as np
    rng = np.random.default_rng(0)
    errors = []
    # (M, K, N): decode rows, prompt chunks, odd sizes; both operand layouts MLX passes.
    for m, k, n in [(1, 576, 1536), (1, 576, 49152), (7, 300, 129), (512, 576, 1536)]:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((n, k)).astype(np.float32)
        ref = a.astype(np.float64) @ b.astype(np.float64).T
        for got in (mx.array(a) @ mx.array(b).T, mx.array(a) @ mx.array(np.ascontiguousarray(b.T))):
            got = np.array(got, dtype=np.float64)
            # float32 accumulation over k terms: relative to the size of the terms summed.
            scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64).T
            errors.append(float(np.max(np.abs(got - ref) / scale)))
    out["max_relative_error"] = max(errors)
print(json.dumps(out))
"""


CASES = {
    "auto": (None, "--matmul"),
    "off": ("off", "--matmul"),
    # libm is on every Linux system and exports no cblas_* symbol.
    "no-cblas": ("libm.so.6",),
    "missing": ("/nonexistent/libblas.so",),
    "mlx-first": (None, "--mlx-first"),
}
# A system OpenBLAS, where one is installed (Debian's libopenblas0-pthread on CI).
SYSTEM_OPENBLAS = next((str(p) for p in _openblas_candidates() if p.exists()), None)
if SYSTEM_OPENBLAS:
    CASES["openblas"] = (SYSTEM_OPENBLAS, "--matmul")


@pytest.fixture(scope="module")
def probes() -> dict[str, dict[str, Any]]:
    """Every case in its own fresh interpreter, all started at once (each imports MLX)."""
    running = {}
    for name, (setting, *flags) in CASES.items():
        env = dict(os.environ)
        env.pop("MLXLM_BLAS", None)
        if setting is not None:
            env["MLXLM_BLAS"] = setting
        running[name] = subprocess.Popen(
            [sys.executable, "-c", PROBE, *flags],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {}
    for name, proc in running.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


@pytest.fixture(scope="module")
def auto(probes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return probes["auto"]


def test_import_changes_no_environment_or_logging(auto: dict[str, Any]) -> None:
    assert not auto["env_changed"]
    assert not auto["handlers_changed"]
    assert auto["warnings"] == []


def test_auto_loads_an_optimised_blas_that_mlx_binds_to(auto: dict[str, Any]) -> None:
    if auto["name"] == "bundled":
        pytest.skip(f"no optimised BLAS installed here: {auto['detail']}")
    assert auto["path"] and os.path.exists(auto["path"])
    # The global scope (searched before libmlx's own libblas) yields the loaded library.
    assert os.path.realpath(auto["owner"]) == os.path.realpath(auto["path"])


def test_auto_prefers_the_blas_extra_when_installed(auto: dict[str, Any]) -> None:
    try:
        importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the mlxlm-core[blas] extra (mkl) is not installed")
    assert auto["name"] == "mkl"
    assert "sequential" in auto["detail"]


def test_matmul_results_match_float64_numpy(auto: dict[str, Any]) -> None:
    assert auto["max_relative_error"] < 1e-5


def test_off_keeps_mlx_bundled_blas_with_the_same_results(probes) -> None:
    off = probes["off"]
    assert off["name"] == "bundled" and off["path"] is None
    assert off["owner"] is None  # nothing in the global scope: libmlx uses its own
    assert off["max_relative_error"] < 1e-5


def test_a_library_without_cblas_names_is_refused_with_a_warning(probes) -> None:
    out = probes["no-cblas"]
    assert out["name"] == "bundled"
    assert "does not export cblas_sgemm" in out["detail"]
    assert out["owner"] is None  # it never entered the global scope
    assert len(out["warnings"]) == 1


def test_a_missing_library_is_reported(probes) -> None:
    out = probes["missing"]
    assert out["name"] == "bundled" and "cannot load" in out["detail"]
    assert len(out["warnings"]) == 1


def test_too_late_after_mlx_core_was_imported(probes) -> None:
    out = probes["mlx-first"]
    assert out["name"] == "bundled"
    assert "imported before mlxlm_core" in out["detail"]


@pytest.mark.skipif(SYSTEM_OPENBLAS is None, reason="no system OpenBLAS on this machine")
def test_openblas_runs_on_one_thread_with_correct_results(probes) -> None:
    out = probes["openblas"]
    assert out["name"] == "openblas" and "1 thread" in out["detail"]
    assert out["threads"] == 1  # its pthread pool would compete with MLX's stream thread
    assert out["max_relative_error"] < 1e-5
