"""Prompt -> merged embeddings -> streaming tokens, through mlx-lm's decoding.

The vision tower runs once per image; the merged embeddings are prefilled
into mlx-lm's KV cache and decoded by `mlx_lm.stream_generate` (its
samplers, logits processors, detokenizer and timing). A `Chat` keeps the
cache between turns, and the ids of what the model said: a follow-up turn
is the previous turn's ids, then the new question's, so only the new
question is prefilled (a re-tokenized answer may differ from what the model
generated). A prompt cache file keeps an image's and a system prompt's keys
and values across processes (`save_prompt_cache`, `load_prompt_cache`).
"""

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import GenerationResponse
from mlx_lm.models.cache import (
    KVCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import common_prefix_len

from . import atomic
# One definition each, shared with batching: the logits mask, an image's identity,
# a cache prefix, each image's visual tokens from one vision-tower call.
from .batch import PrefixCache, encode_each, image_digest, only_text_tokens
from .conversation import IMAGE_PLACEHOLDER
from .errors import LlavaError, check_sampling, is_int, is_number
from .image import load_image

# Chunks of the prompt the language model prefills at once (mlx-lm's
# `prefill_step_size`); see benchmarks/inference.md for how it was chosen.
PREFILL_STEP = 2048


class Chat:
    """A multi-turn conversation about images, with the KV cache kept between turns.

    >>> chat = Chat(model, processor, image="cat.jpg")
    >>> for r in chat.ask("What is in the image?"): print(r.text, end="")
    >>> print(chat.say("What colour is it?"))
    """

    def __init__(self, model, processor, image=None, system: Optional[str] = None,
                 conv_mode: Optional[str] = None):
        self.model = model
        self.processor = processor
        self.conv_mode = conv_mode
        self.system = system
        self.reset(image)

    def reset(self, image=None):
        """Forget the conversation (and the cache); optionally start on a new
        image. A bad image raises before anything is forgotten."""
        pending = load_image(image) if image is not None else None
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.images = []  # PIL images, in prompt order
        self.features = []  # their visual tokens (None until needed), computed once each
        self.pending_image = pending
        self.cache = make_prompt_cache(self.model.language_model)
        self.tokens = []  # the token ids whose keys and values are in the cache
        self.said = None  # (prompt text, its ids + the ids the model answered) of the last turn
        self.prompt_ids = []  # the last prompt's ids

    def restart(self):
        """Start the conversation over about the same first image, keeping its
        visual tokens and the cache (the shared prompt prefix is reused)."""
        first = self.images[:1]
        self.messages = self.messages[:1] if self.system else []
        self.pending_image = first[0] if first else self.pending_image
        self.images = []
        self.features = self.features[:1] if first else []
        self.said = None

    def ask(self, question: str, image=None, max_tokens: int = 256, temperature: float = 0.0,
            top_p: float = 1.0, seed: Optional[int] = None,
            repetition_penalty: Optional[float] = None,
            logit_bias: Optional[Dict[int, float]] = None,
            logits_processors: Optional[List[Callable]] = None) -> Iterator[GenerationResponse]:
        """Stream the answer to `question` (about `image`, if one is given now).

        `max_tokens` -1: until the answer ends or the context is full.
        `logit_bias` ({token id: added logit}, -inf bans a token) and
        `logits_processors` ([f(tokens, logits) -> logits]) as mlx-lm takes
        them. Bad arguments raise before the conversation changes."""
        if not isinstance(question, str):
            raise LlavaError(f"the question must be a string, not {type(question).__name__}")
        check_sampling(max_tokens, temperature, top_p, seed, repetition_penalty)
        check_logits_options(logit_bias, logits_processors, self.model.language_model.model.embed_tokens.weight.shape[0])
        image = load_image(image) if image is not None else self.pending_image
        images = self.images + ([image] if image is not None else [])
        content = question
        if image is not None and IMAGE_PLACEHOLDER not in content:
            content = f"{IMAGE_PLACEHOLDER}\n{content}"
        messages = self.messages + [{"role": "user", "content": content}]
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] == "user")
        if placeholders != len(images):
            raise LlavaError(
                f"the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
                f"but {len(images)} image(s)"
            )
        text = self.processor.prompt(messages, conv_mode=self.conv_mode)
        sizes = [(im.height, im.width) for im in images]  # AnyRes counts visual tokens by size
        ids = self.follow_up(text, sizes) or self.encode(text, sizes)
        context = self.processor.context_length
        if len(ids) >= context:
            raise LlavaError(
                f"the prompt is {len(ids)} tokens, too long for the model's context of {context} tokens"
            )
        self.images, self.messages, self.pending_image = images, messages, None
        self.features = (self.features + [None] * len(images))[: len(images)]
        max_tokens = context - len(ids) if max_tokens == -1 else min(max_tokens, context - len(ids))
        if seed is not None:
            mx.random.seed(seed)
        processors = make_logits_processors(logit_bias=logit_bias, repetition_penalty=repetition_penalty)
        processors += list(logits_processors or []) + [only_text_tokens(self.model, self.processor)]

        self.prompt_ids, generated = ids, []
        try:
            reused = self.reuse_cache(ids)
            for response in mlx_lm.stream_generate(
                self.model.language_model,
                self.processor.tokenizer,
                mx.array(ids[reused:]),
                max_tokens=max_tokens,
                input_embeddings=self.embed(ids, reused),
                prompt_cache=self.cache,
                prefill_step_size=PREFILL_STEP,
                sampler=make_sampler(temperature, top_p),
                logits_processors=processors,
            ):
                generated.append(response.token)
                yield response
        finally:
            # Also on Ctrl-C (even mid-prefill) or an abandoned stream: keep
            # what was said, and know exactly which tokens the cache holds.
            known, held = ids + generated, self.cache[0].offset
            if held > len(known):
                trim_prompt_cache(self.cache, held - len(known))
            self.tokens = known[:held]
            self.said = (text, known)
            answer = [t for t in generated if t not in self.processor.tokenizer.eos_token_ids]
            self.messages.append({"role": "assistant", "content": self.processor.decode(answer).strip()})

    def say(self, question: str, image=None, **sampling) -> str:
        """`ask`, collected into one string."""
        return "".join(r.text for r in self.ask(question, image, **sampling))

    def encode(self, text: str, sizes: list) -> list:
        """The ids of prompt text whose placeholders stand for the first images of `sizes`."""
        return self.processor.encode(text, sizes[: text.count(IMAGE_PLACEHOLDER)])

    def follow_up(self, text: str, sizes: list) -> Optional[list]:
        """The ids of prompt `text` when it continues the last turn: that
        turn's prompt ids and the ids the model answered (not its answer
        re-tokenized, which may differ), then the ids of the text after the
        answer. None when `text` does not continue it that way (the caller
        then tokenizes the whole text)."""
        if self.said is None or not self.messages or self.messages[-1]["role"] != "assistant":
            return None
        previous, said = self.said
        answer = self.messages[-1]["content"]
        rest = text[len(previous):]
        after = len(rest) - len(rest.lstrip())
        if not text.startswith(previous) or not rest[after:].startswith(answer):
            return None
        cut = len(previous) + after + len(answer)
        head, whole = self.encode(text[:cut], sizes), self.encode(text, sizes)
        if whole[: len(head)] != head:
            return None  # the answer's end is no token boundary in the text
        tail = whole[len(head):]
        if said and said[-1] in self.processor.tokenizer.eos_token_ids:
            if tail[:1] == said[-1:]:
                tail = tail[1:]  # the model said the end of its answer itself
            else:
                said = said[:-1]  # the template ends an answer otherwise
        return said + tail

    def reuse_cache(self, ids: list) -> int:
        """Trim the cache back to its longest prefix shared with `ids`; return that length."""
        keep = min(common_prefix_len(self.tokens, ids), len(ids) - 1)  # feed at least one token
        drop = len(self.tokens) - keep
        if drop > 0:
            if not can_trim_prompt_cache(self.cache):
                self.cache = make_prompt_cache(self.model.language_model)
                keep = 0
            else:
                trim_prompt_cache(self.cache, drop)
        self.tokens = self.tokens[:keep]
        return keep

    def counts(self) -> list:
        """Visual tokens of each image of the conversation (all equal but with AnyRes)."""
        return [self.processor.visual_tokens((im.height, im.width)) for im in self.images]

    def embed(self, ids: list, start: int) -> mx.array:
        """The input embeddings of `ids[start:]` (L, D), with the visual tokens
        of the images whose tokens lie there; the vision tower runs once, for
        all those images not encoded yet. The image tokens are counted here,
        from the ids on the host, so the merge needs no device sync."""
        image_token, counts = self.processor.image_token_index, self.counts()
        n_tokens = ids.count(image_token)
        if n_tokens != sum(counts):
            raise LlavaError(
                f"the prompt has {n_tokens} image tokens but {len(self.images)} image(s) give "
                f"{sum(counts)} visual tokens"
            )
        tail = ids[start:]
        first = ids[:start].count(image_token)  # visual tokens already in the cache
        last = first + tail.count(image_token)
        ends = list(itertools.accumulate(counts))
        wanted = [i for i, end in enumerate(ends) if end > first and end - counts[i] < last]
        self.encode_images([i for i in wanted if self.features[i] is None])
        features = None
        if wanted:
            offset = first - (ends[wanted[0]] - counts[wanted[0]])
            rows = mx.concatenate([self.features[i] for i in wanted])
            features = rows[offset: offset + last - first][None]
        return self.model.embed(mx.array([tail]), image_features=features, check=False)[0]

    def encode_images(self, indices: list):
        """Visual tokens (T, D) for these images, in one call of the vision tower."""
        if indices:
            for i, features in zip(indices, encode_each(self.model, self.processor, [self.images[i] for i in indices])):
                self.features[i] = features

    # ------------------------------------------------------------ prompt cache files

    def save_prompt_cache(self, path, length: Optional[int] = None):
        """Write the keys and values of the conversation's first `length`
        tokens (default: the last prompt's) to a `.safetensors` file, with
        what they were made from: the model, the images, the ids. A later
        `load_prompt_cache` (another process too) then skips the vision tower
        and the prefill of that prefix."""
        if not self.tokens:
            raise LlavaError("nothing to save: the conversation has no prompt in the cache yet")
        if not all(isinstance(c, KVCache) for c in self.cache):
            raise LlavaError("only a plain KV cache can be saved to a prompt cache file")
        n = min(length or len(self.prompt_ids) or len(self.tokens), len(self.tokens))
        tokens = self.tokens[:n]
        held, counts = tokens.count(self.processor.image_token_index), self.counts()
        images = sum(1 for end, count in zip(itertools.accumulate(counts), counts) if end - count < held)
        metadata = {
            "format": PROMPT_CACHE_FORMAT,
            "model": model_fingerprint(self.model),
            "images": json.dumps([image_digest(im) for im in self.images[:images]]),
            "tokens": json.dumps(tokens),
        }
        with atomic.file(path, what="the prompt cache ") as tmp:
            save_prompt_cache(str(tmp), PrefixCache.reuse(self.cache, n), metadata)

    def load_prompt_cache(self, path):
        """Take the keys and values of a file `save_prompt_cache` wrote, if
        it was made by this model from this conversation's images (the first
        ones, in order); anything else is refused. A later turn reuses the
        longest prefix its prompt shares with the file's ids."""
        path = Path(path)
        try:
            cache, metadata = load_prompt_cache(str(path), return_metadata=True)
        except FileNotFoundError:
            raise LlavaError(f"prompt cache {path} not found") from None
        except Exception as e:  # mlx raises plain RuntimeError/ValueError on a bad file
            raise LlavaError(f"{path} is not a prompt cache file ({type(e).__name__}: {e})".splitlines()[0]) from None
        if not isinstance(metadata, dict) or metadata.get("format") != PROMPT_CACHE_FORMAT:
            raise LlavaError(f"{path} is not an mlx-llava prompt cache file")
        if metadata.get("model") != model_fingerprint(self.model) or len(cache) != len(self.cache):
            raise LlavaError(f"{path} is a prompt cache of another model: refused (delete it, or name another file)")
        images = json.loads(metadata["images"])
        pending = [self.pending_image] if self.pending_image is not None else []
        mine = [image_digest(im) for im in self.images + pending]
        if mine[: len(images)] != images:
            what = "another image" if images and len(mine) >= len(images) else f"{len(images)} image(s), this conversation {len(mine)}"
            raise LlavaError(f"{path} is a prompt cache made for {what}: refused (delete it, or name another file)")
        tokens = json.loads(metadata["tokens"])
        if any(c.offset != len(tokens) for c in cache):
            raise LlavaError(f"{path} is damaged: its keys and values do not match its {len(tokens)} tokens")
        self.cache, self.tokens = cache, tokens


