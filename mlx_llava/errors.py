"""The one exception type for problems a user can fix (bad input, missing
files, unsupported architectures), and the checks that raise it for option
values, so that the CLI and the Python API refuse the same things with the
same words. The CLI prints it as one line; programming errors still raise
normally.

This module imports nothing heavy: the CLI checks its options with it before
it loads mlx, mlx-lm or a model.
"""

import math
import os
from pathlib import Path


class LlavaError(Exception):
    pass


def need(ok: bool, message: str):
    if not ok:
        raise LlavaError(message)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_sampling(max_tokens=None, temperature=None, top_p=None, seed=None, repetition_penalty=None):
    """Decoding options. `max_tokens` -1 means: until the end of the answer or
    of the model's context, whichever comes first."""
    if max_tokens is not None:
        need(is_int(max_tokens) and (max_tokens >= 1 or max_tokens == -1),
             f"--max-tokens must be a positive number of tokens, or -1 for up to the context, not {max_tokens!r}")
    if temperature is not None:
        need(is_number(temperature) and temperature >= 0,
             f"--temperature must be 0 (greedy) or more, not {temperature!r}")
    if top_p is not None:
        need(is_number(top_p) and 0 < top_p <= 1, f"--top-p must be in (0, 1] (1 = off), not {top_p!r}")
    if seed is not None:
        need(is_int(seed) and 0 <= seed < 2**64, f"--seed must be an integer from 0 to 2**64 - 1, not {seed!r}")
    if repetition_penalty is not None:
        need(is_number(repetition_penalty) and repetition_penalty > 0,
             f"--repetition-penalty must be more than 0 (1 = off), not {repetition_penalty!r}")


QUANT_BITS = (4, 8)
QUANT_GROUP_SIZES = (32, 64, 128)


def check_quantization(bits, group_size):
    need(bits in QUANT_BITS, f"--q-bits must be one of {', '.join(map(str, QUANT_BITS))}, not {bits!r}")
    need(group_size in QUANT_GROUP_SIZES,
         f"--q-group-size must be one of {', '.join(map(str, QUANT_GROUP_SIZES))}, not {group_size!r}")


def check_output(path, sources=(), what: str = "--output", folder: bool = True):
    """An output path must not be, contain or lie inside any (local) source,
    symlinks and relative paths resolved; and it must be creatable: no file
    in its way, its nearest existing folder writable."""
    need(isinstance(path, (str, os.PathLike)), f"{what} must be a path, not {type(path).__name__}")
    out = Path(path).expanduser().resolve()
    for source in sources:
        if not isinstance(source, (str, os.PathLike)) or not Path(source).expanduser().exists():
            continue  # unset, or a hub repo id
        src = Path(source).expanduser().resolve()
        if out == src or src in out.parents or out in src.parents:
            how = "is" if out == src else "lies inside" if src in out.parents else "contains"
            raise LlavaError(f"{what} {path} {how} the source {source}: the output must be "
                             "somewhere else, or the source would be overwritten")
    if folder and out.is_file():
        raise LlavaError(f"{what} {path} is a file, not a folder")
    if not folder and out.is_dir():
        raise LlavaError(f"{what} {path} is a folder, not a file")
    parent = next(p for p in out.parents if p.exists())
    need(parent.is_dir(), f"{what} {path}: {parent} is a file, not a folder")
    need(os.access(parent, os.W_OK | os.X_OK), f"{what} {path}: cannot write in {parent} (permission denied)")


def write_failure(e: BaseException):
    """Why a write failed, if `e` is a failed write: an OSError (a full disk,
    a read-only folder) or MLX's RuntimeError from saving arrays; else None."""
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    if isinstance(e, RuntimeError) and str(e).startswith(("[write]", "[save_safetensors]", "[save]")):
        return f"{e} (is the disk full?)"
    return None
