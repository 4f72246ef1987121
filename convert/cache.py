"""PyTorch checkpoints used directly: converted on first use into a cache folder.

`mlx-llava chat --model liuhaotian/llava-v1.5-7b` should just work. A source
that `mlx_llava.load` reads as it is (an MLX folder, or llava-hf's
safetensors) is used in place; anything else (original LLaVA, `.bin`
weights, or a quantized copy asked for with `-q`) is converted once into
`$MLX_LLAVA_CACHE` (default `~/.cache/mlx-llava`), in a folder keyed by the
source (its hub snapshot, or a local folder's files) and the options, and
reused afterwards. A changed local source gets a new conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Optional

from mlx_llava.errors import LlavaError
from mlx_llava.weights import load_config

from . import formats, hub


def cache_root() -> Path:
    root = os.environ.get("MLX_LLAVA_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-llava"


def prepared(source: str, quantize: bool = False, q_bits: int = 4, q_group_size: int = 64,
             say: Callable[[str], None] = print, on_tensor: Optional[Callable] = None) -> Path:
    """An MLX model folder for `source` (hub repo id or folder), converting it
    into the cache the first time it is asked for."""
    folder = hub.fetch(source, "model", weights=False)  # configs and tokenizer only, for the layout
    if not quantize and "text_config" in load_config(folder) and any(folder.glob("*.safetensors")):
        return folder  # an MLX or llava-hf folder: `load` reads it as it is, and says what is wrong with it
    kind = formats.detect(folder)
    if kind in ("stage-1", "lora"):
        raise LlavaError(f"{source} is a {kind} output: convert it with `mlx-llava convert --model-base ...` first")
    if kind in ("llava-hf", "mlx-vlm") and not quantize:
        folder = hub.fetch(source, "model")
        if any(folder.glob("*.safetensors")):
            return folder  # `load` reads these as they are
    folder = hub.fetch(source, "model")
    options = {"quantize": quantize, "q_bits": q_bits, "q_group_size": q_group_size} if quantize else {}
    options["dtype"] = default_dtype()
    out = cache_root() / _folder_name(source, folder, options)
    if (out / "config.json").is_file():
        return out
    size = sum(f.stat().st_size for f in _weight_files(folder))
    say(f"converting {source} ({size / 1e9:.2f} GB, {kind} layout) to MLX in {out}; later runs reuse it")
    from . import convert

    convert(str(source), str(out), force=True, on_tensor=on_tensor, **options)
    return out


def default_dtype() -> str:
    """float16 where MLX runs on a GPU; float32 on a CPU, where half-precision
    matmuls are several times slower than float32 ones."""
    import mlx.core as mx

    return "float16" if mx.default_device() == mx.gpu else "float32"


def _weight_files(folder: Path) -> list:
    return [f for f in Path(folder).iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()]


def _folder_name(source: str, folder: Path, options: dict) -> str:
    """`<name>-<hash>`: the hash covers where the weights are (a hub snapshot's
    path holds its commit), their sizes and times, and the options."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                   for f in [*_weight_files(folder), Path(folder) / "config.json"])
    key = json.dumps([str(Path(folder).resolve()), files, options])
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", formats.model_name(source))
    tag = f"-{options['q_bits']}bit" if options.get("quantize") else f"-{options['dtype']}"
    return f"{name}{tag}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
