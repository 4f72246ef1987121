"""The whole paper, in miniature, on the synthetic world: the demo model's recipe.

1. a world of coloured shapes, with captions and boxes (its "COCO");
2. the paper's instruction data from that symbolic representation (the
   rule-based teacher), and stage-1 caption instructions;
3. a tokenizer, a small LLaMA pretrained on the world's text (our "Vicuna"),
   and a small CLIP trained contrastively on image-caption pairs and on
   object-phrase pairs from the boxes;
4. LLaVA stage 1 (projector alignment) and stage 2 (instruction tuning, then
   passes over short-answer data, as LLaVA-1.5 adds VQAv2 and GQA),
   through `mlx_llava.train`, the same code as `mlx-llava train`;
5. held-out exact-match accuracy, and the paper's data ablation.

Every step is seeded; a step whose output exists with the same settings is
reused, so an interrupted build continues where it stopped.
"""

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..conversation import IMAGE_PLACEHOLDER, get_template, render
from ..errors import LlavaError
from .rules import SHORT_ANSWER, exact_match, short_answer_samples
from .world import scene_from_record

# The ablation, as the paper's Table 4: what stage 2 is trained on. "short":
# after the instruction mixture, passes over short-answer data (short_answers.json, then
# Recipe.more_passes), as the paper fine-tunes on ScienceQA after instruction
# tuning; the shipped model.
SHIPPED = "full+short"
VARIANTS = {
    "full+short": ("conversation", "detail", "reasoning", "short"),
    "full": ("conversation", "detail", "reasoning"),
    "conversation": ("conversation",),
    "detail+reasoning": ("detail", "reasoning"),
    "stage1": None,  # no instruction tuning
}


@dataclass
class Recipe:
    seed: int = 0
    n_train: int = 3000
    n_test: int = 300
    image_size: int = 72  # 3x3 patches of 24 px: one visual token per cell of the world's grid
    vocab_size: int = 1024
    phrase_tokens: bool = True  # the system message and the short-answer instruction: one token each
    conv_mode: str = "vicuna_v1"
    language_model: dict = field(default_factory=lambda: dict(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384,
        steps=150, batch_size=32, lr=5e-4))
    clip: dict = field(default_factory=lambda: dict(
        patch_size=24, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256,
        steps=500, batch_size=128, lr=1e-3, position_scale=1.0))
    stage1: dict = field(default_factory=lambda: dict(
        captions_per_image=1, batch_size=32, learning_rate=1e-3, epochs=1))
    stage2: dict = field(default_factory=lambda: dict(
        batch_size=4, learning_rate=5e-4, projector_lr=5e-4, epochs=1, warmup_ratio=0.03, group_by_length=False,
        optimizer="muon", muon_lr=5e-3))
    # The pass over the short-answer data, each of its samples once, in batches of 16,
    # with a share of the mixture's samples among them, so that the model still
    # describes and reasons in sentences when not asked for a word.
    short_answers: dict = field(default_factory=lambda: dict(per_scene=5, mixture_share=0.25, batch_size=16, epochs=1))
    # Then more passes, each from the one before, over as many questions drawn afresh
    # from the same training scenes (with the same share of the mixture). The lookup
    # by content is learned late, and relations only after it, with many of them in
    # each step: so the batches grow, and the last pass leans toward counts and
    # relations, the kinds learned last (research/NOTES.md).
    more_passes: list = field(default_factory=lambda: [
        dict(kinds=dict(colour=1, shape=1, count=1, position=1, relation=1), batch_size=32),
        dict(kinds=dict(colour=1, shape=1, count=2, position=1, relation=3), batch_size=64, epochs=2)])

    def pass_settings(self) -> dict:
        """The short-answer pass's training settings: stage 2's, with the pass's batch and epochs."""
        return {**self.stage2, **{k: v for k, v in self.short_answers.items() if k not in ("per_scene", "mixture_share")}}


def variant_dir(out, variant: str, recipe: Recipe) -> Path:
    """Where a build keeps a variant's final model (the shipped one's: its last pass)."""
    types, out = VARIANTS[variant], Path(out)
    if types is None:
        return out / "stage1" / "model"
    passes = 1 + len(recipe.more_passes) if "short" in types else 1
    return out / (f"stage2-{variant}-{passes}" if passes > 1 else f"stage2-{variant}") / "model"


def evaluate_heldout(model, processor, questions, image_folder, **kwargs) -> dict:
    """Held-out exact-match accuracy by kind, the world's answers normalised (`rules.exact_match`)."""
    from ..eval import evaluate

    return evaluate(model, processor, questions, image_folder, match=exact_match, **kwargs)


def pass_samples(short: list, mixture: list, share: float, seed: int) -> list:
    """The short-answer pass's data: every short-answer sample and a `share` of
    the mixture's, drawn and shuffled with `seed`."""
    rng = random.Random(seed)
    chosen = short + rng.sample(mixture, round(share * len(mixture)))
    rng.shuffle(chosen)
    return chosen


