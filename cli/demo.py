"""`mlx-llava demo`: rebuild the shipped demo model from scratch."""

from typing import List, Optional

import typer
from typing_extensions import Annotated

from . import app

Opt = typer.Option
demo = typer.Typer(help="The small demo LLaVA shipped in the package: rebuild it from scratch.",
                   no_args_is_help=True)
app.add_typer(demo, name="demo")


@demo.command("train")
def train_demo(
    output: Annotated[str, Opt("--output", "-o", help="Working folder (reused by a rerun).")] = "demo-build",
    ablation: Annotated[bool, Opt("--ablation", help="Also train the paper's data ablation.")] = False,
    variant: Annotated[Optional[List[str]], Opt("--variant", help="Stage-2 data: full+vqa (the shipped model), full, conversation, detail+reasoning, stage1.")] = None,
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
