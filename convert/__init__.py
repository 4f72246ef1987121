"""PyTorch LLaVA checkpoints -> MLX model directories.

    from mlx_llava.convert import convert
    convert("liuhaotian/llava-v1.5-7b", "llava-v1.5-7b-4bit", quantize=True)

The steps, each in its own module: fetch the source (`hub`), tell its layout
and open it as unread tensors under our names (`formats`, `original`,
`tensors`), decide and check every output tensor against the model
`mlx_llava.load` will build (`writer.plan`, `writer.check`), then stream
them into shards in a temporary folder beside the output, with the
tokenizer, preprocessor, config.json and a model card (`files`), and rename
it into place. config.json is written last, so even a temporary folder left
by a killed process never loads as a model; on any error the temporary
folder is removed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from mlx_llava import atomic
from mlx_llava.errors import LlavaError, check_output, check_quantization

if TYPE_CHECKING:
    from . import formats, writer

__all__ = ["convert", "Summary"]

DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class Summary:
    """What a conversion made."""

    path: Path
    source: str
    kind: str
    parameters: int
    bits_per_weight: float
    size_bytes: int
    seconds: float
    quantization: Optional[dict] = None
    notes: list = field(default_factory=list)
    url: Optional[str] = None
    scales_dtype: Optional[str] = None  # of a quantized model's scales and biases

    def lines(self) -> list:
        q = self.quantization
        return [
            f"parameters: {self.parameters / 1e9:.2f} B" if self.parameters >= 1e8 else f"parameters: {self.parameters:,}",
            f"bits per weight: {self.bits_per_weight:.2f}" + (
                f" ({q['bits']}-bit, group size {q['group_size']}" + (f", {self.scales_dtype} scales" if self.scales_dtype else "") + ")"
                if q else ""),
            f"size on disk: {_size(self.size_bytes)}",
            f"time: {self.seconds:.1f} s",
        ]

    def __str__(self):
        head = f"converted {self.source} ({self.kind}) -> {self.path}"
        tail = [f"note: {n}" for n in self.notes] + ([f"uploaded: {self.url}"] if self.url else [])
        return "\n".join([head, *("  " + line for line in self.lines()), *tail])


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    quantize_vision: bool = False,
    vision_tower: Optional[str] = None,
    model_base: Optional[str] = None,
    conv_mode: Optional[str] = None,
    upload_repo: Optional[str] = None,
    force: bool = False,
    max_shard_gb: float = 5,
    on_tensor: Optional[Callable[[str, int, int], None]] = None,
) -> Summary:
    """Convert a LLaVA checkpoint (hub repo id or folder) into an MLX model directory.

    `hf_path`: original LLaVA, a stage-1 output (with `model_base`), a LoRA
    output (with `model_base`), llava-hf, or an mlx-vlm directory.
    `dtype`: of the unquantized weights, and of a quantized model's scales
    and biases; float16 unless given, except that an MLX source keeps its
    own. float16 suits Metal and CUDA; on MLX's CPU backend float32 is the
    fast choice (4-bit with float16 scales decodes about 35x slower there).
    `vision_tower`: the CLIP repo or folder, instead of the one the config
    names. `quantize`: `q_bits` (default 4) with `q_group_size` (default
    64), as mlx-lm does it; the vision tower too with `quantize_vision`;
    those three without `quantize` are refused, not ignored. `conv_mode`
    overrides the template chosen from the model name. The output may not
    be, contain or lie inside a local source. `on_tensor(name, done, total)` is
    called after each tensor is written (for progress bars). Returns a
    `Summary`; raises LlavaError for anything a user can fix.
    """
    start = time.perf_counter()
    # Every option is checked before anything slow is imported or fetched.
    if dtype is not None and dtype not in DTYPES:
        raise LlavaError(f"unknown dtype {dtype!r} ({', '.join(DTYPES)})")
    if quantize:
        q_bits, q_group_size = 4 if q_bits is None else q_bits, 64 if q_group_size is None else q_group_size
        check_quantization(q_bits, q_group_size)
    elif q_bits is not None or q_group_size is not None or quantize_vision:
        raise LlavaError("--q-bits, --q-group-size and --quantize-vision need -q (--quantize)")
    if conv_mode is not None:
        _check_conv_mode(conv_mode)
    check_output(mlx_path, [hf_path, vision_tower, model_base], "--mlx-path")
    out = Path(mlx_path).expanduser()
    if out.exists() and not force:
        raise LlavaError(f"{out} already exists (pass --force to replace it)")

    import mlx.core as mx

    from . import files, formats, hub, writer

    folder = hub.fetch(hf_path, "model")
    source = open_source(folder, formats.model_name(hf_path), vision_tower, model_base)
    if conv_mode is not None:
        source.config["conv_mode"] = conv_mode
    tokenizer = files.load_tokenizer(source.tokenizer, source.extra_tokens)
    config = _with_tokens(source, tokenizer)
    config = _choose_template(source, config, tokenizer)
    quantization = writer.Quantization(q_bits, q_group_size, quantize_vision) if quantize else None
    target = getattr(mx, dtype) if dtype else None if source.kind == "mlx-vlm" else mx.float16
    items, config = _plan(source, config, target, quantization)

    with atomic.folder(out, "converting", overwrite=True) as tmp:
        written = writer.write(tmp, items, int(max_shard_gb * 10**9), on_tensor)
        files.save_tokenizer(tokenizer, tmp, source.tokenizer)
        files.write_json(tmp / "preprocessor_config.json",
                         files.preprocessor_config(source.preprocessor, config["image_aspect_ratio"],
                                                   config.get("image_grid_pinpoints")))
        summary = Summary(out, str(hf_path), source.kind, written.params, written.bits_per_weight, 0, 0.0,
                          config.get("quantization"), list(source.notes), scales_dtype=_scales_dtype(items))
        if summary.scales_dtype in ("float16", "bfloat16"):
            summary.notes.append(
                f"{summary.scales_dtype} scales suit Metal and CUDA; MLX's CPU backend runs them about 35x slower "
                "than float32 ones (load casts them to float32 there): --dtype float32 writes float32 scales")
        command = _command(hf_path, out, dtype, quantize, q_bits, q_group_size, quantize_vision,
                           vision_tower, model_base, conv_mode)
        (tmp / "README.md").write_text(
            files.model_card(str(hf_path), source.kind, command, config, summary.lines()[:2]))
        files.write_json(tmp / "config.json", config)  # last: only a complete folder loads
    summary.size_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    if upload_repo:
        summary.url = hub.upload(out, upload_repo)
    summary.seconds = time.perf_counter() - start
    return summary


def _check_conv_mode(conv_mode: str):
    from mlx_llava.conversation import CHAT_TEMPLATE, get_template

    if conv_mode != CHAT_TEMPLATE:
        get_template(conv_mode)


def open_source(folder: Path, name: str, vision_tower=None, model_base=None) -> formats.Source:
    """The source folder, in whichever layout it is (`formats.detect`), opened for conversion."""
    from . import formats, original

    kind = formats.detect(folder)
    if re.search(r"delta-v\d", name.lower()):
        raise LlavaError(
            f"{name} holds delta weights (differences from LLaMA): apply them to LLaMA first with the"
            " original's `python -m llava.model.apply_delta`, then convert the result"
        )
    if kind in ("stage-1", "lora") and model_base is None:
        what = "a lone mm_projector.bin (stage-1 output)" if kind == "stage-1" else "a LoRA adapter"
        raise LlavaError(f"{folder} holds {what}: pass --model-base with the language model it was trained on")
    if kind == "original":
        return original.read_original(folder, name, vision_tower)
    if kind == "stage-1":
        return original.read_stage1(folder, name, vision_tower, model_base)
    if kind == "lora":
        return original.read_lora(folder, name, vision_tower, model_base)
    return formats.read_llava_hf(folder, name, kind)


def _choose_template(source: formats.Source, config: dict, tokenizer) -> dict:
    """Template and image handling by `processor.settings`, the rule `load` uses too."""
    from mlx_llava.processor import has_chat_template, settings

    original = source.name if source.kind in ("original", "lora", "stage-1") else None
    chosen = settings(config, source.preprocessor, has_chat_template(tokenizer), original)
    if chosen["conv_mode"] == "llava_v0" and "conv_mode" not in config:
        source.notes.append(f"the original answers a model named {source.name!r} (no 'v1' in it) in its "
                            "llava_v0 template; if it is a v1 model, choose another with --conv-mode")
    source.notes.append(f"template {chosen['conv_mode']} ({chosen['why']}); images: {chosen['image_aspect_ratio']}")
    return {**config, "conv_mode": chosen["conv_mode"], "image_aspect_ratio": chosen["image_aspect_ratio"]}


def _with_tokens(source: formats.Source, tokenizer) -> dict:
    """The config with the image token's id, checking that the original's
    extra tokens have the embedding rows they were trained with."""
    from . import files

    config = dict(source.config)
    vocab = config["text_config"]["vocab_size"]
    for token in source.extra_tokens:
        if files.token_id(tokenizer, token) >= vocab:
            raise LlavaError(
                f"the tokenizer gives {token} id {files.token_id(tokenizer, token)}, past the embedding "
                f"table ({vocab} rows): tokenizer and weights do not belong together"
            )
    if "image_token_index" not in config:
        config["image_token_index"] = files.token_id(tokenizer, files.IMAGE_PLACEHOLDER)
    return config


def _plan(source: formats.Source, config: dict, dtype, quantization) -> tuple:
    """-> (writer items, output config): what each tensor becomes, checked
    against the model `mlx_llava.load` will build from that config."""
    from mlx_llava.weights import build_model

    from . import formats, writer

    model = build_model(config)  # lazy: its random weights are never computed
    quantizable = writer.quantizable_modules(model)
    tensors, source_q = source.tensors, source.quantization
    if source_q and (quantization is None or _same(source_q, quantization)):
        # An mlx-vlm model keeps its quantization; only layers our model
        # needs in full precision are unpacked.
        tensors = formats.dequantize(tensors, source_q, keep=lambda module: module in quantizable)
        quantization, qconfig = None, source_q
    elif source_q:  # asked for another quantization: unpack all, quantize afresh
        tensors = formats.dequantize(tensors, source_q)
        qconfig = quantization.config()
    else:
        qconfig = quantization.config() if quantization else None
    items = writer.plan(tensors, dtype, quantization, quantizable)
    if not any(name.endswith(".scales") for item in items for name, _, _ in item.outputs):
        qconfig = None  # nothing the group size divides
    writer.check(items, model, qconfig)
    config = {**config, **({"quantization": qconfig} if qconfig else {})}
    return items, config


def _scales_dtype(items: list) -> Optional[str]:
    dtypes = {dtype for item in items for name, _, dtype in item.outputs if name.endswith(".scales")}
    return ", ".join(sorted(str(d).removeprefix("mlx.core.") for d in dtypes)) or None


def _same(qconfig: dict, quantization: writer.Quantization) -> bool:
    return (qconfig.get("bits"), qconfig.get("group_size")) == (quantization.bits, quantization.group_size)


def _command(hf_path, out, dtype, quantize, q_bits, q_group_size, quantize_vision,
             vision_tower, model_base, conv_mode) -> str:
    """The mlx-llava command line that makes this conversion."""
    parts = ["mlx-llava convert", f"--hf {hf_path}", f"--mlx-path {out.name}"]
    if dtype:
        parts.append(f"--dtype {dtype}")
    if quantize:
        parts.append(f"-q --q-bits {q_bits} --q-group-size {q_group_size}")
        if quantize_vision:
            parts.append("--quantize-vision")
    for flag, value in (("--vision-tower", vision_tower), ("--model-base", model_base), ("--conv-mode", conv_mode)):
        if value:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"
