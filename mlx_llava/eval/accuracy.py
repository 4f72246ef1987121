"""Short-answer accuracy on questions about images, by kind.

Each question is asked in a fresh conversation about its image (greedy
decoding), as LLaVA-1.5 evaluates short-answer VQA; the image's visual tokens
and the shared prompt prefix are computed once per image. Whether an answer
is right is the caller's `match(prediction, answer)`.
"""

import json
from collections import defaultdict
from pathlib import Path

from ..errors import LlavaError
from ..generate import Chat


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


def evaluate(model, processor, questions, image_folder, match, max_tokens: int = 16, on_answer=None) -> dict:
    """-> {"accuracy", "by_kind": {kind: accuracy}, "count", "answers": [...]}."""
    by_image = defaultdict(list)
    for q in questions:
        by_image[q["image"]].append(q)
    right, total = defaultdict(int), defaultdict(int)
    answers = []
    for image, qs in by_image.items():
        chat = Chat(model, processor, image=Path(image_folder) / image)
        for q in qs:
            chat.restart()
            answer = chat.say(q["question"], max_tokens=max_tokens).strip()
            ok = match(answer, q["answer"])
            kind = q.get("kind", "all")
            right[kind] += ok
            total[kind] += 1
            answers.append({**q, "prediction": answer, "correct": ok})
            if on_answer:
                on_answer(answers[-1])
    count = sum(total.values())
    return {
        "accuracy": sum(right.values()) / max(count, 1),
        "by_kind": {k: right[k] / total[k] for k in sorted(total)},
        "count": count,
        "answers": answers,
    }


def table(results: dict) -> str:
    """Rows of results (name -> evaluate() output) as a markdown table, like the paper's ablation."""
    kinds = sorted({k for r in results.values() for k in r["by_kind"]})
    head = "| model | " + " | ".join(kinds) + " | overall |"
    rule = "|---" * (len(kinds) + 2) + "|"
    rows = [
        f"| {name} | " + " | ".join(f"{100 * r['by_kind'].get(k, 0):.1f}" for k in kinds)
        + f" | {100 * r['accuracy']:.1f} |"
        for name, r in results.items()
    ]
    return "\n".join([head, rule, *rows])
