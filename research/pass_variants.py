"""The demo recipe's short-answer pass, changed in one way.

A diagnostic for the demo model's gap (research/NOTES.md). It reruns
the pass of a finished demo build (`mlx-llava demo train --output BUILD`): the
build's short-answer data (data/short_answers.json) with a share of its instruction
mixture, shuffled, from its mixture model (stage2-full), with the recipe's
stage-2 settings, through `mlx_llava.train`; held-out exact match every
`every` steps and at the end:

    python research/pass_variants.py build=BUILD out=DIR
        # the recipe's pass again (run-to-run noise: another process, other float sums)
    python research/pass_variants.py build=BUILD out=DIR muon_lr=0.01 batch_size=8
        # any stage-2 setting of the recipe (iters=N stops after N steps)
    python research/pass_variants.py build=BUILD out=DIR hard=3,1
        # position and relation questions drawn toward objects that share their colour
        # (weight 1 + 3) or their shape (+ 1) with another object: hard negatives
    python research/pass_variants.py build=BUILD out=DIR start=stage1 share=1
        # no mixture epoch first: one pass over all the mixture and the short answers
    python research/pass_variants.py build=BUILD out=DIR kinds=1,1,1,1,3
        # short-answer questions drawn afresh, the kinds weighted (colour, shape,
        # count, position, relation; the recipe's first pass draws each as likely)
    python research/pass_variants.py build=BUILD out=DIR start=stage2-full+short kinds=1,1,1,1,1 seed=1
        # a further pass from the first pass's model (start: any model folder under
        # BUILD, ../ allowed), over questions drawn afresh; per_scene=N draws N samples a scene

Runs are seeded; two at a time fit a 2-core machine (OPENBLAS_NUM_THREADS=1).
"""

import mlx_llava  # noqa: F401  (before mlx: the system BLAS on Linux)

import json
import sys
import time
from pathlib import Path

from mlx_llava.demo import rules
from mlx_llava.demo.recipe import Recipe, pass_samples, train_scenes
from mlx_llava.demo import evaluate_heldout
from mlx_llava.eval import load_questions
from mlx_llava.train import TrainConfig, train

SETTINGS = dict(build="demo-build", out="", start="stage2-full", share=0.25, hard="", kinds="", every=540, seed=0,
                iters=0, per_scene=0)


def hard_vqa(scenes, weights: str, per_scene: int, seed: int, kinds: dict = None) -> list:
    """rules.short_answer_samples, but "where" and relation questions prefer objects that
    share a colour or a shape with another: the asked object can then be found
    only by both."""
    w_colour, w_shape = map(float, weights.split(","))

    def weight(scene, o):
        others = [p for p in scene.objects if p is not o]
        return 1 + w_colour * any(p.colour == o.colour for p in others) + w_shape * any(p.shape == o.shape for p in others)

    def position(scene, rng):
        return rules.ask_position(scene, rng, rng.choices(scene.objects, [weight(scene, o) for o in scene.objects])[0])

    def relation(scene, rng):
        objs = scene.objects
        unique = [(rel, b) for rel in rules.RELATIONS for b in objs if sum(rules.holds(c, rel, b) for c in objs) == 1]
        if unique and rng.random() < 0.3:
            rel, b = rng.choices(unique, [weight(scene, b) for _, b in unique])[0]
            (c,) = [c for c in objs if rules.holds(c, rel, b)]
            return rules.QA("relation", f"Which object is {rel} {rules.ref(scene, b, rng)}?", c.name, "")
        want = rng.random() < 0.5
        pool = [(a, rel, b) for a in objs for b in objs if a is not b for rel in rules.RELATIONS
                if rules.holds(a, rel, b) == want]
        a, rel, b = rng.choices(pool, [weight(scene, a) + weight(scene, b) for a, _, b in pool])[0]
        q = f"Is {rules.ref(scene, a, rng)} {rel} {rules.ref(scene, b, rng)}?"
        return rules.QA("relation", q, "yes" if want else "no", "")

    return rules.short_answer_samples(scenes, seed, per_scene, families=dict(position=position, relation=relation), weights=kinds)


def main(args: dict):
    recipe = Recipe()
    settings = recipe.pass_settings()
    for key, value in args.items():
        if key in settings:
            kind = type(settings[key])
            settings[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        elif key not in SETTINGS:
            raise SystemExit(f"unknown setting {key} (known: {', '.join([*SETTINGS, *settings])})")
    opts = {**SETTINGS, **args}
    build, out = Path(opts["build"]), Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    kinds = dict(zip(rules.KINDS, map(float, opts["kinds"].split(",")))) if opts["kinds"] else None
    per_scene = int(opts["per_scene"]) or recipe.short_answers["per_scene"]
    if opts["hard"]:
        short = hard_vqa(train_scenes(build), opts["hard"], per_scene, int(opts["seed"]), kinds)
    elif kinds:
        short = rules.short_answer_samples(train_scenes(build), int(opts["seed"]), per_scene, weights=kinds)
    else:
        short = json.loads((build / "data" / "short_answers.json").read_text())
    mixture = json.loads((build / "data" / "instruct.json").read_text())
    samples = pass_samples(short, mixture, float(opts["share"]), int(opts["seed"]))
    (out / "pass.json").write_text(json.dumps(samples))
    start = build / opts["start"] / "model"
    print(f"{len(samples)} samples from {start}, {settings}", flush=True)

    questions, every, held = load_questions(build / "data" / "eval.json"), int(opts["every"]), {}
    tic = time.perf_counter()

    def score(step):
        model, _, processor = held["model"]
        model.eval()
        r = evaluate_heldout(model, processor, questions, build / "data" / "images")
        model.train()
        print(f"step {step} ({time.perf_counter() - tic:.0f}s): held-out {100 * r['accuracy']:.1f} "
              + " ".join(f"{k} {100 * v:.1f}" for k, v in r["by_kind"].items()), flush=True)

    from mlx_llava.train import setup

    load_base = setup.load_base
    setup.load_base = lambda cfg: held.setdefault("model", load_base(cfg))  # to score the model as it trains
    summary = train(TrainConfig(stage=2, model=str(start), method="full", data=str(out / "pass.json"),
                                output=str(out / "run"), image_folder=str(build / "data" / "images"),
                                cache_features=str(build / "features"), seed=recipe.seed, save_every=10**9,
                                iters=int(opts["iters"]) or None, progress=False, **settings),
                    on_step=lambda step, loss: score(step) if step % every == 0 else None)
    if summary["steps"] % every:
        score(summary["steps"])


if __name__ == "__main__":
    main(dict(a.split("=", 1) for a in sys.argv[1:]))
