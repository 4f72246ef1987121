"""Prompt -> merged embeddings -> streaming tokens, through mlx-lm's decoding.

The vision tower runs once per image; the merged embeddings are prefilled
into mlx-lm's KV cache and decoded by `mlx_lm.stream_generate` (its
samplers, logits processors, detokenizer and timing). A `Chat` keeps the
cache between turns: a new turn reuses the longest cached prefix of its
tokens, so the image and the history are neither re-encoded nor re-prefilled.
"""

from typing import Iterator, Optional

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import GenerationResponse
from mlx_lm.models.cache import (
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import common_prefix_len

from .batch import only_text_tokens  # the logits mask, one definition shared with batching
from .conversation import IMAGE_PLACEHOLDER
from .errors import LlavaError, check_sampling
from .image import load_image


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
        self.features = []  # their visual tokens, (T, D) each, computed once
        self.pending_image = pending
        self.cache = make_prompt_cache(self.model.language_model)
        self.tokens = []  # the token ids whose keys and values are in the cache

    def restart(self):
        """Start the conversation over about the same first image, keeping its
        visual tokens and the cache (the shared prompt prefix is reused)."""
        first = self.images[:1]
        self.messages = self.messages[:1] if self.system else []
        self.pending_image = first[0] if first else self.pending_image
        self.images, self.features = [], self.features[:1] if first else []

    def ask(self, question: str, image=None, max_tokens: int = 256, temperature: float = 0.0,
            top_p: float = 1.0, seed: Optional[int] = None,
            repetition_penalty: Optional[float] = None) -> Iterator[GenerationResponse]:
        """Stream the answer to `question` (about `image`, if one is given now).

        `max_tokens` -1: until the answer ends or the context is full. Bad
        arguments raise before the conversation changes."""
        if not isinstance(question, str):
            raise LlavaError(f"the question must be a string, not {type(question).__name__}")
        check_sampling(max_tokens, temperature, top_p, seed, repetition_penalty)
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
        sizes = [(im.height, im.width) for im in images]  # AnyRes counts visual tokens by size
        ids = self.processor.encode(self.processor.prompt(messages, conv_mode=self.conv_mode), sizes)
        context = self.processor.context_length
        if len(ids) >= context:
            raise LlavaError(
                f"the prompt is {len(ids)} tokens, too long for the model's context of {context} tokens"
            )
        self.images, self.messages, self.pending_image = images, messages, None
        max_tokens = context - len(ids) if max_tokens == -1 else min(max_tokens, context - len(ids))
        if seed is not None:
            mx.random.seed(seed)

        generated = []
        try:
            reused = self.reuse_cache(ids)
            while len(self.features) < len(self.images):  # each image's visual tokens, (T, D), once
                pixels, size = self.processor.image_inputs([self.images[len(self.features)]])
                visual = self.model.encode_images(pixels, size)
                self.features.append(visual[0] if visual.ndim == 3 else visual)
            features = mx.concatenate(self.features) if self.features else None
            embeds = self.model.embed(mx.array([ids]), image_features=features)[0]
            for response in mlx_lm.stream_generate(
                self.model.language_model,
                self.processor.tokenizer,
                mx.array(ids[reused:]),
                max_tokens=max_tokens,
                input_embeddings=embeds[reused:],
                prompt_cache=self.cache,
                sampler=make_sampler(temperature, top_p),
                logits_processors=make_logits_processors(repetition_penalty=repetition_penalty)
                + [only_text_tokens(self.model, self.processor)],
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
            answer = [t for t in generated if t not in self.processor.tokenizer.eos_token_ids]
            self.messages.append({"role": "assistant", "content": self.processor.decode(answer).strip()})

    def say(self, question: str, image=None, **sampling) -> str:
        """`ask`, collected into one string."""
        return "".join(r.text for r in self.ask(question, image, **sampling))

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


def stream_generate(model, processor, prompt: str, image=None, **kwargs) -> Iterator[GenerationResponse]:
    """One question (about one image, or none), streamed. `kwargs`: system,
    conv_mode, max_tokens, temperature, top_p, seed, repetition_penalty."""
    chat = Chat(model, processor, image, kwargs.pop("system", None), kwargs.pop("conv_mode", None))
    yield from chat.ask(prompt, **kwargs)


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
