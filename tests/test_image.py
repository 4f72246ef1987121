"""mlx_llava.image against transformers' CLIPImageProcessorPil (and LLaVA's
expand2square), on awkward images made here; plus loading and its errors."""

import http.server
import io
import json
import socket
import threading
from functools import partial

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil
from transformers.image_transforms import convert_to_rgb

from mlx_llava.errors import LlavaError
from mlx_llava.image import ImageConfig, expand2square, load_image, preprocess

SMALL = dict(shortest_edge=28, crop_size=(28, 28))


def noise(h, w, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def png_bytes(image, **kw):
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def llava_expand2square(image, background):
    """LLaVA's mm_utils.expand2square, restated independently for the reference."""
    w, h = image.size
    if w == h:
        return image
    if w > h:
        out = Image.new(image.mode, (w, w), background)
        out.paste(image, (0, (w - h) // 2))
    else:
        out = Image.new(image.mode, (h, h), background)
        out.paste(image, ((h - w) // 2, 0))
    return out


def reference(rgb: Image.Image, config: ImageConfig) -> np.ndarray:
    """transformers' CLIP preprocessing of an RGB image, as NHWC."""
    if config.image_aspect_ratio == "pad":
        rgb = llava_expand2square(rgb, tuple(int(x * 255) for x in config.image_mean))
    size = (
        {"height": config.resize_size[0], "width": config.resize_size[1]}
        if config.resize_size
        else {"shortest_edge": config.shortest_edge}
    )
    proc = CLIPImageProcessorPil(
        size=size,
        crop_size={"height": config.crop_size[0], "width": config.crop_size[1]},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        resample=config.resample,
    )
    out = proc(images=[rgb], return_tensors="np")["pixel_values"]
    return np.asarray(out).transpose(0, 2, 3, 1)


def transformers_rgb(raw) -> Image.Image:
    """What transformers makes of an image's mode (alpha on white etc.)."""
    return Image.fromarray(convert_to_rgb(raw, return_numpy=True))


def palette_png(transparent: bool) -> bytes:
    rgb = Image.fromarray(noise(30, 22, seed=5)).quantize(16)
    return png_bytes(rgb, transparency=3) if transparent else png_bytes(rgb)


def rgba_image():
    a = noise(26, 41, channels=4, seed=3)
    a[:8, :, 3] = 0  # fully transparent band: must come out white
    a[8:16, :, 3] = 255
    return Image.fromarray(a, "RGBA")


def cmyk_image():
    return Image.frombytes("CMYK", (33, 19), noise(19, 33, channels=4, seed=7).tobytes())


# name -> (the raw source, config overrides)
CASES = {
    "portrait": (lambda: Image.fromarray(noise(61, 37)), SMALL),
    "landscape_336": (lambda: Image.fromarray(noise(301, 517, seed=1)), {}),
    "square": (lambda: Image.fromarray(noise(40, 40, seed=2)), SMALL),
    "one_pixel": (lambda: Image.fromarray(noise(1, 1, seed=4)), SMALL),
    "thin": (lambda: Image.fromarray(noise(200, 3, seed=6)), SMALL),
    "rgba": (rgba_image, SMALL),
    "palette": (lambda: Image.open(io.BytesIO(palette_png(False))), SMALL),
    "palette_transparency": (lambda: Image.open(io.BytesIO(palette_png(True))), SMALL),
    "gray_L": (lambda: Image.fromarray(noise(23, 31, channels=1, seed=8), "L"), SMALL),
    "gray_LA": (lambda: Image.fromarray(noise(23, 31, channels=2, seed=9), "LA"), SMALL),
    "cmyk": (cmyk_image, SMALL),
    # resized smaller than the crop: transformers pads the crop with zeros
    "crop_larger_than_resize": (
        lambda: Image.fromarray(noise(50, 35, seed=10)),
        dict(shortest_edge=20, crop_size=(28, 28)),
    ),
    "non_square_crop": (
        lambda: Image.fromarray(noise(45, 70, seed=11)),
        dict(shortest_edge=30, crop_size=(24, 32)),
    ),
    "height_width_size": (
        lambda: Image.fromarray(noise(45, 70, seed=12)),
        dict(resize_size=(30, 40), crop_size=(28, 28)),
    ),
}


@pytest.mark.parametrize("aspect", ["pad", "crop"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(name, aspect):
    make, overrides = CASES[name]
    config = ImageConfig(image_aspect_ratio=aspect, **overrides)
    ours = preprocess(make(), config)
    expected = reference(transformers_rgb(make()), config)
    assert ours.dtype == np.float32
    assert ours.shape == (1, *config.image_size, 3) == expected.shape
    assert np.abs(ours - expected).max() <= 1e-5


def test_transparency_composited_on_white():
    rgb = np.asarray(load_image(rgba_image()))
    assert (rgb[:8] == 255).all()
    assert (rgb[8:16] == np.asarray(rgba_image())[8:16, :, :3]).all()
    p = np.asarray(load_image(palette_png(True)))
    index = np.asarray(Image.open(io.BytesIO(palette_png(True))))
    assert (index == 3).any() and (p[index == 3] == 255).all()


def test_16_bit_is_scaled_not_clipped():
    a = (noise(21, 34, channels=1, seed=13).astype(np.uint16) << 8) | 0x7F
    a[0, 0], a[0, 1] = 65535, 255
    raw = png_bytes(Image.fromarray(a))
    assert Image.open(io.BytesIO(raw)).mode == "I;16"
    loaded = np.asarray(load_image(raw))
    eight = (a >> 8).astype(np.uint8)
    assert (loaded == eight[..., None]).all()
    assert tuple(loaded[0, 0]) == (255, 255, 255) and tuple(loaded[0, 1]) == (0, 0, 0)

    for aspect in ("pad", "crop"):
        config = ImageConfig(image_aspect_ratio=aspect, **SMALL)
        expected = reference(Image.fromarray(eight).convert("RGB"), config)
        assert np.abs(preprocess(raw, config) - expected).max() <= 1e-5

    # mode "I" (32-bit ints): 16-bit content is scaled, 8-bit content kept
    wide = Image.fromarray(a.astype(np.int32))
    assert wide.mode == "I"
    assert (np.asarray(load_image(wide)) == eight[..., None]).all()
    narrow = Image.fromarray((a >> 8).astype(np.int32))
    assert (np.asarray(load_image(narrow)) == eight[..., None]).all()


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation(orientation):
    pixels = noise(24, 40, seed=14)
    pixels[:, :20] = 0  # left half dark so a rotation shows
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    raw = buf.getvalue()

    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).convert("RGB")
    assert load_image(raw).size == (24, 40) == upright.size
    ignored = Image.fromarray(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
    for aspect in ("pad", "crop"):
        config = ImageConfig(image_aspect_ratio=aspect, **SMALL)
        ours = preprocess(raw, config)
        assert np.abs(ours - reference(upright, config)).max() <= 1e-5
        assert np.abs(ours - preprocess(ignored, config)).max() > 0.5


def test_batch_of_sources(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(Image.fromarray(noise(30, 50, seed=15))))
    config = ImageConfig(**SMALL)
    batch = preprocess([str(path), path, path.read_bytes(), Image.open(path)], config)
    assert batch.shape == (4, 28, 28, 3)
    assert all(np.array_equal(batch[0], b) for b in batch[1:])


def test_pad_matches_transformers_llava_processor():
    """Our pad config, written out, makes LlavaImageProcessor do the same."""
    config = ImageConfig(**SMALL)
    d = config.to_preprocessor_config()
    d.pop("image_processor_type")
    image = Image.fromarray(noise(33, 57, seed=16))
    theirs = LlavaImageProcessorPil(**d)(images=[image], return_tensors="np")["pixel_values"]
    ours = preprocess(image, config)
    assert np.abs(ours - np.asarray(theirs).transpose(0, 2, 3, 1)).max() <= 1e-5


# ------------------------------------------------------------ expand2square


@pytest.mark.parametrize("size", [(5, 2), (2, 5), (6, 3)])
def test_expand2square_centers_on_mean_colour(size):
    w, h = size
    image = Image.new("RGB", (w, h), (255, 0, 0))
    background = ImageConfig().background
    assert background == (122, 116, 104)
    out = np.asarray(expand2square(image, background))
    side = max(w, h)
    assert out.shape == (side, side, 3)
    top, left = (side - h) // 2, (side - w) // 2
    mask = np.zeros((side, side), bool)
    mask[top : top + h, left : left + w] = True
    assert (out[mask] == (255, 0, 0)).all()
    assert (out[~mask] == background).all()


def test_expand2square_square_unchanged():
    image = Image.fromarray(noise(4, 4))
    assert np.array_equal(np.asarray(expand2square(image, (0, 0, 0))), np.asarray(image))


# -------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "config",
    [
        ImageConfig(),
        ImageConfig(image_aspect_ratio="crop"),
        ImageConfig(
            shortest_edge=224, crop_size=(200, 220), image_mean=(0.5, 0.5, 0.5),
            image_std=(0.25, 0.5, 1.0), rescale_factor=0.5, resample=2, do_resize=False,
            do_center_crop=False, do_rescale=False, do_normalize=False,
        ),
        ImageConfig(resize_size=(30, 40), crop_size=(28, 28), image_aspect_ratio="crop"),
    ],
)
def test_config_round_trip(config):
    d = json.loads(json.dumps(config.to_preprocessor_config()))
    assert ImageConfig.from_preprocessor_config(d) == config


def test_config_reads_transformers(tmp_path):
    size, crop = {"shortest_edge": 336}, {"height": 336, "width": 336}
    proc = CLIPImageProcessorPil(size=size, crop_size=crop)
    clip = ImageConfig(image_aspect_ratio="crop")
    assert ImageConfig.from_preprocessor_config(proc.to_dict()) == clip
    assert ImageConfig.from_preprocessor_config(proc.to_dict(), "pad") == ImageConfig()

    proc.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert d["image_processor_type"] == "CLIPImageProcessor"
    assert ImageConfig.from_preprocessor_config(d) == clip

    llava = LlavaImageProcessorPil(size=size, crop_size=crop, do_pad=True)
    assert ImageConfig.from_preprocessor_config(llava.to_dict()) == ImageConfig()
    assert ImageConfig().image_size == (336, 336)

    # what a CLIPImageProcessor makes of our "crop" config is our preprocessing
    config = ImageConfig(image_aspect_ratio="crop", **SMALL)
    d = config.to_preprocessor_config()
    d.pop("image_processor_type")
    image = Image.fromarray(noise(33, 57, seed=17))
    theirs = CLIPImageProcessorPil(**d)(images=[image], return_tensors="np")["pixel_values"]
    theirs = np.asarray(theirs).transpose(0, 2, 3, 1)
    assert np.abs(preprocess(image, config) - theirs).max() <= 1e-5


def test_config_rejects_unknown_aspect_ratio():
    with pytest.raises(LlavaError, match="tiles"):
        ImageConfig(image_aspect_ratio="tiles")


# ------------------------------------------------------------ load + errors


def test_load_image_sources(tmp_path):
    image = Image.fromarray(noise(12, 9, seed=18))
    raw = png_bytes(image)
    path = tmp_path / "x.png"
    path.write_bytes(raw)
    for source in (raw, bytearray(raw), image, str(path), path, io.BytesIO(raw)):
        out = load_image(source)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(image))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(LlavaError, match="image not found: .*nope.png"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64, seed=19)).save(buf, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(LlavaError, match=f"cannot read image .*cut.{fmt.lower()}: .*trunc"):
        load_image(path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image at all\n")
    with pytest.raises(LlavaError, match="cannot read image .*notes.png: not an image"):
        load_image(path)


def test_bytes_that_are_not_an_image():
    with pytest.raises(LlavaError, match=r"cannot read image <18 bytes>: not an image"):
        load_image(b"\x00\x01garbage-bytes...")


def test_unsupported_source_type():
    with pytest.raises(LlavaError, match="unsupported image source of type int"):
        load_image(42)


@pytest.fixture
def http_root(tmp_path):
    """A tiny HTTP server on 127.0.0.1 serving tmp_path; shut down after."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_load_from_url(http_root):
    root, base = http_root
    image = Image.fromarray(noise(10, 14, seed=20))
    (root / "cat.png").write_bytes(png_bytes(image))
    out = load_image(f"{base}/cat.png", timeout=5)
    assert np.array_equal(np.asarray(out), np.asarray(image))
    with pytest.raises(LlavaError, match=f"cannot fetch image {base}/missing.png: HTTP 404"):
        load_image(f"{base}/missing.png", timeout=5)


def test_url_that_cannot_connect():
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/x.png"
    with pytest.raises(LlavaError, match=f"cannot fetch image {url}"):
        load_image(url, timeout=5)
