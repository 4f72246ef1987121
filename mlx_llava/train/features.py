"""Vision features, computed once per image and cached on disk.

The vision tower is frozen in both stages (unless `--vision-tower-lr`
trains it, and then no cache is kept), so its output for an image never
changes during training: stage 1 in particular then costs only the projector
and the language model. Entries are keyed by the image file (path, size,
mtime), the preprocessing and a fingerprint of the vision tower's weights, so
a cache shared between runs never serves stale features.
"""

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import atomic
from ..errors import LlavaError
from ..image import load_image
from .monitor import ProgressBar


def fingerprint(model, image_config) -> str:
    """Identifies the vision tower's weights, its feature selection and the preprocessing."""
    h = hashlib.sha1()
    for name, w in tree_flatten(model.vision_tower.parameters()):
        h.update(name.encode())
        h.update(np.asarray(w.astype(mx.float32).reshape(-1)[:64]).tobytes())
        h.update(np.float64(w.astype(mx.float32).sum().item()).tobytes())
    args = model.args
    h.update(json.dumps([args.vision_feature_layer, args.vision_feature_select_strategy,
                         repr(image_config)], default=str).encode())
    return h.hexdigest()[:16]


class FeatureCache:
    def __init__(self, folder, model, image_config):
        self.folder = Path(folder)
        self.tag = fingerprint(model, image_config)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, image: Path) -> Path:
        stat = os.stat(image)
        key = f"{Path(image).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.tag}"
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def get(self, image: Path):
        p = self.path(image)
        return mx.load(str(p))["features"] if p.exists() else None

    def put(self, image: Path, features: mx.array):
        p = self.path(image)
        p.parent.mkdir(exist_ok=True)
        atomic.write_safetensors(p, {"features": features})  # a killed run never leaves half an entry


def image_features(model, processor, path, features=None):
    """The frozen vision tower's features for one image (from the cache when
    there is one): (T, C), or with AnyRes its crops' (crops, T, C)."""
    if features is not None:
        cached = features.get(path)
        if cached is not None:
            return cached
    try:
        pixels = processor.preprocess([load_image(path)])
    except LlavaError:
        return None
    f = model.vision_features(pixels)
    f = f if processor.anyres is not None else f[0]
    if features is not None:
        mx.eval(f)
        features.put(path, f)
    return f


def fill_cache(features: FeatureCache, model, processor, datasets, show: bool):
    """Compute every image's features once, before training; drop unreadable ones."""
    images = sorted({e.image for d in datasets for e in d.examples if e.image is not None})
    todo = [p for p in images if not features.path(p).exists()]
    bar = ProgressBar(len(todo), 0, "caching vision features") if show and todo else None
    bad = set()
    for p in todo:
        if image_features(model, processor, p, features) is None:
            bad.add(p)
        if bar:
            bar.advance()
    if bar:
        bar.close()
    for d in datasets:
        d.skipped += [(e.id, f"cannot read image {e.image}") for e in d.examples if e.image in bad]
        d.examples = [e for e in d.examples if e.image not in bad]
