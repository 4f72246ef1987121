"""Chat templates, prompt tokens and training targets: one source for both.

Inference prompts and training targets must agree token for token, or a
model answers in a format it was never trained on. So this module renders
prompts exactly as the original LLaVA (haotian-liu/LLaVA) does
(`Conversation.get_prompt`), tokenizes them as it does
(`tokenizer_image_token`), and masks training targets with its rules
(`preprocess_multimodal`, `preprocess_plain`, `preprocess_v1`,
`preprocess_llama_2`, `preprocess_mpt`). A conv mode of "chat_template" uses the tokenizer's own
jinja template instead (llava-hf and other converted models).
"""

import logging
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import LlavaError

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100  # labels with this value are not trained (as in PyTorch's cross-entropy)
CHAT_TEMPLATE = "chat_template"  # conv mode: the tokenizer's own jinja chat template

# The original's IMAGE_TOKEN_INDEX. Target arithmetic runs on one such id per
# image, exactly as the original; the real image id and the visual-token
# expansion are put in at the end, so they cannot disturb the arithmetic.
_IMAGE = -200

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Template:
    """The fields of the original's `Conversation` that shape a prompt."""

    name: str
    system: str
    roles: tuple = ("USER", "ASSISTANT")
    style: str = "two"  # "single" | "two" | "mpt" | "plain" | "llama_2" (the original's SeparatorStyle)
    sep: str = " "
    sep2: Optional[str] = "</s>"


_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES = {
    "llava_v1": Template("llava_v1", _HUMAN_SYSTEM),
    # What LLaVA-1.5 trained with (`--version v1` is conv_templates["v1"]).
    "vicuna_v1": Template(
        "vicuna_v1",
        _HUMAN_SYSTEM.replace("human", "user"),
    ),
    # Stage 1. The original leaves sep2 None, which would crash get_prompt on a
    # finished assistant turn; preprocess_plain ends a caption with sep, so do we.
    "plain": Template("plain", "", ("", ""), "plain", "\n", "\n"),
    "llava_llama_2": Template(
        "llava_llama_2",
        "You are a helpful language and vision assistant. You are able to understand the "
        "visual content that the user provides, and assist the user with a variety of tasks "
        "using natural language.",
        style="llama_2", sep="<s>",
    ),
    "mistral_instruct": Template("mistral_instruct", "", style="llama_2", sep=""),
    # LLaVA v0 (April 2023): "###" between turns.
    "llava_v0": Template("llava_v0", _HUMAN_SYSTEM, ("Human", "Assistant"), "single", "###", None),
    # LLaVA-1.6-34b (Yi): ChatML with a one-line system message.
    "chatml_direct": Template(
        "chatml_direct", "<|im_start|>system\nAnswer the questions.",
        ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt", "<|im_end|>", None,
    ),
}


# Where a model names no template, it is answered in the one the original's
# CLI uses for LLaVA v1 models.
DEFAULT_CONV_MODE = "llava_v1"
# The original's chat CLI answers LLaVA-1.5 in llava_v1 ("a curious human"),
# but LLaVA-1.5 was trained (`--version v1`) and is benchmarked in vicuna_v1
# ("a curious user"): the two differ only in the system message.
TRAINED_WITH = {"llava_v1": "vicuna_v1"}


def trained_conv_mode(conv_mode: str) -> str:
    """The template a model answering in `conv_mode` was instruction-tuned with."""
    return TRAINED_WITH.get(conv_mode, conv_mode)


def conv_mode_from_name(name: str) -> str:
    """The template the original's CLI (llava/serve/cli.py) picks from a model's name."""
    n = name.lower()
    for part, mode in (("llama-2", "llava_llama_2"), ("mistral", "mistral_instruct"),
                       ("v1.6-34b", "chatml_direct"), ("v1", "llava_v1"), ("mpt", "mpt")):
        if part in n:
            return mode
    return "llava_v0"


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join([CHAT_TEMPLATE, *TEMPLATES])
        raise LlavaError(f"unknown conv mode {name!r}; known modes: {known}") from None


# ---------------------------------------------------------------- prompts


