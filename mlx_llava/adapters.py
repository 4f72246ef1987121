"""Stage-2 LoRA outputs: apply them to a model, or fuse them into a new model directory.

An adapter folder holds mlx-lm's `adapters.safetensors` + `adapter_config.json`
for the language model, and `projector.safetensors` beside them (mlx-lm's
loader refuses tensors that are not LoRA's own, and the projector learns too;
LLaVA-1.6's image_newline with it), and `vision_tower.safetensors` when the
vision tower learned as well (`--vision-tower-lr`).
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.utils import load_adapters as load_lm_adapters

from .errors import LlavaError, check_output, check_quantization


def apply_adapters(model, folder):
    """Put a LoRA folder's adapters and projector onto `model` (in place)."""
    folder = Path(folder)
    config = read_config(folder)
    base = config.get("quantized_base")
    if base and not isinstance(model.language_model.layers[0].self_attn.q_proj, nn.QuantizedLinear):
        # QLoRA adapters were trained on a quantized base: rebuild that base.
        nn.quantize(model.language_model, group_size=base["group_size"], bits=base["bits"],
                    class_predicate=lambda p, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % base["group_size"] == 0)
    try:
        load_lm_adapters(model.language_model, str(folder))
    except (ValueError, FileNotFoundError) as e:
        raise LlavaError(f"cannot apply the adapters in {folder}: {e}") from None
    for name in ("projector.safetensors", "vision_tower.safetensors"):  # what learned beside the adapters
        if (folder / name).exists():
            model.load_weights(list(mx.load(str(folder / name)).items()), strict=False)
    model.eval()
    return model


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise LlavaError(f"{folder} has no adapter_config.json: not a LoRA output folder") from None
    except (ValueError, OSError) as e:
        raise LlavaError(f"{folder}/adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LlavaError(f"{folder}/adapter_config.json must hold a JSON object")
    return config


def fuse(model_path, adapters, output, bits=None, group_size: int = 64, quantize_vision: bool = False):
    """Merge adapters into the weights and write a plain model directory
    (quantized to `bits` when given). The output may not be, contain or lie
    inside the model or the adapters."""
    from .processor import Processor
    from .weights import load_model, quantize, resolve, save_model

    if bits is not None:
        check_quantization(bits, group_size)
    check_output(output, [model_path, adapters])
    if Path(output).exists():
        raise LlavaError(f"{output} already exists")
    read_config(Path(adapters))
    path = resolve(model_path)
    model, config = load_model(path)
    apply_adapters(model, adapters)
    fused = [(n, m.fuse(dequantize=False)) for n, m in model.language_model.named_modules() if hasattr(m, "fuse")]
    model.language_model.update_modules(tree_unflatten(fused))
    if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()) and "quantization" not in config:
        base = json.loads((Path(adapters) / "adapter_config.json").read_text()).get("quantized_base")
        config["quantization"] = {"group_size": base["group_size"], "bits": base["bits"], "mode": "affine"}
    adapter_conv = json.loads((Path(adapters) / "adapter_config.json").read_text()).get("conv_mode")
    if adapter_conv:
        config["conv_mode"] = adapter_conv
    if bits:
        model, config = quantize(model, config, bits, group_size, quantize_vision)
    return save_model(output, model, config, Processor.from_dir(path, config))
