"""Short-answer accuracy on questions about images, by kind: one more benchmark.

Questions are mlx-llava's short-answer JSON (`[{image, question, answer,
kind}]`, e.g. the demo model's held-out sample). They are answered like
every other benchmark's (`answer.answer_lines`: a fresh conversation per
question in the model's trained template, greedy, batched) and scored here:
an answer is right when the caller's `match(prediction, answer)` says so.
"""

import json
from collections import defaultdict
from pathlib import Path

from ..errors import LlavaError
from .answer import answer_lines, key
from .questions import read_short_answer


def load_questions(path) -> list:
    """[{"image", "question", "answer", "kind"}] from a JSON file."""
    try:
        questions = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LlavaError(f"evaluation data not found: {path}") from None
    except json.JSONDecodeError as e:
        raise LlavaError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(questions, list) or not all(
        isinstance(q, dict) and {"image", "question", "answer"} <= set(q) for q in questions
    ):
        raise LlavaError(f"{path}: expected a list of {{image, question, answer, kind}} records")
    return questions


def score(answers: list, questions: list, match) -> dict:
    """Answer lines against the questions' answers -> {"accuracy", "by_kind", "count",
    "questions", "answers"}; only answered questions count."""
    by_id = {key(a["question_id"]): a for a in answers}
    right, total, scored = defaultdict(int), defaultdict(int), []
    for q, asked in zip(questions, read_short_answer(questions)):
        a = by_id.get(key(asked.question_id))
        if a is None:
            continue
        ok = bool(match(a["text"], q["answer"]))
        kind = q.get("kind", "all")
        right[kind] += ok
        total[kind] += 1
        scored.append({**q, "prediction": a["text"], "correct": ok})
    count = sum(total.values())
    return {
        "benchmark": "heldout",
        "accuracy": sum(right.values()) / max(count, 1),
        "by_kind": {k: right[k] / total[k] for k in sorted(total)},
        "count": count,
        "questions": len(questions),
        "answers": scored,
        "main": 100 * sum(right.values()) / max(count, 1),
    }


def evaluate(model, processor, questions, image_folder, match, max_tokens: int = 16, batch_size: int = 8,
             on_answer=None) -> dict:
    """Answer and score in one go (no answer file): `score`'s result."""
    lines = []
    for line in answer_lines(model, processor, read_short_answer(questions), image_folder,
                             max_new_tokens=max_tokens, batch_size=batch_size):
        lines.append(line)
        if on_answer:
            on_answer(line)
    return score(lines, questions, match)


def table(results: dict) -> str:
    """Rows of results (name -> score() output) as a markdown table, like the paper's ablation."""
    kinds = sorted({k for r in results.values() for k in r["by_kind"]})
    head = "| model | " + " | ".join(kinds) + " | overall |"
    rule = "|---" * (len(kinds) + 2) + "|"
    rows = [
        f"| {name} | " + " | ".join(f"{100 * r['by_kind'].get(k, 0):.1f}" for k in kinds)
        + f" | {100 * r['accuracy']:.1f} |"
        for name, r in results.items()
    ]
    return "\n".join([head, rule, *rows])
