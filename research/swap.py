"""Does a demo model find the object a question names, or guess among the scene's objects?

A counterfactual test of the demo model's lookups (research/NOTES.md). On
held-out scenes of exactly two objects, ask the same question about each object
in turn, and count how often the two answers differ and how often both are right:

- "Where is the <colour> <shape>?"        (find by content, say the place)
- "What shape is the <colour> object?"    (find by colour, say the shape)
- "What color is the <shape>?"            (find by shape, say the colour)

A model that reads the question gives two different answers; one that answers
from the image alone (say, the place of whichever object it attends to) gives
the same answer both times, and is right once in two by luck. Scenes where the
two objects share the asked-for attribute are left out.

    python research/swap.py demo-build/stage2-full+short/model demo-build/data
    python research/swap.py                   # the shipped model, its data rebuilt in a temp dir

Prints, per question, the scenes counted, "differ" and "both right".
"""

import mlx_llava  # noqa: F401  (before mlx: the system BLAS on Linux)

import json
import sys
import tempfile
from pathlib import Path

from mlx_llava import load
from mlx_llava.demo.dataset import build_dataset, make_scenes
from mlx_llava.demo.rules import SHORT_ANSWER, exact_match
from mlx_llava.errors import LlavaError
from mlx_llava.generate import Chat

QUESTIONS = {
    "where (find by content)": (lambda o: f"Where is the {o.colour} {o.shape}?", lambda o: o.position),
    "shape (find by colour)": (lambda o: f"What shape is the {o.colour} object?", lambda o: o.shape),
    "colour (find by shape)": (lambda o: f"What color is the {o.shape}?", lambda o: o.colour),
}


def swap_test(model, processor, data: Path) -> dict:
    if not (data / "meta.json").is_file():
        raise LlavaError(f"{data} has no meta.json: give a data folder that `mlx-llava datagen world` wrote")
    meta = json.loads((data / "meta.json").read_text())
    counts = {k: {"scenes": 0, "differ": 0, "both right": 0} for k in QUESTIONS}
    for scene in make_scenes(meta["n_test"], meta["seed"], "test", meta["image_size"]):
        if len(scene.objects) != 2:
            continue
        chat = Chat(model, processor, image=data / meta["image_folder"] / scene.file_name)
        for kind, (ask, truth) in QUESTIONS.items():
            a, b = scene.objects
            if truth(a) == truth(b):
                continue
            answers = []
            for o in (a, b):
                chat.restart()
                answers.append(chat.say(f"{ask(o)}\n{SHORT_ANSWER}", max_tokens=8).strip())
            c = counts[kind]
            c["scenes"] += 1
            c["differ"] += not exact_match(*answers)
            c["both right"] += exact_match(answers[0], truth(a)) and exact_match(answers[1], truth(b))
    return counts


def main(argv):
    if len(argv) >= 2:
        return report(argv[0], Path(argv[1]))
    from mlx_llava.demo import HERE, Recipe

    r = Recipe()
    with tempfile.TemporaryDirectory() as tmp:  # the held-out scenes, rebuilt from the recipe's seed
        build_dataset(Path(tmp), 1, r.n_test, r.seed, r.image_size)
        report(HERE / "model", Path(tmp))


def report(model_dir, data: Path):
    model, processor = load(model_dir)
    for kind, c in swap_test(model, processor, data).items():
        print(f"{kind:26s} scenes {c['scenes']:4d}  differ {c['differ']:4d}  both right {c['both right']:4d}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except LlavaError as e:  # a wrong model or data folder: one line, no traceback
        raise SystemExit(f"swap.py: {e}") from None
