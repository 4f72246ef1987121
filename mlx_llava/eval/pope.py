"""POPE, scored as the original's `eval_pope.py`, answers matched by question.

An answer means "no" when its first sentence (up to the first "."), commas
dropped and split on single spaces, holds the word "No", "no" or "not";
anything else means "yes". Per split (random, popular, adversarial):
accuracy, precision, recall, F1 and the share of "yes" answers, "yes"
being the positive class. The LLaVA-1.5 paper's POPE figure is the F1
averaged over the three splits.

The original pairs each split's answers with its label file line by line,
so an answer file in another order, or with an answer missing, is silently
scored against the wrong labels. Here each answer finds its question (by
question id, in the question file) and that question its label (by image
and question text, in the split's label file), so order does not matter;
only answered questions are scored, as in the original.

Files: `llava_pope_test.jsonl` (LLaVA's eval.zip) and POPE's
`coco_pope_{random,popular,adversarial}.json` (JSON lines with a `label`).
"""

import json
from pathlib import Path

from ..errors import LlavaError
from .questions import SHORT_ANSWER

SPLITS = ("random", "popular", "adversarial")


def parse_answer(text: str) -> str:
    """"yes" or "no", as the original reads an answer."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def metrics(predictions: list, labels: list) -> dict:
    """Confusion counts and the original's five figures ("yes" is positive).
    Where the original would divide by zero, the figure is 0."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and l == "yes" for p, l in pairs)
    fp = sum(p == "yes" and l == "no" for p, l in pairs)
    tn = sum(p == "no" and l == "no" for p, l in pairs)
    fn = sum(p == "no" and l == "yes" for p, l in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"count": len(pairs), "TP": tp, "FP": fp, "TN": tn, "FN": fn,
            "accuracy": (tp + tn) / len(pairs) if pairs else 0.0, "precision": precision,
            "recall": recall, "f1": f1, "yes_ratio": predictions.count("yes") / len(pairs) if pairs else 0.0}


def _question(text: str) -> str:
    """A question as the label files write it (LLaVA's adds the short-answer instruction)."""
    return text.replace(SHORT_ANSWER, "").strip()


def read_labels(folder) -> dict:
    """{split: {(image, question): "yes"|"no"}} from POPE's label files in `folder`."""
    folder = Path(folder)
    files = sorted(folder.glob("*_pope_*.json"))
    if not files:
        raise LlavaError(f"POPE: no *_pope_<split>.json label files in {folder}")
    labels = {}
    for path in files:
        split = path.stem.rsplit("_", 1)[-1]
        table = labels.setdefault(split, {})
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    table[(row["image"], _question(row["text"]))] = "no" if row["label"] == "no" else "yes"
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise LlavaError(f"{path}:{n} is not a POPE label line ({{image, text, label}})") from None
    return dict(sorted(labels.items(), key=lambda kv: (SPLITS.index(kv[0]) if kv[0] in SPLITS else 99, kv[0])))


def score(answers: list, questions: list, labels: dict) -> dict:
    """`answers`: answer lines; `questions`: the question file's records
    ({question_id, image, text, category}); `labels`: `read_labels`."""
    by_id = {json.dumps(q["question_id"]): q for q in questions}
    per_split = {split: ([], []) for split in labels}
    for a in answers:
        q = by_id.get(json.dumps(a["question_id"]))
        if q is None:
            raise LlavaError(f"POPE: answer to question {a['question_id']!r}, which is not in the question file")
        split = q.get("category")
        if split not in labels:
            raise LlavaError(f"POPE: question {a['question_id']!r} is in split {split!r}, which has no label file")
        label = labels[split].get((q["image"], _question(q["text"])))
        if label is None:
            raise LlavaError(f"POPE: no label for question {a['question_id']!r} ({q['image']}: {q['text']!r})")
        per_split[split][0].append(parse_answer(a["text"]))
        per_split[split][1].append(label)
    splits = {s: metrics(p, l) for s, (p, l) in per_split.items() if p}
    f1 = [m["f1"] for m in splits.values()]
    accuracy = [m["accuracy"] for m in splits.values()]
    questions_per_split = {s: sum(1 for q in questions if q.get("category") == s) for s in splits}
    return {
        "benchmark": "pope",
        "splits": splits,
        "questions": questions_per_split,
        "mean_f1": 100 * sum(f1) / len(f1) if f1 else None,
        "mean_accuracy": 100 * sum(accuracy) / len(accuracy) if accuracy else None,
        "main": 100 * sum(f1) / len(f1) if f1 else None,
    }


def render(result: dict) -> str:
    lines = []
    for split, m in result["splits"].items():
        lines += [f"Category: {split}, # samples: {m['count']}", "TP\tFP\tTN\tFN\t",
                  f"{m['TP']}\t{m['FP']}\t{m['TN']}\t{m['FN']}",
                  f"Accuracy: {m['accuracy']}", f"Precision: {m['precision']}", f"Recall: {m['recall']}",
                  f"F1 score: {m['f1']}", f"Yes ratio: {m['yes_ratio']}",
                  "%.3f, %.3f, %.3f, %.3f, %.3f" % (m["f1"], m["accuracy"], m["precision"], m["recall"],
                                                     m["yes_ratio"]),
                  "===================================="]
    lines += ["", "| split | accuracy | precision | recall | F1 | yes ratio | answered |", "|---|---|---|---|---|---|---|"]
    for split, m in result["splits"].items():
        lines.append(f"| {split} | {100 * m['accuracy']:.2f} | {100 * m['precision']:.2f} | {100 * m['recall']:.2f} "
                     f"| {100 * m['f1']:.2f} | {100 * m['yes_ratio']:.2f} | {m['count']}/{result['questions'][split]} |")
    if result["mean_f1"] is not None:
        lines.append(f"\nF1 averaged over the splits (the LLaVA-1.5 paper's POPE figure): {result['mean_f1']:.2f}"
                     f"; accuracy averaged: {result['mean_accuracy']:.2f}")
    return "\n".join(lines)
