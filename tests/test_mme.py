"""MME: its release folder read as questions, answers scored as the official tool, figures by hand."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from mlx_llava.eval import mme, read_answers, read_questions
from mlx_llava.eval.mme import parse_answer


@pytest.mark.parametrize("text, meaning", [
    ("Yes", "yes"), ("No", "no"), ("yes", "yes"),
    ("Yes, there is.", "yes"), ("no.", "no"), ("YES!", "yes"),  # yes/no within the first four characters
    ("Not sure", "no"),  # "not " holds "no"
    ("I think yes", "other"), ("Absolutely", "other"), ("", "other"),
    ("nyes", "yes"), ("noyes", "no"),  # "yes" is looked for first, in "noye" it is not there
])
def test_parse_answer(text, meaning):
    assert parse_answer(text) == meaning


PLEASE = " Please answer yes or no."
# subtask: {image stem: [(question, ground truth, the model's answer)]}
CASES = {
    "existence": {  # flat layout: images and question files side by side
        "e1": [("Is there a dog in this image?" + PLEASE, "Yes", "Yes"),  # right
               ("Is there a cat in this image?" + PLEASE, "No", "no.")],  # right
        "e2": [("Is there a car in this image? " + PLEASE, "Yes", "I think yes"),  # two spaces; other: wrong
               ("Is there a bus in this image?" + PLEASE, "No", "Not sure")],  # right
    },
    "artwork": {  # images/ + questions_answers_YN/
        "a1": [("Is this artwork created by Monet?" + PLEASE, "Yes", "YES!"),  # right
               ("Is this artwork created by Dali?" + PLEASE, "No", "Yes, it is.")],  # wrong
        "a2": [("Is this artwork titled Sunrise?" + PLEASE, "Yes", "Yes, there is."),  # right
               ("Is this artwork titled Night?" + PLEASE, "No", "No")],  # right
    },
    "code_reasoning": {
        "c1": [("Will this code print 3?" + PLEASE, "Yes", "Absolutely"),  # other: wrong
               ("Will this code print 4?" + PLEASE, "No", "no")],  # right
    },
}


def make_mme(root):
    """A small MME release folder in both of its layouts."""
    for task, images in CASES.items():
        folder = root / task
        image_dir, qa_dir = (folder / "images", folder / "questions_answers_YN") if task == "artwork" else (folder, folder)
        image_dir.mkdir(parents=True, exist_ok=True)
        qa_dir.mkdir(parents=True, exist_ok=True)
        for stem, rows in images.items():
            Image.new("RGB", (20, 16), (len(stem) * 40, 90, 30)).save(image_dir / f"{stem}.{'png' if stem == 'a2' else 'jpg'}")
            (qa_dir / f"{stem}.txt").write_text("".join(f"{q}\t{gt}\n" for q, gt, _ in rows))
    return root


@pytest.fixture
def release(tmp_path):
    return make_mme(tmp_path / "MME_Benchmark_release_version")


def test_questions_as_llava_asks_them(release):
    fmt, questions = read_questions(release)
    assert fmt == "mme" and len(questions) == 10
    by_id = {}
    for q in questions:
        by_id.setdefault(q.question_id, []).append(q)
    assert sorted(by_id) == ["artwork/a1.jpg", "artwork/a2.png", "code_reasoning/c1.jpg", "existence/e1.jpg",
                             "existence/e2.jpg"]
    first = by_id["artwork/a1.jpg"][0]
    assert first.text == "Is this artwork created by Monet?\nAnswer the question using a single word or phrase."
    assert first.prompt == first.text and first.image == "artwork/images/a1.jpg" and first.category == "artwork"
    assert by_id["existence/e2.jpg"][0].text.startswith("Is there a car in this image?\n")  # two spaces gone
    # One subtask's folder alone reads the same way.
    assert [q.question_id for q in read_questions(release / "existence")[1]] == ["existence/e1.jpg"] * 2 + ["existence/e2.jpg"] * 2


def answers_for(release):
    """The model's answers, each prompt as the answer line records it, in a shuffled order."""
    questions = read_questions(release)[1]
    texts = {(t, q): a for t, images in CASES.items() for rows in images.values() for q, _, a in rows}
    lines = []
    for q in questions:
        task = q.question_id.split("/")[0]
        original = next(k[1] for k in texts if k[0] == task and k[1].split("?")[0] == q.text.split("?")[0])
        lines.append({"question_id": q.question_id, "prompt": q.prompt, "text": texts[(task, original)],
                      "answer_id": "x", "model_id": "m", "metadata": {}})
    return lines[1::2] + lines[::2]  # the official tool would pair the wrong lines


def test_figures_by_hand(release, tmp_path):
    result = mme.score(answers_for(release), mme.read_ground_truth(release))
    existence, artwork, code = (result["subtasks"][k] for k in ("existence", "artwork", "code_reasoning"))
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == (75.0, 50.0, 125.0)
    assert (artwork["acc"], artwork["acc_plus"], artwork["score"]) == (75.0, 50.0, 125.0)
    assert (code["acc"], code["acc_plus"], code["score"]) == (50.0, 0.0, 50.0)
    assert (existence["other"], code["other"]) == (1, 1)
    assert result["totals"]["perception"]["score"] == 250.0 and not result["totals"]["perception"]["complete"]
    assert result["totals"]["cognition"]["score"] == 50.0
    assert list(result["subtasks"]) == ["existence", "artwork", "code_reasoning"]  # the official order
    text = mme.render(result)
    assert "=========== Perception ===========" in text and "\t existence  score: 125.0" in text


def test_partial_run(release):
    """Half an image answered: its question counts in acc, the image not in acc+."""
    answers = [a for a in answers_for(release) if a["question_id"] == "existence/e1.jpg"][:1]
    result = mme.score(answers, mme.read_ground_truth(release))
    assert result["subtasks"]["existence"] == {"questions": 1, "images": 0, "acc": 100.0, "acc_plus": 0.0,
                                               "score": 100.0, "other": 0, "asked": 4}


def test_cli(release, tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in answers_for(release)))
    run = subprocess.run([sys.executable, "-m", "mlx_llava.cli", "eval", "score", "mme", "--answers", str(path),
                          "--annotations", str(release), "--summary", str(tmp_path / "s.json")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "total score: 250.0" in run.stdout and "total score: 50.0" in run.stdout
    assert json.loads((tmp_path / "s.json").read_text())["main"] == 250.0
    assert read_answers(path)[0]["model_id"] == "m"
