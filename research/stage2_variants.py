"""Does the demo model's gap move with its features, its data or its language model?

A diagnostic for the demo model's gap (research/NOTES.md). It reruns
the real stage 2 of a demo build as the recipe ran it before its short-answer
pass (the instruction mixture alone, 2 epochs, the recipe's other settings,
`mlx_llava.train`), changed in one way, and scores the 300 held-out scenes as
`mlx-llava demo train` does:

    python research/stage2_variants.py build=demo-build out=DIR variant=oracle
        # exact one-hot symbols of each cell (colour, shape, size, place) in place
        # of the CLIP's features, in stage 1 and stage 2: a perfect vision tower
    python research/stage2_variants.py build=demo-build out=DIR variant=where
        # plus one sample per training scene asking "where" about each of its objects
    python research/stage2_variants.py build=demo-build out=DIR variant=random-lm
        # stage 2 from the stage-1 model with its language model randomly initialised
    python research/stage2_variants.py build=demo-build out=DIR variant=reset-attention
        # ... with only the language model's attention randomly initialised
    python research/stage2_variants.py build=demo-build out=DIR variant=where+reset-attention
        # both (the lab's case: many "where" questions, no pretrained attention)
    python research/stage2_variants.py build=demo-build out=DIR variant=scenes scenes=9000
        # more scenes, one instruction sample each (types in turn), stage 1 on them too
        # (stage1=DIR/stage1/model reuses the stage-1 model of an earlier run instead)
    python research/stage2_variants.py build=demo-build out=DIR variant=curriculum+reset-attention \
        where_epochs=16 where_batch=16
        # first a stage 2 on the "where" samples alone (the lab's diet: 16 epochs of 16),
        # then the recipe's; add +where to keep them in the second stage 2 too

Each variant is seeded as the recipe is; a finished stage in `out` is reused.
Prints held-out exact match, overall and by kind.
"""

import mlx_llava  # noqa: F401  (before mlx: the system BLAS on Linux)

import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from lookup import FEATURES, parse, redraw
from lookup_clip import place, read_scenes
from lookup_clip import symbols as lab_symbols

from mlx_llava import load
from mlx_llava.demo.dataset import build_dataset
from mlx_llava.demo.rules import SHORT_ANSWER, _sample, ask_position
from mlx_llava.demo.recipe import Recipe, stage1_captions
from mlx_llava.demo import evaluate_heldout
from mlx_llava.eval import load_questions
from mlx_llava.train import TrainConfig, train

SETTINGS = dict(build="", out="", variant="", scenes=9000, epochs=2.0, stage1="", where_epochs=2.0, where_batch=8)
VARIANTS = ("curriculum", "oracle", "where", "random-lm", "reset-attention", "scenes")
SCALE = 4.6  # the symbols' size: about the rms norm of the CLIP's visual tokens over 24 dims


def symbols(scene, width: int) -> np.ndarray:
    """(9, width): the lab's symbols of each cell (`lookup_clip.symbols`), with 12 marking a
    large object, zero-padded to the vision tower's width."""
    cells = np.zeros((9, width), np.float32)
    cells[:, :FEATURES] = lab_symbols([scene])[0]
    for o in scene.objects:
        cells[place(o), 12] = o.size == "large"
    return SCALE * cells


def use_oracle(build: Path, model_dir: Path):
    """Make every LLaVA's vision features the exact symbols of the scene its pixels show."""
    from mlx_llava.image import load_image
    from mlx_llava.models import llava

    model, processor = load(model_dir)
    width = model.vision_tower.vision_model.embeddings.patch_embedding.weight.shape[0]
    train_scenes, test_scenes = read_scenes(build)
    table = {}
    for s in train_scenes + test_scenes:
        path = build / "data" / "images" / s.file_name
        if not path.exists():  # a build of fewer than 300 test scenes
            continue
        pixels = np.array(processor.preprocess([load_image(path)])[0])
        table[hashlib.sha1(pixels.tobytes()).hexdigest()] = symbols(s, width)

    def vision_features(self, pixel_values):
        return mx.array(np.stack([table[hashlib.sha1(p.tobytes()).hexdigest()] for p in np.array(pixel_values)]))

    llava.Model.vision_features = vision_features


def where_samples(scenes, seed: int) -> list:
    """One sample per scene: "where" about each of its objects (the teacher's question),
    short answers, in random order."""
    rng = random.Random(seed)
    out = []
    for s in scenes:
        objects = list(s.objects)
        rng.shuffle(objects)
        turns = [(f"{qa.question}\n{SHORT_ANSWER}", qa.short) for qa in (ask_position(s, rng, o) for o in objects)]
        out.append(_sample(s, "where", turns))
    return out


def reinitialised(model_dir: Path, out: Path, only: str = "") -> Path:
    """A copy of a LLaVA model whose language model's weights (those with `only` in their
    name) are drawn afresh."""
    from mlx.utils import tree_flatten

    model, _ = load(model_dir)
    redraw(model.language_model, only)
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    for f in out.glob("*.safetensors"):
        f.unlink()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return out


