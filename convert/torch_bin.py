"""Read PyTorch `.bin` checkpoints without torch and without running their code.

A `.bin` written by `torch.save` is a zip: `<name>/data.pkl` is a pickle of
the state dict whose tensors point, through pickle "persistent ids", at raw
storages stored as `<name>/data/<key>`. Unpickling calls whatever functions
the pickle names, so a hostile `.bin` could call `os.system`. We therefore
unpickle with an allow-list: the few torch names a state dict needs map to
inert stand-ins (storage classes and dtypes to names, the tensor rebuilds to
records of where a tensor lies), and any other name is refused before it is
called. Only after unpickling are the records turned into arrays, with their
bounds checked against the storage.

Tensors come back as read-only numpy arrays viewing a memory map of the file:
nothing is read until it is touched and the pages belong to the OS's page
cache, so converting a 7B shard tensor by tensor holds one copy (the MLX one),
not two. numpy has no bfloat16, so bfloat16 tensors come back as
`BFloat16Array`, holding the raw bits as uint16; `to_mlx` turns either kind
into an `mx.array` of the checkpoint's own dtype.

Not read: the legacy pre-1.6 format (`_use_new_zipfile_serialization=False`),
TorchScript archives, tensors of dtypes numpy/MLX lack (float8, complex) and
tensors saved with their lazy neg/conj bits set; each is refused in one line.
"""

from __future__ import annotations

import collections
import io
import mmap
import pickle
import struct
import zipfile
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from mlx_llava.errors import LlavaError

__all__ = ["BFloat16Array", "Tensor", "load_bin", "to_mlx"]


class BFloat16Array:
    """A bfloat16 tensor, which numpy cannot hold.

    `bits` is a uint16 array of the raw bfloat16 bit patterns (the top half of
    the float32 with the same value). `np.asarray(t)` gives the exact values
    as float32; `to_mlx(t)` gives an `mx.bfloat16` array without rounding.
    """

    __slots__ = ("bits",)
    dtype = "bfloat16"

    def __init__(self, bits: np.ndarray):
        self.bits = bits

    shape = property(lambda self: self.bits.shape)
    ndim = property(lambda self: self.bits.ndim)
    size = property(lambda self: self.bits.size)
    nbytes = property(lambda self: self.bits.nbytes)

    def __array__(self, dtype=None, copy=None):
        values = (self.bits.astype(np.uint32) << 16).view(np.float32)
        return values if dtype is None else values.astype(dtype)

    def __repr__(self):
        return f"BFloat16Array(shape={self.shape})"


Tensor = np.ndarray | BFloat16Array

# torch dtype name -> numpy dtype; bfloat16 travels as its uint16 bits.
_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": np.uint16, "int64": np.int64, "int32": np.int32,
    "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
}
_MX_DTYPES = {np.dtype(d): getattr(mx, n.replace("bool", "bool_")) for n, d in _DTYPES.items() if n != "bfloat16"}
# The storage classes torch writes for each dtype.
_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32",
    "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}
# What `torch.save(..., _use_new_zipfile_serialization=False)` starts with.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# Keys under which training checkpoints wrap their state dict.
_WRAPPERS = ("state_dict", "model", "module")


