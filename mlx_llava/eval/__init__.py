"""Evaluation: short-answer accuracy on questions about images, by kind."""

from .accuracy import evaluate, load_questions, table

__all__ = ["evaluate", "load_questions", "table"]
