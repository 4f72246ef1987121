"""haotian-liu/LLaVA's own outputs: full checkpoints, stage-1 projectors, LoRA runs.

The original saves LlavaLlamaForCausalLM: a flat LLaMA config with `mm_*`
fields, and keys `model.layers.*`, `model.embed_tokens.*`, `model.norm.*`,
`lm_head.*`, `model.mm_projector.*` (`.0`/`.2` for mlp2x_gelu) and, when
saved with it, `model.vision_tower.vision_tower.vision_model.*`. Otherwise
the vision tower comes from the CLIP repository `mm_vision_tower` names.

Stage 1 saves only `mm_projector.bin` (+ config.json); the language model is
the base it trained on (`--model-base`). A LoRA run saves a peft adapter and
`non_lora_trainables.bin` (the projector); the original's builder merges the
adapter into the base (W + alpha/r * B @ A), and so do we, tensor by tensor,
while the base's shards stream past.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx

from mlx_llava.errors import LlavaError
from mlx_llava.weights import load_config

from .formats import Source, complete_text_config, is_buffer, patch_kernel, vision_tower
from .hub import fetch
from .tensors import Tensor, model_files, read_file, read_files

# Flat-config keys that are LLaVA's, not the language model's.
NOT_TEXT = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "image_aspect_ratio", "image_grid_pinpoints", "use_mm_proj", "sep_image_conv_front",
    "tokenizer_model_max_length", "tokenizer_padding_side", "freeze_backbone",
}
NOT_TEXT_PREFIXES = ("_", "mm_", "tune_mm", "freeze_mm", "unfreeze_mm", "image_")
# Original name prefix -> ours, first match wins.
RENAMES = (
    ("model.image_newline", "image_newline"),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.mm_projector.", "multi_modal_projector.linear_1."),
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def our_name(key: str) -> str:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key  # unknown: the check against the model names it


def our_tensors(tensors) -> list:
    """Original tensors under our names, buffers dropped, patch kernel OHWI."""
    return [patch_kernel(t.renamed(our_name(t.name))) for t in tensors if not is_buffer(t.name)]


def text_fields(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_TEXT and not k.startswith(NOT_TEXT_PREFIXES)}


def language_model_type(config: dict, where) -> str:
    """llama or mistral, from a LLaVA or plain language-model config."""
    model_type = config.get("model_type")
    arch = " ".join(config.get("architectures") or [])
    if model_type in ("llava_mistral", "mistral") or "Mistral" in arch:
        return "mistral"
    if "Mpt" in arch or model_type in ("llava_mpt", "mpt"):
        raise LlavaError(f"{where}: MPT-based LLaVA is not supported (LLaMA and Mistral language models only)")
    if model_type in ("llava", "llava_llama", "llama", None):
        return "llama"
    raise LlavaError(f"{where}: unknown model type {model_type!r} (LLaMA and Mistral based LLaVA only)")


# ---------------------------------------------------------------- the three layouts


def read_original(folder: Path, name: str, vision_spec=None) -> Source:
    config = load_config(folder)
    tensors = our_tensors(read_files(model_files(folder)))
    return _build("original", folder, name, config, text_fields(config), language_model_type(config, folder),
                  tensors, folder, vision_spec, None, [])


def read_stage1(folder: Path, name: str, vision_spec, model_base) -> Source:
    base = fetch(model_base, "base model")
    base_config = load_config(base)
    config = load_config(folder) if (folder / "config.json").is_file() else {}
    projector = []
    for t in read_file(folder / "mm_projector.bin"):
        key = "model." + t.name if t.name.startswith("mm_projector.") else t.name
        projector.append(t.renamed(our_name(key)))
    if not any(t.name.startswith("multi_modal_projector.") for t in projector):
        raise LlavaError(f"{folder}/mm_projector.bin holds no mm_projector weights")
    # The keys say which projector it is, whatever a missing config defaults to.
    projector_type = "mlp2x_gelu" if any(".linear_2." in t.name for t in projector) else "linear"
    config = {**config, "mm_projector_type": projector_type}
    tensors = [t for t in our_tensors(read_files(model_files(base))) if t.name.startswith("language_model.")]
    notes = ["stage-1 output: conv mode 'plain', the template it was trained with (choose another with --conv-mode)"]
    return _build("stage-1", folder, name, config, text_fields(base_config),
                  language_model_type(base_config, base), tensors + projector, base, vision_spec, "plain", notes)


def read_lora(folder: Path, name: str, vision_spec, model_base) -> Source:
    config = load_config(folder)
    base = fetch(model_base, "base model")
    adapter = _lora_matrices(folder)
    extra = {}
    trainables = folder / "non_lora_trainables.bin"
    if trainables.is_file():
        extra = {t.name: t for t in _non_lora(read_file(trainables))}
    tensors = []
    for t in read_files(model_files(base)):
        module = t.name[: -len(".weight")] if t.name.endswith(".weight") else None
        if module in adapter:
            t = _merge(t, *adapter.pop(module))
        tensors.append(t)
    if adapter:
        raise LlavaError(f"the LoRA adapter in {folder} targets {next(iter(adapter))}, which the base model lacks")
    # The trainables (the projector, at least) replace what the base has of them.
    tensors = our_tensors([t for t in tensors if t.name not in extra] + list(extra.values()))
    return _build("lora", folder, name, config, text_fields(config), language_model_type(config, folder),
                  tensors, base, vision_spec, None, [])


# ---------------------------------------------------------------- LoRA


def _lora_matrices(folder: Path) -> dict:
    """{base module name: (A, B, scale)} from a peft adapter folder."""
    settings = json.loads((folder / "adapter_config.json").read_text())
    if settings.get("use_dora"):
        raise LlavaError(f"{folder} is a DoRA adapter, which mlx-llava cannot merge (plain LoRA only)")
    files = [folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()]
    if not files:
        raise LlavaError(f"{folder} has adapter_config.json but no adapter_model.safetensors or adapter_model.bin")
    pairs = {}
    for t in read_file(files[0]):
        key = t.name[len("base_model.model."):] if t.name.startswith("base_model.model.") else t.name
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise LlavaError(f"the adapter holds {t.name}, which is not a LoRA matrix mlx-llava can merge")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LlavaError(f"the adapter has lora_{'A' if 'A' in ab else 'B'} but not its partner for {module}")
        r = _pattern(settings.get("rank_pattern"), module, settings["r"])
        alpha = _pattern(settings.get("alpha_pattern"), module, settings.get("lora_alpha", r))
        scale = alpha / (math.sqrt(r) if settings.get("use_rslora") else r)
        out[module] = (ab["A"], ab["B"], scale, bool(settings.get("fan_in_fan_out")))
    return out


def _pattern(patterns, module: str, default):
    """peft's per-module rank/alpha overrides: a key matches a module name's tail."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _merge(w: Tensor, a: Tensor, b: Tensor, scale: float, fan_in_fan_out: bool) -> Tensor:
    """W + scale * B @ A, computed in float32 when read."""
    out_dim, in_dim = (w.shape[1], w.shape[0]) if fan_in_fan_out else w.shape
    if a.shape[1] != in_dim or b.shape[0] != out_dim or a.shape[0] != b.shape[1]:
        raise LlavaError(f"the LoRA matrices for {w.name} ({a.shape}, {b.shape}) do not fit its shape {w.shape}")

    def read():
        delta = b.read().astype(mx.float32) @ a.read().astype(mx.float32)
        return w.read().astype(mx.float32) + scale * (delta.T if fan_in_fan_out else delta)

    return Tensor(w.name, w.shape, mx.float32, read)


