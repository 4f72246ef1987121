"""Evaluation: held-out accuracy on the synthetic world (and the paper's ablation)."""

from .heldout import evaluate, load_questions, table

__all__ = ["evaluate", "load_questions", "table"]