def build(out, recipe: Recipe = None, variants=(SHIPPED,), log=print) -> dict:
    """Run the recipe into `out`; returns {variant: held-out results} and timings."""
    from ..train import TrainConfig, train
    from .dataset import build_dataset
    from .tokenizer import train_tokenizer

    recipe = recipe or Recipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    r = recipe
    start = time.perf_counter()

    def fresh(name, settings) -> bool:
        """True (and `name` cleared) unless `name` holds a finished run with the same settings."""
        done = out / name / ".done.json"
        if done.exists() and json.loads(done.read_text()) == settings:
            log(f"[{name}] reusing {out / name}")
            return False
        shutil.rmtree(out / name, ignore_errors=True)
        log(f"[{name}] ...")
        return True

    def finished(name, settings, seconds):
        timings[name] = round(seconds, 1)
        log(f"[{name}] done in {timings[name]:.0f}s")
        (out / name / ".done.json").write_text(json.dumps(settings))

    def step(name, settings, run):
        if fresh(name, settings):
            tic = time.perf_counter()
            run(out / name)
            finished(name, settings, time.perf_counter() - tic)

    data = out / "data"
    step("data", [r.seed, r.n_train, r.n_test, r.image_size, r.short_answers["per_scene"]],
         lambda p: build_dataset(p, r.n_train, r.n_test, r.seed, r.image_size, r.short_answers["per_scene"]))
    stage1, instruct = read_data(out)
    texts = world_texts(stage1, instruct, r.conv_mode)
    phrases = (get_template(r.conv_mode).system, SHORT_ANSWER) if r.phrase_tokens else ()
    words = [r.seed, r.vocab_size, len(texts), r.phrase_tokens]
    step("tokenizer", words, lambda p: train_tokenizer(texts, r.vocab_size, p, phrases))

    # The language model and the CLIP depend only on the data and the
    # tokenizer: they train side by side, one process each.
    (out / "recipe.json").write_text(json.dumps(asdict(r), indent=2))
    todo = [(name, settings) for name, settings in (
        ("language_model", [words, r.language_model]),
        ("clip", [words, r.image_size, r.clip, "regions-at", "unit-rms"])) if fresh(name, settings)]
    for (name, settings), seconds in zip(todo, side_by_side(out, [name for name, _ in todo], log is print)):
        finished(name, settings, seconds)

    captions = stage1_captions(stage1, r.stage1["captions_per_image"], r.seed)
    (out / "stage1.json").write_text(json.dumps(captions))
    common = dict(image_folder=str(data / "images"), cache_features=str(out / "features"), seed=r.seed,
                  save_every=10**9, progress=False)
    s1 = {k: v for k, v in r.stage1.items() if k != "captions_per_image"}

    def run_stage1(path):
        train(TrainConfig(stage=1, language_model=str(out / "language_model"), vision_tower=str(out / "clip"),
                          projector_type="mlp2x_gelu", conv_mode=r.conv_mode, data=str(out / "stage1.json"),
                          output=str(path), **s1, **common))

    upstream = [words, r.clip, r.language_model]
    step("stage1", [upstream, r.stage1], run_stage1)

    results = {}
    from .. import load
    from ..eval import load_questions

    questions = load_questions(data / "eval.json")

    def stage2(variant) -> Path:
        """The variant's model folder, its stage 2 trained unless done."""
        types = VARIANTS[variant]
        if types is None:
            return out / "stage1" / "model"
        name, mixture = f"stage2-{variant}", [t for t in types if t != "short"]
        samples = [s for s in instruct if s["type"] in mixture]
        start, settings, key = out / "stage1" / "model", r.stage2, [upstream, r.stage1, r.stage2, mixture]
        data_file = out / f"instruct-{variant}.json"
        if "short" in types:  # the mixture's model, then one pass over the short-answer data
            start = stage2(next(k for k, v in VARIANTS.items() if v is not None and list(v) == mixture))
            settings = r.pass_settings()
            key, data_file = key + [r.short_answers], out / f"short-{variant}.json"

        def run(path):
            chosen = samples
            if "short" in types:
                short = json.loads((data / "short_answers.json").read_text())
                chosen = pass_samples(short, samples, r.short_answers["mixture_share"], r.seed)
            data_file.write_text(json.dumps(chosen))
            train(TrainConfig(stage=2, model=str(start), method="full", data=str(data_file), output=str(path),
                              **settings, **common))

        step(name, key, run)
        model = out / name / "model"
        return more_passes(variant, model, key, samples) if "short" in types else model

    def more_passes(variant, model: Path, key: list, mixture: list) -> Path:
        """Recipe.more_passes, each from the model before it; returns the last one's model."""
        for k, extra in enumerate(r.more_passes, start=2):
            name, key, data_file = f"stage2-{variant}-{k}", key + [extra], out / f"short-{variant}-{k}.json"

            def run(path, start=model, extra=extra, seed=r.seed + k - 1, data_file=data_file):
                short = short_answer_samples(train_scenes(out), seed, r.short_answers["per_scene"], weights=extra["kinds"])
                data_file.write_text(json.dumps(pass_samples(short, mixture, r.short_answers["mixture_share"], seed)))
                settings = {**r.pass_settings(), **{s: v for s, v in extra.items() if s != "kinds"}}
                train(TrainConfig(stage=2, model=str(start), method="full", data=str(data_file), output=str(path),
                                  **settings, **common))

            step(name, key, run)
            model = out / name / "model"
        return model

    for variant in variants:
        model_dir = stage2(variant)
        tic = time.perf_counter()
        model, processor = load(model_dir)
        results[variant] = evaluate_heldout(model, processor, questions, data / "images")
        timings[f"eval-{variant}"] = round(time.perf_counter() - tic, 1)
        log(f"[eval {variant}] accuracy {100 * results[variant]['accuracy']:.1f}% "
            + " ".join(f"{k} {100 * v:.0f}%" for k, v in results[variant]["by_kind"].items()))
    summary = {"recipe": asdict(r), "timings": timings, "seconds": round(time.perf_counter() - start, 1),
               "results": {k: {kk: vv for kk, vv in v.items() if kk != "answers"} for k, v in results.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    for k, v in results.items():
        (out / f"answers-{k}.json").write_text(json.dumps(v["answers"], indent=1))
    return summary


def read_data(out: Path):
    """The build's stage-1 captions and instruction samples."""
    data = Path(out) / "data"
    return json.loads((data / "stage1.json").read_text()), json.loads((data / "instruct.json").read_text())


def train_scenes(out: Path) -> list:
    """The build's training scenes, from its COCO files."""
    from ..datagen.coco import read_coco

    coco = Path(out) / "data" / "coco"
    return [scene_from_record(r) for r in read_coco(coco / "captions.json", coco / "instances.json")]


def stage1_captions(stage1, per_image: int, seed: int) -> list:
    """Stage 1's data: `per_image` of each image's caption instructions, drawn at random."""
    rng = random.Random(seed)
    by_image = {}
    for s in stage1:
        by_image.setdefault(s["image"], []).append(s)
    return [x for group in by_image.values() for x in rng.sample(group, min(len(group), per_image))]


def world_texts(stage1, instruct, conv_mode: str) -> list:
    """What the tokenizer and the language model learn from: the captions and
    the conversations, their images left out."""
    return [s["conversations"][1]["value"] for s in stage1] + [chat_text(s, conv_mode) for s in instruct]


def pretrain_language_model(out: Path, r: Recipe, log=print):
    from .lm_pretrain import pretrain

    pretrain(world_texts(*read_data(out), r.conv_mode), out / "tokenizer", out / "language_model", seed=r.seed,
             log=log, **r.language_model)


def train_world_clip(out: Path, r: Recipe, log=print):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from ..datagen.coco import read_coco
    from .clip_pretrain import train_clip

    data = out / "data"
    records = list(read_coco(data / "coco" / "captions.json", data / "coco" / "instances.json"))
    regions = [region_phrases(record) for record in records]
    train_clip([data / "images" / x["file_name"] for x in records], [x["captions"] for x in records],
               load_tokenizer(out / "tokenizer"), out / "clip", image_size=r.image_size, seed=r.seed,
               regions=regions, log=log, **r.clip)


STEPS = {"language_model": pretrain_language_model, "clip": train_world_clip}


def side_by_side(out: Path, names, verbose: bool) -> list:
    """Run the recipe's steps `names` at once, one process each (`python -m
    mlx_llava.demo.step`); returns each one's seconds. MLX's CPU backend runs
    elementwise work (the exp of softmax, SiLU, the loss) on one core, so on
    a 2-core machine two independent trainings take little longer than the
    longer one."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // max(1, len(names))))}
    tic = time.perf_counter()
    procs = {name: subprocess.Popen([sys.executable, "-m", "mlx_llava.demo.step", str(out), name]
                                    + ([] if verbose else ["--quiet"]), env=env) for name in names}
    seconds = {}
    try:
        while len(seconds) < len(procs):
            for name, proc in procs.items():
                if name not in seconds and proc.poll() is not None:
                    if proc.returncode:
                        raise LlavaError(f"demo step {name} failed (exit code {proc.returncode})")
                    seconds[name] = time.perf_counter() - tic
            time.sleep(0.2)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return [seconds[name] for name in names]


def region_phrases(record: dict) -> list:
    """A world COCO record's objects as (x, y, phrase): the box's centre, and
    what stands there and where ("red circle top left"). The place matters:
    with colour and shape alone, the CLIP tokens of occupied patches forget
    where they are (a probe finds their grid cell at chance), and LLaVA cannot
    answer "where" questions or find "the shape at the top left"."""
    return [(*o.center, f"{o.name} {o.position}") for o in scene_from_record(record).objects]


def chat_text(sample: dict, conv_mode: str) -> str:
    """A sample's conversation as text in the chat template, its image left out:
    what the language model reads before it ever sees an image."""
    messages = [{"role": "user" if t["from"] == "human" else "assistant",
                 "content": t["value"].replace(IMAGE_PLACEHOLDER, "").strip()} for t in sample["conversations"]]
    return render(messages, conv_mode, add_generation_prompt=False)
