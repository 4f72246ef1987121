"""POPE scoring: the original's reading of an answer, figures by hand, answers matched by question."""

import json
import subprocess
import sys

import pytest

from mlx_llava.eval import pope, read_answers
from mlx_llava.eval.pope import parse_answer

SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.mark.parametrize("text, meaning", [
    ("Yes, there is a dog.", "yes"),
    ("No.", "no"),
    ("There is no car in the image.", "no"),  # "no" as a word anywhere in the first sentence
    ("The dog is not visible. Yes.", "no"),  # "not"
    ("Yes. There is no bus.", "yes"),  # only the first sentence counts
    ("I see a table,no cup", "yes"),  # commas are dropped, not spaced: "tableno"
    ("NO", "yes"), ("Nope", "yes"), ("no\nthere is none", "yes"),  # only "No", "no", "not", split on spaces
    ("no, it isn't", "no"),
])
def test_parse_answer(text, meaning):
    assert parse_answer(text) == meaning


# split: [(llava question id, image, question, label, the model's answer or None)]
CASES = {
    "random": [
        (101, "img1.jpg", "Is there a dog in the image?", "yes", "Yes, there is a dog."),  # TP
        (102, "img1.jpg", "Is there a cat in the image?", "no", "No."),  # TN
        (103, "img2.jpg", "Is there a car in the image?", "yes", "There is no car in the image."),  # FN
        (104, "img2.jpg", "Is there a bus in the image?", "no", "Yes. There is no bus."),  # FP
        (105, "img3.jpg", "Is there a cup in the image?", "yes", "I see a table,no cup"),  # TP
        (106, "img3.jpg", "Is there a fork in the image?", "no", "NO"),  # FP
    ],
    "popular": [
        (201, "img1.jpg", "Is there a person in the image?", "yes", "Nope"),  # TP
        (202, "img1.jpg", "Is there a chair in the image?", "no", "no, it isn't"),  # TN
        (203, "img4.jpg", "Is there a dog in the image?", "no", "The dog is not visible. Yes."),  # TN
        (204, "img4.jpg", "Is there a bed in the image?", "yes", "Yes"),  # TP
    ],
    "adversarial": [
        (301, "img1.jpg", "Is there a dog in the image?", "yes", "No"),  # FN; same question as 101, other split
        (302, "img5.jpg", "Is there a kite in the image?", "no", None),  # not answered
    ],
}


@pytest.fixture
def files(tmp_path):
    labels = tmp_path / "coco"
    labels.mkdir()
    questions, answers = [], []
    for split, rows in CASES.items():
        # POPE numbers each file's questions from 1; LLaVA's question file has its own ids.
        lines = [json.dumps({"question_id": i + 1, "image": img, "text": q, "label": label})
                 for i, (_, img, q, label, _) in enumerate(rows)]
        (labels / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
        for qid, img, q, _, text in rows:
            questions.append({"question_id": qid, "image": img, "text": q + SUFFIX, "category": split})
            if text is not None:
                answers.append({"question_id": qid, "prompt": q + SUFFIX, "text": text, "answer_id": str(qid),
                                "model_id": "m", "metadata": {}})
    (tmp_path / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    # Answers in another order than the labels: the original would pair them wrongly.
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers[::-1]))
    return tmp_path


def test_figures_by_hand(files):
    questions = [json.loads(l) for l in (files / "llava_pope_test.jsonl").read_text().splitlines()]
    result = pope.score(read_answers(files / "answers.jsonl"), questions, pope.read_labels(files / "coco"))
    assert list(result["splits"]) == ["random", "popular", "adversarial"]
    random, popular, adversarial = result["splits"].values()
    assert (random["TP"], random["FP"], random["TN"], random["FN"]) == (2, 2, 1, 1)
    assert random["accuracy"] == pytest.approx(3 / 6) and random["precision"] == pytest.approx(2 / 4)
    assert random["recall"] == pytest.approx(2 / 3) and random["f1"] == pytest.approx(4 / 7)
    assert random["yes_ratio"] == pytest.approx(4 / 6)
    assert (popular["TP"], popular["FP"], popular["TN"], popular["FN"]) == (2, 0, 2, 0)
    assert popular["accuracy"] == popular["precision"] == popular["recall"] == popular["f1"] == 1.0
    assert popular["yes_ratio"] == 0.5
    # One answered question, answered wrongly: no "yes" at all, so precision is 0 (the original divides by 0).
    assert (adversarial["count"], adversarial["FN"], adversarial["precision"], adversarial["f1"]) == (1, 1, 0.0, 0.0)
    assert result["mean_f1"] == pytest.approx(100 * (4 / 7 + 1 + 0) / 3)
    assert result["questions"] == {"random": 6, "popular": 4, "adversarial": 2}
    text = pope.render(result)
    assert "Category: random, # samples: 6" in text and "2\t2\t1\t1" in text
    assert "| adversarial | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 1/2 |" in text


def test_unknown_question_is_an_error(files):
    from mlx_llava.errors import LlavaError

    questions = [json.loads(l) for l in (files / "llava_pope_test.jsonl").read_text().splitlines()]
    stray = [{"question_id": 999, "prompt": "?", "text": "yes"}]
    with pytest.raises(LlavaError, match="999"):
        pope.score(stray, questions, pope.read_labels(files / "coco"))


def test_cli(files):
    run = subprocess.run([sys.executable, "-m", "mlx_llava.cli", "eval", "score", "pope",
                          "--answers", str(files / "answers.jsonl"), "--questions", str(files / "llava_pope_test.jsonl"),
                          "--annotations", str(files / "coco")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "F1 averaged over the splits (the LLaVA-1.5 paper's POPE figure): 52.38" in run.stdout
    assert json.loads((files / "answers.score.json").read_text())["main"] == pytest.approx(100 * 11 / 21)