def _non_lora(tensors: list) -> list:
    """non_lora_trainables.bin names -> original names, as the original's builder reads them."""
    names = [t.name[len("base_model."):] if t.name.startswith("base_model.") else t.name for t in tensors]
    if any(n.startswith("model.model.") for n in names):
        names = [n[len("model."):] if n.startswith("model.") else n for n in names]
    return [t.renamed(n) for t, n in zip(tensors, names)]


# ---------------------------------------------------------------- the output config


def _build(kind, folder, name, config, text, lm_type, tensors, tokenizer, vision_spec, conv_mode, notes) -> Source:
    """The llava-hf style config and the full tensor list of an original-family source."""
    aspect = config.get("image_aspect_ratio") or "square"
    projector_type = config.get("mm_projector_type", "linear")
    if projector_type not in ("linear", "mlp2x_gelu"):
        raise LlavaError(f"{folder}: projector type {projector_type!r} is not supported (linear, mlp2x_gelu)")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE:
        raise LlavaError(f"{folder}: mm_vision_select_feature {feature!r} is not supported (patch, cls_patch)")

    has_vision = any(t.name.startswith("vision_tower.") for t in tensors)
    spec = vision_spec or config.get("mm_vision_tower") or config.get("vision_tower")
    if not spec:
        raise LlavaError(f"{folder}/config.json names no vision tower (mm_vision_tower): pass --vision-tower")
    vision, vision_tensors, preprocessor = vision_tower(spec, "vision tower", with_weights=not has_vision)
    tensors = tensors + vision_tensors

    start_end = bool(config.get("mm_use_im_start_end"))
    # The original's builder adds <im_patch> (when mm_use_im_patch_token, on by
    # default) before <im_start>/<im_end>: their ids, and the embedding rows
    # trained for them, depend on that order.
    extra = (["<im_patch>"] if config.get("mm_use_im_patch_token", True) else []) + ["<im_start>", "<im_end>"]
    out = {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": complete_text_config({**text, "model_type": lm_type}, tensors),
        "vision_config": vision,
        "projector_type": projector_type,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": config.get("mm_vision_select_layer", -2),
        "vision_feature_select_strategy": SELECT_FEATURE[feature],
        "image_aspect_ratio": "pad" if aspect == "pad" else "crop",
        "mm_use_im_start_end": start_end,
    }
    tensors = _anyres(config, out, tensors, vision, folder, notes)
    if conv_mode:  # else chosen from the model's name, as the original's CLI does
        out["conv_mode"] = conv_mode
    return Source(kind, name, out, tensors, Path(tokenizer), preprocessor,
                  extra_tokens=extra if start_end else [], notes=notes)


