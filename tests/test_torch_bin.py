"""convert/torch_bin.py: torch-free `.bin` reading, checked against torch
itself, and hostile pickles that must be refused before they run."""

import collections
import io
import pickle
import subprocess
import tracemalloc
import zipfile

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_llava.convert.torch_bin import BFloat16Array, load_bin, to_mlx
from mlx_llava.errors import LlavaError


def assert_same(m: mx.array, t: torch.Tensor):
    """Same dtype, shape and exact values (bit patterns for bfloat16)."""
    assert str(m.dtype).split(".")[-1] == str(t.dtype).split(".")[-1]
    assert tuple(m.shape) == tuple(t.shape)
    if t.dtype == torch.bfloat16:
        bits = t.contiguous().view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(np.array(m.view(mx.uint16)), bits)
    else:
        np.testing.assert_array_equal(np.array(m), t.numpy())


def roundtrip(tmp_path, obj, name="model.bin"):
    path = tmp_path / name
    torch.save(obj, path)
    return load_bin(path)


@pytest.mark.parametrize("dtype", [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
    torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.uint16,  # a newer dtype: torch writes it as an untyped storage + _rebuild_tensor_v3
])
def test_dtypes_round_trip(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, 7, generator=g) * 100
    values[0, :3] = torch.tensor([float("inf"), -0.0, 1e-3])
    t = values.to(dtype) if dtype.is_floating_point else values.abs().to(dtype)
    out = roundtrip(tmp_path, {"w": t})
    assert list(out) == ["w"]
    assert_same(to_mlx(out["w"]), t)


def test_bfloat16_is_a_documented_wrapper(tmp_path):
    t = torch.randn(3, 4).to(torch.bfloat16)
    out = roundtrip(tmp_path, {"w": t})["w"]
    assert isinstance(out, BFloat16Array) and out.shape == (3, 4) and out.dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(out), t.float().numpy())
    assert to_mlx(out).dtype == mx.bfloat16


def test_views_offsets_scalars_and_parameters(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        "base": base,
        "transposed": base.t(),  # non-contiguous
        "rows": base[1:3],  # storage offset, same storage as "base"
        "column": base[:, 2],  # offset and stride
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),  # stride 0
        "scalar": torch.tensor(7, dtype=torch.int64),  # 0-d
        "bf16_scalar": torch.tensor(-2.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(2, 3)),
        "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
    }
    out = roundtrip(tmp_path, sd)
    assert list(out) == list(sd)
    for k, t in sd.items():
        assert_same(to_mlx(out[k]), t.detach())
    # Views share the file's bytes instead of copying them.
    assert np.shares_memory(out["base"], out["rows"])
    assert not out["base"].flags.owndata and not out["base"].flags.writeable


def test_module_state_dict(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(11, 8), torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
        torch.nn.GELU(), torch.nn.Linear(16, 4, bias=False),
    ).to(torch.bfloat16)
    model.register_buffer("inv_freq", torch.arange(4, dtype=torch.float32))
    sd = model.state_dict()  # an OrderedDict with a `_metadata` attribute
    out = roundtrip(tmp_path, sd, name="pytorch_model-00001-of-00002.bin")
    assert list(out) == list(sd)
    for k, t in sd.items():
        assert_same(to_mlx(out[k]), t)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3, "step": 10},
    lambda sd: {"model": {"module": sd}},
    lambda sd: collections.OrderedDict(module=sd),
])
def test_wrapped_state_dicts_are_unwrapped(tmp_path, wrap):
    sd = {"w": torch.ones(2, 2)}
    out = roundtrip(tmp_path, wrap(sd))
    assert list(out) == ["w"]


@pytest.mark.parametrize("obj, message", [
    ([torch.ones(2)], "holds a list"),
    ({"w": torch.ones(2), "step": 3}, "'step' is a int"),
    ({"w": {"nested": torch.ones(2)}}, "'w' is a dict"),
])
def test_not_a_state_dict(tmp_path, obj, message):
    with pytest.raises(LlavaError, match=message):
        roundtrip(tmp_path, obj)