def to_mlx(t: Tensor) -> mx.array:
    """Copy a tensor from `load_bin` into an `mx.array` of the same dtype.

    (`mx.array` alone would turn float64 into float32 and could not know that
    uint16 bits are bfloat16.)"""
    if isinstance(t, BFloat16Array):
        return mx.array(np.asarray(t.bits, order="C")).view(mx.bfloat16)
    t = np.asarray(t, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    return mx.array(t, dtype=_MX_DTYPES[t.dtype])


def load_bin(path) -> dict[str, Tensor]:
    """Read a `torch.save` state dict as {name: numpy array or BFloat16Array}.

    A dict that wraps the state dict under "state_dict", "model" or "module"
    (as training checkpoints do) is unwrapped. Raises LlavaError for a
    missing, truncated, hostile or unsupported file, or one that holds
    something other than a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise LlavaError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    with open(path, "rb") as f:
        if f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC:
            raise LlavaError(
                f"{path} uses PyTorch's legacy (pre-1.6) format, which mlx-llava does not read; "
                "re-save it with a current torch.save"
            )
        try:
            with zipfile.ZipFile(f) as zf:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                unpickler = _Unpickler(path, zf, mapped)
                obj = unpickler.load()
        except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
                KeyError, IndexError, AttributeError, OverflowError, struct.error) as e:
            raise LlavaError(f"{path} is truncated or not a PyTorch checkpoint ({e})") from None
    return {k: unpickler.array(v) for k, v in _state_dict(path, obj).items()}


def _state_dict(path: Path, obj) -> dict[str, _TensorRecord]:
    """Unwrap {"state_dict": {...}, "epoch": 3}-style checkpoints and check
    that what is left maps names to tensors."""
    seen = set()  # a pickle can make a dict that wraps itself
    while isinstance(obj, dict) and id(obj) not in seen:
        if any(isinstance(v, _TensorRecord) for v in obj.values()):
            break
        seen.add(id(obj))
        obj = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict):
        raise LlavaError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, _TensorRecord):
            kind = "tensor" if isinstance(v, _TensorRecord) else type(v).__name__
            raise LlavaError(f"{path} is not a state dict: its entry {k!r} is a {kind}")
    return obj


# The unpickler's stand-ins are NamedTuples: pickle's BUILD opcode cannot
# change a tuple, so a hostile pickle cannot tamper with them either.

class _Name(NamedTuple):
    """What an allowed storage class or dtype GLOBAL becomes: an inert name."""
    kind: str  # "storage" or "dtype"
    dtype: str | None  # None for an untyped storage (its tensors name the dtype)


class _Storage(NamedTuple):
    """One storage record: its raw bytes (a view of the file) and dtype."""
    raw: np.ndarray
    dtype: str | None


class _TensorRecord(NamedTuple):
    """Where a tensor lies in a storage; made into an array after unpickling."""
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple
    dtype: str


class _Unpickler(pickle.Unpickler):
    """Unpickles `data.pkl`, resolving only the names a state dict needs."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, mapped: mmap.mmap):
        self.path, self.zf, self.mapped = path, zf, mapped
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise LlavaError(f"{path} is not a PyTorch checkpoint (no single <name>/data.pkl inside)")
        self.prefix = pkls[0][: -len("data.pkl")]  # torch names the folder after the file
        order = self._member(self.prefix + "byteorder", required=False)
        self.big_endian = order is not None and bytes(order).strip() == b"big"
        self.storages: dict[str, _Storage] = {}
        super().__init__(io.BytesIO(zf.read(pkls[0])))

    def find_class(self, module: str, name: str):
        """The only way a pickle reaches a callable: answer from the
        allow-list and refuse everything else before it can run."""
        full = f"{module}.{name}"
        if full in _REBUILDS:
            return getattr(self, _REBUILDS[full])
        if full in _NAMES:
            return _NAMES[full]
        if full == "collections.OrderedDict":
            return collections.OrderedDict
        raise LlavaError(f"refusing to load {self.path}: it asks to run `{full}`, which a checkpoint never needs")

    def persistent_load(self, pid):
        """("storage", storage class, key, location, numel) -> _Storage."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _Name) and pid[1].kind == "storage" and isinstance(pid[2], str)):
            raise LlavaError(f"refusing to load {self.path}: unexpected persistent id {pid!r}")
        key, dtype = pid[2], pid[1].dtype
        if key not in self.storages:
            self.storages[key] = _Storage(self._member(f"{self.prefix}data/{key}", required=True), dtype)
        return self.storages[key]

    def _member(self, name: str, required: bool) -> np.ndarray | None:
        """A zip member's bytes: a view of the memory map when stored
        uncompressed (as torch always writes), else read into memory."""
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            if required:
                raise LlavaError(f"{self.path} is truncated or not a PyTorch checkpoint (no {name})") from None
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return np.frombuffer(self.zf.read(name), np.uint8)
        header = self.mapped[info.header_offset: info.header_offset + 30]
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise LlavaError(f"{self.path} is truncated or not a PyTorch checkpoint (bad entry {name})")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > len(self.mapped):
            raise LlavaError(f"{self.path} is truncated or not a PyTorch checkpoint ({name} is cut short)")
        return np.frombuffer(self.mapped, np.uint8, count=info.file_size, offset=start)

    # Stand-ins for torch._utils' rebuild functions (same arguments).

    def rebuild_tensor(self, storage, offset, size, stride):
        return self._record(storage, offset, size, stride, getattr(storage, "dtype", None))

    def rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        self._plain(metadata)
        return self._record(storage, offset, size, stride, getattr(storage, "dtype", None))

    def rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
        """Newer dtypes (uint16...) live in an untyped storage; the dtype
        comes as its own argument."""
        self._plain(metadata)
        if not (isinstance(dtype, _Name) and dtype.kind == "dtype"):
            raise LlavaError(f"{self.path} is not a PyTorch checkpoint (bad dtype {dtype!r})")
        return self._record(storage, offset, size, stride, dtype.dtype)

    @staticmethod
    def rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
        """nn.Parameter(data): the data is all a state dict needs."""
        return data

    def _plain(self, metadata):
        if metadata:
            raise LlavaError(f"{self.path} holds a tensor with lazy {metadata} bits, which mlx-llava does not read")

    def _record(self, storage, offset, size, stride, dtype) -> _TensorRecord:
        def ints(xs):
            return isinstance(xs, tuple) and all(type(x) is int and x >= 0 for x in xs)

        if not (isinstance(storage, _Storage) and type(offset) is int and offset >= 0
                and ints(size) and ints(stride) and len(size) == len(stride)):
            raise LlavaError(f"{self.path} is not a PyTorch checkpoint (malformed tensor record)")
        if dtype not in _DTYPES:
            raise LlavaError(f"{self.path} holds {dtype or 'untyped'} tensors, which mlx-llava cannot read")
        return _TensorRecord(storage, offset, size, stride, dtype)

    def array(self, t: _TensorRecord) -> Tensor:
        """View a record's elements in its storage, after checking that the
        view stays inside it (a hostile file must not make as_strided read
        beyond the storage)."""
        item = np.dtype(_DTYPES[t.dtype]).newbyteorder(">" if self.big_endian else "<")
        raw = t.storage.raw
        flat = raw[: len(raw) // item.itemsize * item.itemsize].view(item)
        last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
        if 0 not in t.size and last >= len(flat):
            raise LlavaError(f"{self.path} is truncated or corrupt (a tensor overruns its storage)")
        strides = tuple(s * item.itemsize for s in t.stride)
        view = np.lib.stride_tricks.as_strided(flat[t.offset:], t.size, strides, writeable=False)
        if self.big_endian:
            view = view.astype(item.newbyteorder("="))
        return BFloat16Array(view) if t.dtype == "bfloat16" else view


# Every name a state dict's pickle may use, and what it becomes.
_REBUILDS = {
    "torch._utils._rebuild_tensor": "rebuild_tensor",
    "torch._utils._rebuild_tensor_v2": "rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3": "rebuild_tensor_v3",
    "torch._utils._rebuild_parameter": "rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state": "rebuild_parameter",
}
_NAMES = {
    **{f"torch.{cls}": _Name("storage", dtype) for cls, dtype in _STORAGES.items()},
    "torch.UntypedStorage": _Name("storage", None),
    "torch.storage.UntypedStorage": _Name("storage", None),
    **{f"torch.{name}": _Name("dtype", name) for name in _DTYPES},
}
