"""Put a fast BLAS under MLX on Linux.

MLX's Linux wheel bundles a reference BLAS: float32 matmul runs at about
5 GFLOP/s on a 2-core x86 machine. Its cblas symbols are resolved by the
dynamic linker, so a library loaded first with RTLD_GLOBAL serves them
instead. This must happen before `mlx.core` is imported. macOS uses
Accelerate and Metal: nothing is done there.

Which library: Intel's MKL when it is installed in this Python environment
(`pip install mkl`, or `pip install "mlx-llava[mkl]"`), else the system
OpenBLAS (`apt install libopenblas0-pthread`). Both multiply large float32
matrices at about 150-200 GFLOP/s here; OpenBLAS 0.3.21 (Debian 12) copies
the whole weight matrix for a one-row product, so decoding reads each weight
about three times, while MKL reads it once: decoding runs about twice as fast
with MKL (benchmarks/inference.md). MKL runs with its own OpenMP
(`MKL_THREADING_LAYER=INTEL` unless set).

`MLX_LLAVA_BLAS`: `auto` (the default: MKL, else OpenBLAS), `mkl`,
`openblas`, `off`, or the path of a library to load.
"""

import ctypes
import ctypes.util
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

MKL_NAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")

loaded = None  # the path of the library loaded, if any


def environment_mkl() -> list:
    """MKL's runtime library where pip's `mkl` wheel puts it: this environment's lib/."""
    folder = os.path.join(sys.prefix, "lib")
    return [os.path.join(folder, n) for n in MKL_NAMES if os.path.exists(os.path.join(folder, n))]


def use_system_blas():
    """Load a system OpenBLAS globally if we are on Linux and MLX is not yet loaded.

    Returns the path loaded, or None. Safe to call more than once.
    """
    global loaded
    setting = os.environ.get("MLX_LLAVA_BLAS", "auto").strip()
    if (
        loaded
        or not sys.platform.startswith("linux")
        or setting.lower() in ("off", "0", "false", "no", "none")
        or "mlx.core" in sys.modules
    ):
        return loaded
    openblas = [p for p in CANDIDATES if os.path.exists(p)] + [ctypes.util.find_library("openblas")]
    choice = setting.lower()
    if choice in ("auto", "on", "1", ""):
        paths = environment_mkl() + openblas
    elif choice == "mkl":
        paths = environment_mkl()
    elif choice == "openblas":
        paths = openblas
    else:
        paths = [setting]
    for path in filter(None, paths):
        if "mkl" in os.path.basename(path):
            os.environ.setdefault("MKL_THREADING_LAYER", "INTEL")
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            if path == setting:
                print(f"mlx-llava: could not load MLX_LLAVA_BLAS={path}", file=sys.stderr)
            continue
        loaded = path
        break
    return loaded
