"""`mlx-llava demo`: the synthetic world, and the shipped demo model rebuilt from scratch."""

from typing import Annotated, List, Optional

import typer

from . import app

Opt = typer.Option
demo = typer.Typer(help="The small demo LLaVA shipped in the package: rebuild it from scratch.",
                   no_args_is_help=True)
app.add_typer(demo, name="demo")


@demo.command("train")
def train_demo(
    output: Annotated[str, Opt("--output", "-o", help="Working folder (reused by a rerun).")] = "demo-build",
    ablation: Annotated[bool, Opt("--ablation", help="Also train the paper's data ablation.")] = False,
    variant: Annotated[Optional[List[str]], Opt("--variant", help="Stage-2 data: full+short (the shipped model), full, conversation, detail+reasoning, stage1.")] = None,
    install: Annotated[bool, Opt("--install", help="Copy the result into the package as the default model.")] = False,
    seed: Annotated[int, Opt("--seed")] = 0,
):
    """World -> data -> tokenizer -> language model -> CLIP -> stage 1 -> stage 2 -> held-out eval."""
    from mlx_llava.errors import LlavaError, check_output, need

    need(seed >= 0, f"--seed must be 0 or more, not {seed}")
    check_output(output, what="--output")
    from mlx_llava.demo import Recipe, build, install_model
    from mlx_llava.demo.recipe import SHIPPED, VARIANTS
    from mlx_llava.eval import table

    variants = tuple(variant or (VARIANTS if ablation else [SHIPPED]))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise LlavaError(f"unknown variant {unknown[0]!r}; expected one of {', '.join(VARIANTS)}")
    summary = build(output, Recipe(seed=seed), variants=variants)
    print(table(summary["results"]))
    print("time:", ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings"].items()),
          f"(wall clock {summary['seconds']:.0f}s; the language model and the CLIP train side by side)")
    if install:
        print(f"installed {install_model(output, summary)}")


@demo.command()
def world(
    output: Annotated[str, Opt("--output", "-o", help="Dataset folder to write.")],
    train: Annotated[int, Opt("--train", help="Training images.")] = 5000,
    test: Annotated[int, Opt("--test", help="Held-out test images.")] = 500,
    seed: Annotated[int, Opt("--seed")] = 0,
    image_size: Annotated[int, Opt("--image-size", help="Image side in pixels (>= 48).")] = 64,
    short_answers_per_scene: Annotated[int, Opt("--short-answers-per-scene", help="Short-answer samples per training image.")] = 5,
):
    """The synthetic shapes world, taught by rules: images, COCO files, stage-1/2 data, eval questions."""
    from mlx_llava.errors import check_output, need

    need(seed >= 0, f"--seed must be 0 or more, not {seed}")
    check_output(output, what="--output")
    from mlx_llava.demo.dataset import build_dataset

    meta = build_dataset(output, n_train=train, n_test=test, seed=seed, image_size=image_size,
                         short_answers_per_scene=short_answers_per_scene)
    counts = ", ".join(f"{k} {v}" for k, v in meta["counts"].items())
    print(f"wrote {output}: {train} train + {test} test images; samples: {counts}")
