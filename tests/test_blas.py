"""The system OpenBLAS is put under MLX on Linux (and can be turned off)."""

import os
import subprocess
import sys

import pytest

from mlx_llava.blas import CANDIDATES, environment_mkl

PRESENT = sys.platform.startswith("linux") and any(os.path.exists(p) for p in CANDIDATES)
pytestmark = pytest.mark.skipif(not PRESENT, reason="no system OpenBLAS (Linux: apt install libopenblas0-pthread)")

PROBE = """
import time, mlx_llava, mlx.core as mx
maps = open('/proc/self/maps').read()
a = mx.random.normal((512, 512)); b = mx.random.normal((512, 512)); mx.eval(a, b)
mx.eval(a @ b)
best = 1e9
for _ in range(20):  # the best of 20: a busy machine slows some
    t = time.perf_counter()
    mx.eval(a @ b)
    best = min(best, time.perf_counter() - t)
gflops = 2 * 512**3 / best / 1e9
print('/libopenblas' in maps or '/libmkl_rt' in maps, mlx_llava.blas.loaded, round(gflops, 1))
"""


def probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", out[1], float(out[2])


def test_matmul_is_fast_with_system_blas():
    mapped, path, gflops = probe(MLX_LLAVA_BLAS="auto")
    assert mapped and path != "None"
    # The bundled reference BLAS gives about 3-5 GFLOP/s here; OpenBLAS 100+.
    assert gflops > 25, f"float32 matmul at {gflops} GFLOP/s: the fast BLAS is not in use"


def test_off_switch():
    mapped, path, _ = probe(MLX_LLAVA_BLAS="off")
    assert not mapped and path == "None"


def test_openblas_when_asked():
    mapped, path, gflops = probe(MLX_LLAVA_BLAS="openblas")
    assert mapped and "openblas" in path


@pytest.mark.skipif(not environment_mkl(), reason="no MKL in this environment (pip install mkl)")
def test_mkl_first_when_installed():
    mapped, path, gflops = probe(MLX_LLAVA_BLAS="auto")
    assert mapped and "libmkl_rt" in path and gflops > 25


def test_explicit_path():
    path = next(p for p in CANDIDATES if os.path.exists(p))
    mapped, loaded, _ = probe(MLX_LLAVA_BLAS=path)
    assert mapped and loaded == path
