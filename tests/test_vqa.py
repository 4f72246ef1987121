"""TextVQA, VQAv2, GQA: the standard normalisation and accuracies, figures by hand."""

import json
import subprocess
import sys

import pytest

from mlx_llava.eval import vqa
from mlx_llava.eval.vqa import normalize_answer, server_punctuation, soft_accuracy, textvqa_question


@pytest.mark.parametrize("text, normal", [
    ("Two dogs.", "2 dogs"),  # number words become digits, a final period goes
    ("The cat's toy", "cat 's toy"),  # articles go; "'s" is split off
    ("yes, it is", "yes it is"),  # commas go
    ("3.5", "3.5"),  # a period before a digit stays
    ("e-mail", "e mail"),  # a mark touching no space becomes a space
    ("left - right", "left right"),  # a mark touching a space is deleted
    ("dont", "don't"), ("What?", "what"), ("U.S.A.", "usa"), ("none", "0"), ("(hello)", "hello"),
    ("  Ten  Apples\n", "10 apples"),
    ("a" + "." * 40, "a" + "." * 8),  # the evaluators delete at most 32 periods
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_server_punctuation():
    assert server_punctuation("black, white") == "black white"  # a mark next to a space
    assert server_punctuation("black/white") == "black white"  # a mark between letters
    assert server_punctuation("1,000") == "1000"  # commas between digits
    assert server_punctuation("yes!") == "yes!"  # at the end, after a letter: kept (the server's rule)


def test_soft_accuracy():
    assert soft_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert soft_accuracy("3", ["2"] * 3 + ["3"] * 7) == 1.0
    assert soft_accuracy("5", ["5"] + ["x"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert soft_accuracy("4", ["2"] * 10) == 0.0


def test_textvqa_question_from_prompt():
    assert textvqa_question("What brand?\nReference OCR token: A, B\nAnswer the question using a single word or phrase.") == "what brand?"
    assert textvqa_question("Reference OCR token: A\nWhat brand?\nAnswer briefly.") == "what brand?"
    assert textvqa_question("What brand?\nAnswer the question using a single word or phrase.") == "what brand?"
    assert textvqa_question("OCR tokens: A B\nQuestion: Is it\nopen? Short answer:") == "is it\nopen?"


def line(qid, prompt, text):
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m", "metadata": {}}


def test_textvqa_by_hand(tmp_path):
    annotations = {"data": [
        {"image_id": "img1", "question_id": 1, "question": "What brand is this?",
         "answers": ["Sony"] * 4 + ["sony."] * 2 + ["Samsung"] * 4},
        {"image_id": "img2", "question_id": 2, "question": "What number is on the bus?",
         "answers": ["22"] * 2 + ["twenty two"] + ["23"] * 7},
        {"image_id": "img3", "question_id": 3, "question": "Is it open?", "answers": ["yes"] * 10},
    ]}
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps(annotations))
    answers = [
        line("img1", "what brand is this?\nReference OCR token: SONY\nAnswer the question using a single word or phrase.", "SONY."),
        line("img2", "what number is on the bus?\nAnswer the question using a single word or phrase.", "22"),
        line("img3", "OCR tokens: OPEN\nQuestion: Is it open? Short answer:", "No"),
    ]
    result = vqa.score_textvqa(answers, vqa.read_textvqa(path))
    # 1: "sony" six times, so every leave-one-out set holds >= 3: 1.0.
    # 2: "22" twice: leaving out a "22" leaves 1 match (1/3), else 2 (2/3): (2/3 + 16/3) / 10 = 0.6.
    # 3: no match: 0.
    assert result["accuracy"] == pytest.approx(100 * (1 + 0.6 + 0) / 3)
    assert vqa.render_textvqa(result) == "Samples: 3\nAccuracy: 53.33%"


def test_vqav2_by_hand(tmp_path):
    def ann(qid, answers, kind):
        return {"question_id": qid, "answer_type": kind, "question_type": "what",
                "answers": [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"} for i, a in enumerate(answers)]}

    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    path.write_text(json.dumps({"annotations": [
        ann(1, ["2"] * 10, "number"),
        ann(2, ["yes"] * 3 + ["no"] * 7, "yes/no"),
        ann(3, ["red"] * 2 + ["dark red"] * 8, "other"),
        ann(4, ["black and white"] * 3 + ["black, white"] + ["black/white"] * 6, "other"),
    ]}))
    answers = [line(1, "", "Two."), line(2, "", "no, it is not"), line(3, "", "Red"), line(4, "", "Black/White")]
    result = vqa.score_vqav2(answers, vqa.read_vqav2(path))
    # 1: "2" = all ten: 1.0. 2: "no it is not" matches none: 0. 3: (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    # 4: the human answers disagree, so "black, white" and "black/white" become "black white", as the
    #    prediction does: 7 matches, >= 3 in every leave-one-out set: 1.0.
    assert result["accuracy"] == pytest.approx(100 * (1 + 0 + 0.6 + 1) / 4)
    assert result["per_answer_type"] == pytest.approx({"number": 100.0, "other": 80.0, "yes/no": 0.0})


def test_gqa_by_hand(tmp_path):
    def q(answer, structural, semantic):
        return {"imageId": "n1", "question": "?", "answer": answer, "isBalanced": True,
                "types": {"structural": structural, "semantic": semantic, "detailed": "x"}}

    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps({"g1": q("yes", "verify", "obj"), "g2": q("left", "query", "rel"),
                                "g3": q("red", "query", "attr"), "g4": q("no", "logical", "obj"),
                                "g5": q("blue", "query", "attr")}))
    answers = [line("g1", "", "Yes."), line("g2", "", "Left"), line("g3", "", "The red one."),
               line("g4", "", "no.."), line("g5", "", " blue")]
    result = vqa.score_gqa(answers, vqa.read_gqa(path))
    # Trailing periods go and case is ignored, nothing else: g1, g2, g4 right.
    assert (result["accuracy"], result["binary"]) == (60.0, 100.0)
    assert result["open"] == pytest.approx(100 / 3)
    assert result["per_type"]["semantic/attr"] == (0.0, 2)


def test_cli_gqa(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"g1": {"imageId": "n1", "question": "?", "answer": "yes",
                                                        "types": {"structural": "verify", "semantic": "obj"}}}))
    (tmp_path / "a.jsonl").write_text(json.dumps(line("g1", "?", "Yes")) + "\n")
    run = subprocess.run([sys.executable, "-m", "mlx_llava.cli", "eval", "score", "gqa", "--answers",
                          str(tmp_path / "a.jsonl"), "--annotations", str(tmp_path / "q.json")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Accuracy: 100.00%" in run.stdout
