"""`mlx-llava datagen`: the paper's training data (stage-1 captions, LLM-taught instructions)."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app

Opt = typer.Option
datagen = typer.Typer(help="Make training data as the paper did: stage-1 captions, LLM-taught instructions.",
                      no_args_is_help=True)
app.add_typer(datagen, name="datagen")


@datagen.command()
def instruct(
    captions: Annotated[str, Opt("--captions", help="COCO captions JSON.")],
    output: Annotated[str, Opt("--output", "-o", help="JSONL file to append to (a rerun resumes).")],
    teacher_model: Annotated[str, Opt("--teacher-model", help="Model name at --teacher-url, or an mlx-lm model directory.")],
    instances: Annotated[Optional[str], Opt("--instances", help="COCO instances JSON (boxes).")] = None,
    teacher_url: Annotated[Optional[str], Opt("--teacher-url", help="OpenAI-compatible API base, e.g. http://localhost:8080/v1.")] = None,
    api_key_env: Annotated[Optional[str], Opt("--api-key-env", help="Env var holding the API key (default OPENAI_API_KEY).")] = None,
    types: Annotated[str, Opt("--types", help="Comma-separated: conversation, detail, reasoning.")] = "conversation,detail,reasoning",
    limit: Annotated[Optional[int], Opt("--limit", help="Only the first N images.")] = None,
    seed: Annotated[int, Opt("--seed")] = 0,
    max_tokens: Annotated[int, Opt("--max-tokens", help="Most tokens per reply.")] = 1024,
    temperature: Annotated[float, Opt("--temperature", "--temp")] = 0.7,
    timeout: Annotated[float, Opt("--timeout", help="Seconds to wait for one reply from --teacher-url.")] = 120.0,
):
    """Stage-2 data as in the paper: an LLM teacher reads captions + boxes, writes instructions.

    Types: conversation, detail (detailed description), reasoning (complex
    reasoning). Rerun with the same --output to resume.
    """
    from mlx_llava.errors import check_output, check_sampling, need

    check_sampling(max_tokens=max_tokens, temperature=temperature, seed=seed)
    need(limit is None or limit >= 1, f"--limit must be at least 1, not {limit}")
    need(timeout > 0, f"--timeout must be more than 0 seconds, not {timeout}")
    check_output(output, [captions, instances], "--output", folder=False)
    from mlx_llava.datagen import read_coco
    from mlx_llava.datagen.teacher import instruct as run
    from mlx_llava.datagen.teacher import make_teacher, parse_types

    kinds = parse_types(types)
    records = read_coco(captions, instances)
    if instances is None and set(kinds) & {"detail", "reasoning"}:
        print("note: no --instances, so detail and reasoning prompts have captions but no boxes")
    teacher = make_teacher(teacher_model, url=teacher_url, api_key_env=api_key_env, timeout=timeout, seed=seed)
    summary = run(records, teacher, output, types=kinds, limit=limit, seed=seed, max_tokens=max_tokens,
                  temperature=temperature, progress=True)
    print(summary)


@datagen.command()
def stage1(
    captions: Annotated[str, Opt("--captions", help="COCO captions JSON.")],
    output: Annotated[str, Opt("--output", "-o", help="LLaVA JSON file to write.")],
    seed: Annotated[int, Opt("--seed")] = 0,
):
    """Stage-1 data: each image-caption pair as a "describe the image briefly" sample."""
    from mlx_llava.errors import check_output, need

    need(seed >= 0, f"--seed must be 0 or more, not {seed}")
    check_output(output, [captions], "--output", folder=False)
    from mlx_llava.datagen import read_coco, stage1_samples

    pairs = [(r["file_name"], c) for r in read_coco(captions) for c in r["captions"]]
    samples = stage1_samples(pairs, seed)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(samples))
    print(f"wrote {len(samples)} samples to {output}")
