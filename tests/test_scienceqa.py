"""ScienceQA scoring: every answer form the original accepts or refuses, figures by hand."""

import json
import subprocess
import sys

import pytest

from mlx_llava.eval import scienceqa
from mlx_llava.eval.scienceqa import FAILED, parse_answer


@pytest.mark.parametrize("text, letter", [
    ("A", "A"),  # a bare letter
    ("E", "E"),
    ("B. Paris is the capital", "B"),  # "X. " at the start
    ("The sky is blue. The answer is C.", "C"),  # exactly one "The answer is X."
    ("The answer is Dx", "D"),  # the original's period is any character
    ("The answer is A. No wait. The answer is B.", FAILED),  # two matches
    ("The answer is A. No wait, the answer is B.", "A"),  # case matters: one match
    ("(A)", FAILED), ("a", FAILED), ("A.", FAILED), ("AB", FAILED), ("", FAILED),
    ("Answer: B", FAILED), ("F", FAILED), ("The answer is b.", FAILED),
])
def test_parse_answer(text, letter):
    assert parse_answer(text) == letter


# id: (choices, answer, subject, hint, image, grade, the model's answer or None)
PROBLEMS = {
    "1": (3, 0, "natural science", "", "image.png", "grade2", "A"),
    "2": (2, 1, "natural science", "a hint", None, "grade8", "B. two"),
    "3": (4, 2, "social science", "hint", "image.png", "grade5", "Because of that. The answer is C."),
    "4": (2, 1, "social science", "", None, "grade10", "The answer is A. No. The answer is B."),
    "5": (3, 0, "language science", "", None, "grade3", "D"),  # a letter beyond the 3 choices
    "6": (2, 0, "language science", "hint", None, "grade7", "(A)"),
    "7": (2, 1, "natural science", "", "image.png", "grade12", "The answer is Bx"),
    "8": (2, 0, "natural science", "", "image.png", "grade1", None),  # never answered
    "9": (2, 0, "social science", "", "image.png", "grade6", "a"),
    "10": (2, 0, "language science", "", None, "grade9", "A."),
    "11": (2, 0, "natural science", "", None, "grade1", "A"),  # a train problem: not scored
}


@pytest.fixture
def files(tmp_path):
    problems, answers = {}, []
    for pid, (n, answer, subject, hint, image, grade, text) in PROBLEMS.items():
        problems[pid] = {"question": f"Q{pid}?", "choices": [f"c{i}" for i in range(n)], "answer": answer,
                         "hint": hint, "image": image, "subject": subject, "grade": grade,
                         "split": "train" if pid == "11" else "test"}
        if text is not None:
            prompt = ("<image>\n" if image else "") + f"Q{pid}?\nAnswer with the option's letter from the given choices directly."
            answers.append({"question_id": pid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m",
                            "metadata": {}})
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": [str(i) for i in range(1, 11)], "train": ["11"]}))
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in reversed(answers)))  # order does not matter
    return tmp_path, path


def test_figures_by_hand(files):
    folder, path = files
    from mlx_llava.eval import read_answers

    result = scienceqa.score(read_answers(path), scienceqa.read_annotations(folder))
    # Right: 1 (bare letter), 2 ("B. "), 3 (one "The answer is C."), 7 ("The answer is Bx").
    assert (result["count"], result["correct"], result["accuracy"]) == (10, 4, 40.0)
    # The original's IMG: answers whose prompt holds <image> (1, 3, 7, 9): 3 of 4.
    assert result["img_accuracy"] == 75.0
    # The paper's table: IMG counts problem 8 too (it has an image, but no answer).
    assert result["table"] == {"NAT": 75.0, "SOC": 33.33, "LAN": 0.0, "TXT": 66.67, "IMG": 60.0, "NO": 0.0,
                               "G1-6": 40.0, "G7-12": 40.0, "Avg": 40.0}
    assert result["answered"] == 9 and result["failed_to_parse"] == 4  # 4, 6, 9, 10 ("D" parses, to a letter out of range)
    text = scienceqa.render(result)
    assert text.splitlines()[0] == "Total: 10, Correct: 4, Accuracy: 40.00%, IMG-Accuracy: 75.00%"
    assert "1 of 10 problems have no answer" in text


def test_cli(files, tmp_path):
    folder, path = files
    run = subprocess.run([sys.executable, "-m", "mlx_llava.cli", "eval", "score", "scienceqa", "--answers", str(path),
                          "--annotations", str(folder)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Total: 10, Correct: 4, Accuracy: 40.00%, IMG-Accuracy: 75.00%" in run.stdout
    summary = json.loads((tmp_path / "answers.score.json").read_text())
    assert summary["benchmark"] == "scienceqa" and summary["model"] == "m" and summary["main"] == 40.0
    missing = subprocess.run([sys.executable, "-m", "mlx_llava.cli", "eval", "score", "scienceqa", "--answers",
                              str(path), "--annotations", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert missing.returncode == 1 and "problems.json not found" in missing.stderr
