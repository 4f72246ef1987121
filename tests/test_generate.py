"""Generation: the public API, streaming, and exact KV-cache reuse across turns."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from PIL import Image

import mlx_llava
from mlx_llava import Chat, LlavaError, generate, stream_generate


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "picture.png"
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    image.paste((20, 20, 220), (5, 5, 20, 25))
    image.save(path)
    return path


def fresh_pass(model, processor, messages, images, max_tokens, ids=None):
    """Greedy tokens from one uncached pass over the whole conversation (its
    text tokenized, or `ids`)."""
    ids = ids or processor.encode(processor.prompt(messages))
    pixels = processor.preprocess(images)
    embeds = model.embed(mx.array([ids]), pixels)[0]
    out = []
    for token, _ in generate_step(mx.array(ids), model.language_model, input_embeddings=embeds,
                                  max_tokens=max_tokens):
        out.append(token)
        if token in processor.tokenizer.eos_token_ids:
            break
    return out


def end_after(n, eos):
    """A logits processor that makes the `n`-th token of an answer the end of it."""
    calls = []

    def processor(tokens, logits):
        calls.append(1)
        if len(calls) == n:
            return mx.where(mx.arange(logits.shape[-1]) == eos, logits * 0, -mx.inf)
        return logits

    return processor


@pytest.mark.parametrize("ended", [False, True])
def test_second_turn_keeps_what_the_model_said(loaded, picture, ended):
    """A follow-up is the first prompt, the ids the model answered (never its
    answer re-tokenized) and the new question's ids; only those are prefilled,
    and the image is not encoded again."""
    model, processor = loaded
    eos = processor.tokenizer.eos_token_id
    chat = Chat(model, processor, image=picture)
    calls = []
    encode = model.encode_images
    model.encode_images = lambda pixels, *sizes: calls.append(pixels.shape) or encode(pixels, *sizes)
    try:
        stop = [end_after(4, eos)] if ended else None
        answer = [r.token for r in chat.ask("What is in the image?", max_tokens=6, logits_processors=stop)]
        said = chat.prompt_ids + answer
        second = list(chat.ask("What colour is the square?", max_tokens=6))
    finally:
        del model.encode_images
    assert len(calls) == 1, "the image was encoded again on the second turn"
    assert (answer[-1] == eos) == ended
    assert chat.prompt_ids[: len(said)] == said
    question = chat.prompt_ids[len(said):]
    assert second[-1].prompt_tokens == len(question)
    # The question's ids are the template's text after the answer, as the
    # whole conversation's text tokenizes (the end of the answer included
    # unless the model said it).
    text_ids = processor.encode(processor.prompt(chat.messages[:-1]))
    assert text_ids[-len(question):] == question
    assert (question[0] == eos) != ended
    expected = fresh_pass(model, processor, None, [picture], 6, ids=chat.prompt_ids)
    assert [r.token for r in second] == expected


def test_logit_bias_and_processors(loaded, picture):
    model, processor = loaded
    plain = [r.token for r in stream_generate(model, processor, "Hi", image=picture, max_tokens=4)]
    banned = [r.token for r in stream_generate(model, processor, "Hi", image=picture, max_tokens=4,
                                               logit_bias={plain[0]: -mx.inf})]
    assert banned[0] != plain[0]
    forced = [r.token for r in stream_generate(model, processor, "Hi", image=picture, max_tokens=4,
                                               logit_bias={7: 1e4})]
    assert forced == [7, 7, 7, 7]
    never = lambda tokens, logits: mx.where(mx.arange(logits.shape[-1]) == 7, -mx.inf, logits)
    out = [r.token for r in stream_generate(model, processor, "Hi", image=picture, max_tokens=4,
                                            logit_bias={7: 1e4}, logits_processors=[never])]
    assert 7 not in out
    for bad in ({"a": 1.0}, {10**6: 1.0}, {3: "x"}, [1, 2]):
        with pytest.raises(LlavaError, match="logit_bias"):
            generate(model, processor, "Hi", max_tokens=2, logit_bias=bad)
    with pytest.raises(LlavaError, match="logits_processors"):
        generate(model, processor, "Hi", max_tokens=2, logits_processors=[3])


def test_prompt_cache_file(loaded, picture, tmp_path):
    """A prompt cache saved by one run makes another skip the vision tower and
    the prefill of the image, with the same tokens as a fresh run."""
    model, processor = loaded
    path = tmp_path / "new folder" / "cat.safetensors"  # made when missing, as any output's
    first = [r.token for r in stream_generate(model, processor, "What is in the image?", image=picture,
                                              max_tokens=5, prompt_cache=path)]
    assert path.is_file()
    calls = []
    encode = model.encode_images
    model.encode_images = lambda pixels, *sizes: calls.append(pixels.shape) or encode(pixels)
    try:
        again = list(stream_generate(model, processor, "What is in the image?", image=picture,
                                     max_tokens=5, prompt_cache=path))
        other = list(stream_generate(model, processor, "How many objects are there?", image=picture,
                                     max_tokens=5, prompt_cache=path))
    finally:
        del model.encode_images
    assert calls == []
    assert [r.token for r in again] == first and again[-1].prompt_tokens == 1
    chat = Chat(model, processor, image=picture)
    list(chat.ask("How many objects are there?", max_tokens=1))
    fresh = fresh_pass(model, processor, None, [picture], 5, ids=chat.prompt_ids)
    assert [r.token for r in other] == fresh
    assert other[-1].prompt_tokens < len(chat.prompt_ids) - processor.num_visual_tokens


def test_prompt_cache_file_of_another_image_or_model_is_refused(loaded, model_dir, picture, tmp_path):
    model, processor = loaded
    path = tmp_path / "cat.safetensors"
    generate(model, processor, "What is in the image?", image=picture, max_tokens=2, prompt_cache=path)
    other = Image.new("RGB", (40, 30), (10, 200, 30))
    with pytest.raises(LlavaError, match="another image"):
        generate(model, processor, "What is in the image?", image=other, max_tokens=2, prompt_cache=path)
    with pytest.raises(LlavaError, match="refused"):
        generate(model, processor, "Hello", max_tokens=2, prompt_cache=path)
    changed, _ = mlx_llava.load(model_dir)
    weight = changed.language_model.model.embed_tokens.weight
    changed.language_model.model.embed_tokens.weight = weight + 1e-3
    with pytest.raises(LlavaError, match="another model"):
        generate(changed, processor, "What is in the image?", image=picture, max_tokens=2, prompt_cache=path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(LlavaError, match="not a prompt cache"):
        generate(model, processor, "Hi", image=picture, max_tokens=2, prompt_cache=tmp_path / "junk.safetensors")


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
