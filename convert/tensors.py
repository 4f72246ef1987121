"""Source checkpoints, read one tensor at a time.

A conversion must not hold a 7B model in memory, so a checkpoint is opened
as a list of `Tensor`s: each knows its name, shape and dtype from the file's
header (safetensors) or pickle (`.bin`), and reads its data only when asked.
`mx.load` of a safetensors file is lazy per tensor, and `torch_bin.load_bin`
views a memory map, so opening every shard up front costs headers, not
weights, and finds a truncated or missing shard before anything is written.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from mlx_llava.errors import LlavaError

from .torch_bin import BFloat16Array, load_bin, to_mlx

# (index file, single file) for the two formats, safetensors first: when a
# folder has both, safetensors are read (faster, and no pickle at all).
LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


@dataclass
class Tensor:
    """One tensor of a source checkpoint, under the name the converter gives it.

    `read()` returns the data as an mx.array; it may be called more than once
    and keeps nothing alive in between (the converter drops each tensor once
    written). `quantized` is the bits of an already-quantized layer's packed
    weight, scales and biases (mlx-vlm models), which are copied untouched;
    0 for everything else."""

    name: str
    shape: tuple
    dtype: mx.Dtype
    read: Callable[[], mx.array]
    quantized: int = 0

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def renamed(self, name: str) -> "Tensor":
        return Tensor(name, self.shape, self.dtype, self.read, self.quantized)


def model_files(folder: Path) -> list:
    """The weight files of a model folder (transformers or MLX layout): the
    files its index names, or its single file, safetensors preferred."""
    folder = Path(folder)
    for index_name, single in LAYOUTS:
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise LlavaError(f"{index} is not a valid weight index ({type(e).__name__}: {e})") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise LlavaError(f"{folder} is missing weight shard {missing[0]} named in {index_name}")
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    # MLX folders written by other tools may name their shards freely.
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter"))
    if files:
        return files
    raise LlavaError(f"{folder} has no model weights (no model*.safetensors or pytorch_model*.bin)")


def read_file(path: Path) -> list:
    """All tensors of one safetensors or `.bin` file, unread."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _read_bin(path)
    raise LlavaError(f"{path}: unknown weight file type (expected .safetensors or .bin)")


def read_files(paths) -> list:
    return [t for p in paths for t in read_file(p)]


def safetensors_metadata(path: Path) -> dict:
    """The `__metadata__` of a safetensors header ({"format": "mlx"} for MLX files)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > 100 << 20:
                return {}
            return json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError):
        return {}


def _read_safetensors(path: Path) -> list:
    try:
        arrays = mx.load(str(path))
    except Exception as e:  # mlx raises plain RuntimeError/ValueError for a bad file
        raise LlavaError(f"cannot read {path}: truncated or not a safetensors file ({e})") from None
    # Each read loads the header afresh, so no array stays referenced (and
    # resident) after the writer has dropped it.
    return [
        Tensor(k, tuple(v.shape), v.dtype, lambda k=k: mx.load(str(path))[k])
        for k, v in arrays.items()
    ]


def _read_bin(path: Path) -> list:
    state = load_bin(path)

    def read(name):
        t = state[name]
        out = to_mlx(t)
        mx.eval(out)
        _drop_pages(t)
        return out

    return [
        Tensor(k, tuple(t.shape), mx.bfloat16 if isinstance(t, BFloat16Array) else to_mlx_dtype(t),
               lambda k=k: read(k))
        for k, t in state.items()
    ]


def to_mlx_dtype(array) -> mx.Dtype:
    """The mx dtype `to_mlx` will give a numpy tensor, without reading it."""
    return to_mlx(np.empty((0,), array.dtype)).dtype


def _drop_pages(t):
    """Let go of the file pages a `.bin` tensor was read through.

    Pages of a memory-mapped file count in the process's resident memory
    until unmapped; without this a 10 GB shard would sit in RSS while it is
    converted. The pages stay in the OS page cache; only our mapping of them
    is dropped, and touching them again maps them back."""
    base = t.bits if isinstance(t, BFloat16Array) else t
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    if base is not None and hasattr(base, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            base.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass
