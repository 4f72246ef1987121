"""Answering question files: the original's formats and answer lines, batches, resume, report."""

import json
import subprocess
import sys

import pytest
from PIL import Image

import mlx_llava
from mlx_llava import generate
from mlx_llava.errors import LlavaError
from mlx_llava.eval import answer, read_answers, read_questions
from mlx_llava.eval.answer import load_eval_image

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for k in range(4):
        image = Image.new("RGBA", (30 + 4 * k, 24), (60 * k, 200, 40, 255))
        image.paste((0, 0, 0, 0), (2, 2, 10, 10))  # transparent, black underneath
        image.save(folder / f"{k}.png")
    return folder


def write(path, rows, jsonl=True):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return path


def test_llava_jsonl(tmp_path):
    path = write(tmp_path / "q.jsonl", [{"question_id": 7, "image": "0.png", "text": "Is it red?\n" + SHORT,
                                         "category": "random"}, {"question_id": "x", "text": "Hi"}])
    fmt, questions = read_questions(path)
    assert fmt == "llava"
    assert (questions[0].question_id, questions[0].image, questions[0].prompt) == (7, "0.png", "Is it red?\n" + SHORT)
    assert questions[1].image is None and questions[1].text == "Hi"
    fmt, questions = read_questions(path, single_pred_prompt=True)
    assert questions[0].text.endswith(f"{SHORT}\n{LETTER}")


def test_scienceqa_json(tmp_path):
    path = write(tmp_path / "llava_test_CQM-A.json", [
        {"id": "4", "image": "4/image.png", "conversations": [{"from": "human", "value": "Which is hot?\nA. sun\nB. ice\n<image>"},
                                                              {"from": "gpt", "value": "A"}]},
        {"id": "5", "conversations": [{"from": "human", "value": "  Pick one.\nA. x\nB. y "}, {"from": "gpt", "value": "B"}]},
    ], jsonl=False)
    fmt, (with_image, text_only) = read_questions(path)
    assert fmt == "scienceqa"
    # model_vqa_science.py: <image> removed and the text stripped; the letter instruction on by default.
    assert with_image.text == f"Which is hot?\nA. sun\nB. ice\n{LETTER}"
    assert with_image.prompt == f"<image>\nWhich is hot?\nA. sun\nB. ice\n{LETTER}" and with_image.image == "4/image.png"
    assert text_only.text == text_only.prompt == f"Pick one.\nA. x\nB. y\n{LETTER}" and text_only.image is None
    assert read_questions(path, single_pred_prompt=False)[1][1].text == "Pick one.\nA. x\nB. y"


def test_official_vqav2_and_gqa_questions(tmp_path):
    v = write(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
              {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "What?", "question_id": 420}]}, jsonl=False)
    fmt, (q,) = read_questions(v)
    assert (fmt, q.question_id, q.image, q.text) == ("vqav2", 420, "COCO_val2014_000000000042.jpg", f"What?\n{SHORT}")
    g = write(tmp_path / "testdev_balanced_questions.json", {"2013": {"imageId": "n1", "question": "Is it?", "answer": "no"}},
              jsonl=False)
    fmt, (q,) = read_questions(g)
    assert (fmt, q.question_id, q.image, q.text) == ("gqa", "2013", "n1.jpg", f"Is it?\n{SHORT}")


def test_unknown_files(tmp_path):
    with pytest.raises(LlavaError, match="not found"):
        read_questions(tmp_path / "nothing.jsonl")
    with pytest.raises(LlavaError, match="not a question file"):
        read_questions(write(tmp_path / "x.json", {"a": 1}, jsonl=False))


def test_images_read_as_the_original_reads_them(images):
    """PIL's convert("RGB"): alpha dropped (what hides under it shows), not composited on white."""
    image = load_eval_image(images / "1.png")
    assert image.mode == "RGB" and image.getpixel((4, 4)) == (0, 0, 0)
    assert mlx_llava.image.load_image(images / "1.png").getpixel((4, 4)) == (255, 255, 255)  # what chat does
    with pytest.raises(LlavaError, match="image not found"):
        load_eval_image(images / "missing.png")