def render(messages: list, conv_mode: str, tokenizer=None, add_generation_prompt: bool = True) -> str:
    """Messages ({"role": "system"|"user"|"assistant", "content"}) -> prompt text.

    `<image>` marks where an image goes. A leading system message replaces the
    template's system text. With `add_generation_prompt` the prompt ends with
    an empty assistant turn ("... ASSISTANT:"), as the original's CLI makes it.
    """
    if conv_mode == CHAT_TEMPLATE:
        return _apply_chat_template(tokenizer, messages, add_generation_prompt)
    template = get_template(conv_mode)
    system, turns = template.system, []
    for n, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role == "system" and n == 0:
            system = content or ""
        elif role in ("user", "assistant"):
            turns.append((role, content))
        else:
            raise LlavaError(f"message {n}: role {role!r} (expected a leading system, then user/assistant)")
    # get_prompt's image rule: the first message's <image> goes to its front.
    # The original holds one image per conversation; with several in that
    # message we leave it alone rather than drop images.
    if turns and turns[0][0] == "user" and (turns[0][1] or "").count(IMAGE_PLACEHOLDER) == 1:
        text = turns[0][1].replace(IMAGE_PLACEHOLDER, "").strip()
        turns[0] = ("user", f"{IMAGE_PLACEHOLDER}\n{text}")
    if add_generation_prompt:
        turns.append(("assistant", None))
    return _prompt(template, system, turns)


def _prompt(template: Template, system: str, turns: list) -> str:
    """The original's get_prompt for (role, message) turns; a falsy message is an open turn."""
    t = template
    roles = {"user": t.roles[0], "assistant": t.roles[1]}
    if t.style == "single":
        out = system + t.sep
        for role, msg in turns:
            out += f"{roles[role]}: {msg}{t.sep}" if msg else f"{roles[role]}:"
        return out
    if t.style == "mpt":
        out = system + t.sep
        for role, msg in turns:
            out += f"{roles[role]}{msg}{t.sep}" if msg else roles[role]
        return out
    if t.style == "two":
        seps = (t.sep, t.sep2)
        out = system + t.sep
        for i, (role, msg) in enumerate(turns):
            out += f"{roles[role]}: {msg}{seps[i % 2]}" if msg else f"{roles[role]}:"
        return out
    if t.style == "plain":
        seps = (t.sep, t.sep2)
        return system + "".join(msg + seps[i % 2] for i, (_, msg) in enumerate(turns) if msg)
    # llama_2: "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] ..."
    if not turns or turns[0][0] != "user" or not turns[0][1]:
        raise LlavaError(f"the {t.name} template needs the conversation to start with a user message")
    out = ""
    for i, (_, msg) in enumerate(turns):
        if not msg:
            continue
        if i == 0 and system:
            msg = f"<<SYS>>\n{system}\n<</SYS>>\n\n{msg}"
        out += f"{t.sep}[INST] {msg} [/INST]" if i % 2 == 0 else f" {msg} {t.sep2}"
    return out.lstrip(t.sep)  # a character-set strip, as the original's


