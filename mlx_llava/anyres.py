"""LLaVA-1.6 (LLaVA-NeXT) "AnyRes": the geometry of a high-resolution image.

An image is resized (aspect kept) and padded onto the grid pinpoint that
fits it best, cut into crops of the vision tower's size, and a squashed
copy of the whole image goes first. The vision tower encodes every crop;
the grid's patch features are laid out as one big (rows x side, cols x
side) map, the padding is cut off again (`unpad`), a learned
`image_newline` is appended to each row, and the rows are flattened after
the base image's tokens. So the number of visual tokens depends on the
image's size.

This module holds that geometry once, for the image preprocessing, the
processor's token counts and the model's feature layout alike. Sizes are
(height, width) and pinpoints (height, width), as llava-hf writes them; the
original (haotian-liu/LLaVA) writes pinpoints as (width, height), and
`convert` swaps them, which keeps its choice among equal candidates.

Two rules differ between the original and transformers' LlavaNext and are
kept apart by `rounding`: the unpadded side is `int(x)` in the original and
`int(round(x, 7))` in transformers, where x = side * (grid / image) is a
float that can fall just below a whole number (a 704 x 396 portrait image:
26.999999999999996).

The model lays out its visual tokens by a gather: `token_index` lists, for
each visual token, the row of the vision tower's (crops x tokens) output it
comes from, and NEWLINE where `image_newline` goes. The index is made on
the host from image sizes only, so a compiled training step takes it as data.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .errors import LlavaError

NEWLINE = -1  # in a token index: the image_newline vector
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
ROUNDING = ("round", "truncate")  # transformers' unpad, the original's
# LLaVA-1.6's pinpoints (llava-hf's default), for a 336 px vision tower.
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def parse_pinpoints(value, crop: int) -> list:
    """A config's `image_grid_pinpoints` -> [(a, b), ...] in the order and
    orientation written: a list of pairs, its string form ("[[336, 672], ...]"),
    or LLaVA-NeXT's range form "(1x1),...,(3x3)" (every (i, j) from the first
    to the last, i outer, times the crop size). Each side must be a multiple
    of the crop size."""
    if value is None:
        return [tuple(p) for p in DEFAULT_PINPOINTS]
    if isinstance(value, str):
        ranges = re.findall(r"\((\d+)x(\d+)\)", value)
        if ranges:
            (a0, b0), (a1, b1) = [tuple(map(int, r)) for r in (ranges[0], ranges[-1])]
            value = [(i * crop, j * crop) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
        else:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise LlavaError(f"cannot read image_grid_pinpoints {value!r}") from None
    try:
        pairs = [(int(a), int(b)) for a, b in value]
    except (TypeError, ValueError):
        raise LlavaError(f"image_grid_pinpoints must be pairs of sizes, not {value!r}") from None
    if not pairs or any(a <= 0 or b <= 0 or a % crop or b % crop for a, b in pairs):
        raise LlavaError(f"image_grid_pinpoints {pairs} must be multiples of the crop size {crop}")
    return pairs


def swap(pairs) -> list:
    """(width, height) pinpoints, as the original writes them, -> (height, width)."""
    return [(b, a) for a, b in pairs]


def select_best_resolution(size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple:
    """The pinpoint (height, width) an image of `size` (height, width) goes on:
    the largest effective resolution (the image's pixels it keeps, never more
    than it has), then the least wasted area; the first of equals."""
    height, width = size
    best, best_effective, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (h, w), effective, waste
    return best


def fit_size(size: Sequence[int], target: Sequence[int]) -> tuple:
    """(height, width) an image of `size` is resized to, aspect kept, to fit
    `target` (height, width): one side fills it, the other rounds up."""
    height, width = size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


@dataclass(frozen=True)
class AnyRes:
    """The AnyRes settings of a model: pinpoints (height, width), the vision
    tower's image (crop) size and patch size, how the grid's features are
    merged, and which unpad rounding."""

    pinpoints: tuple
    crop: int = 336
    patch: int = 14
    merge: str = "spatial_unpad"
    rounding: str = "round"

    def __post_init__(self):
        object.__setattr__(self, "pinpoints", tuple(tuple(int(x) for x in p) for p in self.pinpoints))
        if self.merge not in MERGE_TYPES:
            raise LlavaError(f"unsupported mm_patch_merge_type {self.merge!r} (expected one of {', '.join(MERGE_TYPES)})")
        if self.rounding not in ROUNDING:
            raise LlavaError(f"unknown unpad_rounding {self.rounding!r} (round or truncate)")
        if not self.pinpoints or any(h % self.crop or w % self.crop for h, w in self.pinpoints):
            raise LlavaError(f"image_grid_pinpoints {list(self.pinpoints)} must be multiples of the crop size {self.crop}")

    @property
    def side(self) -> int:
        """Patches along a crop's side (24 for CLIP ViT-L/14 at 336 px)."""
        return self.crop // self.patch

    @property
    def newline(self) -> bool:
        return "unpad" in self.merge

    def best(self, size) -> tuple:
        return select_best_resolution(size, self.pinpoints)

    def grid(self, size) -> tuple:
        """(rows, cols) of crops for an image of `size` (height, width)."""
        h, w = self.best(size)
        return h // self.crop, w // self.crop

    def crops(self, size) -> int:
        """Crops the vision tower sees for one image: the grid's and the base image."""
        rows, cols = self.grid(size)
        return rows * cols + 1

    def unpadded(self, size) -> tuple:
        """(top, bottom, left, right): the part of the grid's (rows x side,
        cols x side) feature map that shows the image, in patches (`unpad_image`)."""
        height, width = size
        rows, cols = self.grid(size)
        map_h, map_w = rows * self.side, cols * self.side
        if width / height > map_w / map_h:  # wider than the map: bars above and below
            new = self._whole(height * (map_w / width))
            pad = (map_h - new) // 2
            return pad, map_h - pad, 0, map_w
        new = self._whole(width * (map_h / height))
        pad = (map_w - new) // 2
        return 0, map_h, pad, map_w - pad

    def _whole(self, x: float) -> int:
        return int(x) if self.rounding == "truncate" else int(round(x, 7))

    def num_tokens(self, size) -> int:
        """Visual tokens one image of `size` (height, width) becomes."""
        per_crop = self.side * self.side
        if not self.newline:  # flat and spatial keep every crop's tokens, in another order
            return self.crops(size) * per_crop
        top, bottom, left, right = self.unpadded(size)
        return per_crop + (bottom - top) * (right - left + 1)

    def token_index(self, size) -> np.ndarray:
        """For each visual token of one image, the row of its crops' features
        ((crops x side*side) rows, the base image's first) it is, or NEWLINE.

        flat: every crop's tokens in order. spatial: the base image's, then
        the grid's as one map, row by row. spatial_unpad: the same map cut to
        the image (`unpadded`), each row followed by the newline."""
        per_crop = self.side * self.side
        base = np.arange(per_crop)
        if self.merge == "flat":
            return np.arange(self.crops(size) * per_crop)
        rows, cols = self.grid(size)
        s = self.side
        y, x = np.meshgrid(np.arange(rows * s), np.arange(cols * s), indexing="ij")
        rows_of_map = ((y // s) * cols + x // s + 1) * per_crop + (y % s) * s + (x % s)
        if self.merge == "spatial":
            return np.concatenate([base, rows_of_map.reshape(-1)])
        top, bottom, left, right = self.unpadded(size)
        kept = rows_of_map[top:bottom, left:right]
        with_newline = np.concatenate([kept, np.full((kept.shape[0], 1), NEWLINE)], axis=1)
        return np.concatenate([base, with_newline.reshape(-1)])

    def batch_index(self, sizes) -> np.ndarray:
        """`token_index` of several images whose crops lie one after another, in order."""
        per_crop = self.side * self.side
        parts, start = [], 0
        for size in sizes:
            index = self.token_index(size)
            parts.append(np.where(index == NEWLINE, NEWLINE, index + start * per_crop))
            start += self.crops(size)
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)


def from_config(config: dict, vision: dict) -> Optional[AnyRes]:
    """The AnyRes settings a (complete, our spelling) model config asks for, or None."""
    aspect = config.get("image_aspect_ratio")
    if isinstance(aspect, str) and aspect.startswith("anyres_max"):
        raise LlavaError(
            f"image_aspect_ratio {aspect!r} (LLaVA-OneVision's feature downscaling) is not supported: "
            "its checkpoints use a SigLIP vision tower, which mlx-llava does not have"
        )
    if aspect != "anyres":
        return None
    crop, patch = int(vision["image_size"]), int(vision["patch_size"])
    pinpoints = parse_pinpoints(config.get("image_grid_pinpoints"), crop)
    merge = config.get("mm_patch_merge_type") or "spatial_unpad"
    return AnyRes(tuple(pinpoints), crop, patch, merge, config.get("unpad_rounding") or "round")
