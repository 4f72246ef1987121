"""LLaVA-1.6 AnyRes preprocessing and geometry (mlx_llava/anyres.py, image.py).

Expected crops come from the original's rules restated in
tests/reference_llava.py, each crop through transformers' CLIP image
processor as the original sends it; llava-hf configs are checked against
transformers' LlavaNextImageProcessor (its PIL backend). Where the two
disagree, the test shows it.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import reference_llava as ref
from mlx_llava import anyres
from mlx_llava.errors import LlavaError
from mlx_llava.image import ImageConfig, image_size, preprocess, preprocess_with_sizes

# The original's LLaVA-1.6 pinpoints scaled to a 28 px vision tower, (width, height) as it writes them.
PINS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
# (width, height): portrait, landscape, square, tiny, huge, very wide and tall, and one whose
# unpadded side the original truncates (188 x 47: 2.9999999999999996 patches)
SIZES = {"portrait": (28, 45), "landscape": (45, 28), "square": (60, 60), "tiny": (9, 7),
         "huge": (1000, 700), "wide": (300, 40), "tall": (40, 300), "odd": (188, 47), "small-portrait": (30, 50)}


def noise(size, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def clip_pixels(images, crop):
    """Crops through transformers' CLIP processor, as the original's process_anyres_image does."""
    from transformers import CLIPImageProcessorPil

    clip = CLIPImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
    return np.asarray(clip(images, return_tensors="np")["pixel_values"]).transpose(0, 2, 3, 1)


def original_config(crop=28, pins=PINS):
    """Our preprocessing for a converted original checkpoint: pinpoints swapped to (height, width)."""
    return ImageConfig(shortest_edge=crop, crop_size=(crop, crop), image_aspect_ratio="anyres",
                       grid_pinpoints=anyres.swap(pins))


def test_the_sizes_hit_every_pinpoint():
    assert {tuple(ref.anyres_fit(s, PINS)) for s in SIZES.values()} == {tuple(p) for p in PINS}


@pytest.mark.parametrize("name", SIZES)
def test_crops_equal_the_originals(name):
    image = noise(SIZES[name])
    expected = clip_pixels(ref.anyres_crops(image, PINS, 28), 28)
    ours, sizes = preprocess_with_sizes(image, original_config())
    assert sizes == [(image.height, image.width)]
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-5


@pytest.mark.parametrize("size", [(1000, 750), (396, 704), (200, 300), (2000, 300)])
def test_crops_at_336_px_with_llava_16_pinpoints(size):
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    image = noise(size, seed=1)
    expected = clip_pixels(ref.anyres_crops(image, pins, 336), 336)
    ours = preprocess(image, original_config(336, pins))
    assert ours.shape == expected.shape and np.abs(ours - expected).max() <= 1e-5


def transformers_pixels(image, pins, crop=28):
    from transformers import LlavaNextImageProcessorPil

    processor = LlavaNextImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                                           image_grid_pinpoints=pins)
    out = processor(image, return_tensors="np")
    return np.asarray(out["pixel_values"][0]).transpose(0, 2, 3, 1), [tuple(s) for s in out["image_sizes"]]


@pytest.mark.parametrize("name", SIZES)
def test_llava_hf_crops_equal_transformers(name):
    """A llava-hf config's pinpoints are (height, width): read as transformers reads them."""
    image = noise(SIZES[name], seed=2)
    expected, sizes = transformers_pixels(image, PINS)
    config = ImageConfig(shortest_edge=28, crop_size=(28, 28), image_aspect_ratio="anyres", grid_pinpoints=PINS)
    ours, our_sizes = preprocess_with_sizes(image, config)
    assert our_sizes == sizes
    assert ours.shape == expected.shape and np.abs(ours - expected).max() <= 1e-5