def _apply_chat_template(tokenizer, messages: list, add_generation_prompt: bool) -> str:
    """The tokenizer's jinja template. llava-hf templates want content lists
    ([{"type": "image"}]* + [{"type": "text"}]); others take plain strings, and
    show a list as its Python repr, so that (or an error) means: use strings."""
    if tokenizer is None or (getattr(tokenizer, "chat_template", None) is None
                             and not getattr(tokenizer, "has_chat_template", False)):
        raise LlavaError(
            "conv mode 'chat_template' needs a tokenizer with a chat template; "
            f"pick one of: {', '.join(TEMPLATES)}"
        )

    def as_list(content):
        text = (content or "").replace(IMAGE_PLACEHOLDER, "").strip()
        return [{"type": "image"}] * (content or "").count(IMAGE_PLACEHOLDER) + [{"type": "text", "text": text}]

    def apply(msgs):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    try:
        text = apply([{**m, "content": as_list(m["content"])} for m in messages])
        if "{'type': " not in text:
            return text
    except Exception:  # templates fail in many ways on content they do not expect
        pass
    try:
        return apply([dict(m) for m in messages])
    except Exception as e:
        raise LlavaError(f"the tokenizer's chat template failed: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------- tokens


class OriginalTokenizer:
    """A tokenizer whose `encode` gives the ids the original LLaVA's does.

    The original tokenizes with transformers' slow, sentencepiece
    LlamaTokenizer (`use_fast=False`). The fast one that converted models
    carry differs where a text starts with a space: sentencepiece always
    puts its "▁" word prefix in front, the fast pre-tokenizer (Metaspace)
    only where none is there, so " ASSISTANT:" loses a "▁". Every piece
    between two `<image>`s is such a text (a human turn that is only
    `<image>` leaves " ASSISTANT: ..." after it), and so is every text after
    a special token for a `legacy` tokenizer. So, for Metaspace tokenizers,
    `encode` does what the slow tokenizer does: split the text on added
    tokens, give each text segment the prefix where the slow one gives it
    (every segment when `legacy`; else only the text's start), and run the
    BPE model on exactly that string. Any other tokenizer is used as it is.
    Everything but `encode` is the wrapped tokenizer's.
    """

    def __init__(self, tokenizer, legacy: bool = True):
        self._tokenizer = tokenizer
        hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper holds transformers'
        backend = getattr(hf, "backend_tokenizer", None)
        self.slow_legacy = legacy if backend is not None and _is_metaspace(backend) else None
        if self.slow_legacy is None:
            return
        self._bpe = backend.model
        added = sorted(hf.get_added_vocab().items(), key=lambda kv: -len(kv[0]))
        self._added = dict(added)
        self._split = re.compile("(" + "|".join(re.escape(t) for t, _ in added) + ")") if added else None
        probe = list(hf.encode("a", add_special_tokens=False))
        full = list(hf.encode("a"))
        start = next(i for i in range(len(full)) if full[i:i + len(probe)] == probe)
        self._before, self._after = full[:start], full[start + len(probe):]

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        if self.slow_legacy is None:
            return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))
        ids = []
        if text:
            if not self.slow_legacy:  # the prefix goes in front of the whole text, once
                text = "▁" + text.replace("▁", " ")
            parts = [p for p in (self._split.split(text) if self._split else [text]) if p]
            if not self.slow_legacy and len(parts) > 1 and parts[0] == "▁" and parts[1] in self._added:
                parts = parts[1:]  # a text that starts with a special token gets no prefix
            for part in parts:
                if part in self._added:
                    ids.append(self._added[part])
                else:
                    part = ("▁" if self.slow_legacy else "") + part.replace(" ", "▁")
                    ids += [t.id for t in self._bpe.tokenize(part)]
        return (self._before + ids + self._after) if add_special_tokens else ids

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _is_metaspace(backend) -> bool:
    """A BPE tokenizer whose pre-tokenizer adds sentencepiece's "▁" prefix."""
    import json

    spec = json.loads(backend.to_str())
    if (spec.get("model") or {}).get("type") != "BPE":
        return False
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps)


def tokenize(tokenizer, text: str, image_token_index: int, num_visual_tokens: int = 1) -> list:
    """Prompt text -> token ids, as the original's `tokenizer_image_token`.

    The text between `<image>`s is tokenized piece by piece with the
    tokenizer's special tokens; the first piece keeps its BOS, the others lose
    their first token (their BOS); each `<image>` becomes `num_visual_tokens`
    copies of `image_token_index` (a list: the k-th image's count for the k-th). So the ids do not depend on whether
    `<image>` is in the vocabulary. One addition: a text that already starts
    with the BOS string (some chat templates write it) gets one BOS, not two,
    as mlx-lm does. (The original's templates never start with it.)
    """
    ids = _tokenizer_image_token(tokenizer, text, image_token_index, num_visual_tokens)
    bos, bos_text = tokenizer.bos_token_id, getattr(tokenizer, "bos_token", None)
    if bos is not None and ids[:2] == [bos, bos] and bos_text and text.startswith(bos_text):
        ids = ids[1:]
    return ids


def _tokenizer_image_token(tokenizer, text, image_token_index, num_visual_tokens=1) -> list:
    """The original's tokenizer_image_token, to the letter (the target arithmetic needs it so)."""
    chunks = [list(tokenizer.encode(piece)) for piece in text.split(IMAGE_PLACEHOLDER)]
    bos = tokenizer.bos_token_id
    drop = 1 if bos is not None and chunks[0][:1] == [bos] else 0
    counts = num_visual_tokens if isinstance(num_visual_tokens, (list, tuple)) else \
        [num_visual_tokens] * (len(chunks) - 1)
    ids = chunks[0]
    for chunk, count in zip(chunks[1:], counts):
        ids += [image_token_index] * count + chunk[drop:]
    return ids


# ---------------------------------------------------------------- targets

