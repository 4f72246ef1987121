"""mlx-llava: LLaVA (Visual Instruction Tuning) in MLX.

    from mlx_llava import load, generate
    model, processor = load("path/or/hub-repo")
    print(generate(model, processor, "What is in the image?", image="cat.jpg"))
"""

from .blas import use_system_blas

use_system_blas()  # before anything imports mlx.core

from .errors import LlavaError  # noqa: E402
from .generate import Chat, generate, stream_generate  # noqa: E402
from .train import train  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "Chat", "train", "LlavaError"]


def load(path_or_repo, adapter_path=None, lazy: bool = False):
    """A model directory or hub repo id (MLX format) -> (model, processor).

    `adapter_path`: a stage-2 LoRA output folder to apply on top."""
    from .processor import Processor
    from .weights import load_model, resolve

    path = resolve(path_or_repo)
    model, config = load_model(path, lazy=lazy)
    if adapter_path is not None:
        import json
        from pathlib import Path

        from .adapters import apply_adapters

        apply_adapters(model, adapter_path)
        conv_mode = json.loads((Path(adapter_path) / "adapter_config.json").read_text()).get("conv_mode")
        config = {**config, "conv_mode": conv_mode or config.get("conv_mode")}
    return model, Processor.from_dir(path, config)

