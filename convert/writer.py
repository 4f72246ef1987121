"""The streaming writer: source tensors -> safetensors shards, one tensor at a time.

`plan` decides, before any data is read, what each source tensor becomes:
copied, cast to the target dtype, or quantized (packed weight, scales and
biases, the names nn.QuantizedLinear / nn.QuantizedEmbedding load). Knowing
every output's name, shape and dtype up front lets `check` compare the
result with the model `mlx_llava.load` will build, and lets `write` put each
shard's safetensors header first and then stream the tensors after it: only
the tensor being converted is ever in memory, however large the shard.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_llava.errors import LlavaError

from .tensors import Tensor

MAX_SHARD_BYTES = 5 * 10**9  # "at most 5 GB" per shard, as the hub counts
_ST_DTYPES = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.float64: "F64",
    mx.uint8: "U8", mx.uint16: "U16", mx.uint32: "U32", mx.uint64: "U64",
    mx.int8: "I8", mx.int16: "I16", mx.int32: "I32", mx.int64: "I64", mx.bool_: "BOOL",
}


@dataclass(frozen=True)
class Quantization:
    """mlx-lm's affine quantization; the vision tower only when `vision`."""

    bits: int = 4
    group_size: int = 64
    vision: bool = False

    def config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


@dataclass
class Item:
    """One source tensor and what it becomes: [(name, shape, dtype)] outputs."""

    tensor: Tensor
    action: str  # "copy" | "cast" | "quantize"
    outputs: list
    params: int  # parameters it stands for (a quantized weight counts unpacked)
    quantization: Optional[Quantization] = None

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(shape, dtype) for _, shape, dtype in self.outputs)


@dataclass
class Written:
    """What `write` produced: tensors, parameters and bytes."""

    tensors: int = 0
    params: int = 0
    nbytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.params, 1)


def quantizable_modules(model: nn.Module) -> set:
    """Module paths mlx-lm's `nn.quantize` would turn into quantized layers:
    Linear and Embedding. The vision tower's position embedding is left out:
    our CLIP adds its `.weight` directly, which a quantized layer packs."""
    return {
        path for path, module in model.named_modules()
        if hasattr(module, "to_quantized") and not path.endswith("position_embedding")
    }


def plan(tensors: list, dtype: Optional[mx.Dtype], quantization: Optional[Quantization], quantizable: set) -> list:
    """The outputs of every source tensor, in order. `dtype` None keeps each
    tensor's own."""
    items = []
    for t in tensors:
        module, _, leaf = t.name.rpartition(".")
        target = dtype or t.dtype
        if t.quantized:
            items.append(Item(t, "copy", [(t.name, t.shape, t.dtype)], _params(t)))
        elif (quantization and leaf == "weight" and module in quantizable and len(t.shape) == 2
              and t.shape[-1] % quantization.group_size == 0
              and (quantization.vision or not module.startswith("vision_tower."))):
            rows, cols = t.shape
            groups = (rows, cols // quantization.group_size)
            items.append(Item(t, "quantize", [
                (t.name, (rows, cols * quantization.bits // 32), mx.uint32),
                (f"{module}.scales", groups, target),
                (f"{module}.biases", groups, target),
            ], t.size, quantization))
        elif mx.issubdtype(t.dtype, mx.floating):
            items.append(Item(t, "cast", [(t.name, t.shape, target)], t.size))
        else:
            items.append(Item(t, "copy", [(t.name, t.shape, t.dtype)], t.size))
    return items


def _params(t: Tensor) -> int:
    """Parameters behind an already-quantized tensor: a packed weight counts
    unpacked, scales and biases not at all."""
    if t.name.endswith((".scales", ".biases")):
        return 0
    return t.size * 32 // t.quantized


def check(items: list, model: nn.Module, quantization_config: Optional[dict]):
    """Refuse to write what `mlx_llava.load` would not load: the outputs must
    be exactly the parameters of `model` (built from the output config), with
    the same shapes, once the layers that have scales are quantized."""
    from mlx_llava.weights import apply_quantization

    names = Counter(name for item in items for name, _, _ in item.outputs)
    twice = [name for name, n in names.items() if n > 1]
    if twice:
        raise LlavaError(f"the checkpoint holds {twice[0]} twice")
    planned = {name: shape for item in items for name, shape, _ in item.outputs}
    if quantization_config:
        apply_quantization(model, {"quantization": quantization_config}, planned)
    expected = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    missing = sorted(set(expected) - set(planned))
    if missing:
        raise LlavaError(f"the checkpoint has no {missing[0]}" + (f" (and {len(missing) - 1} more weights)" if len(missing) > 1 else ""))
    extra = sorted(set(planned) - set(expected))
    if extra:
        raise LlavaError(f"the checkpoint has a weight this LLaVA does not use: {extra[0]}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name, shape in planned.items():
        if tuple(shape) != expected[name]:
            raise LlavaError(f"{name} has shape {tuple(shape)}, but config.json implies {expected[name]}")


def shard(items: list, max_bytes: int = MAX_SHARD_BYTES) -> list:
    """Group items into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards, size = [], 0
    for item in items:
        if not shards or size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def write(folder: Path, items: list, max_bytes: int = MAX_SHARD_BYTES,
          on_tensor: Optional[Callable[[str, int, int], None]] = None) -> Written:
    """Write the planned tensors as safetensors shards (+ index when several);
    `on_tensor(name, done, total)` after each."""
    folder = Path(folder)
    shards = shard(items, max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    done = Written()

    def report(name):
        if on_tensor:
            on_tensor(name, done.tensors, len(items))

    weight_map = {}
    for name, group in zip(names, shards):
        _write_shard(folder / name, group, done, report)
        weight_map.update({out: name for item in group for out, _, _ in item.outputs})
    if len(shards) > 1:
        index = {"metadata": {"total_size": done.nbytes}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return done


def _write_shard(path: Path, items: list, done: Written, report):
    header, offset = {}, 0
    for item in items:
        for name, shape, dtype in item.outputs:
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
    header["__metadata__"] = {"format": "mlx"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for item in items:
            arrays = _produce(item)
            for (name, shape, dtype), a in zip(item.outputs, arrays):
                if tuple(a.shape) != tuple(shape) or a.dtype != dtype:
                    raise RuntimeError(f"{name}: planned {shape} {dtype}, made {a.shape} {a.dtype}")
                a = mx.contiguous(a)
                mx.eval(a)
                f.write(memoryview(a))
            del arrays, a
            done.tensors += 1
            done.params += item.params
            done.nbytes += item.nbytes
            mx.clear_cache()  # hand the tensor's memory back before the next one
            report(item.tensor.name)


def _produce(item: Item) -> list:
    x = item.tensor.read()
    if item.action == "copy":
        return [x]
    x = x.astype(item.outputs[-1][2])
    if item.action == "cast":
        return [x]
    q = item.quantization
    return list(mx.quantize(x, group_size=q.group_size, bits=q.bits))


def _nbytes(shape, dtype) -> int:
    n = dtype.size
    for d in shape:
        n *= d
    return n
