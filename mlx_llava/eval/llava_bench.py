"""LLaVA-Bench (in-the-wild and COCO), judged as the original's `eval_gpt_review_*.py`.

For each question a judge model reads, in one user turn under the
original's system message: the image's context (in-the-wild: its caption;
COCO: its five captions, a blank line, then `category: [x1, y1, x2, y2]`
per box), the question, the reference answer (GPT-4's) as Assistant 1 and
the model's as Assistant 2, then the reviewer prompt of the question's
category from the original's rule file (`llava_bench_<category>` for
in-the-wild, `<category>` for COCO), with that rule's role name. The judge
is asked at temperature 0.2 for up to 1024 tokens. Its reply's first line,
commas read as spaces and split on single spaces, must be exactly two
numbers (the two scores); anything else is a malformed reply, recorded as
[-1, -1] as the original records it, counted and reported, never fatal.

The summary is the original's `summarize_gpt_review.py`: per category and
overall, the mean score of each assistant and the relative score
mean(Assistant 2) / mean(Assistant 1) * 100. The judge's model name is part
of the result: the paper's figures come from GPT-4 (gpt-4-0314), and
scores from any other judge are not comparable to them.

Reviews are appended one JSON line at a time, in the original's form
(`{id, question_id, answer1_id, answer2_id, category, content, tuple}`
plus the judge's name), so an interrupted run continues with the questions
not yet reviewed. Answers are matched to questions by question id.

Files (in-the-wild, from huggingface.co/datasets/liuhaotian/llava-bench-in-the-wild):
`questions.jsonl`, `context.jsonl`, `answers_gpt4.jsonl`, `images/`; COCO:
`qa90_questions.jsonl`, `qa90_gpt4_answer.jsonl` (the original repository's
`playground/data/coco2014_val_qa_eval/`) and `caps_boxes_coco2014_val_80.jsonl`
(its `llava/eval/table/`); both: the rule file `llava/eval/table/rule.json`.
"""

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Optional

from ..errors import LlavaError
from .answer import key, read_answers, read_lines
from .questions import read_jsonl

SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
TEMPERATURE = 0.2
MAX_TOKENS = 1024
MALFORMED = [-1.0, -1.0]


def parse_scores(review: str) -> list:
    """[score 1, score 2] from the judge's first line, or [-1, -1] (malformed)."""
    first = review.split("\n")[0].replace(",", " ")
    parts = first.split(" ")
    if len(parts) != 2:
        return list(MALFORMED)
    try:
        return [float(parts[0]), float(parts[1])]
    except ValueError:
        return list(MALFORMED)


def context_text(context: dict, coco: bool) -> str:
    """What the judge is told about the image."""
    if coco:
        boxes = "\n".join(f"{i['category']}: {i['bbox']}" for i in context["instances"])
        return "\n".join(context["captions"]) + "\n\n" + boxes
    caption = context["caption"]
    return "\n".join(caption) if isinstance(caption, list) else caption


