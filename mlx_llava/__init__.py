"""mlx-llava: LLaVA (Visual Instruction Tuning) in MLX.

    from mlx_llava import load, generate
    model, processor = load("path/or/hub-repo")
    print(generate(model, processor, "What is in the image?", image="cat.jpg"))

Importing the package is cheap: `generate`, `stream_generate`, `Chat` and
`train` bring in mlx-lm (and transformers) when first used, so that
`mlx-llava --help` and the CLI's option errors are instant.
"""

import sys
import types

from .blas import use_system_blas

use_system_blas()  # before anything imports mlx.core

from .errors import LlavaError  # noqa: E402

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


def __getattr__(name):  # PEP 562: the heavy parts, on first use
    if name in ("Chat", "stream_generate"):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.generate"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """`generate` and `train` each name both a function of the API and a
    submodule. Importing a submodule sets the package's attribute to it, so
    these two are served by properties, which always give the function."""

    @property
    def generate(self):
        from .generate import generate

        return generate

    @generate.setter
    def generate(self, module):
        pass  # the import system recording the submodule: sys.modules has it

    @property
    def train(self):
        from .train import train

        return train

    @train.setter
    def train(self, module):
        pass


sys.modules[__name__].__class__ = _Package
