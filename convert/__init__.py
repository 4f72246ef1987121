"""PyTorch LLaVA checkpoints -> MLX model directories."""
