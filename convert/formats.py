"""Which layout a source checkpoint is in, and reading it as a `Source`.

Five layouts are read:

- "original": haotian-liu/LLaVA's LlavaLlamaForCausalLM (liuhaotian/*),
  told apart from llava-hf by the `mm_*` fields of its flat config;
- "stage-1": a lone `mm_projector.bin` (needs the language model);
- "lora": a peft adapter + `non_lora_trainables.bin` (needs the base);
- "llava-hf": LlavaForConditionalGeneration (`text_config`/`vision_config`),
  and LLaVA-1.6's LlavaNextForConditionalGeneration (`llava_next`);
- "mlx-vlm": the same configs with MLX weights, possibly quantized.

The first three live in `original.py`; this module tells the layouts apart
(`detect`; `convert.open_source` dispatches on it), reads llava-hf / mlx-vlm,
and holds what all of them share (the CLIP vision tower, tensor renames).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx

from mlx_llava import anyres
from mlx_llava.errors import LlavaError
from mlx_llava.models.llava import llava_config, rename, text_config_with_defaults
from mlx_llava.weights import clip_weights, load_config, read_clip_config

from .hub import fetch
from .tensors import Tensor, model_files, read_files, safetensors_metadata

LLAVA_TYPES = ("llava", "llava_llama", "llava_mistral", "llava_next")


@dataclass
class Source:
    """A checkpoint opened for conversion: everything the output is made of.

    `config` is the output config.json (llava-hf style, our keys added)
    before quantization; `tensors` are under our names, unread; `quantization`
    is the source's own (mlx-vlm), whose tensors are marked `quantized`."""

    kind: str
    name: str
    config: dict
    tensors: list
    tokenizer: Path
    preprocessor: dict
    extra_tokens: list = field(default_factory=list)  # added before <image>, in this order
    quantization: Optional[dict] = None
    notes: list = field(default_factory=list)


