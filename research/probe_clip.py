"""What the demo CLIP's visual tokens hold, and where the "where" answers go wrong.

A diagnostic for the demo model's gap (research/NOTES.md):

1. A linear probe (softmax regression in numpy) on the visual token of each
   object's cell, from a demo build's CLIP (its cached features): the cell's
   row and column, and the object's colour and shape. Trained on 80% of the
   training scenes' objects, scored on the other 20%.
2. The held-out "where" questions of a build's answers, by distractor: does
   another object in the scene share the asked object's colour, or its shape,
   and when the answer is wrong, whose place does it name?

    python research/probe_clip.py build=demo-build [answers=demo-build/answers-full+short_answers.json]
"""

import mlx_llava  # noqa: F401  (before mlx: the system BLAS on Linux)

import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from lookup_clip import place, read_scenes

from mlx_llava.demo.world import COLOURS, SHAPES
from mlx_llava.processor import Processor
from mlx_llava.train.features import FeatureCache
from mlx_llava.train.features import image_features
from mlx_llava.weights import load_model


def probe(x: np.ndarray, y: np.ndarray, split: float = 0.8, steps: int = 300) -> float:
    """Held-out accuracy of a softmax regression from x to the classes y."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    x = np.c_[x, np.ones(len(x))]
    n, onehot = int(split * len(x)), np.eye(y.max() + 1)[y]
    w = np.linalg.solve(x[:n].T @ x[:n] + 0.1 * np.eye(x.shape[1]), x[:n].T @ onehot[:n])  # ridge start
    for _ in range(steps):
        z = x[:n] @ w
        p = np.exp(z - z.max(1, keepdims=True))
        w -= 0.5 * x[:n].T @ (p / p.sum(1, keepdims=True) - onehot[:n]) / n
    return float(((x[n:] @ w).argmax(1) == y[n:]).mean())


def token_probe(build: Path):
    model, config = load_model(build / "stage1" / "model")
    processor = Processor.from_dir(build / "stage1" / "model", config)
    cache = FeatureCache(build / "features", model, processor.image_config)
    train, _ = read_scenes(build)
    rows, labels = [], []
    for scene in train:
        feats = np.array(image_features(model, processor, build / "data" / "images" / scene.file_name, cache))
        for o in scene.objects:
            rows.append(feats[place(o)])
            labels.append((o.cell[0], o.cell[1], list(COLOURS).index(o.colour), SHAPES.index(o.shape)))
    x, y = np.array(rows), np.array(labels)
    print(f"linear probe on {len(x)} objects' visual tokens (80/20):")
    for j, name in enumerate(("row", "column", "colour", "shape")):
        print(f"  {name}: {100 * probe(x, y[:, j]):.1f}%")


def where_by_distractor(build: Path, answers: Path):
    _, test = read_scenes(build)
    scenes = {s.file_name: s for s in test}
    tally = Counter()
    for a in json.loads(answers.read_text()):
        if a["kind"] != "position":
            continue
        scene = scenes[a["image"]]
        name = re.sub(r"^Where is the |( in the image| located)?\?$", "", a["question"].split("\n")[0])
        (o,) = [o for o in scene.objects if name in (o.name, o.shape)]
        others = [p for p in scene.objects if p is not o]
        case = " and ".join(k for k, shared in (("colour", any(p.colour == o.colour for p in others)),
                                                ("shape", any(p.shape == o.shape for p in others))) if shared)
        named = [p for p in others if p.position == a["prediction"]]
        outcome = "right" if a["correct"] else (
            "a same-colour object's place" if named and named[0].colour == o.colour else
            "a same-shape object's place" if named and named[0].shape == o.shape else
            "another object's place" if named else "an empty cell")
        tally[case or "none", outcome] += 1
    print(f'"where" questions in {answers.name}, by what another object shares with the one asked about:')
    for case in sorted({c for c, _ in tally}):
        total = sum(v for (c, _), v in tally.items() if c == case)
        print(f"  shares {case}: {total} questions, {100 * tally[case, 'right'] / total:.0f}% right; wrong: "
              + ", ".join(f"{v} {k}" for (c, k), v in sorted(tally.items()) if c == case and k != "right"))


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    build = Path(args.get("build", "demo-build"))
    token_probe(build)
    where_by_distractor(build, Path(args.get("answers", build / "answers-full+short_answers.json")))