def test_self_wrapping_dict_ends(tmp_path):
    d = {}
    d["model"] = d
    with pytest.raises(LlavaError, match="'model' is a dict"):
        roundtrip(tmp_path, d)


def test_any_archive_folder_name(tmp_path):
    buf = io.BytesIO()  # torch names the folder "archive" when saving to a stream
    torch.save({"w": torch.arange(3)}, buf)
    path = tmp_path / "odd.name.with.dots"
    path.write_bytes(buf.getvalue())
    assert zipfile.ZipFile(path).namelist()[0].startswith("archive/")
    np.testing.assert_array_equal(load_bin(path)["w"], [0, 1, 2])


def rewrite(src, dst, change=lambda name, data: data, compression=zipfile.ZIP_STORED):
    """Copy a checkpoint zip member by member, letting `change` edit members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def test_compressed_members_and_big_endian(tmp_path):
    t = torch.randn(4, 5)
    torch.save({"w": t}, tmp_path / "a.bin")
    rewrite(tmp_path / "a.bin", tmp_path / "deflated.bin", compression=zipfile.ZIP_DEFLATED)
    assert_same(to_mlx(load_bin(tmp_path / "deflated.bin")["w"]), t)

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, "<f4").astype(">f4").tobytes()
        return data

    rewrite(tmp_path / "a.bin", tmp_path / "big.bin", to_big)
    assert_same(to_mlx(load_bin(tmp_path / "big.bin")["w"]), t)


def test_loading_reads_nothing_into_memory(tmp_path):
    t = torch.randn(4096, 2048)  # 32 MiB
    torch.save({"w": t, "b": torch.randn(2048)}, tmp_path / "big.bin")
    tracemalloc.start()
    out = load_bin(tmp_path / "big.bin")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2**20, f"load_bin allocated {peak} bytes for a 32 MiB tensor"
    assert_same(to_mlx(out["w"]), t)


# --- hostile files ---------------------------------------------------------

def call_pickle(module: str, name: str, args: tuple, protocol: int = 2) -> bytes:
    """A pickle that calls module.name(*args), written opcode by opcode:
    GLOBAL (or STACK_GLOBAL for protocol 4), the argument tuple, REDUCE."""
    body = pickle.dumps(args, protocol=2)[2:-1]  # the tuple, without PROTO and STOP
    if protocol == 4:
        fn = (b"\x8c" + bytes([len(module)]) + module.encode()
              + b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93")  # SHORT_BINUNICODE x2, STACK_GLOBAL
        return b"\x80\x04" + fn + body + b"R."
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + body + b"R."


def payloads(marker):
    touch = f"touch {marker}"
    return {
        "os.system": call_pickle("os", "system", (touch,)),
        "posix.system": call_pickle("posix", "system", (touch,)),
        "builtins.eval": call_pickle("builtins", "eval", (f"open({str(marker)!r}, 'w').close()",)),
        "builtins.exec/protocol4": call_pickle("builtins", "exec", (f"open({str(marker)!r}, 'w').close()",), 4),
        "subprocess.Popen": call_pickle("subprocess", "Popen", (("touch", str(marker)),)),
    }


def torch_like_zip(path, data_pkl: bytes, storages=None):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("kind", list(payloads("x")))
def test_payloads_are_live(tmp_path, kind):
    """The payloads below do run under a plain unpickler, so their refusal
    proves the allow-list, not a broken payload."""
    marker = tmp_path / "ran"
    result = pickle.loads(payloads(marker)[kind])
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert marker.exists()


@pytest.mark.parametrize("kind", list(payloads("x")))
def test_hostile_data_pkl_is_refused(tmp_path, kind):
    marker = tmp_path / "ran"
    torch_like_zip(tmp_path / "evil.bin", payloads(marker)[kind])
    with pytest.raises(LlavaError, match=r"refusing to load .*evil\.bin: it asks to run `(os|posix|builtins|subprocess)\."):
        load_bin(tmp_path / "evil.bin")
    assert not marker.exists()


@pytest.mark.parametrize("kind", list(payloads("x")))
def test_hostile_entry_inside_a_real_checkpoint_is_refused(tmp_path, kind):
    """A genuine torch checkpoint with one more entry spliced in after its
    tensors, so the refusal happens mid-load with valid storages around."""
    marker = tmp_path / "ran"
    torch.save({"a": torch.ones(2), "b": torch.zeros(3)}, tmp_path / "ok.bin")
    evil = payloads(marker)[kind]
    entry = pickle.dumps("evil", protocol=2)[2:-1] + evil[2:-1]  # key, then the call (no PROTO/STOP)

    def splice(name, data):
        if name.endswith("data.pkl"):
            assert data.endswith(b"u.")  # ... SETITEMS STOP
            return data[:-2] + entry + b"u."
        return data

    rewrite(tmp_path / "ok.bin", tmp_path / "evil.bin", splice)
    with pytest.raises(LlavaError, match="refusing to load"):
        load_bin(tmp_path / "evil.bin")
    assert not marker.exists()


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_reduce_object_saved_by_torch_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "x": Evil(marker)}, tmp_path / "evil.bin")
    with pytest.raises(LlavaError, match=r"it asks to run `posix\.system`, which a checkpoint never needs"):
        load_bin(tmp_path / "evil.bin")
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [
    ("torch", "load"), ("torch.serialization", "load"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("numpy.core.multiarray", "_reconstruct"), ("collections", "defaultdict"), ("__builtin__", "getattr"),
    ("torch", "Size"),
])
def test_only_the_allow_list_is_accepted(tmp_path, module, name):
    torch_like_zip(tmp_path / "evil.bin", call_pickle(module, name, ()))
    with pytest.raises(LlavaError, match=f"`{module}.{name}`"):
        load_bin(tmp_path / "evil.bin")


def test_tensor_overrunning_its_storage_is_refused(tmp_path):
    """A record that claims more elements than its storage holds must not let
    as_strided read past the storage."""
    torch.save({"w": torch.ones(100)}, tmp_path / "ok.bin")
    rewrite(tmp_path / "ok.bin", tmp_path / "short.bin",
            lambda name, data: data[:40] if "/data/" in name else data)
    with pytest.raises(LlavaError, match="overruns its storage"):
        load_bin(tmp_path / "short.bin")


def test_stand_ins_cannot_be_tampered_with(tmp_path):
    """BUILD on an allowed name (here FloatStorage) tries to change it."""
    pkl = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x07\x00\x00\x00float64sb."
    torch_like_zip(tmp_path / "evil.bin", pkl)
    with pytest.raises(LlavaError):
        load_bin(tmp_path / "evil.bin")
    t = torch.randn(3)
    assert_same(to_mlx(roundtrip(tmp_path, {"w": t})["w"]), t)


# --- files that are not checkpoints -----------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(LlavaError, match="does not exist"):
        load_bin(tmp_path / "nope.bin")
    with pytest.raises(LlavaError, match="is not a file"):
        load_bin(tmp_path)


def test_truncated_zip(tmp_path):
    torch.save({"w": torch.randn(1000)}, tmp_path / "ok.bin")
    data = (tmp_path / "ok.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(LlavaError, match=r"cut\.bin is truncated or not a PyTorch checkpoint"):
        load_bin(tmp_path / "cut.bin")


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", pickle.dumps({"w": 1})])
def test_not_a_zip(tmp_path, content):
    (tmp_path / "x.bin").write_bytes(content)
    with pytest.raises(LlavaError, match="truncated or not a PyTorch checkpoint"):
        load_bin(tmp_path / "x.bin")


def test_zip_without_data_pkl(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.bin", "w") as z:
        z.writestr("archive/version", "3\n")
    with pytest.raises(LlavaError, match="not a PyTorch checkpoint"):
        load_bin(tmp_path / "x.bin")


def test_missing_storage(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.bin")
    rewrite(tmp_path / "ok.bin", tmp_path / "x.bin", lambda name, data: None if "/data/" in name else data)
    with pytest.raises(LlavaError, match="no ok/data/0"):
        load_bin(tmp_path / "x.bin")


def test_legacy_format_is_refused_in_one_line(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(LlavaError, match="legacy") as e:
        load_bin(tmp_path / "old.bin")
    assert "\n" not in str(e.value)
