"""The paper's instruction-data pipeline, with any text-only LLM as the teacher.

LLaVA never showed its teacher an image: GPT-4 read each COCO image's
captions and boxes and wrote a conversation, a detailed description or a
complex-reasoning question with its answer (Liu et al. 2023, section 3).
This module does the same for any COCO-style annotation files:

    record (read_coco) -> build_messages -> teacher -> parse -> LLaVA JSON line

- The request is the paper's: the type's system message, its few-shot
  examples as user/assistant turns, then this image's context (`prompts`).
- A teacher is anything called as `teacher(messages, max_tokens, temperature)`
  that returns a `Reply`: an OpenAI-compatible endpoint (`OpenAITeacher`) or a
  local mlx-lm model (`MLXTeacher`).
- Replies become LLaVA-Instruct records: `{"id", "image", "type",
  "conversations": [{"from": "human", ...}, {"from": "gpt", ...}, ...]}`.
  As in the released LLaVA-Instruct-158K, `<image>` sits in the first human
  turn only, before or after the question at random (LLaVA's trainer moves it
  to the front anyway). A reply that does not parse is counted, not written.
- Output is JSONL, one flushed line per record, so a run can be killed and
  started again: records already there (same id and type) are skipped, and
  failed ones are tried again.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import NamedTuple

from ..conversation import IMAGE_PLACEHOLDER
from ..errors import LlavaError
from .prompts import DETAIL_INSTRUCTIONS, PROMPTS

TYPES = ("conversation", "detail", "reasoning")


def parse_types(text: str | Iterable[str]) -> tuple[str, ...]:
    """'conversation,detail' -> ('conversation', 'detail'), in the order given."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in names if t not in TYPES]
    if unknown or not names:
        raise LlavaError(f"unknown response type(s) {unknown or names}: choose from {', '.join(TYPES)}")
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------- the prompt


def normalize_box(bbox, width: int, height: int) -> list[float]:
    """COCO's [x, y, w, h] in pixels -> the paper's [x1, y1, x2, y2] in [0, 1], 3 decimals."""
    x, y, w, h = bbox
    corners = (x / width, y / height, (x + w) / width, (y + h) / height)
    return [round(min(max(c, 0.0), 1.0), 3) + 0.0 for c in corners]  # + 0.0: never "-0.0"


def symbolic_context(record: dict, boxes: bool = True) -> str:
    """What the teacher sees of an image: its captions, then a blank line and its boxes."""
    text = "\n".join(record["captions"])
    if boxes and record["objects"]:
        w, h = record["width"], record["height"]
        text += "\n\n" + "\n".join(f"{o['category']}: {normalize_box(o['bbox'], w, h)}" for o in record["objects"])
    return text


def build_messages(record: dict, kind: str, boxes: bool | None = None) -> list[dict]:
    """The paper's chat request for one image and one response type.

    `boxes=None` follows the paper: boxes for detail and reasoning, captions
    only for conversation (its few-shot examples have no boxes).
    """
    prompt = PROMPTS[kind]
    messages = [{"role": "system", "content": prompt.system}]
    for example in prompt.examples:
        messages.append({"role": "user", "content": example.context})
        messages.append({"role": "assistant", "content": example.response})
    use_boxes = prompt.boxes if boxes is None else boxes
    messages.append({"role": "user", "content": symbolic_context(record, use_boxes)})
    return messages


# ---------------------------------------------------------------- the reply


class Reply(NamedTuple):
    text: str
    truncated: bool = False  # the teacher stopped at max_tokens: the last turn may be cut


class ReplyError(ValueError):
    """A teacher's reply that cannot become a sample (counted and skipped, never raised to the user)."""


# "Question:" / "Answer:" at the start of a line; tolerate markdown bold around the word.
_MARKER = re.compile(r"^[ \t]*\**(question|answer)\**[ \t]*:\**", re.IGNORECASE | re.MULTILINE)
_SEPARATOR = re.compile(r"^[ \t]*={3,}[ \t]*$", re.MULTILINE)
_THINKING = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)  # reasoning models' preamble


def _clean(text: str) -> str:
    return _THINKING.sub("", text).replace(IMAGE_PLACEHOLDER, "").strip()