_FROM = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def build_targets(tokenizer, conversation: list, conv_mode: str, image_token_index: int,
                  num_visual_tokens: int = 1, image_wrap: Optional[tuple] = None) -> tuple:
    """A LLaVA JSON conversation ([{"from": "human"|"gpt", "value"}]) -> (input_ids, labels).

    Labels are IGNORE_INDEX where nothing is learned: the system text, the
    questions, the image. The answers and the separator that ends each are
    learned, by the original's rules for the conv mode (see the functions
    below). A sample with no `<image>` is text-only and gets no image tokens.
    `image_wrap`: the (before, after) tokens of `mm_use_im_start_end` models.
    """
    turns = []
    for n, turn in enumerate(conversation):
        role = _FROM.get(turn.get("from"))
        if role is None:
            raise LlavaError(f"turn {n}: unknown speaker {turn.get('from')!r} (expected human or gpt)")
        turns.append((role, turn["value"]))
    if turns and turns[0][0] != "user":  # the original skips a leading non-human turn
        turns = turns[1:]
    for j, (role, _) in enumerate(turns):
        if role != ("user", "assistant")[j % 2]:
            raise LlavaError("turns must alternate human, gpt, human, gpt, ...")
    # preprocess_multimodal: a turn holding <image> becomes "<image>\n" + the rest.
    turns = [
        (role, f"{IMAGE_PLACEHOLDER}\n{value.replace(IMAGE_PLACEHOLDER, '').strip()}".strip())
        if IMAGE_PLACEHOLDER in value else (role, value)
        for role, value in turns
    ]
    if image_wrap:
        wrapped = image_wrap[0] + IMAGE_PLACEHOLDER + image_wrap[1]
        turns = [(role, value.replace(IMAGE_PLACEHOLDER, wrapped)) for role, value in turns]

    if conv_mode == CHAT_TEMPLATE:
        ids, labels = _chat_template_targets(tokenizer, turns)
    else:
        template = get_template(conv_mode)
        if template.style == "plain":
            ids, labels = _plain_targets(tokenizer, template, turns)
        elif template.style == "mpt":
            ids, labels = _mpt_targets(tokenizer, template, turns)
        elif template.style not in ("two", "llama_2"):
            raise LlavaError(f"training with the {conv_mode} template is not supported (llava_v1, vicuna_v1, "
                             "plain, llava_llama_2, mistral_instruct, chatml_direct or chat_template)")
        else:
            ids, labels = _round_targets(tokenizer, template, turns)

    # Each image: num_visual_tokens copies of the image id, never trained
    # (the original's model also labels the visual tokens IGNORE_INDEX).
    out_ids, out_labels = [], []
    for i, label in zip(ids, labels):
        if i == _IMAGE:
            out_ids += [image_token_index] * num_visual_tokens
            out_labels += [IGNORE_INDEX] * num_visual_tokens
        else:
            out_ids.append(i)
            out_labels.append(label)
    return out_ids, out_labels


def _plain_targets(tokenizer, template: Template, turns: list) -> tuple:
    """Stage 1 (preprocess_plain): text "<image>" + caption + "\\n"; the question
    is dropped, BOS and image are masked, the caption and newline are learned."""
    if len(turns) != 2 or IMAGE_PLACEHOLDER not in turns[0][1]:
        raise LlavaError("a stage-1 (plain) sample is an image and its caption: [human <image>, gpt caption]")
    ids = _tokenizer_image_token(tokenizer, IMAGE_PLACEHOLDER + turns[1][1] + template.sep, _IMAGE)
    masked = len(_tokenizer_image_token(tokenizer, IMAGE_PLACEHOLDER, _IMAGE))
    return ids, [IGNORE_INDEX] * masked + ids[masked:]


