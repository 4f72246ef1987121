"""Batched generation: many LLaVA requests decoded together, joining and leaving at any step.

A request's prompt is turned into merged embeddings (its images' visual
tokens spliced in) and prefilled, all but its last token, into a KV cache of
its own, exactly as a single `generate` call prefills it; the images of all
the requests inserted together go through the vision tower in one call.
The request then joins mlx-lm's `BatchGenerator` with that cache and its last
token: mlx-lm left-pads the caches into one batch, decodes every sequence one
token per step, stops each at its own EOS or token limit and lets it leave,
and takes new sequences in at the next step (continuous batching).

    gen = BatchGenerator(model, processor)
    uids = gen.insert([Request.ask("What is it?", image="cat.jpg"), ...])
    while len(gen):
        for r in gen.next():          # one token for each running request
            print(r.uid, r.text, r.finish_reason)

Greedy decoding gives the same tokens as one request at a time, up to the
last bits of float arithmetic: a batched matmul may round differently from a
single one, which flips a token only where two logits tie to those bits.
"""

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import BatchGenerator as _MLXBatchGenerator
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .conversation import IMAGE_PLACEHOLDER
from .errors import LlavaError
from .image import load_image


@dataclass
class Request:
    """One conversation to answer: `messages` ({"role", "content"}, `<image>` where
    each image goes) and its `images` in placeholder order."""

    messages: List[dict]
    images: Sequence = ()
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: Optional[float] = None
    conv_mode: Optional[str] = None

    @classmethod
    def ask(cls, question: str, image=None, system: Optional[str] = None, **options) -> "Request":
        """One question about one image (or none), rendered as `generate` renders it."""
        content = question
        if image is not None and IMAGE_PLACEHOLDER not in content:
            content = f"{IMAGE_PLACEHOLDER}\n{content}"
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": content}
        ]
        return cls(messages, [] if image is None else [image], **options)


@dataclass
class Response:
    """One step of one request: its new token and text; `finish_reason` is
    "stop" (EOS, whose text is not included) or "length" on its last step."""

    uid: int
    token: int
    text: str
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    logprobs: Optional[mx.array] = None  # over the vocabulary, at this step


@dataclass
class _Running:
    detokenizer: object
    prompt_tokens: int
    tokens: list = field(default_factory=list)