def test_original_and_transformers_differ_on_ties():
    """The same pinpoint list, read as (width, height) by the original and as
    (height, width) by transformers: a small image fits every candidate
    alike, the first wins, and that first is a portrait grid to one and a
    landscape grid to the other. `convert` swaps an original's pinpoints,
    so each model keeps its own rule."""
    image = noise((9, 7))
    assert ref.anyres_fit(image.size, PINS) == (28, 56)  # the original: 28 wide, 56 high
    from transformers.image_processing_utils import select_best_resolution

    assert select_best_resolution((7, 9), PINS) == (28, 56)  # transformers: 28 high, 56 wide
    original, _ = preprocess_with_sizes(image, original_config())
    hf, _ = preprocess_with_sizes(image, ImageConfig(shortest_edge=28, crop_size=(28, 28),
                                                    image_aspect_ratio="anyres", grid_pinpoints=PINS))
    assert original.shape == hf.shape  # two crops each, but not the same crops
    assert np.abs(original - clip_pixels(ref.anyres_crops(image, PINS, 28), 28)).max() <= 1e-5
    assert np.abs(hf - transformers_pixels(image, PINS)[0]).max() <= 1e-5
    assert np.abs(original[1:] - hf[1:]).max() > 0.5


def test_unpad_rounding_differs_on_a_704_by_396_portrait():
    """The unpadded width of a 396 x 704 image on the 2x2 grid is
    396 * 48 / 704 = 27, computed as 26.999999999999996: the original
    truncates it (26 columns kept), transformers rounds (28 kept)."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    features = torch.zeros(1, 48, 48)
    original = ref.anyres_unpad(features, (396, 704)).shape[1:]
    theirs = unpad_image(features, (704, 396)).shape[1:]
    assert tuple(original) == (48, 26) and tuple(theirs) == (48, 28)
    pins = anyres.swap(anyres.parse_pinpoints(None, 336))  # the defaults are symmetric; order aside
    for rounding, expected in (("truncate", original), ("round", theirs)):
        rules = anyres.AnyRes(pins, 336, 14, rounding=rounding)
        top, bottom, left, right = rules.unpadded((704, 396))
        assert (bottom - top, right - left) == tuple(expected)
        assert rules.num_tokens((704, 396)) == 576 + expected[0] * (expected[1] + 1)


@pytest.mark.parametrize("merge", ["spatial_unpad", "spatial", "flat"])
@pytest.mark.parametrize("name", ["portrait", "tiny", "odd", "wide"])
def test_token_layout_equals_the_original_merge(merge, name):
    """anyres.token_index, applied to crop features, gives the original's merged tokens."""
    size = SIZES[name]
    rules = anyres.AnyRes(anyres.swap(PINS), 28, 7, merge=merge, rounding="truncate")
    crops = rules.crops((size[1], size[0]))
    features = torch.randn(crops, 16, 5, generator=torch.Generator().manual_seed(3))
    newline = torch.randn(5)
    expected = ref.anyres_merge(features, size, PINS, 28, 4, newline, merge)
    table = torch.cat([features.reshape(-1, 5), newline[None]])
    index = rules.token_index((size[1], size[0]))
    ours = table[torch.tensor(np.where(index == anyres.NEWLINE, len(table) - 1, index))]
    assert rules.num_tokens((size[1], size[0])) == len(expected)
    assert torch.equal(ours, expected)


def test_pinpoints_in_every_written_form():
    expected = [(i * 336, j * 336) for i in range(1, 4) for j in range(1, 4)]
    assert anyres.parse_pinpoints("(1x1),...,(3x3)", 336) == expected
    assert anyres.parse_pinpoints("[[336, 672], [672, 336]]", 336) == [(336, 672), (672, 336)]
    assert anyres.parse_pinpoints(None, 336) == list(anyres.DEFAULT_PINPOINTS)
    with pytest.raises(LlavaError, match="multiples of the crop size"):
        anyres.parse_pinpoints([[300, 600]], 336)
    with pytest.raises(LlavaError, match="SigLIP"):
        anyres.from_config({"image_aspect_ratio": "anyres_max_9"}, {"image_size": 336, "patch_size": 14})
    with pytest.raises(LlavaError, match="mm_patch_merge_type"):
        anyres.from_config({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "maxpool2x2"},
                           {"image_size": 336, "patch_size": 14})


def test_image_size_from_the_header_honours_exif(tmp_path):
    """prepare() counts visual tokens from the header; it must see the image as load_image does."""
    from mlx_llava.image import load_image

    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    noise((40, 20)).save(path, exif=exif)
    loaded = load_image(path)
    assert image_size(path) == (loaded.height, loaded.width) == (40, 20)
