"""Training: stage 1 (projector alignment) and stage 2 (instruction tuning)."""

from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name):  # PEP 562: the trainer (mlx, mlx-lm) loads on first use
    if name == "train":
        from .trainer import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
