"""`mlx-llava eval`: held-out accuracy, and the paper's ablation table."""

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import app

Opt = typer.Option


@app.command("eval")
def evaluate(
    model: Annotated[Optional[List[str]], Opt("--model", "-m", help="Model directory (repeat to compare). Default: the demo model.")] = None,
    data: Annotated[Optional[str], Opt("--data", help="Questions: [{image, question, answer, kind}] (default: the shipped held-out sample).")] = None,
    image_folder: Annotated[Optional[str], Opt("--image-folder", help="Images of --data (default: beside it, images/).")] = None,
    ablation: Annotated[Optional[str], Opt("--ablation", help="A `mlx-llava demo train` folder: evaluate each of its variants.")] = None,
    max_tokens: Annotated[int, Opt("--max-tokens", help="Most tokens per answer; -1: up to the context.")] = 16,
    answers: Annotated[Optional[str], Opt("--answers", help="Write every answer to this JSON file.")] = None,
):
    """Exact-match accuracy by question kind (colour, shape, count, position, relation)."""
    from mlx_llava.errors import LlavaError, check_output, check_sampling

    check_sampling(max_tokens=max_tokens)
    if answers:
        check_output(answers, [data], "--answers", folder=False)
    import mlx_llava
    from mlx_llava.demo import evaluate_heldout as run
    from mlx_llava.demo import heldout_dir
    from mlx_llava.eval import load_questions, table

    models = {}
    if ablation:
        root = Path(ablation)
        models = {"stage1 only (no instruction tuning)": root / "stage1" / "model"}
        models.update({f"stage 2: {p.name[len('stage2-'):]}": p / "model"
                       for p in sorted(root.glob("stage2-*")) if (p / "model").is_dir()})
        if not any(m.is_dir() for m in models.values()):
            raise LlavaError(f"{root} holds no demo build (no stage1/model, stage2-*/model)")
        data = data or str(root / "data" / "eval.json")
    for m in model or []:
        models[m] = m
    if not models:
        from mlx_llava.weights import default_model

        models = {"demo": default_model()}
    data = Path(data) if data else heldout_dir() / "questions.json"
    folder = Path(image_folder) if image_folder else data.parent / "images"
    questions = load_questions(data)
    results, written = {}, []
    for name, path in models.items():
        llava, processor = mlx_llava.load(path)
        results[name] = run(llava, processor, questions, folder, max_tokens=max_tokens)
        written += [{"model": name, **a} for a in results[name]["answers"]]
    print(table(results))
    print(f"{len(questions)} questions from {data}")
    if answers:
        Path(answers).write_text(json.dumps(written, indent=1))
