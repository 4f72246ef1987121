"""Image loading and preprocessing for the vision tower.

`preprocess` reproduces transformers' CLIPImageProcessor (its PIL backend)
value for value: PIL bicubic resize of the shortest edge, center crop,
rescale to [0, 1], normalize with the CLIP mean and std. LLaVA-1.5
(`image_aspect_ratio: "pad"`) first pads the image to a square filled with
the mean colour (`expand2square`), so that nothing at the edges is cropped
away. LLaVA-1.6 (`"anyres"`, `anyres_crops`) makes several crops of one
image: the whole image squashed to the crop size, then the crops of its
resized and black-padded copy on the best grid pinpoint (see `anyres.py`),
each through the CLIP steps. The output is channels-last (N, H, W, 3)
because MLX convolutions are NHWC; with AnyRes N counts crops, image after image.

`load_image` turns whatever a user hands us (a path, bytes, a URL, a PIL
image) into an 8-bit RGB image the way a person would expect to see it:
EXIF rotation applied, transparency on white, 16-bit scaled rather than
clipped. Every failure is a `LlavaError` naming the source.
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import LlavaError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASPECT_RATIOS = ("pad", "crop", "anyres")


@dataclass
class ImageConfig:
    """The preprocessing knobs, named as in preprocessor_config.json.

    `resize_size` (height, width) stands for a `size={"height", "width"}`
    config: resize to exactly that, ignoring `shortest_edge`.
    """

    shortest_edge: int = 336
    crop_size: tuple[int, int] = (336, 336)  # (height, width)
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    image_aspect_ratio: str = "pad"  # "pad": LLaVA-1.5 expand2square; "crop": plain CLIP
    resize_size: tuple[int, int] | None = None  # (height, width)
    grid_pinpoints: tuple | None = None  # anyres: ((height, width), ...)

    def __post_init__(self):
        self.crop_size = tuple(int(x) for x in self.crop_size)
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        self.resample = int(self.resample)  # transformers stores a Resampling enum
        self.rescale_factor = float(self.rescale_factor)
        if self.resize_size is not None:
            self.resize_size = tuple(int(x) for x in self.resize_size)
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise LlavaError(
                f"unsupported image_aspect_ratio {self.image_aspect_ratio!r} "
                f"(expected one of {', '.join(ASPECT_RATIOS)})"
            )
        if self.image_aspect_ratio == "anyres":
            from .anyres import DEFAULT_PINPOINTS

            if self.crop_size[0] != self.crop_size[1]:
                raise LlavaError(f"anyres needs square crops, not {self.crop_size}")
            self.grid_pinpoints = tuple(tuple(int(x) for x in p) for p in (self.grid_pinpoints or DEFAULT_PINPOINTS))

    @classmethod
    def from_preprocessor_config(
        cls, d: dict, image_aspect_ratio: str | None = None, grid_pinpoints=None
    ) -> "ImageConfig":
        """Read a transformers preprocessor_config.json dict.

        Missing keys keep this class's defaults (CLIP ViT-L/14-336). Without an
        explicit `image_aspect_ratio`, `do_pad` (LlavaImageProcessor's flag
        for pad-to-square) decides. LLaVA's config.json may say "square" or
        nothing for the plain CLIP path: both mean "crop". For "anyres",
        `grid_pinpoints` (height, width) are the model's; else the
        preprocessor's own (LlavaNextImageProcessor writes them so too).
        """
        kw: dict[str, Any] = {}
        size = d.get("size")
        if isinstance(size, int):  # legacy CLIP configs: an int is the shortest edge
            kw["shortest_edge"] = size
        elif isinstance(size, dict):
            if "shortest_edge" in size and "longest_edge" not in size:
                kw["shortest_edge"] = int(size["shortest_edge"])
            elif "height" in size and "width" in size:
                kw["resize_size"] = (int(size["height"]), int(size["width"]))
            else:
                raise LlavaError(f"unsupported image size in preprocessor config: {size}")
        crop = d.get("crop_size")
        if isinstance(crop, int):
            kw["crop_size"] = (crop, crop)
        elif isinstance(crop, dict):
            kw["crop_size"] = (int(crop["height"]), int(crop["width"]))
        for key in ("image_mean", "image_std", "rescale_factor", "resample", "do_resize",
                    "do_center_crop", "do_rescale", "do_normalize"):
            if d.get(key) is not None:
                kw[key] = d[key]
        if image_aspect_ratio is None:
            image_aspect_ratio = "pad" if d.get("do_pad") else "crop"
        if image_aspect_ratio in ("square", ""):
            image_aspect_ratio = "crop"
        if image_aspect_ratio == "anyres":
            kw["grid_pinpoints"] = grid_pinpoints or d.get("image_grid_pinpoints")
        return cls(image_aspect_ratio=image_aspect_ratio, **kw)

    def to_preprocessor_config(self) -> dict:
        """A dict transformers' image processors read to the same preprocessing.

        With "pad" the type is LlavaImageProcessor (a CLIPImageProcessor plus
        `do_pad`, its pad-to-square): a plain CLIPImageProcessor would ignore
        the padding and center-crop instead.
        """
        h, w = self.crop_size
        pad = self.image_aspect_ratio == "pad"
        if self.resize_size is not None:
            size = {"height": self.resize_size[0], "width": self.resize_size[1]}
        else:
            size = {"shortest_edge": self.shortest_edge}
        kind = "LlavaImageProcessor" if pad else "CLIPImageProcessor"
        anyres = {}
        if self.image_aspect_ratio == "anyres":  # LlavaNextImageProcessor's do_pad pads the crops' batch
            kind, pad = "LlavaNextImageProcessor", True
            anyres = {"image_grid_pinpoints": [list(p) for p in self.grid_pinpoints]}
        return {
            "image_processor_type": kind,
            **anyres,
            "do_resize": self.do_resize,
            "size": size,
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": h, "width": w},
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
            "do_pad": pad,
        }

    @property
    def background(self) -> tuple[int, int, int]:
        """expand2square's fill: the mean colour in 8 bits, truncated as LLaVA does."""
        return tuple(int(x * 255) for x in self.image_mean)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every preprocessed image."""
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize and self.resize_size is not None:
            return self.resize_size
        if self.do_resize and self.image_aspect_ratio == "pad":
            return (self.shortest_edge, self.shortest_edge)
        raise LlavaError("the output image size depends on the input: enable center crop")


# ---------------------------------------------------------------- loading


def load_image(source, timeout: float = 30.0) -> Image.Image:
    """Open `source` as an 8-bit RGB image, upright.

    `source`: a path (str or os.PathLike), an http(s) URL, bytes, a binary
    file object, or a PIL image. The pixels are decoded here, so a truncated
    file fails now, as a LlavaError, rather than later inside the model.
    """
    if isinstance(source, Image.Image):
        name, image = "<PIL image>", source
    else:
        name, data = _open(source, timeout)
        try:
            image = Image.open(data)
        except Image.UnidentifiedImageError as e:
            why = "not an image (unknown format or damaged header)"
            raise LlavaError(f"cannot read image {name}: {why}") from e
        except Exception as e:
            raise LlavaError(f"cannot read image {name}: {_reason(e)}") from e
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except LlavaError:
        raise
    except Exception as e:
        raise LlavaError(f"cannot read image {name}: {_reason(e)}") from e


def _open(source, timeout: float):
    """(name for messages, something Image.open takes)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>", io.BytesIO(bytes(source))
    if hasattr(source, "read"):
        return getattr(source, "name", "<file object>"), source
    if isinstance(source, str) and source.lower().startswith(("http://", "https://")):
        return source, io.BytesIO(_fetch(source, timeout))
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise LlavaError(f"image not found: {path}")
        try:
            with open(path, "rb") as f:
                return path, io.BytesIO(f.read())
        except OSError as e:
            raise LlavaError(f"cannot read image {path}: {_reason(e)}") from e
    raise LlavaError(
        f"unsupported image source of type {type(source).__name__} "
        "(expected a path, URL, bytes, file object or PIL image)"
    )


