"""Model directories: find, read, quantize, write.

A model directory is llava-hf's layout, as mlx-vlm also writes it for llava:
config.json (`text_config`, `vision_config`, `image_token_index`, ...,
`quantization` when quantized), safetensors shards (with an index when more
than one), tokenizer files and preprocessor_config.json. Our own keys
(`projector_type`, `image_aspect_ratio`, `conv_mode`) ride along in config.json.
"""

import json
import os
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import make_shards, quantize_model

from . import atomic
from .conversation import (
    CHAT_TEMPLATE,
    DEFAULT_CONV_MODE,
    IMAGE_PLACEHOLDER,
    trained_conv_mode,
)
from .errors import LlavaError, is_int
from .models.clip import clip_vision_config, vision_model_name
from .models.llava import Model, ModelArgs, llava_config
from .models.projector import PROJECTOR_TYPES

# What `load` fetches of a hub repository already in MLX format.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
MAX_SHARD_GB = 5


def resolve(path_or_repo) -> Path:
    """A local folder, or a hub repo id fetched with huggingface-hub (which
    honours HF_HUB_OFFLINE and its local cache)."""
    if not isinstance(path_or_repo, (str, os.PathLike)):
        raise LlavaError(f"a model is a folder or a hub repo id, not {type(path_or_repo).__name__}")
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LlavaError(f"{path} is not a model directory (no config.json)")
        return path
    repo = str(path_or_repo)
    if not is_repo_id(repo):
        raise LlavaError(f"model not found: {repo} (no such folder, and not a hub repo id)")
    return download(repo, ALLOW_PATTERNS)


def is_repo_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and " " not in source


def download(repo: str, patterns: list, what: str = "model") -> Path:
    """`repo`'s files matching `patterns`, through huggingface-hub (HF_HUB_OFFLINE
    and the local cache honoured); a failure is one LlavaError line naming `what`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise LlavaError(
            f"{what} not found: {repo} is not a local folder and is not in the Hugging Face cache"
            " (offline, or the hub cannot be reached)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise LlavaError(f"{what} not found: {repo} ({type(e).__name__}: {e})".splitlines()[0]) from None


def default_model() -> Path:
    """The small demo LLaVA shipped inside the package."""
    path = Path(__file__).parent / "demo" / "model"
    if not (path / "config.json").is_file():
        raise LlavaError("no --model given, and this installation has no demo model")
    return path


def load_config(path: Path) -> dict:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except FileNotFoundError:
        raise LlavaError(f"{path} has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaError(f"{path}/config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LlavaError(f"{path}/config.json must hold a JSON object, not a {type(config).__name__}")
    return config


SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "vocab_size", "max_position_embeddings", "image_size", "patch_size")


def check_config(config: dict, path) -> dict:
    """A LLaVA config.json's required parts and the types of the fields we
    read, each problem as one line naming the field: a sparse or broken
    config would otherwise be filled with LLaMA-7B defaults and fail later
    with hundreds of parameter names."""
    where = Path(path) / "config.json"

    def bad(field, what):
        raise LlavaError(f"{where}: {field} {what}")

    text = config.get("text_config")
    if text is None:
        bad("text_config", "is missing (the language model's settings): not a llava-hf style LLaVA directory")
    if not isinstance(text, dict) or not text:
        bad("text_config", f"must be a non-empty object, not {text!r}")
    vision = config.get("vision_config")
    if vision is not None and not isinstance(vision, dict):
        bad("vision_config", f"must be an object, not {vision!r}")
    for section, fields in (("text_config", text), ("vision_config", vision or {})):
        for key in SIZES:
            value = fields.get(key)
            if value is not None and not (is_int(value) and value > 0):
                bad(f"{section}.{key}", f"must be a positive integer, not {value!r}")
        if not isinstance(fields.get("model_type", ""), str):
            bad(f"{section}.model_type", f"must be a string, not {fields['model_type']!r}")
    for key in ("image_token_index", "image_token_id"):
        if key in config and not (is_int(config[key]) and config[key] >= 0):
            bad(key, f"must be a token id (an integer >= 0), not {config[key]!r}")
    layer = config.get("vision_feature_layer", -2)
    if not (is_int(layer) or (isinstance(layer, list) and layer and all(is_int(x) for x in layer))):
        bad("vision_feature_layer", f"must be an integer or a list of integers, not {layer!r}")
    for key, allowed in (("projector_type", PROJECTOR_TYPES), ("vision_feature_select_strategy", ("default", "full"))):
        if key in config and config[key] not in allowed:
            bad(key, f"must be one of {', '.join(allowed)}, not {config[key]!r}")
    q = config.get("quantization")
    if q is not None and not (isinstance(q, dict) and is_int(q.get("bits")) and is_int(q.get("group_size"))):
        bad("quantization", f"must be an object with integer bits and group_size, not {q!r}")
    return config


def weight_files(path: Path) -> list:
    """The safetensors files of a directory; the index, when present, must name only files that exist."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise LlavaError(f"{path} is missing weight shard {missing[0]} named in its index")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LlavaError(f"{path} has no .safetensors weights")
    return files


