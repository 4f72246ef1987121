"""Training: stage 1 (projector alignment) and stage 2 (instruction tuning)."""

from .config import TrainConfig
from .trainer import train

__all__ = ["TrainConfig", "train"]
