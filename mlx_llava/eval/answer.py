"""Answering a question file: the original's answer lines, batched and resumable.

Each question is asked in a fresh conversation, `<image>` first, in the
template the model was trained with (LLaVA-1.5: vicuna_v1, as the original's
eval scripts), greedy unless a temperature is given; images are read as the
original's scripts read them (PIL's `convert("RGB")`: alpha dropped, EXIF
orientation not applied). Several questions decode together
(`mlx_llava.batch`). Each answer is one JSON line, as the original writes it:

    {"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}

Lines are written in question order, each in one write call and flushed, so
a killed run leaves whole lines (at worst a last partial one, which the next
run removes); run again and it continues after the last written line.
"""

import json
import os
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image

from ..batch import Request, stream_batch
from ..conversation import CHAT_TEMPLATE, IMAGE_PLACEHOLDER
from ..errors import LlavaError

# What llava-hf's LLaVA-1.5 chat template makes of one question: vicuna_v1 without its system message.
_LLAVA_HF_15 = f"USER: {IMAGE_PLACEHOLDER}\nQ ASSISTANT:"


def read_answers(path, repair: bool = False) -> list:
    """The answer lines of a JSONL file (see `read_lines`)."""
    return read_lines(path, ("question_id", "text"), "an answer line ({question_id, text, ...})", repair)


def read_lines(path, fields: tuple, what: str, repair: bool = False) -> list:
    """The JSON lines of a file that an interrupted run appends to, each an
    object with `fields`. A last line cut short by a kill is ignored (removed
    from the file when `repair`); any other bad line is an error naming `what`."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(data))
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise LlavaError(f"{path}:{n} is not a JSON line") from None
        if not isinstance(row, dict) or any(f not in row for f in fields):
            raise LlavaError(f"{path}:{n} is not {what}")
        rows.append(row)
    return rows


def key(question_id) -> str:
    """A question id as a dict key that keeps 1 and "1" apart."""
    return json.dumps(question_id)


def eval_conv_mode(processor) -> str:
    """The template the original's eval scripts ask this model in: the one it was
    trained with (vicuna_v1 for LLaVA-1.5). A llava-hf conversion of LLaVA-1.5
    carries a chat template that is vicuna_v1 without its system message; the
    original evaluated those weights in vicuna_v1, so they get it here too."""
    mode = processor.train_conv_mode
    if mode == CHAT_TEMPLATE:
        try:
            rendered = processor.prompt([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nQ"}])
        except LlavaError:
            return mode
        bos = getattr(processor.tokenizer, "bos_token", None) or ""
        if rendered.removeprefix(bos).strip() == _LLAVA_HF_15:
            return "vicuna_v1"
    return mode


def eval_prompt(processor, question, conv_mode: str) -> str:
    """The prompt the original's eval scripts build: one user turn, "<image>\n" then
    the question exactly as the file has it (the chat path strips a question's
    surrounding whitespace; the original's scripts do not)."""
    mark = "\x00question\x00"
    content = f"{IMAGE_PLACEHOLDER}\n{mark}" if question.image is not None else mark
    rendered = processor.prompt([{"role": "user", "content": content}], conv_mode=conv_mode)
    return rendered.replace(mark, question.text)


def load_eval_image(path) -> Image.Image:
    """An image as the original's eval scripts open it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise LlavaError(f"image not found: {path}") from None
    except (OSError, ValueError) as e:
        raise LlavaError(f"cannot read image {path}: {e}") from None


def answer_lines(model, processor, questions, image_folder, *, model_id: str = "model",
                 conv_mode: Optional[str] = None, batch_size: int = 8, temperature: float = 0.0,
                 top_p: Optional[float] = None, max_new_tokens: int = 1024) -> Iterator[dict]:
    """The answer line of each of `questions` (`Question`s), in their order,
    decoded `batch_size` at a time."""
    questions = list(questions)
    folder = Path(image_folder) if image_folder is not None else None
    conv_mode = conv_mode or eval_conv_mode(processor)

    def requests():
        for q in questions:
            image = None
            if q.image is not None:
                if folder is None:
                    raise LlavaError("these questions have images: give --image-folder")
                image = load_eval_image(folder / q.image)
            yield Request([], [] if image is None else [image], max_tokens=max_new_tokens, temperature=temperature,
                          top_p=1.0 if top_p is None else top_p, prompt=eval_prompt(processor, q, conv_mode))

    texts, finished, next_out = [[] for _ in questions], {}, 0
    for response in stream_batch(model, processor, requests(), batch_size):
        texts[response.uid].append(response.text)
        if response.finish_reason is None:
            continue
        finished[response.uid] = "".join(texts[response.uid]).strip()
        texts[response.uid] = None
        while next_out in finished:  # in question order
            q = questions[next_out]
            yield {"question_id": q.question_id, "prompt": q.prompt, "text": finished.pop(next_out),
                   "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}
            next_out += 1


def answer(model, processor, questions, image_folder, output, *, limit: Optional[int] = None,
           progress: bool = False, on_answer=None, **options) -> dict:
    """Answer `questions` (the first `limit`) into the JSONL file `output`,
    continuing after the answers it already holds (to the same questions, in
    order). `options`: those of `answer_lines`. Returns counts and answers/s."""
    if options.get("batch_size", 1) < 1 or options.get("max_new_tokens", 1) < 1 or (limit is not None and limit < 0):
        raise LlavaError("--batch-size and --max-new-tokens must be >= 1, --limit >= 0")
    everything = list(questions)
    questions = everything[:limit]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Lines are written in question order, so a rerun continues after the last one
    # (ids alone cannot say which are done: MME asks two questions per id).
    written_before = [key(a["question_id"]) for a in read_answers(output, repair=True)]
    if written_before != [key(q.question_id) for q in everything[: len(written_before)]]:
        raise LlavaError(f"{output} holds answers to other questions, or in another order, than these: "
                         "answer into another file")
    todo = questions[len(written_before):]
    written, start = 0, time.perf_counter()
    with open(output, "ab", buffering=0) as out, _Progress(len(questions), len(questions) - len(todo), progress) as bar:
        for line in answer_lines(model, processor, todo, image_folder, **options):
            out.write((json.dumps(line) + "\n").encode())  # one write of a whole line
            written += 1
            bar.advance()
            if on_answer:
                on_answer(line)
        os.fsync(out.fileno())
    seconds = time.perf_counter() - start
    return {"questions": len(questions), "already_answered": len(questions) - len(todo), "written": written,
            "seconds": round(seconds, 2), "answers_per_s": round(written / seconds, 2) if written else None,
            "output": str(output)}


class _Progress:
    """A rich progress bar with answers/s and the time left, or nothing."""

    def __init__(self, total: int, done: int, show: bool):
        self.bar = None
        if show:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("answering"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn())
            self.task = self.bar.add_task("answers", total=total, completed=done, rate="")
            self.start, self.count = time.perf_counter(), 0

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def advance(self):
        if self.bar:
            self.count += 1
            rate = self.count / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.task, advance=1, rate=f"{rate:.2f} answers/s")

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()