def _round_targets(tokenizer, template: Template, turns: list) -> tuple:
    """preprocess_v1 / preprocess_llama_2: split the prompt into rounds on sep2
    ("</s>") and each round into instruction | answer on " ASSISTANT: " (or
    "[/INST] "); mask each instruction, learn each answer and its "</s>".

    Lengths come from tokenizing each round alone, as the original: the round's
    BOS stands for the "</s>" that ends it in the whole prompt, `- 2` takes the
    BOS and the lone trailing-space token off the instruction, and the count
    starts at 1 for the prompt's own BOS. If the sum disagrees with the prompt's
    length (the original's "tokenization mismatch") every label is masked.

    Rounds after the first: preprocess_v1 takes one token off when the
    tokenizer is not `legacy` (it adds no "▁" after "</s>" but does at the
    start of a text); preprocess_llama_2 never does. That rule is followed
    for the sentencepiece tokenizers it was written for (`OriginalTokenizer`);
    for others, which the original cannot train, the shift is measured: the
    tokens a round gains when tokenized alone rather than after sep2.
    """
    t = template
    prompt = _prompt(t, t.system, turns)
    ids = _tokenizer_image_token(tokenizer, prompt, _IMAGE)
    labels = np.array(ids)
    answer_sep = t.sep + t.roles[1] + ": " if t.style == "two" else "[/INST] "
    legacy = getattr(tokenizer, "slow_legacy", None)
    cur = 1
    labels[:cur] = IGNORE_INDEX
    for i, rou in enumerate(prompt.split(t.sep2)):
        if rou == "":
            break
        parts = rou.split(answer_sep)
        if len(parts) != 2:
            break
        round_len = len(_tokenizer_image_token(tokenizer, rou, _IMAGE))
        instruction_len = len(_tokenizer_image_token(tokenizer, parts[0] + answer_sep, _IMAGE)) - 2
        if i > 0:
            shift = 0 if t.style != "two" else (
                int(not legacy) if legacy is not None
                else round_len + 1 - len(_tokenizer_image_token(tokenizer, t.sep2 + rou, _IMAGE)))
            round_len -= shift
            instruction_len -= shift
        labels[cur:cur + instruction_len] = IGNORE_INDEX
        cur += round_len
    labels[cur:] = IGNORE_INDEX
    if cur != len(ids):
        logger.warning("tokenization mismatch: %d vs. %d; the sample is not trained", cur, len(ids))
        labels[:] = IGNORE_INDEX
    return ids, labels.tolist()


def _mpt_targets(tokenizer, template: Template, turns: list) -> tuple:
    """preprocess_mpt (chatml_direct, LLaVA-1.6-34b): split the prompt on sep
    ("<|im_end|>"); the first round is the system, the first question and
    its answer, each later one a question and its answer; split each on
    sep + the assistant role; mask the instruction (its length less one),
    learn the answer. The count starts at 0 (no BOS assumed); rounds after
    the first gain one token for a `legacy` sentencepiece tokenizer. Each
    round's closing sep is not counted, so the sum matches the prompt only
    when the tokenizer's BOS stands in for it (else, as the original, the
    sample is masked whole). The prompt's length leaves out padding tokens
    (the original pads with <unk>)."""
    t = template
    prompt = _prompt(t, t.system, turns)
    ids = _tokenizer_image_token(tokenizer, prompt, _IMAGE)
    labels = np.array(ids)
    pad = getattr(tokenizer, "unk_token_id", None)
    total = sum(1 for i in ids if i != pad)
    answer_sep = t.sep + t.roles[1]
    shift = int(bool(getattr(tokenizer, "slow_legacy", None)))
    rounds = prompt.split(t.sep)
    rounds = [t.sep.join(rounds[:3])] + [t.sep.join(rounds[k:k + 2]) for k in range(3, len(rounds), 2)]
    cur = 0
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(answer_sep)
        if len(parts) != 2:
            break
        round_len = len(_tokenizer_image_token(tokenizer, rou, _IMAGE))
        instruction_len = len(_tokenizer_image_token(tokenizer, parts[0] + answer_sep, _IMAGE)) - 1
        if i > 0:
            round_len += shift
            instruction_len += shift
        labels[cur:cur + instruction_len] = IGNORE_INDEX
        cur += round_len
    labels[cur:] = IGNORE_INDEX
    if cur != total:
        logger.warning("tokenization mismatch: %d vs. %d; the sample is not trained", cur, total)
        labels[:] = IGNORE_INDEX
    return ids, labels.tolist()


def _chat_template_targets(tokenizer, turns: list) -> tuple:
    """A rule for any chat template: an assistant message's tokens are those
    the prompt gains when the message is added (the conversation up to it with
    a generation prompt, against the conversation up to and including it),
    taken as the common token prefixes with the whole conversation."""
    messages = [{"role": role, "content": value} for role, value in turns]
    full = tokenize(tokenizer, render(messages, CHAT_TEMPLATE, tokenizer, False), _IMAGE)
    labels = [IGNORE_INDEX] * len(full)

    def prefix(n_messages, generation_prompt):
        text = render(messages[:n_messages], CHAT_TEMPLATE, tokenizer, generation_prompt)
        ids = tokenize(tokenizer, text, _IMAGE)
        n = 0
        while n < min(len(ids), len(full)) and ids[n] == full[n]:
            n += 1
        return n

    for k, (role, _) in enumerate(turns):
        if role == "assistant":
            start, stop = prefix(k, True), prefix(k + 1, False)
            labels[start:stop] = full[start:stop]
    return full, labels