def main(argv):
    s = parse(argv, SETTINGS, "stage2_variants.py")
    chosen = s["variant"].split("+")
    combined = set(chosen) <= {"where", "curriculum", "random-lm", "reset-attention"} and not (
        {"random-lm", "reset-attention"} <= set(chosen))
    if not s["out"] or len(set(chosen)) < len(chosen) or not (chosen in (["oracle"], ["scenes"]) or combined):
        raise SystemExit(f"stage2_variants.py: variant= one of {', '.join(VARIANTS)}, or where, curriculum and "
                         "one of random-lm and reset-attention joined by +; and out=DIR")
    build, out = Path(s["build"]), Path(s["out"])
    if not (build / "stage1" / "model" / "config.json").is_file():
        raise SystemExit(f"stage2_variants.py: {build} is not a finished demo build (no stage1/model); build=DIR")
    out.mkdir(parents=True, exist_ok=True)
    r = Recipe()
    mx.random.seed(r.seed)
    data, start = build / "data", build / "stage1" / "model"
    samples = json.loads((build / "instruct-full.json").read_text())
    cache = build / "features"
    stage1 = None  # (captions file, data folder) when the variant reruns stage 1
    where = where_samples(read_scenes(build)[0], r.seed + 1) if {"where", "curriculum"} & set(chosen) else []
    if "where" in chosen:
        samples = samples + where
        random.Random(r.seed + 2).shuffle(samples)
    if {"random-lm", "reset-attention"} & set(chosen):
        only = "self_attn" if "reset-attention" in chosen else ""
        start = reinitialised(start, out / "start", only)
    if chosen == ["oracle"]:
        use_oracle(build, start)
        cache, stage1 = out / "features", (build / "stage1.json", data)
    elif chosen == ["scenes"]:  # more scenes, one sample each
        data, cache = out / "data", out / "features"
        if not (data / "eval.json").exists():
            build_dataset(data, s["scenes"], r.n_test, r.seed, r.image_size)
        by_scene = {}
        for x in json.loads((data / "instruct.json").read_text()):
            by_scene.setdefault(x["image"], {})[x["type"]] = x
        kinds = ("conversation", "detail", "reasoning")
        samples = [by_scene[image][kinds[i % 3]] for i, image in enumerate(sorted(by_scene))]
        random.Random(r.seed).shuffle(samples)
        captions = stage1_captions(json.loads((data / "stage1.json").read_text()), r.stage1["captions_per_image"],
                                   r.seed)
        (out / "stage1.json").write_text(json.dumps(captions))
        stage1 = (out / "stage1.json", data)
    common = dict(image_folder=str(data / "images"), cache_features=str(cache), seed=r.seed, save_every=10**9,
                  progress=False)
    timings = {}

    def stage2(model: Path, name: str, data_file: Path, **settings) -> Path:
        """The recipe's stage 2 (with `settings` changed) from `model`, into out/name, unless done."""
        if not (out / name / "model").exists():
            tic = time.perf_counter()
            train(TrainConfig(stage=2, model=str(model), method="full", data=str(data_file), output=str(out / name),
                              **{**r.stage2, **settings}, **common))
            timings[name] = round(time.perf_counter() - tic)
        return out / name / "model"

    if stage1 is not None and s["stage1"]:
        start = Path(s["stage1"])
    elif stage1 is not None:
        start = out / "stage1" / "model"
        if not start.exists():
            tic = time.perf_counter()
            train(TrainConfig(stage=1, language_model=str(build / "language_model"), vision_tower=str(build / "clip"),
                              projector_type="mlp2x_gelu", conv_mode=r.conv_mode, data=str(stage1[0]),
                              output=str(out / "stage1"), **{k: v for k, v in r.stage1.items()
                                                            if k != "captions_per_image"}, **common))
            timings["stage1"] = round(time.perf_counter() - tic)
    if "curriculum" in chosen:  # the "where" samples alone first, from the start model
        (out / "where.json").write_text(json.dumps(where))
        start = stage2(start, "where", out / "where.json", epochs=s["where_epochs"], batch_size=s["where_batch"])
    (out / "instruct.json").write_text(json.dumps(samples))
    model = stage2(start, "stage2", out / "instruct.json", epochs=s["epochs"])
    result = evaluate_heldout(*load(model), load_questions(data / "eval.json"), data / "images")
    summary = {"settings": s, "samples": len(samples), "seconds": timings, "accuracy": result["accuracy"],
               "by_kind": result["by_kind"]}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(f"{s['variant']}: {len(samples)} stage-2 samples, {timings}; held-out {100 * result['accuracy']:.1f}% "
          + " ".join(f"{k} {100 * v:.1f}" for k, v in result["by_kind"].items()))


if __name__ == "__main__":
    main(sys.argv[1:])
