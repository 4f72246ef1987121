"""Can the demo's tiny LLaMA find an object by content in a build's CLIP tokens?

A diagnostic for the demo model's "where" gap (research/NOTES.md). It is
`research/lookup.py`'s lab (the recipe's LLaMA shape trained from scratch, a
projector, Muon at lr 0.005) on the world's real scenes: each sample is the 9
visual tokens of a training image, read from a demo build's CLIP as LLaVA
reads them, and "where <colour> <shape> ?" about one of its objects, answered
by the object's grid cell. Every object of every image is asked about, so the
answer cannot come from the image alone. Held-out: the 300 test scenes.

    python research/lookup_clip.py build=demo-build                # the build's CLIP tokens
    python research/lookup_clip.py build=demo-build empty=zero     # empty cells' tokens set to 0
    python research/lookup_clip.py build=demo-build symbols=1      # exact one-hot symbols instead

Prints held-out accuracy every 250 steps.
"""

import mlx_llava  # noqa: F401  (before mlx: the system BLAS on Linux)

import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from lookup import ASK, BOS, COLOURS, IMAGE, PLACES, SHAPES, WHERE, Lookup, cell_symbols, make_optimizer, parse

from mlx_llava.demo import world

SETTINGS = dict(build="", steps=1000, batch=16, layer=-2, empty="keep", symbols=0, seed=0, lr=5e-4, muon=0.005)
LAB = dict(hidden=128, layers=4, heads=4, theta=10000.0, first=0)  # the recipe's language model shape


def features(model, processor, folder: Path, scenes, layer: int) -> np.ndarray:
    from mlx_llava.image import load_image

    out = []
    for i in range(0, len(scenes), 64):
        pixels = processor.preprocess([load_image(folder / s.file_name) for s in scenes[i:i + 64]])
        out.append(np.array(model.vision_tower(pixels, [layer])[0][:, 1:]))
    return np.concatenate(out)


def place(o) -> int:
    return 3 * o.cell[0] + o.cell[1]


def symbols(scenes) -> np.ndarray:
    return np.stack([cell_symbols([(place(o), list(world.COLOURS).index(o.colour), world.SHAPES.index(o.shape))
                                   for o in s.objects]) for s in scenes])


def read_scenes(build: Path) -> tuple:
    """A demo build's training scenes (from its COCO files) and the 300 held-out test scenes."""
    from mlx_llava.demo.recipe import train_scenes

    train = train_scenes(build)
    return train, world.make_scenes(300, 0, "test", train[0].image_size)


def asked(scenes):
    """(scene index, object) for every object that is the only one of its colour and shape."""
    for n, s in enumerate(scenes):
        for o in s.objects:
            if sum(q.name == o.name for q in s.objects) == 1:
                yield n, o


def questions(scenes, cells) -> tuple:
    """"where <colour> <shape> ?" about each object `asked`: (ids, cells, answers)."""
    rows, index, answers = [], [], []
    for n, o in asked(scenes):
        question = [WHERE, COLOURS + list(world.COLOURS).index(o.colour), SHAPES + world.SHAPES.index(o.shape)]
        rows.append([BOS, *[IMAGE] * 9, *question, ASK])
        index.append(n)
        answers.append(PLACES + place(o))
    return np.array(rows, np.int32), cells[index], np.array(answers, np.int32)


def main(argv):
    s = parse(argv, SETTINGS, "lookup_clip.py")
    if s["empty"] not in ("keep", "zero"):
        raise SystemExit(f"lookup_clip.py: empty={s['empty']!r}; keep or zero")
    build = Path(s["build"])
    if not (build / "stage1" / "model").is_dir():
        raise SystemExit(f"lookup_clip.py: {build} is not a demo build (no stage1/model); build=DIR")
    from mlx_llava import load

    train, test = read_scenes(build)
    if s["symbols"]:
        cells = [symbols(train), symbols(test)]
    else:
        model, processor = load(build / "stage1" / "model")
        cells = [features(model, processor, build / "data" / "images", x, s["layer"]) for x in (train, test)]
    if s["empty"] == "zero":
        for c, scenes in zip(cells, (train, test)):
            for n, scene in enumerate(scenes):
                full = {place(o) for o in scene.objects}
                c[n, [i for i in range(9) if i not in full]] = 0
    train_q, test_q = questions(train, cells[0]), questions(test, cells[1])
    test_q = [mx.array(x) for x in test_q]

    rng = np.random.default_rng(s["seed"])
    mx.random.seed(s["seed"])
    model = Lookup(LAB, features=cells[0].shape[-1])
    opt = make_optimizer(s["lr"], s["muon"])

    def loss(model, ids, x, answer):
        return nn.losses.cross_entropy(model(ids, x)[:, -1], answer).mean()

    step = nn.value_and_grad(model, loss)
    print(s, f"{len(train_q[0])} training questions, {len(test_q[0])} held-out", flush=True)
    tic = time.time()
    for i in range(1, s["steps"] + 1):
        pick = rng.integers(0, len(train_q[0]), s["batch"])
        value, grads = step(model, *(mx.array(x[pick]) for x in train_q))
        opt.update(model, grads)
        mx.eval(value, model.parameters(), opt.state)
        if i % 250 == 0:
            right = (model(test_q[0], test_q[1])[:, -1].argmax(-1) == test_q[2]).mean().item()
            print(f"step {i}: loss {value.item():.3f}  held-out where {right:.2f}  ({time.time() - tic:.0f}s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
