"""The MLX LLaVA against transformers' LlavaForConditionalGeneration on the same weights."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from conftest import TEXT, VISION, VOCAB, build_reference, save_reference
from mlx_llava.errors import LlavaError
from mlx_llava.weights import load_model

PATCHES = (VISION["image_size"] // VISION["patch_size"]) ** 2
CONFIGS = {
    "mlp2x_gelu": dict(projector_type="mlp2x_gelu"),
    "linear": dict(projector_type="linear"),
    "gqa": dict(projector_type="mlp2x_gelu", kv_heads=2),
    "multilayer-full": dict(projector_type="mlp2x_gelu", feature_layer=[-3, -1], strategy="full"),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory, tokenizer_dir):
    """(transformers model, our model, visual tokens per image) for one configuration."""
    kwargs = CONFIGS[request.param]
    reference = build_reference(**kwargs)
    path = save_reference(reference, tmp_path_factory.mktemp(request.param), tokenizer_dir,
                          projector_type=kwargs["projector_type"])
    model, _ = load_model(path)
    per_image = PATCHES + (1 if kwargs.get("strategy") == "full" else 0)
    return reference, model, per_image


def prompt_ids(rng, n_images, per_image, length=12):
    """Text tokens with `n_images` runs of image tokens at random places."""
    text = [int(t) for t in rng.integers(3, VOCAB, size=length)]
    for _ in range(n_images):
        at = int(rng.integers(0, len(text) + 1))
        text[at:at] = [VOCAB] * per_image
    return [1] + text


def compare(reference, model, ids, n_images, seed=0):
    pixels = torch.randn(n_images, 3, VISION["image_size"], VISION["image_size"],
                         generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(ids), pixel_values=pixels if n_images else None
        ).logits.numpy()
    ours = model(mx.array(ids), mx.array(pixels.permute(0, 2, 3, 1).numpy()) if n_images else None)
    return np.abs(np.array(ours) - expected).max()


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_logits_match_transformers(pair, n_images):
    reference, model, per_image = pair
    ids = prompt_ids(np.random.default_rng(n_images), n_images, per_image)
    assert compare(reference, model, [ids], n_images) < 1e-4


def test_batch_with_several_images_per_row(pair):
    """Image k of the batch goes to the k-th run of image tokens, across rows."""
    reference, model, per_image = pair
    rng = np.random.default_rng(7)
    rows = [prompt_ids(rng, 1, per_image, length=12 + per_image), prompt_ids(rng, 2, per_image)]
    assert len(rows[0]) == len(rows[1])
    assert compare(reference, model, rows, 3, seed=1) < 1e-4


def test_greedy_decoding_matches_generate(reference, model_dir):
    """20 greedy tokens through mlx-lm's generate_step equal transformers' generate."""
    from mlx_lm.generate import generate_step

    hf, _ = reference
    model, _ = load_model(model_dir)
    ids = prompt_ids(np.random.default_rng(3), 1, PATCHES)
    pixels = torch.randn(1, 3, VISION["image_size"], VISION["image_size"])
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=20,
                          min_new_tokens=20, do_sample=False)
    expected = out[0, len(ids):].tolist()
    embeds = model.embed(mx.array([ids]), mx.array(pixels.permute(0, 2, 3, 1).numpy()))[0]
    steps = generate_step(mx.array(ids), model.language_model, input_embeddings=embeds,
                          max_tokens=20)
    ours = [token for token, _ in steps]
    assert ours == expected


def test_image_count_mismatch_is_a_clear_error(model_dir):
    model, _ = load_model(model_dir)
    ids = mx.array([prompt_ids(np.random.default_rng(0), 1, PATCHES)])
    two = mx.zeros((2, VISION["image_size"], VISION["image_size"], 3))
    with pytest.raises(LlavaError, match=r"16 image tokens but 2 image\(s\) give 32 visual tokens"):
        model(ids, two)
    with pytest.raises(LlavaError, match=r"16 image tokens but 0 image"):
        model(ids)


def test_lm_head_is_the_checkpoints_own(model_dir):
    """mlx-lm would tie lm_head to the embeddings by default; Vicuna's is its own."""
    model, config = load_model(model_dir)
    assert config["text_config"]["tie_word_embeddings"] is False
    head = np.array(model.language_model.lm_head.weight)
    embed = np.array(model.language_model.model.embed_tokens.weight)
    assert head.shape == (TEXT["vocab_size"], TEXT["hidden_size"])
    assert not np.allclose(head, embed)


def test_vision_tower_in_two_cpu_streams_equals_one_pass():
    """On the CPU the tower's attention and activation run in two halves on
    two streams (models/clip.in_halves): the same numbers as one pass, for
    an odd number of heads and of features, grouped-query heads; on one stream it is f whole."""
    from mlx_llava.models.clip import in_halves

    q, k, v = (mx.random.normal((2, 5, 7, 8), key=mx.random.key(i)) for i in range(3))
    attend = lambda *qkv: mx.fast.scaled_dot_product_attention(*qkv, scale=0.3)  # noqa: E731
    assert mx.array_equal(in_halves(attend, 1, q, k, v), attend(q, k, v))
    kv = [mx.random.normal((2, n, 7, 8)) for n in (2, 2)]  # grouped-query: 5 query heads per KV head
    q10 = mx.random.normal((2, 10, 7, 8))
    assert mx.array_equal(in_halves(attend, 1, q10, *kv), attend(q10, *kv))
    odd = [mx.random.normal((2, 3, 7, 8)), mx.random.normal((2, 1, 7, 8)), mx.random.normal((2, 1, 7, 8))]
    assert mx.array_equal(in_halves(attend, 1, *odd), attend(*odd))  # no even cut: whole
    h = mx.random.normal((2, 7, 13))
    assert mx.array_equal(in_halves(mx.sigmoid, -1, h), mx.sigmoid(h))
    one = mx.random.normal((1, 1, 3))
    assert mx.array_equal(in_halves(mx.sigmoid, 1, one), mx.sigmoid(one))


def test_vision_tower_halves_in_another_thread():
    """MLX's streams belong to the thread that made them: the tower runs in
    a second thread (the server's model thread) as in the first."""
    import threading

    from mlx_llava.models.clip import in_halves

    h = mx.random.normal((2, 7, 12))
    expected = mx.sigmoid(h)
    mx.eval(h, expected, in_halves(mx.sigmoid, -1, h))  # this thread's streams first
    out = []
    worker = threading.Thread(target=lambda: out.append(mx.array_equal(in_halves(mx.sigmoid, -1, h), expected).item()))
    worker.start()
    worker.join()
    assert out == [True]
