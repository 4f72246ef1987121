"""Batched generation: many LLaVA requests decoded together, joining and leaving at any step.

The requests inserted together have their images encoded in one
vision-tower call and their prompts (merged embeddings, visual tokens
spliced in) prefilled together, all but each one's last token,
right-padded as mlx-lm pads prompts so that no real token attends to
padding; each request gets its own KV cache, cut out of the batch's. It
then joins mlx-lm's `BatchGenerator` with that cache and its last token:
mlx-lm left-pads the caches into one batch, decodes every sequence one
token per step, stops each at its own EOS or token limit and lets it leave,
and takes new sequences in at the next step (continuous batching).

    gen = BatchGenerator(model, processor)
    uids = gen.insert([Request.ask("What is it?", image="cat.jpg"), ...])
    while len(gen):
        for r in gen.next():          # one token for each running request
            print(r.uid, r.text, r.finish_reason)

Greedy decoding gives the same tokens as one request at a time, up to the
last bits of float arithmetic: a batched matmul may round differently from a
single one, which could flip a token only where two logits tie to those
bits (on MLX's CPU backend with OpenBLAS the batched log-probabilities were
measured equal to the single ones, bit for bit; see tests/test_batch.py).
"""

from dataclasses import dataclass, field
from itertools import islice
from typing import Iterable, Iterator, List, Optional, Sequence

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
    each image goes) and its `images` in placeholder order. `prompt`, when
    given, is the prompt text itself, already in a template (messages ignored)."""

    messages: List[dict]
    images: Sequence = ()
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: Optional[float] = None
    conv_mode: Optional[str] = None
    prompt: Optional[str] = None

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
    once; more wait their turn inside mlx-lm. Call it from one thread (a
    server's generation loop), as mlx-lm's own.
    """

    def __init__(self, model, processor, max_batch_size: int = 8, prefill_step_size: int = 2048):
        self.model = model
        self.processor = processor
        self.prefill_step_size = prefill_step_size
        eos = sorted(processor.tokenizer.eos_token_ids)
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

    def prompt_ids(self, request: Request, image_sizes=None) -> list:
        """The request's prompt token ids, `<image>` expanded to visual tokens
        (with AnyRes, each image's count by its (height, width) in `image_sizes`)."""
        if request.prompt is not None:
            placeholders = request.prompt.count(IMAGE_PLACEHOLDER)
        else:
            placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in request.messages if m["role"] == "user")
        if placeholders != len(request.images):
            raise LlavaError(
                f"the conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
                f"but {len(request.images)} image(s)"
            )
        text = request.prompt
        if text is None:
            text = self.processor.prompt(request.messages, conv_mode=request.conv_mode)
        ids = self.processor.encode(text, image_sizes)
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
        loaded = [[load_image(image) for image in r.images] for r in requests]
        prompts = [self.prompt_ids(r, [(im.height, im.width) for im in ims]) for r, ims in zip(requests, loaded)]
        images = [im for ims in loaded for im in ims]
        features = None
        if images:  # every image of these requests (every AnyRes crop) in one vision-tower call
            features = self.model.encode_images(*self.processor.image_inputs(images))
        mine, first = [], 0
        for ims in loaded:
            # (images, T, D) sliced by image; AnyRes gives (tokens, D), sliced by each image's count
            n = len(ims) if features is None or features.ndim == 3 else \
                sum(self.processor.visual_tokens((im.height, im.width)) for im in ims)
            mine.append(features[first : first + n] if ims else None)
            first += n
        caches = self.prefill(prompts, mine)
        max_tokens = [max(1, min(r.max_tokens, self.processor.context_length - len(ids)))
                      for r, ids in zip(requests, prompts)]
        uids = self.generator.insert(
            [[ids[-1]] for ids in prompts],
            max_tokens=max_tokens,
            caches=caches,
            samplers=[None if r.temperature == 0 else make_sampler(r.temperature, r.top_p) for r in requests],
            logits_processors=[make_logits_processors(repetition_penalty=r.repetition_penalty)
                               + [only_text_tokens(self.model, self.processor)] for r in requests],
        )
        for uid, ids in zip(uids, prompts):
            self.running[uid] = _Running(self.processor.tokenizer.detokenizer, len(ids))
        return uids

    def prefill(self, prompts: list, features: list) -> list:
        """A KV cache per prompt holding all its tokens but the last, from the merged
        embeddings. The prompts run together, right-padded as mlx-lm pads them (so
        a real token never attends to padding) in the chunks `mlx_lm.generate_step`
        uses; each prompt's cache is then cut out of the batch's."""
        lm = self.model.language_model
        lengths = [len(ids) - 1 for ids in prompts]
        longest = max(lengths)
        if longest == 0:
            return [make_prompt_cache(lm) for _ in prompts]
        embeds = mx.stack([
            mx.pad(self.model.embed(mx.array([ids]), image_features=f)[0][:-1], [(0, longest - n), (0, 0)])
            for ids, f, n in zip(prompts, features, lengths)
        ])
        tokens = mx.array([ids[:-1] + [0] * (longest - n) for ids, n in zip(prompts, lengths)])
        singles = [make_prompt_cache(lm) for _ in prompts]
        cache = [layer.merge([c[i] for c in singles]) for i, layer in enumerate(singles[0])]
        padding = [longest - n for n in lengths]
        if max(padding):
            for c in cache:
                c.prepare(lengths=lengths, right_padding=padding)
        for start in range(0, longest, self.prefill_step_size):
            end = min(start + self.prefill_step_size, longest)
            lm(tokens[:, start:end], cache=cache, input_embeddings=embeds[:, start:end])
            mx.eval([c.state for c in cache])
        if max(padding):
            for c in cache:
                c.finalize()
        return [[c.extract(i) for c in cache] for i in range(len(prompts))]

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


def stream_batch(model, processor, requests: Iterable[Request], batch_size: int = 8) -> Iterator[Response]:
    """Decode `requests` (any iterable, read as the batch has room), at most
    `batch_size` at once. The batch is topped up once half of it has finished,
    so that each refill's prompts are prefilled, and their images encoded,
    together (measured on the demo's short answers: 1.1-1.4x the answers/s of
    topping up after every finished request). Yields every Response; `uid` is
    the request's position in `requests`."""
    gen = BatchGenerator(model, processor, max_batch_size=batch_size)
    index, pending, position = {}, iter(requests), 0
    try:
        while True:
            take = list(islice(pending, batch_size - len(gen))) if len(gen) <= batch_size // 2 else []
            for uid in gen.insert(take):
                index[uid], position = position, position + 1
            if not len(gen):
                return
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


def only_text_tokens(model, processor):
    """A logits processor that never picks the image token nor an id past the
    tokenizer's vocabulary: llava-hf pads the output layer (32064 rows for
    32002 tokens), and such ids decode to nothing."""
    rows = model.language_model.model.embed_tokens.weight.shape[0]
    known = min(rows, len(getattr(processor.tokenizer, "_tokenizer", processor.tokenizer)))
    ids = mx.arange(rows)
    keep = (ids < known) & (ids != processor.image_token_index)

    def mask(tokens, logits):
        return mx.where(keep[: logits.shape[-1]], logits, -mx.inf)

    return mask