PROMPT_CACHE_FORMAT = "mlx-llava-prompt-cache-1"


def model_fingerprint(model) -> str:
    """A digest of the model's config and of a few values of every weight
    array: what a prompt cache file was made with (cheap; not a checksum of
    every weight)."""
    h = hashlib.sha1(json.dumps(getattr(model.args, "__dict__", {}), sort_keys=True, default=str).encode())
    for name, p in tree_flatten(model.parameters()):
        h.update(f"{name}{p.shape}{p.dtype}".encode())
        h.update(np.asarray(p.reshape(-1)[:8].astype(mx.float32) if p.dtype == mx.bfloat16 else p.reshape(-1)[:8]).tobytes())
    return h.hexdigest()


def check_logits_options(logit_bias, logits_processors, vocabulary: int):
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise LlavaError(f"logit_bias must be a dict {{token id: bias}}, not {type(logit_bias).__name__}")
        for token, bias in logit_bias.items():
            if not (is_int(token) and 0 <= token < vocabulary):
                raise LlavaError(f"logit_bias: {token!r} is not a token id (0 to {vocabulary - 1})")
            if not (is_number(bias) or bias == -math.inf):
                raise LlavaError(f"logit_bias: the bias of token {token} must be a number (or -inf), not {bias!r}")
    if logits_processors is not None and not (
        isinstance(logits_processors, (list, tuple)) and all(callable(p) for p in logits_processors)
    ):
        raise LlavaError("logits_processors must be a list of functions f(tokens, logits) -> logits")