@pytest.fixture
def questions_file(tmp_path):
    rows = [{"question_id": i, "image": f"{i % 4}.png", "text": q, "category": "c"}
            for i, q in enumerate(["What is in the image?", "Describe the image briefly.", "How many objects are there?",
                                   "Where is the star?", "What color is the triangle?", "Hello"])]
    del rows[-1]["image"]  # a text-only question (ScienceQA has them)
    return write(tmp_path / "questions.jsonl", rows)


def test_answer_lines_as_the_original(loaded, images, questions_file, tmp_path):
    model, processor = loaded
    _, questions = read_questions(questions_file)
    out = tmp_path / "answers.jsonl"
    result = answer(model, processor, questions, images, out, model_id="tiny", batch_size=4, max_new_tokens=6)
    assert (result["written"], result["already_answered"], result["questions"]) == (6, 0, 6)
    lines = read_answers(out)
    assert [l["question_id"] for l in lines] == list(range(6))  # in question order
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert lines[0]["prompt"] == "What is in the image?" and lines[0]["model_id"] == "tiny" and lines[0]["metadata"] == {}
    assert len({l["answer_id"] for l in lines}) == 6
    # Each answer is what one greedy `generate` call gives for "<image>\n" + the question in the
    # template the model was trained with, about the image opened as the original opens it.
    for q, l in zip(questions, lines):
        image = load_eval_image(images / q.image) if q.image else None
        expected = generate(model, processor, q.text, image=image, max_tokens=6, conv_mode=processor.train_conv_mode).strip()
        assert l["text"] == expected
    # Batch size changes nothing.
    one = tmp_path / "one.jsonl"
    answer(model, processor, questions, images, one, batch_size=1, max_new_tokens=6)
    assert [l["text"] for l in read_answers(one)] == [l["text"] for l in lines]


def test_resume(loaded, images, questions_file, tmp_path):
    model, processor = loaded
    _, questions = read_questions(questions_file)
    full = tmp_path / "full.jsonl"
    answer(model, processor, questions, images, full, max_new_tokens=5)
    out = tmp_path / "answers.jsonl"
    seen = []

    def stop_after_three(line):
        seen.append(line)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        answer(model, processor, questions, images, out, max_new_tokens=5, batch_size=2, on_answer=stop_after_three)
    assert len(read_answers(out)) == 3
    with open(out, "ab") as f:
        f.write(b'{"question_id": 3, "prompt": "Where')  # killed in the middle of a line
    result = answer(model, processor, questions, images, out, max_new_tokens=5, batch_size=3)
    assert (result["already_answered"], result["written"]) == (3, 3)
    lines = read_answers(out)
    assert [l["question_id"] for l in lines] == list(range(6))
    assert [l["text"] for l in lines] == [l["text"] for l in read_answers(full)]
    again = answer(model, processor, questions, images, out, max_new_tokens=5)
    assert again["written"] == 0 and len(read_answers(out)) == 6
    limited = answer(model, processor, questions, images, tmp_path / "two.jsonl", max_new_tokens=5, limit=2)
    assert limited["questions"] == 2 and len(read_answers(tmp_path / "two.jsonl")) == 2
    more = answer(model, processor, questions, images, tmp_path / "two.jsonl", max_new_tokens=5, limit=4)
    assert (more["already_answered"], more["written"]) == (2, 2)
    with pytest.raises(LlavaError, match="other questions"):
        answer(model, processor, questions[::-1], images, out, max_new_tokens=5)


def test_resume_with_shared_question_ids(loaded, images, tmp_path):
    """MME asks two questions per id (subtask/image): a rerun continues after the last line."""
    from mlx_llava.eval import Question

    model, processor = loaded
    questions = [Question(f"task/{k // 2}.png", f"Question {k}?", f"{k // 2}.png") for k in range(6)]
    out = tmp_path / "mme.jsonl"
    answer(model, processor, questions, images, out, max_new_tokens=3, limit=3)
    result = answer(model, processor, questions, images, out, max_new_tokens=3)
    assert (result["already_answered"], result["written"]) == (3, 3)
    lines = read_answers(out)
    assert [l["prompt"] for l in lines] == [f"Question {k}?" for k in range(6)]


