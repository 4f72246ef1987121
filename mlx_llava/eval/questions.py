"""Question files, read as the original LLaVA's eval scripts read them.

Every format becomes a list of `Question`s: what the model is asked (`text`,
without the `<image>` placeholder, which the answerer puts first), the image
(relative to the image folder), and what the answer line records as its
`prompt` (the original's `cur_prompt`, which some scorers read back).

- LLaVA's JSONL (`{question_id, image, text, category}`): the files of
  `model_vqa_loader.py` / `model_vqa.py` (POPE, MME, TextVQA, GQA, VQAv2,
  LLaVA-Bench). The prompt recorded is `text`.
- ScienceQA in LLaVA's JSON (`llava_test_CQM-A.json` from
  `convert_sqa_to_llava`): `model_vqa_science.py`'s rules: the human turn
  without `<image>`, stripped; the recorded prompt starts "<image>\\n" when
  there is an image; with `single_pred_prompt`, both end in the
  answer-with-the-letter instruction.
- MME's release folder (`MME_Benchmark_release_version/`, or one subtask's
  folder): each subtask's `question\\tanswer` files beside (or in
  `questions_answers_YN/` beside `images/`) the images. Asked as LLaVA-1.5
  asks (its `llava_mme.jsonl`): "Please answer yes or no." replaced by the
  short-answer instruction; question ids are `subtask/image`.
- VQAv2's own questions JSON (`v2_OpenEnded_mscoco_*_questions.json`) and
  GQA's (`*_balanced_questions.json`), asked with the short-answer
  instruction as LLaVA-1.5's converted files do, for a local val split.
- mlx-llava's short-answer JSON (`[{image, question, answer, kind}]`, the
  demo's held-out sample): asked as written.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..conversation import IMAGE_PLACEHOLDER
from ..errors import LlavaError

SHORT_ANSWER = "Answer the question using a single word or phrase."
SINGLE_PRED = "Answer with the option's letter from the given choices directly."
MME_SUFFIX = "Please answer yes or no."
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


@dataclass
class Question:
    question_id: object  # as the file has it (int or str); answers keep its type
    text: str  # the user's turn, without <image>
    image: Optional[str] = None  # relative to the image folder
    prompt: Optional[str] = None  # recorded in the answer line; default: text
    category: Optional[str] = None

    def __post_init__(self):
        if self.prompt is None:
            self.prompt = self.text


def read_questions(path, single_pred_prompt: Optional[bool] = None) -> tuple:
    """-> (format name, [Question]). `single_pred_prompt` None: on for
    ScienceQA (as LLaVA's sqa.sh runs it), off for the rest."""
    path = Path(path)
    if path.is_dir():
        fmt, questions = "mme", read_mme(path)
    elif not path.is_file():
        raise LlavaError(f"question file not found: {path}")
    elif path.suffix == ".jsonl":
        fmt, questions = "llava", read_llava_jsonl(path)
    else:
        data = _load_json(path)
        if isinstance(data, dict) and isinstance(data.get("questions"), list):
            fmt, questions = "vqav2", read_vqav2(data)
        elif isinstance(data, dict) and data and all(isinstance(v, dict) and "imageId" in v for v in data.values()):
            fmt, questions = "gqa", read_gqa(data)
        elif isinstance(data, list) and data and all(isinstance(q, dict) and "conversations" in q for q in data):
            fmt, questions = "scienceqa", read_scienceqa(data, single_pred_prompt is not False)
        elif isinstance(data, list) and all(isinstance(q, dict) and {"image", "question"} <= set(q) for q in data):
            fmt, questions = "short-answer", read_short_answer(data)
        else:
            raise LlavaError(
                f"{path}: not a question file this tool reads (LLaVA JSONL, ScienceQA's LLaVA JSON, "
                "VQAv2 or GQA questions JSON, [{image, question, answer}] JSON, or MME's folder)"
            )
    if single_pred_prompt and fmt != "scienceqa":
        for q in questions:
            q.text, q.prompt = f"{q.text}\n{SINGLE_PRED}", f"{q.prompt}\n{SINGLE_PRED}"
    return fmt, questions


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LlavaError(f"{path} is not valid JSON ({e})") from None


def read_jsonl(path) -> list:
    """JSON lines; blank lines skipped; a bad line is an error naming it."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise LlavaError(f"{path}:{n} is not a JSON line") from None
    return rows


def read_llava_jsonl(path) -> list:
    questions = []
    for n, q in enumerate(read_jsonl(path), 1):
        if not isinstance(q, dict) or "question_id" not in q or "text" not in q:
            raise LlavaError(f"{path}:{n}: expected {{question_id, image, text}}")
        questions.append(Question(q["question_id"], q["text"], q.get("image"), category=q.get("category")))
    return questions


def read_scienceqa(data: list, single_pred_prompt: bool) -> list:
    questions = []
    for item in data:
        text = item["conversations"][0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
        prompt = f"{IMAGE_PLACEHOLDER}\n{text}" if "image" in item else text
        if single_pred_prompt:
            text, prompt = f"{text}\n{SINGLE_PRED}", f"{prompt}\n{SINGLE_PRED}"
        questions.append(Question(item["id"], text, item.get("image"), prompt))
    return questions


def mme_subtasks(root: Path) -> list:
    """[(subtask name, image folder, question folder)] under an MME release folder
    (or the one subtask `root` is)."""
    def layout(folder: Path):
        if (folder / "images").is_dir():
            return folder / "images", folder / "questions_answers_YN"
        return folder, folder

    if any(root.glob("*.txt")) or (root / "questions_answers_YN").is_dir():
        return [(root.name, *layout(root))]
    tasks = [(d.name, *layout(d)) for d in sorted(root.iterdir()) if d.is_dir()]
    tasks = [t for t in tasks if t[2].is_dir() and any(t[2].glob("*.txt"))]
    if not tasks:
        raise LlavaError(f"{root} holds no MME subtask folders (question .txt files beside images)")
    return tasks


def read_mme(root: Path) -> list:
    base = root.parent if _is_subtask(root) else root
    questions = []
    for name, images, qa in mme_subtasks(root):
        for txt in sorted(qa.glob("*.txt")):
            image = next((images / (txt.stem + s) for s in IMAGE_SUFFIXES if (images / (txt.stem + s)).is_file()), None)
            if image is None:
                raise LlavaError(f"MME: no image for {txt} in {images}")
            for line in txt.read_text().splitlines():
                if not line.strip():
                    continue
                question = line.split("\t")[0]
                text = f"{question.replace(MME_SUFFIX, '').strip()}\n{SHORT_ANSWER}"
                questions.append(Question(f"{name}/{image.name}", text, str(image.relative_to(base)), category=name))
    return questions


def _is_subtask(root: Path) -> bool:
    return any(root.glob("*.txt")) or (root / "questions_answers_YN").is_dir()


def read_vqav2(data: dict) -> list:
    subtype = data.get("data_subtype", "val2014")
    return [Question(q["question_id"], f"{q['question']}\n{SHORT_ANSWER}",
                     f"COCO_{subtype}_{int(q['image_id']):012d}.jpg") for q in data["questions"]]


def read_gqa(data: dict) -> list:
    return [Question(qid, f"{q['question']}\n{SHORT_ANSWER}", f"{q['imageId']}.jpg") for qid, q in data.items()]


def read_short_answer(data: list) -> list:
    return [Question(q.get("id", i), q["question"], q["image"], category=q.get("kind")) for i, q in enumerate(data)]


def default_image_folder(path, fmt: str) -> Optional[Path]:
    """Where the images are when no folder is given: MME's own folder; beside a
    short-answer JSON, `images/`; else none (the original scripts need one too)."""
    path = Path(path)
    if fmt == "mme":
        return path.parent if _is_subtask(path) else path
    if fmt == "short-answer":
        return path.parent / "images"
    return None
