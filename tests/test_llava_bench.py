"""LLaVA-Bench: the original's judge protocol against an OpenAI-compatible server on loopback."""

import json
import os
import subprocess
import sys

import pytest

from endpoint import Endpoint

from mlx_llava.datagen.teacher import OpenAITeacher
from mlx_llava.eval import llava_bench
from mlx_llava.eval.llava_bench import SYSTEM, parse_scores


@pytest.mark.parametrize("reply, scores", [
    ("8 6\nAssistant 2 misses the dog.", [8.0, 6.0]),
    ("7,7\nBoth fine.", [7.0, 7.0]),  # a comma is read as a space
    ("8.5 9", [8.5, 9.0]),
    ("Score: 9 10\n...", [-1.0, -1.0]),  # three words
    ("8, 9", [-1.0, -1.0]),  # ", " becomes two spaces: three parts, as in the original
    ("eight nine", [-1.0, -1.0]), ("", [-1.0, -1.0]), ("\n8 9", [-1.0, -1.0]),
])
def test_parse_scores(reply, scores):
    assert parse_scores(reply) == scores


RULES = {  # the rule file's shape; the prompts are this test's own
    "llava_bench_conv": {"role": "Assistant", "prompt": "Rate the conversation answers."},
    "llava_bench_detail": {"role": "Assistant", "prompt": "Rate the descriptions."},
    "llava_bench_complex": {"role": "Helper", "prompt": "Rate the reasoning."},
    "conv": {"role": "Assistant", "prompt": "COCO conversation rule."},
}
# question id: (image, category, question, reference answer, model answer, the judge's reply)
CASES = {
    0: ("a.jpg", "conv", "What is this?", "A dog.", "A cat.", "8 6\nThe second is wrong."),
    1: ("a.jpg", "detail", "Describe it.", "A brown dog on grass.", "A dog.", "7,7\nBoth short."),
    2: ("b.jpg", "complex", "Why is it here?", "It is a park.", "Because.", "Score: 9 10\nmalformed"),
    3: ("b.jpg", "conv", "How many?", "Two.", "Two dogs.", "6 9\nThe second is better."),
}


class Judge(Endpoint):
    """An OpenAI-style /v1/chat/completions on 127.0.0.1 answering each question's scripted reply."""

    def __init__(self, key="sk-test", lifetime=120):
        self.requests, self.key = [], key
        super().__init__(lifetime)

    def answer(self, path, auth, body):
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": "not found"}}
        if auth != f"Bearer {self.key}":
            return 401, {"error": {"message": "bad key"}}
        self.requests.append(body)
        question = body["messages"][1]["content"].split("[Question]\n")[1].split("\n\n")[0]
        reply = next(c[5] for c in CASES.values() if c[2] == question)
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                  "finish_reason": "stop"}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def bench(tmp_path):
    files = {
        "questions": write_jsonl(tmp_path / "questions.jsonl", [
            {"question_id": q, "image": c[0], "text": c[2], "category": c[1]} for q, c in CASES.items()]),
        "context": write_jsonl(tmp_path / "context.jsonl", [
            {"id": "a", "image": "a.jpg", "caption": "A dog on grass."},
            {"id": "b", "image": "b.jpg", "caption": ["Two dogs.", "In a park."]}]),
        "reference": write_jsonl(tmp_path / "answers_gpt4.jsonl", [
            {"question_id": q, "text": c[3], "answer_id": f"gpt4-{q}"} for q, c in CASES.items()]),
        # The model's answers, in another order than the questions.
        "answers": write_jsonl(tmp_path / "answers.jsonl", [
            {"question_id": q, "prompt": c[2], "text": c[4], "answer_id": f"m-{q}", "model_id": "m", "metadata": {}}
            for q, c in reversed(list(CASES.items()))]),
        "rule": tmp_path / "rule.json",
    }
    files["rule"].write_text(json.dumps(RULES))
    return files


def run_review(bench, judge, output, **kwargs):
    return llava_bench.review(bench["questions"], bench["context"], bench["reference"], bench["answers"],
                              bench["rule"], output, judge, "judge-1", **kwargs)


