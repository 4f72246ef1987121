"""PyTorch checkpoints used directly: converted once into the cache, then reused."""

import json
import os
import subprocess
import sys

import pytest

from conftest import build_reference
from mlx_llava.convert.cache import prepared
from mlx_llava.weights import load_model
from test_convert import clip_folder, hub_cache, max_error, write_original


@pytest.fixture(scope="module")
def ref():
    return build_reference(seed=6)


@pytest.fixture
def original(ref, tokenizer_dir, tmp_path):
    clip = clip_folder(ref, tmp_path / "clip")
    return write_original(ref, tmp_path / "llava-v1.5-tiny", tokenizer_dir, clip, kind="bin")


def test_converted_once_then_reused(ref, original, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_LLAVA_CACHE", str(tmp_path / "cache"))
    said = []
    path = prepared(str(original), say=said.append)
    assert path.parent == tmp_path / "cache" and len(said) == 1
    assert "converting" in said[0] and "GB" in said[0] and str(path) in said[0]
    model, config = load_model(path)
    assert config["conv_mode"] == "llava_v1"  # chosen by the source's name, not the cache folder's
    assert max_error(ref, model) < 1e-4  # float32 on the CPU
    assert prepared(str(original), say=said.append) == path and len(said) == 1
    quantized = prepared(str(original), quantize=True, q_bits=8, q_group_size=32, say=said.append)
    assert quantized != path and json.loads((quantized / "config.json").read_text())["quantization"]["bits"] == 8
    # a changed source is converted again
    weights = sorted(original.glob("pytorch_model*.bin"))[0]
    os.utime(weights, (1, 1))
    assert prepared(str(original), say=said.append) not in (path, quantized) and len(said) == 3


def test_loadable_sources_are_used_in_place(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_LLAVA_CACHE", str(tmp_path / "cache"))
    assert prepared(str(model_dir), say=pytest.fail) == model_dir  # llava-hf safetensors
    assert not (tmp_path / "cache").exists()


def test_chat_with_a_hub_checkpoint(original, tmp_path):
    """`mlx-llava generate --model org/name` on an original checkpoint in the (offline) hub cache."""
    cache = hub_cache(tmp_path / "hub", "tiny-org/llava-v1.5-tiny", original)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"),
           "MLX_LLAVA_CACHE": str(tmp_path / "mlx")}
    command = [sys.executable, "-m", "mlx_llava.cli", "generate", "--model", "tiny-org/llava-v1.5-tiny",
               "-p", "What is it?", "--max-tokens", "3"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "converting tiny-org/llava-v1.5-tiny" in first.stderr
    assert len(list((tmp_path / "mlx").iterdir())) == 1
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0 and "converting" not in second.stderr
    assert second.stdout == first.stdout
