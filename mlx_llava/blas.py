"""Put a fast system BLAS under MLX on Linux.

MLX's Linux wheel bundles a reference BLAS: float32 matmul runs at about
5 GFLOP/s on a 2-core x86 machine. Its cblas symbols are resolved by the
dynamic linker, so a system OpenBLAS loaded first with RTLD_GLOBAL serves them
instead (about 200 GFLOP/s). This must happen before `mlx.core` is imported.
macOS uses Accelerate and Metal: nothing is done there.

`MLX_LLAVA_BLAS=off` disables it; `MLX_LLAVA_BLAS=/path/to/libopenblas.so`
names the library to load.
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

loaded = None  # the path of the library loaded, if any


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
    if setting.lower() in ("auto", "on", "1", ""):
        paths = [p for p in CANDIDATES if os.path.exists(p)]
        paths.append(ctypes.util.find_library("openblas"))
    else:
        paths = [setting]
    for path in filter(None, paths):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            if path == setting:
                print(f"mlx-llava: could not load MLX_LLAVA_BLAS={path}", file=sys.stderr)
            continue
        loaded = path
        break
    return loaded