class BatchGenerator:
    """Continuous batching of LLaVA requests over mlx-lm's `BatchGenerator`.

    `insert` may be called at any time, also while others decode; `next`
    advances every running request by one token; `remove` drops requests
    (a client that went away). `max_batch_size` bounds how many decode at
    once; more wait their turn inside mlx-lm.
    """

    def __init__(self, model, processor, max_batch_size: int = 8, prefill_step_size: int = 2048):
        self.model = model
        self.processor = processor
        self.prefill_step_size = prefill_step_size
        eos = sorted(processor.tokenizer.eos_token_ids)
        self.eos = set(eos)
        self.generator = _MLXBatchGenerator(
            model.language_model,
            stop_tokens=[[t] for t in eos],
            completion_batch_size=max_batch_size,
            prefill_batch_size=max_batch_size,
            prefill_step_size=prefill_step_size,
        )
        self.running = {}  # uid -> _Running

    def __len__(self) -> int:
        """Requests inserted and not yet finished."""
        return len(self.running)

    # ------------------------------------------------------------ requests in

    def prompt_ids(self, request: Request) -> list:
        """The request's prompt token ids, `<image>` expanded to visual tokens."""
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in request.messages if m["role"] == "user")
        if placeholders != len(request.images):
            raise LlavaError(
                f"the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
                f"but {len(request.images)} image(s)"
            )
        ids = self.processor.encode(self.processor.prompt(request.messages, conv_mode=request.conv_mode))
        context = self.processor.context_length
        if len(ids) >= context:
            raise LlavaError(
                f"the prompt is {len(ids)} tokens, too long for the model's context of {context} tokens"
            )
        if ids[-1] == self.processor.image_token_index:
            raise LlavaError(f"a prompt must not end with {IMAGE_PLACEHOLDER}")
        return ids

    def insert(self, requests: Sequence[Request]) -> List[int]:
        """Prefill `requests` and let them join the batch; returns their uids, in order."""
        requests = list(requests)
        if not requests:
            return []
        prompts = [self.prompt_ids(r) for r in requests]
        images = [load_image(image) for r in requests for image in r.images]
        features = None
        if images:  # every image of these requests in one vision-tower call
            features = self.model.encode_images(self.processor.preprocess(images))
        caches, first = [], 0
        for request, ids in zip(requests, prompts):
            n = len(request.images)
            mine = features[first : first + n] if n else None
            first += n
            caches.append(self.prefill(ids, mine))
        max_tokens = [max(1, min(r.max_tokens, self.processor.context_length - len(ids)))
                      for r, ids in zip(requests, prompts)]
        uids = self.generator.insert(
            [[ids[-1]] for ids in prompts],
            max_tokens=max_tokens,
            caches=caches,
            samplers=[None if r.temperature == 0 else make_sampler(r.temperature, r.top_p) for r in requests],
            logits_processors=[make_logits_processors(repetition_penalty=r.repetition_penalty) for r in requests],
        )
        for uid, ids in zip(uids, prompts):
            self.running[uid] = _Running(self.processor.tokenizer.detokenizer, len(ids))
        return uids

    def prefill(self, ids: list, features) -> list:
        """A KV cache holding all of `ids` but the last, from the merged embeddings,
        in the chunks `mlx_lm.generate_step` uses (so the same arithmetic as one request alone)."""
        lm = self.model.language_model
        cache = make_prompt_cache(lm)
        embeds = self.model.embed(mx.array([ids]), image_features=features)[0]
        for start in range(0, len(ids) - 1, self.prefill_step_size):
            end = min(start + self.prefill_step_size, len(ids) - 1)
            lm(mx.array(ids[start:end])[None], cache=cache, input_embeddings=embeds[start:end][None])
            mx.eval([c.state for c in cache])
        return cache

    # ------------------------------------------------------------ tokens out

    def next(self) -> List[Response]:
        """One decoding step: a Response for each request that made a token."""
        out = []
        for r in self.generator.next_generated():
            running = self.running.get(r.uid)
            if running is None:  # removed while its token was on the way
                continue
            running.tokens.append(r.token)
            detokenizer = running.detokenizer
            if r.finish_reason != "stop":  # EOS is not text
                detokenizer.add_token(r.token)
            if r.finish_reason is not None:
                detokenizer.finalize()
                del self.running[r.uid]
            out.append(Response(r.uid, r.token, detokenizer.last_segment, r.finish_reason,
                                running.prompt_tokens, len(running.tokens), r.logprobs))
        return out

    def remove(self, uids: Sequence[int]):
        """Stop these requests now (their KV caches are freed)."""
        uids = [u for u in uids if u in self.running]
        self.generator.remove(uids)
        for u in uids:
            del self.running[u]

    def close(self):
        self.generator.close()


def stream_batch(model, processor, requests: Sequence[Request], batch_size: int = 8) -> Iterator[Response]:
    """Decode `requests`, at most `batch_size` at once, topping the batch up as
    requests finish (each refill's images in one vision-tower call). Yields
    every Response; `uid` is the request's index in `requests`."""
    gen = BatchGenerator(model, processor, max_batch_size=batch_size)
    index, pending = {}, list(enumerate(requests))[::-1]
    try:
        while pending or len(gen):
            if pending and len(gen) < batch_size:
                take = [pending.pop() for _ in range(min(batch_size - len(gen), len(pending)))]
                for uid, (i, _) in zip(gen.insert([r for _, r in take]), take):
                    index[uid] = i
            for response in gen.next():
                response.uid = index.pop(response.uid) if response.finish_reason else index[response.uid]
                yield response
    finally:
        gen.close()


def batch_generate(model, processor, requests: Sequence[Request], batch_size: int = 8) -> List[str]:
    """The whole answer to each request, in order."""
    texts = [[] for _ in requests]
    for response in stream_batch(model, processor, requests, batch_size):
        texts[response.uid].append(response.text)
    return ["".join(t) for t in texts]
