"""Training data: LLaVA JSON/JSONL records -> tokenized examples -> length-grouped batches.

Records are `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}`.
Targets come from `conversation.build_targets`, the same module as the chat
templates, so training and inference agree token for token. Bad records are
skipped and counted, never fatal.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Union

import numpy as np

from ..conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, build_targets
from ..errors import LlavaError
from ..image import image_size


@dataclass
class Example:
    id: str
    input_ids: List[int]
    labels: List[int]
    image: Optional[Path]
    image_size: Optional[tuple] = None  # (height, width), from the header, when the count depends on it


@dataclass
class Dataset:
    examples: List[Example]
    skipped: List[tuple] = field(default_factory=list)  # (id, reason)
    truncated: int = 0
    unplaced: List[str] = field(default_factory=list)  # ids with an image but no <image>: trained as text


def read_records(path) -> tuple:
    """-> (records, skipped). A JSON list, or JSONL with one record per line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LlavaError(f"training data not found: {path}") from None
    except IsADirectoryError:
        raise LlavaError(f"{path} is a folder; expected a LLaVA JSON or JSONL file") from None
    except UnicodeDecodeError:
        raise LlavaError(f"{path} is not a text file (LLaVA JSON or JSONL)") from None
    if not text.strip():
        raise LlavaError(f"{path} is empty")
    try:
        data = json.loads(text)
        if not isinstance(data, list):
            raise LlavaError(f"{path}: expected a JSON list of records (or JSONL)")
        return data, []
    except json.JSONDecodeError:
        pass
    records, skipped = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                skipped.append((f"line {n}", "not valid JSON"))
    if not records and skipped:
        raise LlavaError(f"{path} is neither a JSON list nor JSONL")
    return records, skipped


def check_record(record) -> Optional[str]:
    """Why a record cannot be used, or None."""
    if not isinstance(record, dict):
        return "not an object"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "no conversations"
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or "from" not in t:
            return "malformed turn"
    if not any(t["from"] in ("human", "user") for t in turns):
        return "no question (human turn)"
    if not any(t["from"] in ("gpt", "assistant") for t in turns):
        return "no answer to learn"
    if "image" in record and not isinstance(record["image"], str):
        return "image is not a path"
    return None


def skip_summary(skipped) -> str:
    """(id, reason) pairs as counts per kind of reason, most first:
    "3 image not found, 1 not valid JSON" (a reason's detail after ":" dropped)."""
    counts = {}
    for _, why in skipped:
        kind = why.split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]))


class MemoTokenizer:
    """The tokenizer with `encode` remembered: building one sample's targets
    tokenizes each round several times, as the original does, and a dataset
    repeats its questions, answers and system prompt thousands of times."""

    def __init__(self, tokenizer):
        self._tokenizer, self._known = tokenizer, {}

    def encode(self, text: str) -> list:
        ids = self._known.get(text)
        if ids is None:
            ids = self._known[text] = tuple(self._tokenizer.encode(text))
        return list(ids)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def prepare(path, tokenizer, conv_mode: str, image_token_index: int,
            num_visual_tokens: Union[int, Callable[[tuple], int]],
            image_folder=None, max_length: int = 2048, image_wrap=None) -> Dataset:
    """Tokenize every usable record; skip (and count) the rest.

    `num_visual_tokens`: per image, or (AnyRes) a function of the image's
    (height, width), which is then read from the file's header alone."""
    records, skipped = read_records(path)
    tokenizer = MemoTokenizer(tokenizer)
    folder = Path(image_folder) if image_folder else Path(path).parent
    out = Dataset([], skipped)
    for n, record in enumerate(records):
        rid = str(record.get("id", f"#{n}")) if isinstance(record, dict) else f"#{n}"
        reason = check_record(record)
        image = None
        if reason is None and record.get("image"):
            image = folder / record["image"]
            if not image.is_file():
                reason = f"image not found: {image}"
        if reason is not None:
            out.skipped.append((rid, reason))
            continue
        turns = [dict(t) for t in record["conversations"]]
        placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
        if image is not None and placeholders > 1:
            out.skipped.append((rid, f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for one image"))
            continue
        if image is not None and placeholders == 0:
            # The original splices an image only where <image> stands; with
            # none, the sample trains as text and its image is never seen.
            image = None
            out.unplaced.append(rid)
        if image is None:
            for t in turns:
                t["value"] = t["value"].replace(IMAGE_PLACEHOLDER, "").strip()
        size, count = None, num_visual_tokens if image else 1
        try:
            if image is not None and callable(num_visual_tokens):
                size = image_size(image)
                count = num_visual_tokens(size)
            ids, labels = build_targets(tokenizer, turns, conv_mode, image_token_index, count, image_wrap)
        except LlavaError as e:
            out.skipped.append((rid, str(e)))
            continue
        if len(ids) > max_length:
            image_end = max((i for i, t in enumerate(ids) if t == image_token_index), default=-1)
            if image_end >= max_length:
                out.skipped.append((rid, f"longer than --max-length {max_length} before its image ends"))
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            out.truncated += 1
        if all(l == IGNORE_INDEX for l in labels[1:]):
            out.skipped.append((rid, "no answer tokens left to learn"))
            continue
        out.examples.append(Example(rid, ids, labels, image, size))
    return out


def epoch_batches(lengths, batch_size: int, micro_batches: int, seed: int, epoch: int,
                  group_by_length: bool = False) -> list:
    """One epoch as global batches, each a list of `micro_batches` index lists.

    A random order, then inside each global batch the samples sorted by
    length, so each micro-batch pads little while every global batch stays a
    random draw. With `group_by_length` (LLaVA-1.5's
    `--group_by_modality_length`, transformers' LengthGroupedSampler), the
    random order is cut into megabatches of 50 batches, each sorted by length
    before it is cut into batches, and the batches are shuffled: samples of
    like length train together and padding nearly vanishes. A short last
    batch is dropped.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        mega = 50 * batch_size
        order = np.concatenate([sorted(order[i:i + mega], key=lambda j: -lengths[j])
                                for i in range(0, len(order), mega)])
    micro = batch_size // micro_batches
    out = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chunk = sorted(order[start:start + batch_size], key=lambda i: -lengths[i])
        out.append([list(map(int, chunk[m * micro:(m + 1) * micro])) for m in range(micro_batches)])
    if group_by_length:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def pad(examples: List[Example], pad_id: int = 0, multiple: int = 1):
    """Right-padded (input_ids, labels) int32 arrays, `multiple` dividing the
    width; padding is never trained."""
    width = max(len(e.input_ids) for e in examples)
    width = -(-width // multiple) * multiple
    ids = np.full((len(examples), width), pad_id, np.int32)
    labels = np.full((len(examples), width), IGNORE_INDEX, np.int32)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = e.input_ids
        labels[row, : len(e.labels)] = e.labels
    return ids, labels
