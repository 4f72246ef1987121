"""Generation: the public API, streaming, and exact KV-cache reuse across turns."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import common_prefix_len
from PIL import Image

import mlx_llava
from mlx_llava import Chat, LlavaError, generate, stream_generate


@pytest.fixture(scope="module")
def loaded(model_dir):
    return mlx_llava.load(model_dir)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "picture.png"
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    image.paste((20, 20, 220), (5, 5, 20, 25))
    image.save(path)
    return path


def fresh_pass(model, processor, messages, images, max_tokens):
    """Greedy tokens from one uncached pass over the whole conversation."""
    ids = processor.encode(processor.prompt(messages))
    pixels = processor.preprocess(images)
    embeds = model.embed(mx.array([ids]), pixels)[0]
    out = []
    for token, _ in generate_step(mx.array(ids), model.language_model, input_embeddings=embeds,
                                  max_tokens=max_tokens):
        out.append(token)
        if token in processor.tokenizer.eos_token_ids:
            break
    return out


def test_second_turn_reuses_the_cache_exactly(loaded, picture):
    model, processor = loaded
    chat = Chat(model, processor, image=picture)
    calls = []
    encode = model.encode_images
    model.encode_images = lambda pixels, *sizes: calls.append(pixels.shape) or encode(pixels, *sizes)
    try:
        list(chat.ask("What is in the image?", max_tokens=6))
        first_prompt = processor.encode(processor.prompt(chat.messages[:1]))
        history = list(chat.tokens)
        second = list(chat.ask("What colour is the square?", max_tokens=6))
    finally:
        del model.encode_images
    assert len(calls) == 1, "the image was encoded again on the second turn"
    # The conversation is re-rendered as text each turn (as the original CLI
    # does); everything it shares with the cache is reused, never re-prefilled:
    # at least the whole first prompt with its image.
    full = processor.encode(processor.prompt(chat.messages[:-1]))
    shared = common_prefix_len(history, full)
    assert shared >= len(first_prompt)
    assert second[-1].prompt_tokens == len(full) - shared
    expected = fresh_pass(model, processor, chat.messages[:-1], [picture], 6)
    assert [r.token for r in second] == expected


def test_abandoned_stream_leaves_a_consistent_cache(loaded, picture):
    model, processor = loaded
    chat = Chat(model, processor, image=picture)
    for i, _ in enumerate(chat.ask("Describe the image briefly.", max_tokens=10)):
        if i == 2:
            break
    assert chat.cache[0].offset == len(chat.tokens)
    second = [r.token for r in chat.ask("How many objects are there?", max_tokens=5)]
    assert second == fresh_pass(model, processor, chat.messages[:-1], [picture], 5)


def test_generate_and_stream(loaded, picture):
    model, processor = loaded
    text = generate(model, processor, "What is in the image?", image=picture, max_tokens=5)
    chunks = list(stream_generate(model, processor, "What is in the image?", image=picture, max_tokens=5))
    assert text == "".join(c.text for c in chunks)
    last = chunks[-1]
    assert last.prompt_tokens > processor.num_visual_tokens
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    assert last.finish_reason in ("stop", "length")


def test_sampling_is_seeded(loaded, picture):
    model, processor = loaded
    run = lambda seed: generate(model, processor, "Hi", image=picture, max_tokens=8,
                                temperature=1.0, seed=seed)
    assert run(3) == run(3)
    assert len({run(s) for s in range(4)}) > 1


def test_text_only_prompt(loaded):
    model, processor = loaded
    assert isinstance(generate(model, processor, "Hello", max_tokens=3), str)


def test_processor_inputs(loaded, picture):
    model, processor = loaded
    inputs = processor("USER: <image>\nWhat is it? ASSISTANT:", [picture])
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1
    assert (ids == processor.image_token_index).sum().item() == processor.num_visual_tokens
    assert inputs["pixel_values"].shape == (1, 28, 28, 3)
    logits = model(ids, inputs["pixel_values"])
    assert logits.shape == (1, ids.shape[1], model.args.text_config["vocab_size"])
    with pytest.raises(LlavaError, match="1 <image> placeholder"):
        processor("USER: <image>\nWhat is it? ASSISTANT:", [picture, picture])


def test_prompt_longer_than_context(loaded):
    model, processor = loaded
    with pytest.raises(LlavaError, match=r"too long for the model's context of 256 tokens"):
        generate(model, processor, "the star " * 300, max_tokens=3)


def test_sampling_never_picks_the_image_token_or_padding_rows(loaded, picture):
    """llava-hf pads the output layer past the tokenizer (here 416 rows for 401
    tokens): sampled freely, the model must still only say tokens it can decode."""
    model, processor = loaded
    chat = Chat(model, processor, image=picture)
    tokens = []
    for seed in range(20):
        chat.restart()
        tokens += [r.token for r in chat.ask("What is in the image?", max_tokens=50, temperature=5.0, seed=seed)]
    assert len(tokens) > 200  # enough draws that, unmasked, the 15 padding rows would come up
    vocabulary = len(processor.tokenizer._tokenizer)
    assert all(t < vocabulary and t != processor.image_token_index for t in tokens)
