"""The synthetic world's dataset folder: everything the demo recipe trains and evaluates on.

    out_dir/
      images/            train_000000.png ..., test_000000.png ...
      coco/              captions.json, instances.json (train split, COCO layout)
      stage1.json        stage 1: one sample per (train image, caption)
      instruct.json      stage 2: conversation + detail + reasoning per train image
      short_answers.json stage 2's short-answer data: several samples per train image
      eval.json          held-out questions on the test split, with short answers
      meta.json          what was built and how
"""

from __future__ import annotations

import json
from pathlib import Path

from ..datagen.captions import stage1_samples
from ..errors import LlavaError
from .world import IMAGE_SIZE, make_scenes, save_images, write_coco


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))  # no indent: keeps the fast C encoder


def build_dataset(
    out_dir,
    n_train: int = 5000,
    n_test: int = 500,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    short_answers_per_scene: int = 5,
) -> dict:
    """Write the whole synthetic dataset folder (see the module docstring).

    Image paths inside the JSON files are relative to `out_dir/images`, as
    LLaVA's `image` fields are relative to its `--image_folder`. Returns what
    meta.json holds: sizes, counts and file paths.
    """
    from . import rules

    if n_train < 1 or n_test < 0 or short_answers_per_scene < 0:
        raise LlavaError("build_dataset needs n_train >= 1, n_test >= 0 and short_answers_per_scene >= 0")
    out_dir = Path(out_dir)
    train = make_scenes(n_train, seed, "train", image_size)
    test = make_scenes(n_test, seed, "test", image_size)
    images = out_dir / "images"
    write_coco(train, out_dir / "coco", image_folder=Path("..") / "images")
    save_images(test, images)

    stage1 = stage1_samples([(s.file_name, c) for s in train for c in s.captions], seed)
    instruct = rules.instruct_samples(train, seed)
    short = rules.short_answer_samples(train, seed, short_answers_per_scene)
    evaluation = [
        {"id": f"{Path(s.file_name).stem}_{k}", "image": s.file_name, **q}
        for s in test
        for k, q in enumerate(rules.eval_questions(s))
    ]
    _write_json(out_dir / "stage1.json", stage1)
    _write_json(out_dir / "instruct.json", instruct)
    _write_json(out_dir / "short_answers.json", short)
    _write_json(out_dir / "eval.json", evaluation)
    meta = {
        "image_size": image_size,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "image_folder": "images",
        "coco": ["coco/captions.json", "coco/instances.json"],
        "stage1": "stage1.json",
        "instruct": "instruct.json",
        "short_answers": "short_answers.json",
        "eval": "eval.json",
        "counts": {"stage1": len(stage1), "instruct": len(instruct), "short_answers": len(short), "eval": len(evaluation)},
        "short_answer_suffix": rules.SHORT_ANSWER,
    }
    _write_json(out_dir / "meta.json", meta)
    return meta