def _anyres(config: dict, out: dict, tensors: list, vision: dict, folder, notes: list) -> list:
    """LLaVA-1.6: AnyRes settings into the output config (llava-hf's
    `llava_next` spelling), the tensors kept accordingly.

    The original writes pinpoints as (width, height); they are written
    (height, width), llava-hf's order, pair by pair, so that the first of
    equal candidates is the one the original picks. Its unpad truncates
    (`unpad_rounding: truncate`). A `spatial*` merge matters only to
    anyres images (the original encodes other images flat), so elsewhere an
    `image_newline` is dropped."""
    from mlx_llava import anyres

    aspect = config.get("image_aspect_ratio") or "square"
    merge = config.get("mm_patch_merge_type") or "flat"
    newline = [t for t in tensors if t.name == "image_newline"]
    if aspect != "anyres" and not aspect.startswith("anyres_max"):
        if newline:
            notes.append(f"mm_patch_merge_type {merge} with image_aspect_ratio {aspect}: the original lays such "
                         "images out flat, so image_newline is unused and left out")
        return [t for t in tensors if t.name != "image_newline"]
    pinpoints = anyres.swap(anyres.parse_pinpoints(config.get("image_grid_pinpoints"), vision["image_size"]))
    out.update({
        "model_type": "llava_next", "architectures": ["LlavaNextForConditionalGeneration"],
        "image_aspect_ratio": aspect, "image_grid_pinpoints": [list(p) for p in pinpoints],
        "mm_patch_merge_type": merge, "unpad_rounding": "truncate",
    })
    anyres.from_config(out, vision)  # refuses what cannot be laid out, in one line
    if "unpad" in merge and not newline:
        raise LlavaError(f"{folder}: mm_patch_merge_type {merge} needs model.image_newline, which the checkpoint lacks")
    if "unpad" not in merge:
        tensors = [t for t in tensors if t.name != "image_newline"]
    return tensors
