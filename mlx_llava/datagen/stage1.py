"""Stage-1 (feature alignment) data, and the synthetic dataset folder.

Stage 1 turns image-caption pairs into single-turn instructions: the human
asks for a brief description in one of the paper's phrasings (Liu et al.
2023, appendix table "instructions for brief image description"), the
assistant answers with the caption. Varying the instruction while the answer
stays a plain caption teaches the projector to align features, not the
language model to follow one fixed prompt.

`build_dataset` writes everything the later steps train and evaluate on:

    out_dir/
      images/          train_000000.png ..., test_000000.png ...
      coco/            captions.json, instances.json (train split, COCO layout)
      stage1.json      stage 1: one sample per (train image, caption)
      instruct.json    stage 2: conversation + detail + reasoning per train image
      vqa.json         stage 2's short-answer (VQA) data: several samples per train image
      eval.json        held-out questions on the test split, with short answers
      meta.json        what was built and how
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import LlavaError
from .world import IMAGE_SIZE, make_scenes, save_images, write_coco

IMAGE_TOKEN = "<image>"

# The paper's list for brief descriptions (stage 1), as in its appendix.
BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)

# The paper's list for detailed descriptions (the detail type). The paper
# prints them without a final period; one is added so they read as sentences.
DETAIL_INSTRUCTIONS = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
)


def stage1_samples(pairs, seed: int = 0) -> list[dict]:
    """(image_file, caption) pairs -> LLaVA stage-1 samples, deterministic in `seed`.

    Ids are "{image stem}_{k}" where k counts that image's captions, so an
    image with several captions gives several distinct samples.
    """
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    samples = []
    for image, caption in pairs:
        stem = Path(image).stem
        k = seen[stem] = seen.get(stem, -1) + 1
        samples.append(
            {
                "id": f"{stem}_{k}",
                "image": str(image),
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_TOKEN}\n{rng.choice(BRIEF_INSTRUCTIONS)}"},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    return samples


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))  # no indent: keeps the fast C encoder


def build_dataset(
    out_dir,
    n_train: int = 5000,
    n_test: int = 500,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    vqa_per_scene: int = 5,
) -> dict:
    """Write the whole synthetic dataset folder (see the module docstring).

    Image paths inside the JSON files are relative to `out_dir/images`, as
    LLaVA's `image` fields are relative to its `--image_folder`. Returns what
    meta.json holds: sizes, counts and file paths.
    """
    from . import rules  # rules reads this module's instruction lists

    if n_train < 1 or n_test < 0 or vqa_per_scene < 0:
        raise LlavaError("build_dataset needs n_train >= 1, n_test >= 0 and vqa_per_scene >= 0")
    out_dir = Path(out_dir)
    train = make_scenes(n_train, seed, "train", image_size)
    test = make_scenes(n_test, seed, "test", image_size)
    images = out_dir / "images"
    write_coco(train, out_dir / "coco", image_folder=Path("..") / "images")
    save_images(test, images)

    stage1 = stage1_samples([(s.file_name, c) for s in train for c in s.captions], seed)
    instruct = rules.instruct_samples(train, seed)
    vqa = rules.vqa_samples(train, seed, vqa_per_scene)
    evaluation = [
        {"id": f"{Path(s.file_name).stem}_{k}", "image": s.file_name, **q}
        for s in test
        for k, q in enumerate(rules.eval_questions(s))
    ]
    _write_json(out_dir / "stage1.json", stage1)
    _write_json(out_dir / "instruct.json", instruct)
    _write_json(out_dir / "vqa.json", vqa)
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
        "vqa": "vqa.json",
        "eval": "eval.json",
        "counts": {"stage1": len(stage1), "instruct": len(instruct), "vqa": len(vqa), "eval": len(evaluation)},
        "short_answer_suffix": rules.SHORT_ANSWER,
    }
    _write_json(out_dir / "meta.json", meta)
    return meta
