"""Batched generation: the same greedy tokens as one request at a time, continuous batching.

Batched and single decoding run different matmul shapes (and the batch a
left-padding mask), so on MLX's CPU they could round differently in the last
bits, and a greedy token could then flip where two logits tie to those bits.
Measured here (OpenBLAS, float32): the batched log-probabilities of the
prompts below equal the single ones exactly, and the smallest gap between the
two best tokens at any step is 2.6e-4 on the random tiny LLaVA and 5e-3 on
the demo model's 195 held-out questions; so what the equality tests is the
batching itself: padding, per-sequence positions, stops, caches joining and
leaving, images landing in the right rows.
"""

import mlx.core as mx
import pytest
from PIL import Image

import mlx_llava
from mlx_llava import LlavaError, generate, stream_generate
from mlx_llava.batch import BatchGenerator, Request, batch_generate, stream_batch

QUESTIONS = ["What is in the image?", "Describe the image briefly.", "How many objects are there?",
             "Where is the star?", "What color is the triangle?", "Hello"]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Six different images of different sizes (so different pixels after padding)."""
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for k in range(6):
        image = Image.new("RGB", (40 + 3 * k, 30), (200 - 30 * k, 30 + 20 * k, 30))
        image.paste((20, 20, 220), (5 + k, 5, 20, 25))
        image.save(folder / f"{k}.png")
        paths.append(folder / f"{k}.png")
    return paths


def single_tokens(model, processor, question, image, max_tokens):
    return [r.token for r in stream_generate(model, processor, question, image=image, max_tokens=max_tokens)]


def batched_tokens(model, processor, requests, batch_size):
    tokens = [[] for _ in requests]
    for r in stream_batch(model, processor, requests, batch_size):
        tokens[r.uid].append(r.token)
    return tokens


@pytest.mark.parametrize("batch_size", [1, 2, 3, 6])
def test_batched_greedy_equals_one_at_a_time(loaded, pictures, batch_size):
    model, processor = loaded
    images = pictures[:5] + [None]  # a text-only prompt among them
    expected = [single_tokens(model, processor, q, i, 20) for q, i in zip(QUESTIONS, images)]
    requests = [Request.ask(q, image=i, max_tokens=20) for q, i in zip(QUESTIONS, images)]
    assert batched_tokens(model, processor, requests, batch_size) == expected
    # The prompts differ in length, so the batch really was left-padded.
    assert len({len(BatchGenerator(model, processor).prompt_ids(r)) for r in requests}) > 1


def test_generate_takes_a_list(loaded, pictures):
    model, processor = loaded
    one_by_one = [generate(model, processor, q, image=i, max_tokens=8) for q, i in zip(QUESTIONS, pictures)]
    assert generate(model, processor, QUESTIONS, image=pictures, max_tokens=8, batch_size=4) == one_by_one
    shared = generate(model, processor, QUESTIONS[:2], image=pictures[0], max_tokens=8)
    assert shared == [generate(model, processor, q, image=pictures[0], max_tokens=8) for q in QUESTIONS[:2]]
    with pytest.raises(LlavaError, match="2 prompts but 3 images"):
        generate(model, processor, QUESTIONS[:2], image=pictures[:3])


def test_one_vision_tower_call_per_insert(loaded, pictures):
    model, processor = loaded
    calls = []
    encode = model.encode_images
    model.encode_images = lambda pixels, *sizes: calls.append(pixels.shape[0]) or encode(pixels, *sizes)
    try:
        batch_generate(model, processor, [Request.ask(q, image=i, max_tokens=3) for q, i in zip(QUESTIONS, pictures)],
                       batch_size=6)
    finally:
        del model.encode_images
    assert calls == [6]


def test_requests_join_and_leave_a_running_batch(loaded, pictures):
    """What a server does: a request joins while others decode, a short one leaves,
    one is cancelled; every survivor's tokens equal its single run."""
    model, processor = loaded
    gen = BatchGenerator(model, processor, max_batch_size=4)
    long_a, short, cancelled = gen.insert([Request.ask(QUESTIONS[0], image=pictures[0], max_tokens=12),
                                           Request.ask(QUESTIONS[1], image=pictures[1], max_tokens=3),
                                           Request.ask(QUESTIONS[2], image=pictures[2], max_tokens=12)])
    tokens, finish = {}, {}

    def step():
        for r in gen.next():
            tokens.setdefault(r.uid, []).append(r.token)
            if r.finish_reason:
                finish[r.uid] = r.finish_reason

    for _ in range(2):
        step()
    late = gen.insert([Request.ask(QUESTIONS[3], image=pictures[3], max_tokens=10)])[0]
    step()
    assert len(gen) == 3 and finish == {short: "length"}  # the short one has left
    gen.remove([cancelled])
    assert len(gen) == 2
    while len(gen):
        step()
    gen.close()
    assert cancelled not in finish and len(tokens[cancelled]) == 3
    assert tokens[long_a] == single_tokens(model, processor, QUESTIONS[0], pictures[0], 12)
    assert tokens[short] == single_tokens(model, processor, QUESTIONS[1], pictures[1], 3)
    assert tokens[late] == single_tokens(model, processor, QUESTIONS[3], pictures[3], 10)
    assert finish[late] == "length" and len(tokens[late]) == 10


def test_stops_at_eos_without_its_text(loaded, pictures):
    """Make EOS the greedy choice after two tokens: the request stops there, as
    `generate` does, and EOS adds no text."""
    model, processor = loaded
    expected = single_tokens(model, processor, QUESTIONS[0], pictures[0], 6)
    eos = processor.tokenizer.eos_token_ids
    original = processor.tokenizer.eos_token_ids
    processor.tokenizer.eos_token_ids = set(original) | {expected[2]}
    try:
        single = single_tokens(model, processor, QUESTIONS[0], pictures[0], 6)
        gen = BatchGenerator(model, processor)
        gen.insert([Request.ask(QUESTIONS[0], image=pictures[0], max_tokens=6)])
        out = []
        while len(gen):
            out += gen.next()
    finally:
        processor.tokenizer.eos_token_ids = original
    assert eos is not None and single == expected[:3]
    assert [r.token for r in out] == single and out[-1].finish_reason == "stop"
    assert "".join(r.text for r in out) == processor.decode(single[:2])
    assert out[-1].prompt_tokens > processor.num_visual_tokens and out[-1].generation_tokens == 3


def test_bad_requests(loaded, pictures):
    model, processor = loaded
    gen = BatchGenerator(model, processor)
    with pytest.raises(LlavaError, match="1 <image> placeholder"):
        gen.insert([Request([{"role": "user", "content": "<image>\nHi"}], [pictures[0], pictures[1]])])
    with pytest.raises(LlavaError, match="too long for the model's context of 256 tokens"):
        gen.insert([Request.ask("the star " * 300)])
    assert len(gen) == 0


def test_demo_model_batched_equals_one_at_a_time():
    from mlx_llava.demo import heldout_dir
    from mlx_llava.eval import load_questions
    from mlx_llava.weights import default_model

    model, processor = mlx_llava.load(default_model())
    questions = load_questions(heldout_dir() / "questions.json")[:40]
    images = [heldout_dir() / "images" / q["image"] for q in questions]
    expected = [single_tokens(model, processor, q["question"], i, 16) for q, i in zip(questions, images)]
    requests = [Request.ask(q["question"], image=i, max_tokens=16) for q, i in zip(questions, images)]
    mx.random.seed(0)
    assert batched_tokens(model, processor, requests, 16) == expected