def test_protocol_and_summary(bench, tmp_path):
    with Judge() as server:
        judge = OpenAITeacher(server.url, "judge-1", api_key="sk-test", retries=0)
        reviews = run_review(bench, judge, tmp_path / "reviews.jsonl")
    assert len(server.requests) == 4
    first = server.requests[0]
    assert first["model"] == "judge-1" and first["temperature"] == 0.2 and first["max_tokens"] == 1024
    assert first["messages"][0] == {"role": "system", "content": SYSTEM}
    assert first["messages"][1]["content"] == (
        "[Context]\nA dog on grass.\n\n[Question]\nWhat is this?\n\n"
        "[Assistant 1]\nA dog.\n\n[End of Assistant 1]\n\n[Assistant 2]\nA cat.\n\n[End of Assistant 2]\n\n"
        "[System]\nRate the conversation answers.\n\n")
    third = server.requests[2]["messages"][1]["content"]  # a list caption, and the rule's own role name
    assert third.startswith("[Context]\nTwo dogs.\nIn a park.\n\n") and "[Helper 1]\nIt is a park.\n\n[End of Helper 1]" in third
    assert [r["tuple"] for r in reviews] == [[8.0, 6.0], [7.0, 7.0], [-1.0, -1.0], [6.0, 9.0]]
    assert reviews[0] == {"id": 1, "question_id": 0, "answer1_id": "gpt4-0", "answer2_id": "m-0",
                          "category": "llava_bench_conv", "content": "8 6\nThe second is wrong.",
                          "tuple": [8.0, 6.0], "judge": "judge-1"}
    result = llava_bench.summarize(reviews, "judge-1", 4)
    # conv: (8, 6) and (6, 9): means 7 and 7.5; detail (7, 7); complex: the malformed (-1, -1), averaged in.
    assert result["categories"] == {
        "all": {"relative": 105.0, "assistant1": 50.0, "assistant2": 52.5, "count": 4},
        "llava_bench_complex": {"relative": 100.0, "assistant1": -10.0, "assistant2": -10.0, "count": 1},
        "llava_bench_conv": {"relative": 107.1, "assistant1": 70.0, "assistant2": 75.0, "count": 2},
        "llava_bench_detail": {"relative": 100.0, "assistant1": 70.0, "assistant2": 70.0, "count": 1},
    }
    assert result["malformed"] == 1 and result["judge"] == "judge-1" and result["main"] == 105.0
    text = llava_bench.render(result)
    assert "not comparable" in text and "1 judge replies were malformed" in text
    assert "llava_bench_conv 107.1 70.0 75.0" in text


def test_coco_context(bench, tmp_path):
    context = write_jsonl(tmp_path / "caps_boxes.jsonl", [
        {"id": "a", "image": "a.jpg", "captions": ["A dog.", "A brown dog."],
         "instances": [{"category": "dog", "bbox": [0.1, 0.25, 0.5, 1.0]}, {"category": "ball", "bbox": [0.0, 0.0, 0.2, 0.2]}]}])
    category, messages = llava_bench.judge_request({"question_id": 0, "image": "a.jpg", "text": "Q?", "category": "conv"},
                                                   json.loads(context.read_text().splitlines()[0]), "R", "M", RULES, coco=True)
    assert category == "conv"
    assert messages[1]["content"].startswith(
        "[Context]\nA dog.\nA brown dog.\n\ndog: [0.1, 0.25, 0.5, 1.0]\nball: [0.0, 0.0, 0.2, 0.2]\n\n[Question]\nQ?\n\n")


def test_resume_after_an_interruption(bench, tmp_path):
    output = tmp_path / "reviews.jsonl"
    with Judge() as server:
        judge = OpenAITeacher(server.url, "judge-1", api_key="sk-test", retries=0)
        calls = []

        def interrupted(messages, **kw):
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(1)
            return judge(messages, **kw)

        with pytest.raises(KeyboardInterrupt):
            run_review(bench, interrupted, output)
        assert len(output.read_text().splitlines()) == 2
        with open(output, "ab") as f:
            f.write(b'{"id": 3, "question_id": 2, "cont')  # a line cut short by the kill
        reviews = run_review(bench, judge, output)
        assert len(server.requests) == 4  # 2 before, the 2 missing after: none asked twice
        assert [r["question_id"] for r in reviews] == [0, 1, 2, 3]
        assert len(output.read_text().splitlines()) == 4
        # Ask again where the reply was malformed: only that question.
        again = run_review(bench, judge, output, retry_malformed=True)
        assert len(server.requests) == 5 and [r["question_id"] for r in again] == [0, 1, 2, 3]
        # Another judge's reviews are never mixed into this file.
        from mlx_llava.errors import LlavaError

        with pytest.raises(LlavaError, match="judge-1"):
            llava_bench.review(bench["questions"], bench["context"], bench["reference"], bench["answers"],
                               bench["rule"], output, judge, "judge-2")


def test_cli(bench, tmp_path):
    with Judge(key="sk-cli") as server:
        env = {**os.environ, "JUDGE_KEY": "sk-cli"}
        run = subprocess.run([sys.executable, "-m", "mlx_llava.cli", "eval", "score", "llava-bench",
                              "--answers", str(bench["answers"]), "--questions", str(bench["questions"]),
                              "--context", str(bench["context"]), "--reference", str(bench["reference"]),
                              "--rule", str(bench["rule"]), "--judge-url", server.url, "--judge-model", "judge-1",
                              "--api-key-env", "JUDGE_KEY"], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert "all 105.0 50.0 52.5" in run.stdout and "judge: judge-1" in run.stdout
    summary = json.loads((tmp_path / "answers.score.json").read_text())
    assert summary["judge"] == "judge-1" and summary["main"] == 105.0 and summary["reviews"] == 4
    assert summary["reviews_file"].endswith("answers.reviews-judge-1.jsonl") and summary["malformed"] == 1
    assert (tmp_path / "answers.reviews-judge-1.jsonl").is_file()
