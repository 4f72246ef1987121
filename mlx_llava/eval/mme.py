"""MME, scored as its official `calculation.py` after LLaVA's `convert_answer_to_mme.py`.

An answer, lower-cased, is "yes" or "no" when it is exactly that; else "yes"
when "yes" appears in its first four characters, else "no" when "no" does;
else "other" (always wrong). Per subtask: acc (questions right) and acc+
(images with both their questions right), its score acc*100 + acc+*100;
perception is the sum over its 10 subtasks (out of 2000), cognition over
its 4 (out of 800).

Each answer finds its ground truth as LLaVA's converter does: the subtask
and the question file from the question id (`subtask/image`), the question
from the recorded prompt (the short-answer instruction removed, "Please
answer yes or no." put back, with one or two spaces before it, whichever
the file has). The official tool pairs consecutive lines as an image's two
questions; here an image's questions are grouped by that key, so order does
not matter. A partial run is scored over the questions answered, acc+ over
the images with every question answered.

Files: the MME release folder (`MME_Benchmark_release_version/`, from the
MME authors on request) holds both the questions and their answers.
"""

from collections import defaultdict
from pathlib import Path

from ..errors import LlavaError
from .questions import MME_SUFFIX, SHORT_ANSWER, mme_subtasks

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_answer(text: str) -> str:
    """"yes", "no" or "other", as the official tool reads an answer."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def read_ground_truth(folder) -> dict:
    """{(subtask, question file, question): "yes"|"no"} from an MME release folder."""
    truth = {}
    for name, _, qa in mme_subtasks(Path(folder)):
        for txt in qa.glob("*.txt"):
            for line in txt.read_text().splitlines():
                if line.strip():
                    question, answer = line.strip().split("\t")
                    truth[(name, txt.name, question)] = answer.strip().lower()
    return truth


def lookup(truth: dict, question_id: str, prompt: str):
    """(subtask, question file, question key) of an answer, as LLaVA's converter finds it."""
    subtask = question_id.split("/")[0]
    file = question_id.split("/")[-1].split(".")[0] + ".txt"
    question = prompt
    if SHORT_ANSWER in question:
        question = question.replace(SHORT_ANSWER, "").strip()
    if MME_SUFFIX not in question:
        question = f"{question} {MME_SUFFIX}"
        if (subtask, file, question) not in truth:
            question = question.replace(f" {MME_SUFFIX}", f"  {MME_SUFFIX}")
    found = (subtask, file, question)
    if found not in truth:
        raise LlavaError(f"MME: no ground truth for {question_id!r} ({question!r})")
    return found


def score(answers: list, truth: dict) -> dict:
    per_image = defaultdict(list)  # (subtask, file) -> [(gt, parsed)]
    for a in answers:
        subtask, file, question = lookup(truth, str(a["question_id"]), a["prompt"])
        per_image[(subtask, file)].append((truth[(subtask, file, question)], parse_answer(a["text"])))
    asked = defaultdict(int)  # questions per image in the ground truth
    for subtask, file, _ in truth:
        asked[(subtask, file)] += 1
    subtasks = {}
    for name in sorted({s for s, _ in per_image}, key=_order):
        images = {k: v for k, v in per_image.items() if k[0] == name}
        pairs = [p for v in images.values() for p in v]
        complete = [v for k, v in images.items() if len(v) == asked[k]]
        acc = sum(gt == pred for gt, pred in pairs) / len(pairs)
        acc_plus = sum(all(gt == pred for gt, pred in v) for v in complete) / len(complete) if complete else 0.0
        subtasks[name] = {"questions": len(pairs), "images": len(complete), "acc": 100 * acc,
                          "acc_plus": 100 * acc_plus, "score": 100 * acc + 100 * acc_plus,
                          "other": sum(pred == "other" for _, pred in pairs),
                          "asked": sum(1 for s, _, _ in truth if s == name)}
    totals = {}
    for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [n for n in names if n in subtasks]
        if present:
            totals[group] = {"score": sum(subtasks[n]["score"] for n in present),
                             "complete": len(present) == len(names), "missing": [n for n in names if n not in subtasks]}
    return {"benchmark": "mme", "subtasks": subtasks, "totals": totals,
            "main": totals.get("perception", {}).get("score")}


def _order(name: str):
    order = PERCEPTION + COGNITION
    return (order.index(name) if name in order else len(order), name)


def render(result: dict) -> str:
    lines = []
    for group, names in (("Perception", PERCEPTION), ("Cognition", COGNITION)):
        total = result["totals"].get(group.lower())
        if total is None:
            continue
        lines.append(f"=========== {group} ===========")
        lines.append(f"total score: {total['score']}" + ("" if total["complete"] else
                     f"  (subtasks missing: {', '.join(total['missing'])})"))
        for name in names:
            if name in result["subtasks"]:
                lines.append(f"\t {name}  score: {result['subtasks'][name]['score']}")
    lines += ["", "| subtask | acc | acc+ | score | other | answered |", "|---|---|---|---|---|---|"]
    for name, s in result["subtasks"].items():
        lines.append(f"| {name} | {s['acc']:.2f} | {s['acc_plus']:.2f} | {s['score']:.2f} | {s['other']} "
                     f"| {s['questions']}/{s['asked']} |")
    return "\n".join(lines)