def _fetch(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-llava"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise LlavaError(f"cannot fetch image {url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise LlavaError(f"cannot fetch image {url}: {e.reason}") from e
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        raise LlavaError(f"cannot fetch image {url}: {_reason(e)}") from e


def _reason(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB.

    Transparency is composited on white, as transformers' convert_to_rgb does
    (PIL's own convert would drop alpha and show whatever colour hides under
    it). 16-bit values are shifted down to 8 bits, since PIL's convert clips
    them at 255 and turns most 16-bit photos white.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(image)
        if image.mode != "I" or a.max(initial=0) > 255:
            a = np.clip(a, 0, 65535).astype(np.uint16) >> 8
        image = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    bands = image.getbands()
    if "A" in bands or "a" in bands or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# ----------------------------------------------------------- preprocessing


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad `image` to a square of its longer side, centred, on `background`.

    LLaVA-1.5's answer to CLIP's center crop cutting off the edges of
    non-square images. Offsets round down, as in the original.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def preprocess(images, config: ImageConfig) -> np.ndarray:
    """Sources (one, or a list) to float32 pixel values (N, H, W, 3); with
    AnyRes, every image's crops one after another."""
    return preprocess_with_sizes(images, config)[0]


def preprocess_with_sizes(images, config: ImageConfig) -> tuple:
    """-> (pixel values as `preprocess` gives them, [(height, width)] of the images)."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise LlavaError("no images to preprocess")
    loaded = [load_image(x) for x in images]
    sizes = [(im.height, im.width) for im in loaded]
    if config.image_aspect_ratio == "anyres":
        crops = [_preprocess_one(c, config) for im in loaded for c in anyres_crops(im, config)]
        return np.stack(crops), sizes
    arrays = [_preprocess_one(im, config) for im in loaded]
    if len({a.shape for a in arrays}) > 1:
        raise LlavaError("images preprocess to different sizes: enable center crop")
    return np.stack(arrays), sizes


def anyres_crops(image: Image.Image, c: ImageConfig) -> list:
    """LLaVA-1.6's crops of one image, as PIL images, before the CLIP steps:
    the whole image resized to the base size (aspect not kept), then the
    image resized to fit its best grid pinpoint (aspect kept, bicubic),
    centred on black, cut into crop-sized tiles row by row."""
    from .anyres import fit_size, select_best_resolution

    crop = c.crop_size[0]
    target_h, target_w = select_best_resolution((image.height, image.width), c.grid_pinpoints)
    new_h, new_w = fit_size((image.height, image.width), (target_h, target_w))
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), resample=c.resample), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    tiles = [canvas.crop((x, y, x + crop, y + crop)) for y in range(0, target_h, crop) for x in range(0, target_w, crop)]
    base_h, base_w = c.resize_size or (c.shortest_edge, c.shortest_edge)
    return [image.resize((base_w, base_h), resample=c.resample)] + tiles


def image_size(path) -> tuple:
    """(height, width) that `load_image(path)` will give, read from the file's
    header (EXIF rotation included) without decoding its pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception as e:
        raise LlavaError(f"cannot read image {path}: {_reason(e)}") from e
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _preprocess_one(image: Image.Image, c: ImageConfig) -> np.ndarray:
    if c.image_aspect_ratio == "pad":
        image = expand2square(image, c.background)
    if c.do_resize:
        height, width = _resize_size(image.height, image.width, c)
        image = image.resize((width, height), resample=c.resample)
    x = np.asarray(image)
    if c.do_center_crop:
        x = _center_crop(x, *c.crop_size)
    if c.do_rescale:  # in float64 then down to float32, as transformers does
        x = (x.astype(np.float64) * c.rescale_factor).astype(np.float32)
    x = x.astype(np.float32, copy=False)
    if c.do_normalize:
        x = (x - np.array(c.image_mean, np.float32)) / np.array(c.image_std, np.float32)
    return x


def _resize_size(height: int, width: int, c: ImageConfig) -> tuple[int, int]:
    """(H, W) after resizing: the shortest edge to `shortest_edge`, the long
    one scaled and truncated (transformers' get_resize_output_image_size with
    default_to_square=False), or exactly `resize_size`."""
    if c.resize_size is not None:
        return c.resize_size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = c.shortest_edge, int(c.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop (H, W, C) to (height, width); where the image is smaller,
    the missing border is zeros, centred as transformers centres it."""
    top, left = (x.shape[0] - height) // 2, (x.shape[1] - width) // 2
    if top >= 0 and left >= 0:
        return x[top : top + height, left : left + width]
    out = np.zeros((height, width, x.shape[2]), x.dtype)
    src = x[max(top, 0) : top + height, max(left, 0) : left + width]
    dy, dx = max(-top, 0), max(-left, 0)
    out[dy : dy + src.shape[0], dx : dx + src.shape[1]] = src
    return out