def stream_generate(model, processor, prompt: str, image=None, prompt_cache=None,
                    **kwargs) -> Iterator[GenerationResponse]:
    """One question (about one image, or none), streamed. `kwargs`: system,
    conv_mode, max_tokens, temperature, top_p, seed, repetition_penalty,
    logit_bias, logits_processors.

    `prompt_cache`: a `.safetensors` file. When it exists it must have been
    made by this model from this image, and the prompt reuses its keys and
    values (the vision tower and the prefill of the shared prefix are
    skipped); when it does not, the prompt's are written there once the
    answer is complete."""
    chat = Chat(model, processor, image, kwargs.pop("system", None), kwargs.pop("conv_mode", None))
    existed = prompt_cache is not None and Path(prompt_cache).exists()
    if existed:
        chat.load_prompt_cache(prompt_cache)
    yield from chat.ask(prompt, **kwargs)
    if prompt_cache is not None and not existed:
        chat.save_prompt_cache(prompt_cache)


def generate(model, processor, prompt, image=None, verbose: bool = False, batch_size: int = 8, **kwargs):
    """One question's whole answer; with `verbose`, stream it and print the speeds.

    `prompt` a list: each question's answer, in order, decoded together
    `batch_size` at a time (`mlx_llava.batch`); `image` is then one image
    for all, or a list with one (or None) per question. Greedy answers equal
    those of one question at a time."""
    if isinstance(prompt, (list, tuple)):
        return _generate_many(model, processor, list(prompt), image, batch_size, **kwargs)
    text, last = [], None
    for last in stream_generate(model, processor, prompt, image, **kwargs):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(f"\n{speed_line(last)}")
    return "".join(text)


def _generate_many(model, processor, prompts: list, image, batch_size: int, system=None, seed=None,
                   **options) -> list:
    from .batch import Request, batch_generate

    images = image if isinstance(image, (list, tuple)) else [image] * len(prompts)
    if len(images) != len(prompts):
        raise LlavaError(f"{len(prompts)} prompts but {len(images)} images")
    if seed is not None:
        mx.random.seed(seed)
    requests = [Request.ask(p, image=i, system=system, **options) for p, i in zip(prompts, images)]
    return batch_generate(model, processor, requests, batch_size=batch_size)


def speed_line(r: GenerationResponse) -> str:
    return (
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"peak memory: {r.peak_memory:.2f} GB"
    )

