"""Evaluation: the paper's and LLaVA-1.5's benchmarks, scored as the original scores them.

    questions -> answer (batched, resumable JSONL) -> score (per benchmark) -> report

`read_questions` reads every question file the original eval scripts read;
`answer` writes the original's answer lines; `scienceqa`, `pope`, `mme`,
`vqa` (TextVQA, VQAv2, GQA), `llava_bench` (the judged benchmark) and
`accuracy` (short-answer JSON, e.g. the demo's held-out sample) score them;
`report` puts scored runs side by side.
"""

from .accuracy import evaluate, load_questions, score, table
from .answer import answer, answer_lines, read_answers
from .questions import Question, read_questions

__all__ = ["evaluate", "load_questions", "score", "table", "answer", "answer_lines", "read_answers",
           "Question", "read_questions", "write_summary"]


def write_summary(result: dict, path, **about) -> dict:
    """Write a score's JSON summary (`about`: model, answers file, ...) atomically; return it."""
    import json
    import time

    from .. import atomic

    summary = {**{k: v for k, v in result.items() if k != "answers"}, **about,
               "scored_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic.write_text(path, json.dumps(summary, indent=2) + "\n")
    return summary