def model_name(source) -> str:
    """The original's get_model_name_from_path: the last path part, or the
    last two for a `checkpoint-N` folder. The conversation template depends on it."""
    parts = str(source).rstrip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def detect(folder: Path) -> str:
    """The layout of a source folder (see the module docstring)."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return "lora"
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    if (folder / "mm_projector.bin").is_file() and not has_weights:
        return "stage-1"
    config = load_config(folder)
    model_type = config.get("model_type")
    if "text_config" in config or "vision_config" in config:
        if model_type not in LLAVA_TYPES:
            raise LlavaError(f"unknown model type {model_type!r}: mlx-llava converts LLaVA models (llava)")
        quantized = "quantization" in config
        mlx = quantized or any(safetensors_metadata(f).get("format") == "mlx" for f in folder.glob("*.safetensors"))
        return "mlx-vlm" if mlx else "llava-hf"
    if model_type in LLAVA_TYPES or any(k.startswith("mm_") for k in config):
        return "original"
    raise LlavaError(
        f"unknown model type {model_type!r}: not a LLaVA checkpoint"
        " (no text_config/vision_config, and no mm_* fields of the original LLaVA)"
    )


# ---------------------------------------------------------------- shared


def patch_kernel(t: Tensor, channels: int = 3) -> Tensor:
    """PyTorch's OIHW patch kernel -> MLX's OHWI (a kernel already OHWI stays)."""
    if not t.name.endswith("patch_embedding.weight") or len(t.shape) != 4 or t.shape[-1] == channels:
        return t
    o, i, h, w = t.shape
    return Tensor(t.name, (o, h, w, i), t.dtype, lambda: t.read().transpose(0, 2, 3, 1))


def is_buffer(name: str) -> bool:
    """Non-parameters some checkpoints save: rotary frequencies, position ids."""
    return name.endswith(("rotary_emb.inv_freq", "position_ids"))


def vision_tower(spec, what: str, with_weights: bool) -> tuple:
    """(vision_config, tensors or [], preprocessor dict) of a CLIP vision tower,
    a hub id or a folder in any CLIP spelling (`mlx_llava.weights.read_clip`'s
    reader, with lazy tensors and .bin too); its weights only when `with_weights`."""
    try:
        folder = fetch(spec, what, weights=with_weights)
    except LlavaError as e:
        raise LlavaError(f"{e}; name it with --vision-tower") from None
    config, preprocessor = read_clip_config(folder)
    tensors = []
    if with_weights:
        found = clip_weights(((t.name, t) for t in read_files(model_files(folder))), folder)
        tensors = [patch_kernel(t.renamed(name), config["num_channels"]) for name, t in found.items()]
    return config, tensors, preprocessor


def complete_text_config(text: dict, tensors: list) -> dict:
    """A full text config; vocabulary and weight tying from the tensors themselves."""
    text = text_config_with_defaults(text)
    names = {t.name: t for t in tensors}
    embed = names.get("language_model.model.embed_tokens.weight")
    if embed is not None:  # rows are tokens, packed or not
        text["vocab_size"] = embed.shape[0]
    text["tie_word_embeddings"] = "language_model.lm_head.weight" not in names
    return text


# ---------------------------------------------------------------- llava-hf, mlx-vlm


def read_llava_hf(folder: Path, name: str, kind: str) -> Source:
    config = load_config(folder)
    quantization = config.get("quantization")
    if not quantization and isinstance(config.get("quantization_config"), dict):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise LlavaError(f"{folder} is quantized with {method}, which mlx-llava cannot read: convert the full-precision model")
    config = llava_config(config)
    vision = config["vision_config"]
    channels = vision["num_channels"]
    tensors = []
    for t in read_files(model_files(folder)):
        if is_buffer(t.name):
            continue
        tensors.append(patch_kernel(t.renamed(rename(t.name)), channels))
    if quantization:
        tensors = _mark_quantized(tensors, quantization)

    out = {k: v for k, v in config.items()
           if k not in ("quantization", "quantization_config", "transformers_version", "torch_dtype", "dtype")
           and not k.startswith("_")}
    if config.get("image_aspect_ratio") == "anyres":  # llava_next: transformers' AnyRes rules
        out["model_type"] = "llava_next"
        out["architectures"] = ["LlavaNextForConditionalGeneration"]
        out.setdefault("mm_patch_merge_type", "spatial_unpad")
        out.setdefault("unpad_rounding", "round")
        out.setdefault("image_grid_pinpoints", [list(p) for p in anyres.DEFAULT_PINPOINTS])
    else:
        out["model_type"] = "llava"
        out["architectures"] = ["LlavaForConditionalGeneration"]
    out["text_config"] = complete_text_config(config["text_config"], tensors)
    out["vision_config"] = vision
    out.setdefault("projector_type", "mlp2x_gelu")

    pre_path = folder / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    # Template and image handling: processor.settings, once the tokenizer is read.
    return Source(kind, name, out, tensors, folder, pre, quantization=quantization)


def _mark_quantized(tensors: list, quantization: dict) -> list:
    """Mark each quantized layer's weight, scales and biases with its bits."""
    scaled = {t.name[: -len(".scales")] for t in tensors if t.name.endswith(".scales")}
    out = []
    for t in tensors:
        module, _, leaf = t.name.rpartition(".")
        if module in scaled and leaf in ("weight", "scales", "biases"):
            layer = quantization.get(module) if isinstance(quantization.get(module), dict) else quantization
            t = Tensor(t.name, t.shape, t.dtype, t.read, quantized=layer["bits"])
        out.append(t)
    return out


def dequantize(tensors: list, quantization: dict, keep=lambda module: False) -> list:
    """Already-quantized layers back to full precision (float16), except
    those `keep(module)` says stay as they are."""
    by_name = {t.name: t for t in tensors}
    out = []
    for t in tensors:
        module, _, leaf = t.name.rpartition(".")
        if not t.quantized or keep(module):
            out.append(t)
            continue
        if leaf != "weight":
            continue  # scales and biases go into the weight
        layer = quantization.get(module) if isinstance(quantization.get(module), dict) else quantization
        bits, group_size = layer["bits"], layer["group_size"]
        w, s, b = t, by_name[f"{module}.scales"], by_name[f"{module}.biases"]

        def read(w=w, s=s, b=b, bits=bits, group_size=group_size):
            return mx.dequantize(w.read(), s.read(), b.read(), group_size=group_size, bits=bits)

        shape = (*t.shape[:-1], t.shape[-1] * 32 // bits)
        out.append(Tensor(t.name, shape, s.dtype, read))
    return out
