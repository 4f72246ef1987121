"""The synthetic visual world: coloured shapes on plain backgrounds.

It exists so the whole LLaVA recipe (vision tower, language model, stage 1,
stage 2) can be trained and checked on a 2-core CPU in minutes, with no
download. Every choice below serves two needs: a tiny model must be able to
learn it at low resolution, and every question asked about a scene must have
one short, true answer.

- Images are 64x64 by default (`image_size` changes it; all geometry scales).
  A vision tower with 8-pixel patches sees 8x8 = 64 visual tokens, cheap
  enough to train contrastively and then run LLaVA over on a CPU, while the
  smallest shape (14 px) still spans two patches and stays recognisable.
- Objects sit on a 3x3 grid, one per cell, with a little jitter. The cell is
  the object's position ("top left", ..., "center", ..., "bottom right"), so
  position and left/above relations never sit on a knife edge. Large objects
  may overlap a neighbour by a few pixels (never a tenth of its box, never
  its centre); objects of the same colour never touch (they would merge).
- Within a scene no two objects share both colour and shape, so "the red
  circle" always names exactly one object.
- Train and test are disjoint twice over: they come from different random
  streams, and a scene's layout (objects + background) is hashed to decide
  its split, so no test layout can ever be drawn for training, whatever the
  seeds or sizes asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import LlavaError

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {s: s + "es" if s.endswith("s") else s + "s" for s in SHAPES}
# Saturated, far apart in RGB, and far from every (grey) background.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 200),
    "orange": (245, 140, 20),
}
BACKGROUNDS = {"white": 240, "light gray": 200, "gray": 150, "dark gray": 85, "black": 25}
TEXTURES = ("plain", "noise", "gradient")
NOISE = 6  # +- per channel, background only
GRADIENT = 14  # +- across the image, background only
SIZES = {"small": 0.22, "large": 0.36}  # side as a fraction of the image: 14 / 23 px at 64
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
# How a position reads inside a sentence: "the star at the top left".
AT = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
SPLITS = ("train", "test")
TEST_SHARE = 10  # one layout in TEST_SHARE belongs to the test split
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class Object:
    shape: str
    colour: str
    size: str  # "small" | "large"
    bbox: list[int]  # [x, y, w, h] in pixels; the shape touches all four sides
    cell: tuple[int, int]  # (row, col) on the 3x3 grid

    @property
    def position(self) -> str:
        return POSITIONS[self.cell[0]][self.cell[1]]

    @property
    def center(self) -> tuple[int, int]:
        """The box's centre pixel: always painted in this object's colour."""
        x, y, w, h = self.bbox
        return x + w // 2, y + h // 2

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    id: int
    file_name: str
    image_size: int
    background: str
    texture: str
    objects: list[Object]
    captions: list[str] = field(default_factory=list)
    seed: int = 0  # drives the background's noise and gradient direction

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum(
            (shape is None or o.shape == shape) and (colour is None or o.colour == colour)
            for o in self.objects
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objects = [Object(**{**o, "cell": tuple(o["cell"])}) for o in d["objects"]]
        return cls(**{**d, "objects": objects})


# ---------------------------------------------------------------- drawing


def _star(points: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    """A star's outline stretched to fill the unit box (a fat star reads better at 14 px)."""
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    xs, ys = radii * np.cos(angles), radii * np.sin(angles)
    xs = (xs - xs.min()) / (xs.max() - xs.min())
    ys = (ys - ys.min()) / (ys.max() - ys.min())
    return list(zip(xs.tolist(), ys.tolist()))


_A, _B = 0.33, 0.67  # the cross's arms are the middle third
OUTLINES = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "cross": [
        (_A, 0),
        (_B, 0),
        (_B, _A),
        (1, _A),
        (1, _B),
        (_B, _B),
        (_B, 1),
        (_A, 1),
        (_A, _B),
        (0, _B),
        (0, _A),
        (_A, _A),
    ],
    "star": _star(),
}