def parse_turns(text: str) -> list[tuple[str, str]]:
    """'Question:\\n...\\n===\\nAnswer:\\n...' (the paper's format) -> [(question, answer), ...].

    Markers must open a line and alternate, starting with a question and
    ending with an answer; text before the first marker ("Sure! Here is...")
    is dropped. Anything else raises ReplyError.
    """
    text = _clean(text)
    marks = list(_MARKER.finditer(text))
    if not marks:
        raise ReplyError("no 'Question:' / 'Answer:' turns")
    pieces = []
    for mark, following in zip(marks, marks[1:] + [None]):
        body = text[mark.end() : following.start() if following else len(text)]
        body = _SEPARATOR.sub("", body).strip()
        if not body:
            raise ReplyError(f"an empty {mark.group(1).lower()}")
        pieces.append((mark.group(1).lower(), body))
    labels = [label for label, _ in pieces]
    if len(labels) % 2 or labels != ["question", "answer"] * (len(labels) // 2):
        raise ReplyError("questions and answers do not alternate")
    return [(pieces[i][1], pieces[i + 1][1]) for i in range(0, len(pieces), 2)]


def sample_id(record: dict) -> str:
    """LLaVA-Instruct's ids are the image file's stem ("000000033471")."""
    return Path(record["file_name"]).stem


def make_sample(record: dict, kind: str, reply: Reply | str, rng: random.Random) -> dict:
    """A teacher's reply -> one LLaVA-Instruct record; ReplyError if it does not parse."""
    if isinstance(reply, str):
        reply = Reply(reply)
    if reply.truncated:
        raise ReplyError("cut off at max_tokens")
    if kind == "detail":  # the answer is the reply; the question comes from the paper's list
        description = _clean(reply.text)
        if not description:
            raise ReplyError("an empty description")
        turns = [(rng.choice(DETAIL_INSTRUCTIONS), description)]
    else:
        turns = parse_turns(reply.text)
    conversations = []
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            question = f"{IMAGE_PLACEHOLDER}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE_PLACEHOLDER}"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": sample_id(record), "image": record["file_name"], "type": kind, "conversations": conversations}


# ---------------------------------------------------------------- teachers


class OpenAITeacher:
    """Any OpenAI-compatible chat endpoint: OpenAI, vLLM, llama.cpp, Ollama, mlx_lm.server.

    `url` is the API base (".../v1"); requests go to `{url}/chat/completions`.
    Rate limits (429), server errors (5xx), timeouts (408 too) and dropped connections
    are retried with exponential backoff (honouring Retry-After); a refused
    connection, a refused key or a rejected request stop the run with a
    LlavaError, since every later request would fail the same way.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 5, backoff: float = 1.0):
        self.url = url.rstrip("/")
        self.endpoint = self.url if self.url.endswith("/chat/completions") else self.url + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.backoff = retries, backoff

    def __call__(self, messages: list[dict], max_tokens: int = 1024, temperature: float = 0.7) -> Reply:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, json.dumps(body).encode(), headers, method="POST")
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2**attempt
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._reply(response.read())
            except urllib.error.HTTPError as e:
                if e.code not in (408, 429) and e.code < 500:
                    raise self._refused(e) from None
                problem = f"HTTP {e.code}"
                wait = _retry_after(e.headers.get("Retry-After")) or wait
            except urllib.error.URLError as e:
                if not isinstance(e.reason, (TimeoutError, socket.timeout, ConnectionResetError)):
                    reason = "connection refused" if isinstance(e.reason, ConnectionRefusedError) else e.reason
                    raise LlavaError(f"cannot reach the teacher at {self.url}: {reason}") from None
                problem = str(e.reason)
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:  # while reading
                problem = str(e) or type(e).__name__
            if attempt < self.retries:
                time.sleep(wait)
        raise LlavaError(f"the teacher at {self.url} failed {self.retries + 1} times; last: {problem}")

    def _reply(self, raw: bytes) -> Reply:
        try:
            choice = json.loads(raw)["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise LlavaError(f"{self.endpoint} did not answer like an OpenAI chat endpoint: {raw[:200]!r}") from None
        return Reply(text, choice.get("finish_reason") == "length")

    def _refused(self, e: urllib.error.HTTPError) -> LlavaError:
        try:
            detail = json.loads(e.read())["error"]
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except (ValueError, KeyError, TypeError, AttributeError, OSError):  # any body: the status says enough
            detail = e.reason
        if e.code in (401, 403):
            return LlavaError(f"the teacher at {self.url} refused the API key (HTTP {e.code}): {detail}")
        return LlavaError(f"the teacher at {self.url} rejected the request (HTTP {e.code}): {detail}")


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 60.0) if value else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


class MLXTeacher:
    """A local mlx-lm model as the teacher: its own chat template, then mlx-lm's decoding.

    Decodes with `mlx_lm.stream_generate` (what `mlx_lm.generate` wraps) to
    learn whether the reply stopped at max_tokens. Templates that refuse a
    system role (Mistral's, Gemma's) get the system message at the head of
    the first user turn instead.
    """

    def __init__(self, path: str, seed: int = 0):
        import mlx.core as mx
        from mlx_lm import load

        if not Path(path).exists() and path.count("/") != 1:
            raise LlavaError(f"no such mlx-lm model directory: {path}")
        try:
            self.model, self.tokenizer = load(str(path))
        except (OSError, ValueError) as e:
            raise LlavaError(f"cannot load the teacher model {path}: {e}") from None
        self.path = path
        mx.random.seed(seed)

    def prompt(self, messages: list[dict]) -> list[int]:
        from jinja2.exceptions import TemplateError

        try:
            try:
                return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except TemplateError:
                if messages[0]["role"] != "system":
                    raise
                system, user = messages[0], messages[1]
                merged = {"role": "user", "content": system["content"] + "\n\n" + user["content"]}
                return self.tokenizer.apply_chat_template([merged, *messages[2:]], add_generation_prompt=True)
        except (TemplateError, ValueError) as e:
            raise LlavaError(f"cannot build a chat prompt with {self.path}'s tokenizer: {e}") from None

    def __call__(self, messages: list[dict], max_tokens: int = 1024, temperature: float = 0.7) -> Reply:
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        text, finish = "", None
        sampler = make_sampler(temp=temperature)
        for response in stream_generate(self.model, self.tokenizer, self.prompt(messages),
                                        max_tokens=max_tokens, sampler=sampler):
            text += response.text
            finish = response.finish_reason
        return Reply(text, finish == "length")


def make_teacher(model: str, url: str | None = None, api_key_env: str | None = None, timeout: float = 120.0,
                 seed: int = 0):
    """`url` given: an OpenAI-compatible endpoint serving `model`, keyed by env var
    `api_key_env` (default OPENAI_API_KEY, optional for local servers). Otherwise
    `model` is an mlx-lm model directory."""
    if url is None:
        return MLXTeacher(model, seed=seed)
    if not url.startswith(("http://", "https://")):
        raise LlavaError(f"--teacher-url must start with http:// or https://, not {url!r}")
    key = os.environ.get(api_key_env or "OPENAI_API_KEY")
    if api_key_env and not key:
        raise LlavaError(f"environment variable {api_key_env} (the teacher's API key) is not set")
    return OpenAITeacher(url, model, api_key=key, timeout=timeout)


# ---------------------------------------------------------------- the run


@dataclass
class Summary:
    """Counts per response type, for the end-of-run report."""

    output: Path
    written: Counter = field(default_factory=Counter)
    done: Counter = field(default_factory=Counter)  # already in the output: skipped
    failed: Counter = field(default_factory=Counter)  # replies that did not parse
    no_captions: Counter = field(default_factory=Counter)  # images the teacher cannot be told about

    def __str__(self) -> str:
        def line(name, counts):
            parts = ", ".join(f"{k} {counts[k]}" for k in TYPES if counts[k])
            return f"{name}: {sum(counts.values())}" + (f" ({parts})" if parts else "")

        lines = [line("written", self.written), line("skipped as done", self.done),
                 line("failed to parse", self.failed)]
        if self.no_captions:
            lines.append(line("skipped, no captions", self.no_captions))
        return "\n".join(lines + [f"output: {self.output}"])


def read_done(path: Path) -> set[tuple[str, str]]:
    """(id, type) of the records already in a JSONL output.

    A last line cut short (the run was killed mid-write) is removed, so the
    next record starts on a line of its own.
    """
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    done = set()
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done.add((str(record["id"]), record["type"]))
        except (ValueError, KeyError, TypeError):
            raise LlavaError(f"{path}:{n} is not a record of this tool; refusing to append to it") from None
    return done


class _Progress:
    """A rich progress bar (rich comes with typer), or nothing."""

    def __init__(self, total: int, show: bool):
        self.bar = None
        if show:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn())
            self.task = self.bar.add_task("teacher", total=total)

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def advance(self, kind: str):
        if self.bar:
            self.bar.update(self.task, advance=1, description=kind)

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()


def instruct(records: Iterable[dict], teacher, output, types=TYPES, limit: int | None = None, seed: int = 0,
             max_tokens: int = 1024, temperature: float = 0.7, boxes: bool | None = None,
             progress: bool = False) -> Summary:
    """Ask `teacher` for each of `types` on each record (the first `limit` images);
    append the parsed samples to the JSONL file `output`; return the counts.

    Deterministic in `seed` wherever the teacher is: the detail question and the
    `<image>` placement of a sample depend only on (seed, id, type).
    """
    types = parse_types(types)
    if limit is not None and limit < 0 or max_tokens < 1:
        raise LlavaError("--limit must be >= 0 and --max-tokens >= 1")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(output)
    jobs = [(r, kind) for r in islice(records, limit) for kind in types]
    summary = Summary(output)
    with open(output, "a", encoding="utf-8") as out, _Progress(len(jobs), progress) as bar:
        for record, kind in jobs:
            key = (sample_id(record), kind)
            if key in done:
                summary.done[kind] += 1
            elif not record["captions"]:
                summary.no_captions[kind] += 1
            else:
                reply = teacher(build_messages(record, kind, boxes), max_tokens=max_tokens, temperature=temperature)
                try:
                    sample = make_sample(record, kind, reply, random.Random(f"{seed}:{key[0]}:{kind}"))
                except ReplyError:
                    summary.failed[kind] += 1
                else:
                    out.write(json.dumps(sample, ensure_ascii=False) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                    done.add(key)
                    summary.written[kind] += 1
            bar.advance(kind)
    return summary