def test_not_an_answer_file(loaded, tmp_path, questions_file, images):
    model, processor = loaded
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"something": 1}\n')
    with pytest.raises(LlavaError, match="not an answer line"):
        answer(model, processor, read_questions(questions_file)[1], images, bad)
    with pytest.raises(LlavaError, match="give --image-folder"):
        answer(model, processor, read_questions(questions_file)[1], None, tmp_path / "x.jsonl")


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mlx_llava.cli", "eval", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_answer_with_a_tiny_model(model_dir, images, questions_file, tmp_path):
    out = tmp_path / "answers.jsonl"
    run = cli("answer", "-m", str(model_dir), "--questions", str(questions_file), "--image-folder", str(images),
              "--answers", str(out), "--max-new-tokens", "4", "--limit", "4", "-b", "2")
    assert run.returncode == 0, run.stderr
    assert "wrote 4 answers" in run.stdout and "template vicuna_v1" in run.stderr
    assert read_answers(out)[0]["model_id"] == model_dir.name
    missing = cli("answer", "-m", str(model_dir), "--questions", str(questions_file), "--answers", str(out),
                  "--image-folder", str(tmp_path))
    assert missing.returncode == 1 and "image not found" in missing.stderr


def test_report(tmp_path):
    from mlx_llava.eval.report import report

    def heldout(name, colour, count):
        return {"benchmark": "heldout", "model": name, "accuracy": (colour + count) / 2,
                "by_kind": {"colour": colour, "count": count}}

    paths = []
    for name, colour, count in (("base", 0.9, 0.5), ("tuned", 1.0, 0.75), ("tuned-4bit", 1.0, 0.7)):
        paths.append(write(tmp_path / f"{name}.json", heldout(name, colour, count), jsonl=False))
    paths.append(write(tmp_path / "sqa.json", {"benchmark": "scienceqa", "model": "tuned", "img_accuracy": 70.0,
                                                "table": {"NAT": 80.0, "Avg": 75.5}}, jsonl=False))
    text = report(paths, tmp_path / "report")
    assert "## heldout" in text and "| run | colour | count | overall |" in text
    assert "| tuned | 100.00 | 75.00 | 87.50 |" in text and "| tuned-4bit | 100.00 | 70.00 | 85.00 |" in text
    assert "## scienceqa" in text and "| tuned | 80.00 | 75.50 | 70.00 |" in text
    for name in ("heldout.png", "scienceqa.png"):
        with Image.open(tmp_path / "report" / name) as png:
            assert png.format == "PNG" and png.size[0] >= 480
    assert (tmp_path / "report" / "report.md").read_text().startswith("## heldout")
    run = cli("report", *map(str, paths[:2]), "--name", "A", "--name", "B")
    assert run.returncode == 0 and "| A | 90.00 | 50.00 | 70.00 |" in run.stdout


# The shape of llava-hf's LLaVA-1.5 chat template (chat_template.json of llava-1.5-7b-hf):
# "USER: " + "<image>\n" per image + the text + " ", then "ASSISTANT:".
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.mark.parametrize("template, expected", [
    (LLAVA_HF_TEMPLATE, "vicuna_v1"),  # LLaVA-1.5 weights: evaluated as the original evaluated them
    ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>", "chat_template"),  # its own format
])
def test_eval_template_of_a_llava_hf_model(model_dir, tmp_path, template, expected):
    import shutil

    from mlx_llava.eval.answer import eval_conv_mode

    folder = tmp_path / "llava-hf"
    shutil.copytree(model_dir, folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    _, processor = mlx_llava.load(folder)
    assert processor.conv_mode == "chat_template"
    assert eval_conv_mode(processor) == expected


def test_prompt_as_the_original_builds_it(loaded):
    """conv.append_message(USER, "<image>\\n" + text): the text as the file has it, spaces and all."""
    from mlx_llava.eval import Question
    from mlx_llava.eval.answer import eval_prompt

    _, processor = loaded
    system = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    assert eval_prompt(processor, Question(1, " What is it?\n", "0.png"), "vicuna_v1") == (
        f"{system} USER: <image>\n What is it?\n ASSISTANT:")
    assert eval_prompt(processor, Question(2, "Pick A or B.", None), "vicuna_v1") == f"{system} USER: Pick A or B. ASSISTANT:"