def _draw(draw: ImageDraw.ImageDraw, obj: Object) -> None:
    x, y, w, h = obj.bbox
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([x, y, x + w - 1, y + h - 1], fill=fill)
    else:
        draw.polygon([(x + u * (w - 1), y + v * (h - 1)) for u, v in OUTLINES[obj.shape]], fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image; the same scene always gives the same pixels."""
    s = scene.image_size
    rng = np.random.default_rng(scene.seed)
    pixels = np.full((s, s, 3), BACKGROUNDS[scene.background], np.int32)
    if scene.texture == "gradient":
        ramp = np.linspace(-GRADIENT, GRADIENT, s).round().astype(np.int32)
        pixels += (ramp if rng.integers(2) else ramp[::-1])[:, None, None]
    elif scene.texture == "noise":
        pixels += rng.integers(-NOISE, NOISE + 1, (s, s, 3), dtype=np.int32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj)
    return image


def save_images(scenes: list[Scene], folder) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        render(scene).save(folder / scene.file_name)


# ---------------------------------------------------------------- sampling


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _layout_ok(objects: list[Object]) -> bool:
    """Overlaps stay mild: no box covers another object's centre or more than a tenth
    of another box, and same-coloured boxes keep a 2 px gap (else they merge)."""
    for a in objects:
        for b in objects:
            if a is b:
                continue
            (cx, cy), (x, y, w, h), (ax, ay, aw, ah) = a.center, b.bbox, a.bbox
            if x <= cx < x + w and y <= cy < y + h:
                return False
            gap = 2 if a.colour == b.colour else 0
            dx = min(ax + aw, x + w) - max(ax, x) + gap  # overlap (> 0) along each axis
            dy = min(ay + ah, y + h) - max(ay, y) + gap
            if dx > 0 and dy > 0 and (gap or dx * dy > 0.1 * aw * ah):
                return False
    return True


def _sample_objects(rng: random.Random, image_size: int, max_objects: int) -> list[Object]:
    k = min(max_objects, rng.choices([1, 2, 3, 4], weights=[15, 30, 30, 25])[0])
    cell_size = image_size / 3
    jitter = max(1, round(image_size / 32))
    objects: list[Object] = []
    for index in sorted(rng.sample(range(9), k)):
        while True:  # repeats of a shape or colour are made likelier, so counts exceed one
            shapes = [o.shape for o in objects]
            colours = [o.colour for o in objects]
            shape = rng.choice(shapes) if shapes and rng.random() < 0.3 else rng.choice(SHAPES)
            colour = rng.choice(colours) if colours and rng.random() < 0.3 else rng.choice(list(COLOURS))
            if (shape, colour) not in zip(shapes, colours):
                break
        size = rng.choice(list(SIZES))
        side = round(SIZES[size] * image_size)
        row, col = divmod(index, 3)
        x, y = (
            min(
                max(round((c + 0.5) * cell_size - side / 2) + rng.randint(-jitter, jitter), 0),
                image_size - side,
            )
            for c in (col, row)
        )
        objects.append(Object(shape, colour, size, [x, y, side, side], (row, col)))
    return objects


def layout_key(scene: Scene) -> str:
    """What a scene shows, without jitter or noise: equal keys look the same."""
    parts = [scene.background] + [f"{o.cell}{o.colour}{o.shape}{o.size}" for o in scene.objects]
    return "|".join(parts)


def split_of(scene: Scene) -> str:
    digest = hashlib.sha256(layout_key(scene).encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % TEST_SHARE == 0 else "train"


def captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five COCO-like captions, each true of the scene, in varied phrasing."""
    objs, bg = scene.objects, scene.background

    def phrase(o: Object, sized: bool) -> str:
        words = f"{o.size} {o.colour} {o.shape}" if sized else o.name
        return f"{article(words)} {words}"

    sized = [phrase(o, rng.random() < 0.5) for o in objs]
    n = len(objs)
    by_shape = [
        f"{NUMBER_WORDS[c]} {PLURALS[s]}" if c > 1 else f"{article(s)} {s}"
        for s in SHAPES
        if (c := scene.count(shape=s))
    ]
    texts = [
        f"{join(sized)} on {article(bg)} {bg} background",
        (
            f"{NUMBER_WORDS[n]} shapes: {join([phrase(o, False) for o in objs])}"
            if n > 1
            else f"a single {objs[0].name} on {bg}"
        ),
        join([f"{phrase(o, False)} {AT[o.position]}" for o in objs]),
        f"{join(by_shape)} on {article(bg)} {bg} background",
        f"a picture of {join([phrase(o, True) for o in objs])} against {article(bg)} {bg} backdrop",
    ]
    rng.shuffle(texts)
    return [t[0].upper() + t[1:] + "." for t in texts]


def sample_scene(
    seed: int, image_size: int = IMAGE_SIZE, max_objects: int = 4, with_captions: bool = True
) -> Scene:
    """One scene from one integer seed (id and file name left for the caller)."""
    rng = random.Random(seed)
    while True:
        objects = _sample_objects(rng, image_size, max_objects)
        if _layout_ok(objects):
            break
    background = rng.choice(list(BACKGROUNDS))
    texture = rng.choices(TEXTURES, weights=[2, 1, 1])[0]
    scene = Scene(0, "", image_size, background, texture, objects, seed=seed)
    if with_captions:
        scene.captions = captions(scene, rng)
    return scene


def make_scenes(
    n: int,
    seed: int = 0,
    split: str = "train",
    image_size: int = IMAGE_SIZE,
    max_objects: int = 4,
) -> list[Scene]:
    """`n` scenes of one split, deterministic in (seed, split, image_size).

    Ids start at 1 for train and 10,000,001 for test so both splits can share
    one COCO file; file names are "{split}_{index:06d}.png".
    """
    if split not in SPLITS:
        raise LlavaError(f"split must be one of {SPLITS}, not {split!r}")
    if image_size < 48:  # below, a small cross is an 8-pixel blob
        raise LlavaError(f"image_size {image_size} is too small for the shapes to stay recognisable (>= 48)")
    if not 1 <= max_objects <= 4:
        raise LlavaError("max_objects must be between 1 and 4")
    stream = random.Random(f"{split}:{seed}")  # one stream per split
    first_id = 1 if split == "train" else 10_000_001
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene_seed = stream.getrandbits(31)
        scene = sample_scene(scene_seed, image_size, max_objects, with_captions=False)
        if split_of(scene) != split:
            continue
        i = len(scenes)
        scene = sample_scene(scene_seed, image_size, max_objects)  # again, with captions
        scenes.append(dataclasses.replace(scene, id=first_id + i, file_name=f"{split}_{i:06d}.png"))
    return scenes


# ---------------------------------------------------------------- COCO files


def _coco_image(scene: Scene) -> dict:
    return {
        "id": scene.id,
        "file_name": scene.file_name,
        "width": scene.image_size,
        "height": scene.image_size,
        # Not COCO: what a reader needs to rebuild the Scene (see scene_from_record).
        "attributes": {"background": scene.background, "texture": scene.texture, "seed": scene.seed},
    }


def write_coco(scenes: list[Scene], out_dir, image_folder="images") -> tuple[Path, Path]:
    """Write the PNGs into `image_folder` (relative paths are under `out_dir`) and
    `captions.json` + `instances.json` in COCO's layout into `out_dir`.

    Boxes are COCO's [x, y, w, h]; `area` is the box's area; there is no
    segmentation. Colour and size go in an extra `attributes` field of each
    annotation, which COCO tools ignore: like COCO, a box's category is only
    its shape, and colours reach a text-only teacher through the captions.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len({s.id for s in scenes}) != len(scenes):
        raise LlavaError("scene ids must be unique in one COCO file")
    save_images(scenes, out_dir / image_folder)
    info = {"description": "mlx-llava synthetic shapes world", "version": "1.0"}
    images = [_coco_image(s) for s in scenes]
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    caption_anns = [
        {"id": k + 1, "image_id": s.id, "caption": c}
        for k, (s, c) in enumerate((s, c) for s in scenes for c in s.captions)
    ]
    instance_anns = [
        {
            "id": k + 1,
            "image_id": s.id,
            "category_id": SHAPES.index(o.shape) + 1,
            "bbox": list(o.bbox),
            "area": o.bbox[2] * o.bbox[3],
            "iscrowd": 0,
            "attributes": {"color": o.colour, "size": o.size},
        }
        for k, (s, o) in enumerate((s, o) for s in scenes for o in s.objects)
    ]
    paths = out_dir / "captions.json", out_dir / "instances.json"
    common = {"info": info, "licenses": [], "images": images}
    paths[0].write_text(json.dumps({**common, "annotations": caption_anns}))
    paths[1].write_text(json.dumps({**common, "annotations": instance_anns, "categories": categories}))
    return paths


def scene_from_record(record: dict) -> Scene:
    """Rebuild a Scene from a `read_coco` record of this world's own files."""
    if "attributes" not in record:
        raise LlavaError(f"image {record['file_name']} has no scene attributes: not a synthetic-world file")
    size, attrs = record["width"], record["attributes"]
    objects = []
    for o in record["objects"]:
        x, y, w, h = (int(v) for v in o["bbox"])
        cell = (min(2, (y + h // 2) * 3 // size), min(2, (x + w // 2) * 3 // size))
        objects.append(
            Object(o["category"], o["attributes"]["color"], o["attributes"]["size"], [x, y, w, h], cell)
        )
    return Scene(
        record["id"],
        record["file_name"],
        size,
        attrs["background"],
        attrs["texture"],
        objects,
        list(record["captions"]),
        attrs["seed"],
    )
