"""What the server needs of mlx_llava.batch beyond test_batch.py: a KV cache of
shared prefixes kept across requests (PrefixCache), seeded sampling that does
not depend on what else runs, and the same logits mask as `generate`."""

import mlx.core as mx
import pytest
from PIL import Image

from mlx_llava import stream_generate
from mlx_llava.batch import BatchGenerator, PrefixCache, Request
from mlx_llava.generate import Chat


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reuse")
    paths = []
    for k in range(3):
        image = Image.new("RGB", (36 + 5 * k, 30), (40 + 60 * k, 200 - 50 * k, 90))
        image.paste((250, 250, 20), (4 + 2 * k, 6, 18, 22))
        image.save(folder / f"{k}.png")
        paths.append(folder / f"{k}.png")
    return paths


def run(gen, requests):
    uids = gen.insert(requests)
    tokens = {u: [] for u in uids}
    while len(gen):
        for r in gen.next():
            tokens[r.uid].append(r.token)
    return [tokens[u] for u in uids]


def count_encodes(model):
    calls = []
    encode = model.encode_images
    model.encode_images = lambda pixels, *sizes: calls.append(pixels.shape[0]) or encode(pixels, *sizes)
    return calls


def test_next_turn_reuses_the_image_and_history(loaded, pictures):
    """Turn 2 of a conversation (its messages' text, as a client sends it)
    starts from turn 1's cache (prompt + answer): the image is not encoded
    again, and the tokens equal a fresh prefill's of the same text."""
    model, processor = loaded
    chat = Chat(model, processor, image=pictures[0])
    first = [r.token for r in chat.ask("What is in the image?", max_tokens=8)]
    list(chat.ask("Where is the star?", max_tokens=1))

    cache = PrefixCache()
    gen = BatchGenerator(model, processor, prefix_cache=cache)
    turn1 = Request.ask("What is in the image?", image=pictures[0], max_tokens=8)
    assert run(gen, [turn1]) == [first]
    assert cache.hits == 0 and len(cache) == 1
    messages = chat.messages[:-1]  # turn 1, its answer, the question of turn 2
    assert messages[-1] == {"role": "user", "content": "Where is the star?"}
    turn2 = Request(messages, [pictures[0]], max_tokens=8)
    fresh = BatchGenerator(model, processor)
    expected = run(fresh, [turn2])
    calls = count_encodes(model)
    try:
        assert run(gen, [turn2]) == expected
    finally:
        del model.encode_images
    assert calls == []  # the image's visual tokens came from the cache
    prompt1 = len(gen.prompt_ids(turn1))
    # Past the prompt of turn 1 (whose last token only the finished answer's cache holds); how far
    # into the answer depends on whether re-tokenizing its text gives the same tokens.
    assert cache.hits == 1 and cache.reused_tokens >= prompt1
    gen.close()
    fresh.close()


def test_another_image_never_shares_the_visual_tokens(loaded, pictures):
    model, processor = loaded
    cache = PrefixCache()
    gen = BatchGenerator(model, processor, prefix_cache=cache)
    a = Request.ask("What is in the image?", image=pictures[0], max_tokens=6)
    b = Request.ask("What is in the image?", image=pictures[1], max_tokens=6)
    run(gen, [a])
    calls = count_encodes(model)
    try:
        got = run(gen, [b])
    finally:
        del model.encode_images
    ids = gen.prompt_ids(b)
    first_image = ids.index(processor.image_token_index)
    assert calls == [1]
    assert cache.hits == 1 and cache.reused_tokens == first_image  # the system message only
    assert got == [[r.token for r in stream_generate(model, processor, "What is in the image?",
                                                     image=pictures[1], max_tokens=6)]]


def test_requests_inserted_together_share_one_encode(loaded, pictures):
    """Four questions about one image in one insert: the image is encoded once,
    the later prompts reuse the first one's prefix, and every answer is its own."""
    model, processor = loaded
    questions = ["What is in the image?", "Where is the star?", "How many objects are there?", "Hello"]
    expected = [[r.token for r in stream_generate(model, processor, q, image=pictures[2], max_tokens=6)]
                for q in questions]
    cache = PrefixCache()
    gen = BatchGenerator(model, processor, prefix_cache=cache)
    calls = count_encodes(model)
    try:
        got = run(gen, [Request.ask(q, image=pictures[2], max_tokens=6) for q in questions])
    finally:
        del model.encode_images
    assert calls == [1] and cache.hits == 3
    assert got == expected


def test_prefix_cache_stays_within_its_bytes(loaded, pictures):
    model, processor = loaded
    one = PrefixCache()
    gen = BatchGenerator(model, processor, prefix_cache=one)
    run(gen, [Request.ask("Hello", image=pictures[0], max_tokens=4)])
    size = one.nbytes
    assert size > 0
    small = PrefixCache(max_bytes=int(size * 1.5))
    gen = BatchGenerator(model, processor, prefix_cache=small)
    for k in range(3):
        run(gen, [Request.ask("Hello", image=pictures[k], max_tokens=4)])
        assert small.nbytes <= small.max_bytes and len(small) == 1  # the newest only
    assert small.lookup(gen.key(gen.prompt_ids(Request.ask("Hello", image=pictures[2])), ["x"], [processor.num_visual_tokens]))[0] > 0
    few = PrefixCache(max_entries=2)
    gen = BatchGenerator(model, processor, prefix_cache=few)
    for k in range(3):
        run(gen, [Request.ask("Hello", image=pictures[k], max_tokens=4)])
    assert len(few) == 2


def test_seeded_sampling_is_the_same_in_a_batch(loaded, pictures):
    """A seeded request draws what `generate(seed=)` draws, while other
    requests (greedy and seeded) sample beside it."""
    model, processor = loaded
    options = dict(max_tokens=12, temperature=1.5, top_p=0.9)
    alone = [r.token for r in stream_generate(model, processor, "Describe the image briefly.", image=pictures[1],
                                              seed=3, **options)]
    gen = BatchGenerator(model, processor)
    mx.random.seed(99)
    got = run(gen, [Request.ask("What is in the image?", image=pictures[0], max_tokens=12),
                    Request.ask("Describe the image briefly.", image=pictures[1], seed=3, **options),
                    Request.ask("Hello", image=pictures[2], seed=5, **options)])
    assert got[1] == alone
    assert got[2] != alone  # another seed, another draw


def test_never_picks_the_image_token(loaded, pictures):
    """As `generate` masks them, the batch never says the image token or a padded row."""
    model, processor = loaded
    gen = BatchGenerator(model, processor)
    tokens = sum(run(gen, [Request.ask("What is in the image?", image=pictures[0], max_tokens=40,
                                       temperature=5.0, seed=s) for s in range(6)]), [])
    vocabulary = len(processor.tokenizer._tokenizer)
    assert len(tokens) > 100
    assert all(t < vocabulary and t != processor.image_token_index for t in tokens)