def judge_request(question: dict, context: dict, reference: str, answer: str, rules: dict, coco: bool) -> tuple:
    """(rule category, messages) for one question."""
    category = question["category"] if coco else f"llava_bench_{question['category']}"
    if category not in rules:
        raise LlavaError(f"LLaVA-Bench: category {category!r} is not in the rule file")
    rule = rules[category]
    role, prompt = rule["role"], rule["prompt"]
    content = (f"[Context]\n{context_text(context, coco)}\n\n"
               f"[Question]\n{question['text']}\n\n"
               f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
               f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
               f"[System]\n{prompt}\n\n")
    return category, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def review(questions_file, context_file, reference_file, answers_file, rule_file, output, judge,
           judge_name: str, coco: Optional[bool] = None, retry_malformed: bool = False, progress=None) -> list:
    """Ask `judge` (called as `judge(messages, max_tokens=, temperature=)` returning a
    reply with `.text`, e.g. `datagen.teacher.OpenAITeacher`) about every answered
    question not yet in `output`; returns all the reviews in question order."""
    questions = read_jsonl(questions_file)
    contexts = {c["image"]: c for c in read_jsonl(context_file)}
    coco = ("instances" in next(iter(contexts.values()), {})) if coco is None else coco
    references = {key(a["question_id"]): a for a in read_jsonl(reference_file)}
    answers = {key(a["question_id"]): a for a in read_answers(answers_file)}
    try:
        rules = json.loads(Path(rule_file).read_text())
    except FileNotFoundError:
        raise LlavaError(f"rule file not found: {rule_file} (the original's llava/eval/table/rule.json)") from None
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    for r in read_lines(output, ("question_id", "tuple"), "a review line", repair=True):
        if r.get("judge", judge_name) != judge_name:
            raise LlavaError(f"{output} holds reviews by judge {r.get('judge')!r}, not {judge_name!r}: use another --reviews file")
        if not (retry_malformed and r["tuple"] == MALFORMED):
            done[key(r["question_id"])] = r
    missing_refs = [q["question_id"] for q in questions if key(q["question_id"]) not in references]
    if missing_refs:
        raise LlavaError(f"LLaVA-Bench: no reference answer for questions {missing_refs[:5]}")
    reviews = []
    with open(output, "ab", buffering=0) as out:
        for index, q in enumerate(questions):
            k = key(q["question_id"])
            if k in done:
                reviews.append(done[k])
                continue
            if k not in answers:
                continue
            if q["image"] not in contexts:
                raise LlavaError(f"LLaVA-Bench: no context for image {q['image']!r}")
            category, messages = judge_request(q, contexts[q["image"]], references[k]["text"], answers[k]["text"],
                                               rules, coco)
            text = judge(messages, max_tokens=MAX_TOKENS, temperature=TEMPERATURE).text
            reference, answer = references[k], answers[k]
            row = {"id": index + 1, "question_id": q["question_id"],
                   "answer1_id": reference.get("answer_id", reference["question_id"]),
                   "answer2_id": answer.get("answer_id", answer["question_id"]), "category": category,
                   "content": text, "tuple": parse_scores(text), "judge": judge_name}
            out.write((json.dumps(row) + "\n").encode())
            reviews.append(row)
            if progress:
                progress(row)
        os.fsync(out.fileno())
    return reviews


def summarize(reviews: list, judge_name: str, questions: Optional[int] = None) -> dict:
    """The original's summary: per category and "all", (relative score, mean 1 x10, mean 2 x10)."""
    scores = defaultdict(list)
    for r in reviews:
        scores[r["category"]].append(r["tuple"])
        scores["all"].append(r["tuple"])
    table = {}
    for category, pairs in sorted(scores.items()):
        mean1 = sum(p[0] for p in pairs) / len(pairs)
        mean2 = sum(p[1] for p in pairs) / len(pairs)
        table[category] = {"relative": round(mean2 / mean1 * 100, 1) if mean1 else None,
                           "assistant1": round(mean1 * 10, 1), "assistant2": round(mean2 * 10, 1),
                           "count": len(pairs)}
    return {"benchmark": "llava-bench", "judge": judge_name, "reviews": len(reviews), "questions": questions,
            "malformed": sum(r["tuple"] == MALFORMED for r in reviews), "categories": table,
            "main": table.get("all", {}).get("relative")}


def render(result: dict) -> str:
    lines = [f"judge: {result['judge']}" + ("" if result["judge"].startswith("gpt-4-0314") else
             "  (the paper's figures are GPT-4's, gpt-4-0314: scores from another judge are not comparable)")]
    for category, row in result["categories"].items():
        lines.append(f"{category} {row['relative']} {row['assistant1']} {row['assistant2']}")
    lines += ["", "| category | relative score | reference (x10) | model (x10) | reviews |", "|---|---|---|---|---|"]
    for category, row in result["categories"].items():
        lines.append(f"| {category} | {row['relative']} | {row['assistant1']} | {row['assistant2']} | {row['count']} |")
    if result["malformed"]:
        lines.append(f"\n{result['malformed']} judge replies were malformed (first line not two scores): "
                     "recorded as -1 -1 and averaged in, as the original does; --retry-malformed asks again")
    if result["questions"] is not None and result["reviews"] < result["questions"]:
        lines.append(f"{result['reviews']} of {result['questions']} questions reviewed")
    return "\n".join(lines)
