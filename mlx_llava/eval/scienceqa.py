"""ScienceQA, scored as the original's `eval_science_qa.py`, with the ScienceQA paper's table.

An answer counts only in one of the forms the original accepts: the bare
letter ("B"); the letter, a period and a space at the start ("B. Paris");
or exactly one match of `The answer is X.` anywhere, where the last
character may be any one (the original's pattern leaves the period
unescaped). Anything else, a letter beyond the problem's choices, or no
answer at all is wrong. "IMG" is as the original prints it: over answers
whose recorded prompt holds `<image>`. The ScienceQA paper's columns
(subject, context modality, grade) come from `problems.json`, as its own
`evaluate_acc.py` computes them.

Files: `problems.json` and `pid_splits.json` from ScienceQA's `data/scienceqa`.
"""

import json
import re
from pathlib import Path

from ..conversation import IMAGE_PLACEHOLDER
from ..errors import LlavaError

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # "." unescaped, as in the original

# The paper's table: column -> which problems it covers.
COLUMNS = {
    "NAT": lambda p: p["subject"] == "natural science",
    "SOC": lambda p: p["subject"] == "social science",
    "LAN": lambda p: p["subject"] == "language science",
    "TXT": lambda p: bool(p.get("hint")),
    "IMG": lambda p: bool(p.get("image")),
    "NO": lambda p: not p.get("hint") and not p.get("image"),
    "G1-6": lambda p: p.get("grade") in {f"grade{g}" for g in range(1, 7)},
    "G7-12": lambda p: p.get("grade") in {f"grade{g}" for g in range(7, 13)},
}


def parse_answer(text: str) -> str:
    """The letter an answer gives, or "FAILED"."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def choice_index(letter: str, choices: list) -> int:
    """0-based choice, or -1 when the letter is not among this problem's options."""
    return OPTIONS.index(letter) if letter in OPTIONS[: len(choices)] else -1


def read_annotations(folder, split: str = "test") -> dict:
    """{problem id: problem} of a split, from a folder with problems.json and pid_splits.json."""
    folder = Path(folder)
    try:
        problems = json.loads((folder / "problems.json").read_text())
        splits = json.loads((folder / "pid_splits.json").read_text())
    except FileNotFoundError as e:
        raise LlavaError(f"ScienceQA: {e.filename} not found (download problems.json and pid_splits.json)") from None
    if split not in splits:
        raise LlavaError(f"ScienceQA: no split {split!r} in pid_splits.json ({', '.join(splits)})")
    return {pid: problems[pid] for pid in splits[split]}


def score(answers: list, problems: dict) -> dict:
    """`answers`: answer lines; `problems`: {id: problem} of the split scored."""
    by_id = {str(a["question_id"]): a for a in answers}
    rows = []
    for pid, problem in problems.items():
        answer = by_id.get(pid)
        text = answer["text"] if answer else FAILED
        prompt = answer["prompt"] if answer else "Unknown"
        parsed = parse_answer(text)
        rows.append({
            "question_id": pid,
            "parsed": parsed,
            "correct": choice_index(parsed, problem["choices"]) == problem["answer"],
            "multimodal": IMAGE_PLACEHOLDER in prompt,
            "problem": problem,
        })
    correct = sum(r["correct"] for r in rows)
    multimodal = [r for r in rows if r["multimodal"]]
    table = {}
    for name, covers in COLUMNS.items():
        chosen = [r for r in rows if covers(r["problem"])]
        table[name] = _percent(sum(r["correct"] for r in chosen), len(chosen))
    table["Avg"] = _percent(correct, len(rows))
    return {
        "benchmark": "scienceqa",
        "count": len(rows),
        "correct": correct,
        "answered": sum(1 for pid in problems if pid in by_id),
        "accuracy": _percent(correct, len(rows)),
        "img_accuracy": _percent(sum(r["correct"] for r in multimodal), len(multimodal)),
        "failed_to_parse": sum(r["parsed"] == FAILED for r in rows if r["question_id"] in by_id),
        "table": table,
        "main": _percent(correct, len(rows)),
    }


def _percent(k: int, n: int):
    return round(100 * k / n, 2) if n else None


def render(result: dict) -> str:
    """The original's line, then the paper's table."""
    r = result
    img = "n/a" if r["img_accuracy"] is None else f"{r['img_accuracy']:.2f}%"
    head = f"Total: {r['count']}, Correct: {r['correct']}, Accuracy: {r['accuracy']:.2f}%, IMG-Accuracy: {img}"
    names = list(r["table"])
    cells = ["n/a" if r["table"][n] is None else f"{r['table'][n]:.2f}" for n in names]
    lines = [head, "", "| " + " | ".join(names) + " |", "|---" * len(names) + "|", "| " + " | ".join(cells) + " |"]
    if r["answered"] < r["count"]:
        lines.append(f"\n{r['count'] - r['answered']} of {r['count']} problems have no answer: counted wrong, as the original does")
    return "\n".join(lines)