def load_weights(path: Path) -> dict:
    weights = {}
    for f in weight_files(path):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises plain RuntimeError/ValueError on bad files
            raise LlavaError(f"cannot read {f}: truncated or not a safetensors file ({e})") from None
    return weights


def check_llava(config: dict):
    if config.get("model_type", "llava") not in ("llava", "llava_llama", "llava_mistral", "llava_next"):
        raise LlavaError(f"unknown architecture {config.get('model_type')!r}: not a LLaVA model")
    if "text_config" not in config:
        raise LlavaError("config.json has no text_config: not a llava-hf style LLaVA directory")


def build_model(config: dict) -> Model:
    check_llava(config)
    return Model(ModelArgs.from_dict(config))


def apply_quantization(model: nn.Module, config: dict, weights: dict):
    """Swap in quantized layers where the checkpoint has scales, before loading."""
    q = config.get("quantization") or config.get("quantization_config")
    if not q:
        return

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return q.get(path, True)

    nn.quantize(model, group_size=q["group_size"], bits=q["bits"],
                mode=q.get("mode", "affine"), class_predicate=predicate)


def load_model(path, lazy: bool = False, cpu_fallback: bool = True):
    """-> (Model, config) from a model directory; the config complete, in
    the spelling our model reads (see `llava_config`), whichever the file has.
    On MLX's CPU backend a quantized model's half-precision scales become
    float32 unless `cpu_fallback` is False (see `cpu_float32`)."""
    path = Path(path)
    raw = check_config(load_config(path), path)
    check_llava(raw)
    config = llava_config(raw)
    weights = load_weights(path)
    # mlx-lm would tie the output layer to the embeddings unless told, silently
    # dropping Vicuna's own lm_head: decide from the checkpoint itself.
    config["text_config"]["tie_word_embeddings"] = not any(k.endswith("lm_head.weight") for k in weights)
    try:
        model = build_model(config)
    except (TypeError, ValueError, KeyError) as e:  # a field of a type the checks above do not know
        raise LlavaError(f"{path}/config.json: cannot build the model from it ({type(e).__name__}: {e})") from None
    weights = model.sanitize(weights)
    apply_quantization(model, config, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        assumed = [f"no {section}.hidden_size: {what} assumed" for section, what in (
            ("text_config", "LLaMA-7B's sizes"), ("vision_config", "CLIP ViT-L/14-336's sizes"))
            if "hidden_size" not in (raw.get(section) or {})]
        hint = f"; config.json gives {', '.join(assumed)}" if assumed else ""
        raise LlavaError(f"{path}: weights do not match config.json ({short(e)}){hint}") from None
    note = cpu_float32(model, config, cast=cpu_fallback)
    if note:
        import sys

        print(f"mlx-llava: {note}", file=sys.stderr)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


HALF = (mx.float16, mx.bfloat16)


def cpu_float32(model: nn.Module, config: dict, cast: bool = True) -> Optional[str]:
    """On MLX's CPU backend, half precision is the slow path: a quantized
    matmul with float16 scales runs about 35 times slower than with float32
    ones (a 1B model decodes at 0.02 tokens/s instead of about 1), a float16
    matmul about 2 times. A quantized model's half-precision parameters
    (scales, biases, norms, the unquantized vision tower) are therefore cast
    to float32 here (exactly: every float16 value is a float32 one), which
    costs little memory; an unquantized half-precision model is left as it is
    (casting would double it). Returns the one line to tell the user, or None.
    Nothing is done on a GPU (Metal, CUDA)."""
    if mx.default_device() != mx.cpu:
        return None
    params = tree_flatten(model.parameters())
    half = [(k, v) for k, v in params if v.dtype in HALF]
    if not half:
        return None
    dtype = str(half[0][1].dtype).removeprefix("mlx.core.")
    quantized = bool(config.get("quantization") or config.get("quantization_config"))
    if not quantized:
        return (f"this model is {dtype}, which MLX's CPU backend multiplies about 2x slower than float32; "
                "`mlx-llava convert --dtype float32` makes a float32 copy")
    if not cast:
        return (f"this quantized model has {dtype} scales, which MLX's CPU backend runs about 35x slower than "
                "float32 ones (0.02 tokens/s for a 1B model); `mlx-llava convert -q --dtype float32` makes a fast copy")
    extra = sum(v.size for _, v in half) * 2
    model.load_weights([(k, v.astype(mx.float32)) for k, v in half], strict=False)
    return (f"this quantized model has {dtype} scales, which MLX's CPU backend runs about 35x slower than "
            f"float32 ones: cast to float32 at load (+{extra / 1e6:.0f} MB); "
            "`mlx-llava convert -q --dtype float32` writes such a model directly")


def short(e: Exception, names: int = 3) -> str:
    """mlx's "Missing 252 parameters: <one per line>" as one short line."""
    head, *rest = str(e).splitlines() or [""]
    rest = [r.strip(" ,.") for r in rest if r.strip(" ,.")]
    if len(rest) > names:
        rest = rest[:names] + [f"... {len(rest) - names} more"]
    return f"{head.rstrip(': ')}: {', '.join(rest)}" if rest else head


def read_clip_config(path) -> tuple:
    """(complete vision config, preprocessor dict) of a CLIP folder in any of
    its spellings (see models/clip.py); one LlavaError line when it is not one."""
    path = Path(path)
    config = load_config(path)
    vision = clip_vision_config(config)
    if vision is None:
        raise LlavaError(f"{path} is not a CLIP vision tower (model_type {config.get('model_type')!r})")
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        return vision, json.loads(pre.read_text())
    size = vision["image_size"]
    return vision, {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}


def clip_weights(items, path) -> dict:
    """A CLIP checkpoint's (name, tensor) pairs -> its vision tower's, under
    our names (`vision_tower.vision_model.*`); the rest is dropped."""
    out = {}
    for key, value in items:
        name = vision_model_name(key)
        if name is not None:
            out["vision_tower." + name] = value
    if not out:
        raise LlavaError(f"{path} has no CLIP vision tower weights (vision_model.*, or embeddings.* and encoder.*)")
    return out


def read_clip(path) -> tuple:
    """A CLIP directory (safetensors) -> (vision config, vision tower weights
    under our names, preprocessor dict)."""
    vision, preprocessor = read_clip_config(path)
    return vision, clip_weights(load_weights(path).items(), path), preprocessor


def assemble(language_model, vision_tower, projector_type: str = "mlp2x_gelu", conv_mode=None):
    """A new LLaVA from an mlx-lm language model directory and a CLIP
    directory, with a freshly initialised projector: what stage 1 starts
    from. -> (model, config, processor)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from .image import ImageConfig
    from .processor import (
        Processor,
        attach_chat_template,
        has_chat_template,
        tokenizer_legacy,
    )

    lm_path = resolve(language_model)
    lm_config = load_config(lm_path)
    vision_config, vision_weights, preprocessor = read_clip(resolve(vision_tower))
    weights = {"language_model." + k: v for k, v in load_weights(lm_path).items()}
    text_config = {k: v for k, v in lm_config.items() if k not in ("quantization", "quantization_config")}
    text_config["tie_word_embeddings"] = "language_model.lm_head.weight" not in weights
    tokenizer = load_tokenizer(lm_path, eos_token_ids=lm_config.get("eos_token_id"))
    attach_chat_template(tokenizer, lm_path)
    # The original leaves <image> out of the vocabulary; use it where a tokenizer has it.
    image_token = tokenizer.get_vocab().get(IMAGE_PLACEHOLDER, text_config["vocab_size"])
    config = llava_config({
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": text_config,
        "vision_config": vision_config,
        "projector_type": projector_type,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_token_index": image_token,
        "image_aspect_ratio": "pad",
        # the template LLaVA-1.5 trained in, unless the language model brings its own
        "conv_mode": conv_mode or (CHAT_TEMPLATE if has_chat_template(tokenizer) else trained_conv_mode(DEFAULT_CONV_MODE)),
    })
    if lm_config.get("quantization"):
        config["quantization"] = lm_config["quantization"]
    model = build_model(config)
    projector = dict(tree_flatten(model.multi_modal_projector.parameters()))
    weights.update({f"multi_modal_projector.{k}": v for k, v in projector.items()})
    weights = model.sanitize({**weights, **vision_weights})
    apply_quantization(model, config, weights)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    image_config = ImageConfig.from_preprocessor_config(preprocessor, "pad")
    processor = Processor(tokenizer, image_config, image_token, model.num_visual_tokens,
                          config["conv_mode"], config["text_config"].get("max_position_embeddings") or 4096,
                          legacy=tokenizer_legacy(lm_path))
    return model, config, processor


def quantize(model: Model, config: dict, bits: int = 4, group_size: int = 64,
             quantize_vision: bool = False):
    """mlx-lm's quantization (embeddings and lm_head included); the vision
    tower only when asked; layers the group size does not divide stay full."""

    def predicate(path, module):
        return quantize_vision or not path.startswith("vision_tower")

    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    model, config = quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    config.pop("quantization_config", None)
    return model, config


def save_model(path, model: Model, config: dict, processor=None, overwrite: bool = False,
               extra_files: Optional[dict] = None):
    """Write a model directory atomically (`atomic.folder`): a temporary folder
    beside `path`, renamed into place only when complete."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LlavaError(f"{path} already exists")
    with atomic.folder(path, "saving", overwrite=True) as tmp:
        weights = dict(tree_flatten(model.parameters()))
        shards = make_shards(weights, MAX_SHARD_GB)
        names = (
            ["model.safetensors"] if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map = {}
        for name, shard in zip(names, shards):
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
        if processor is not None:
            processor.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return path


