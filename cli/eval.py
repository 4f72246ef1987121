"""`mlx-llava eval`: answer benchmark questions, score them as the original does, compare runs.

    mlx-llava eval                       the demo model on its held-out sample (= eval heldout)
    mlx-llava eval heldout -m A -m B     short-answer accuracy by kind, models side by side
    mlx-llava eval answer ...            a question file -> the original's answer lines (JSONL)
    mlx-llava eval score BENCHMARK ...   an answer file -> the original's figures + a JSON summary
    mlx-llava eval report S1.json S2.json ...   scored runs side by side (table + bar charts)
"""

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import app
from .options import ConvMode, Quantize

Opt = typer.Option
evaluation = typer.Typer(
    help="Benchmarks as the original LLaVA scores them: answer, score, report. "
         "With no command: the demo model on its held-out sample.",
    invoke_without_command=True,
)
app.add_typer(evaluation, name="eval")
score = typer.Typer(help="Score an answer file as the original's scripts do; print the figures, write a JSON summary.",
                    no_args_is_help=True)
evaluation.add_typer(score, name="score")

Answers = Annotated[str, Opt("--answers", "-a", help="Answer file (JSONL) written by `eval answer`.")]
Summary = Annotated[Optional[str], Opt("--summary", help="Where to write the JSON summary (default: beside --answers, .score.json).")]


@evaluation.callback()
def default(ctx: typer.Context):
    if ctx.invoked_subcommand is None:
        heldout()


# ---------------------------------------------------------------- answer


def model_name(model: Optional[str]) -> str:
    """The original's model id: the folder's name ("checkpoint-N" with its parent's)."""
    if model is None:
        return "demo"
    parts = Path(model.rstrip("/")).parts
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


@evaluation.command()
def answer(
    answers: Annotated[str, Opt("--answers", "-a", help="Answer file to write (JSONL; a rerun continues it).")],
    model: Annotated[Optional[str], Opt("--model", "-m", help="Model directory, hub repo or PyTorch checkpoint. Default: the demo model.")] = None,
    questions: Annotated[Optional[str], Opt("--questions", help="Question file (LLaVA JSONL, ScienceQA's LLaVA JSON, VQAv2/GQA questions JSON, short-answer JSON) or MME's folder. Default: the demo's held-out sample.")] = None,
    image_folder: Annotated[Optional[str], Opt("--image-folder", help="Folder the questions' images are relative to.")] = None,
    conv_mode: ConvMode = None,
    single_pred_prompt: Annotated[Optional[bool], Opt("--single-pred-prompt/--no-single-pred-prompt", help="Append \"Answer with the option's letter from the given choices directly.\" (default: on for ScienceQA, as LLaVA-1.5's sqa.sh).")] = None,
    batch_size: Annotated[int, Opt("--batch-size", "-b", help="Questions decoded together.")] = 8,
    limit: Annotated[Optional[int], Opt("--limit", help="Only the first N questions.")] = None,
    temperature: Annotated[float, Opt("--temperature", "--temp", help="0 is greedy, as the original's scripts.")] = 0.0,
    top_p: Annotated[Optional[float], Opt("--top-p")] = None,
    max_new_tokens: Annotated[Optional[int], Opt("--max-new-tokens", help="Default 1024 (the original's model_vqa and ScienceQA scripts); 16 for short-answer JSON.")] = None,
    quantize: Quantize = False,
):
    """Answer a question file as the original's eval scripts do (greedy, the model's trained template)."""
    from mlx_llava.eval import answer as run
    from mlx_llava.eval.answer import eval_conv_mode
    from mlx_llava.eval.questions import default_image_folder, read_questions

    from .options import load

    if questions is None:
        from mlx_llava.demo import heldout_dir

        questions = str(heldout_dir() / "questions.json")
    fmt, asked = read_questions(questions, single_pred_prompt)
    folder = image_folder or default_image_folder(questions, fmt)
    llava, processor = load(model, quantize)
    conv = conv_mode or eval_conv_mode(processor)
    limit_text = f", the first {limit}" if limit is not None else ""
    typer.echo(f"{len(asked)} questions ({fmt}){limit_text}; template {conv}; batch size {batch_size}", err=True)
    result = run(llava, processor, asked, folder, answers, model_id=model_name(model), conv_mode=conv,
                 batch_size=batch_size, limit=limit, temperature=temperature, top_p=top_p,
                 max_new_tokens=max_new_tokens or (16 if fmt == "short-answer" else 1024), progress=True)
    rate = f"; {result['answers_per_s']} answers/s" if result["answers_per_s"] else ""
    typer.echo(f"wrote {result['written']} answers to {answers} ({result['already_answered']} were there){rate}")


# ---------------------------------------------------------------- score


def _finish(result: dict, text: str, answers_path: str, summary: Optional[str], **about) -> None:
    from mlx_llava.eval import read_answers, write_summary

    lines = read_answers(answers_path)
    model = lines[0].get("model_id") if lines else None
    path = summary or str(Path(answers_path).with_suffix("")) + ".score.json"
    write_summary(result, path, model=model, answers=str(answers_path), **about)
    typer.echo(text)
    typer.echo(f"\nsummary: {path}")


def _answers(path: str) -> list:
    from mlx_llava.errors import LlavaError
    from mlx_llava.eval import read_answers

    if not Path(path).is_file():
        raise LlavaError(f"answer file not found: {path}")
    return read_answers(path)


@score.command("scienceqa")
def score_scienceqa(
    answers: Answers,
    annotations: Annotated[str, Opt("--annotations", help="Folder with ScienceQA's problems.json and pid_splits.json.")],
    split: Annotated[str, Opt("--split")] = "test",
    summary: Summary = None,
):
    """Accuracy as eval_science_qa.py, and the ScienceQA paper's table."""
    from mlx_llava.eval import scienceqa

    result = scienceqa.score(_answers(answers), scienceqa.read_annotations(annotations, split))
    _finish(result, scienceqa.render(result), answers, summary, split=split)


@score.command("pope")
def score_pope(
    answers: Answers,
    questions: Annotated[str, Opt("--questions", help="LLaVA's llava_pope_test.jsonl.")],
    annotations: Annotated[str, Opt("--annotations", help="Folder of POPE's coco_pope_<split>.json label files.")],
    summary: Summary = None,
):
    """Accuracy, precision, recall, F1 and yes-ratio per split, as eval_pope.py."""
    from mlx_llava.eval import pope
    from mlx_llava.eval.questions import read_jsonl

    result = pope.score(_answers(answers), read_jsonl(questions), pope.read_labels(annotations))
    _finish(result, pope.render(result), answers, summary)


@score.command("mme")
def score_mme(
    answers: Answers,
    annotations: Annotated[str, Opt("--annotations", help="MME_Benchmark_release_version/ (questions with answers).")],
    summary: Summary = None,
):
    """acc and acc+ per subtask, perception and cognition totals, as MME's calculation.py."""
    from mlx_llava.eval import mme

    result = mme.score(_answers(answers), mme.read_ground_truth(annotations))
    _finish(result, mme.render(result), answers, summary)


@score.command("textvqa")
def score_textvqa(
    answers: Answers,
    annotations: Annotated[str, Opt("--annotations", help="TextVQA_0.5.1_val.json.")],
    summary: Summary = None,
):
    """Soft accuracy over EvalAI-normalised answers, as eval_textvqa.py."""
    from mlx_llava.eval import vqa

    result = vqa.score_textvqa(_answers(answers), vqa.read_textvqa(annotations))
    _finish(result, vqa.render_textvqa(result), answers, summary)


@score.command("vqav2")
def score_vqav2(
    answers: Answers,
    annotations: Annotated[str, Opt("--annotations", help="v2_mscoco_val2014_annotations.json (or another split's).")],
    summary: Summary = None,
):
    """VQA accuracy on a local split, as the VQA evaluation server scores test-dev."""
    from mlx_llava.eval import vqa

    result = vqa.score_vqav2(_answers(answers), vqa.read_vqav2(annotations))
    _finish(result, vqa.render_vqav2(result), answers, summary)


@score.command("gqa")
def score_gqa(
    answers: Answers,
    annotations: Annotated[str, Opt("--annotations", help="GQA's testdev_balanced_questions.json.")],
    summary: Summary = None,
):
    """Exact-match accuracy (binary, open, per type), as GQA's eval.py after LLaVA's conversion."""
    from mlx_llava.eval import vqa

    result = vqa.score_gqa(_answers(answers), vqa.read_gqa(annotations))
    _finish(result, vqa.render_gqa(result), answers, summary)


@score.command("llava-bench")
def score_llava_bench(
    answers: Answers,
    questions: Annotated[str, Opt("--questions", help="questions.jsonl (in-the-wild) or qa90_questions.jsonl (COCO).")],
    context: Annotated[str, Opt("--context", help="context.jsonl (in-the-wild) or caps_boxes_coco2014_val_80.jsonl (COCO).")],
    reference: Annotated[str, Opt("--reference", help="GPT-4's answers: answers_gpt4.jsonl or qa90_gpt4_answer.jsonl.")],
    rule: Annotated[str, Opt("--rule", help="The original's llava/eval/table/rule.json.")],
    judge_url: Annotated[str, Opt("--judge-url", help="OpenAI-compatible API base, e.g. https://api.openai.com/v1.")],
    judge_model: Annotated[str, Opt("--judge-model", help="The judge (the paper's: gpt-4-0314).")],
    reviews: Annotated[Optional[str], Opt("--reviews", help="Review file (JSONL; a rerun continues it). Default: beside --answers.")] = None,
    api_key_env: Annotated[str, Opt("--api-key-env", help="Env var holding the judge's API key (unset: no key).")] = "OPENAI_API_KEY",
    retry_malformed: Annotated[bool, Opt("--retry-malformed", help="Ask again where the judge's reply was malformed.")] = False,
    timeout: Annotated[float, Opt("--timeout", help="Seconds to wait for one reply.")] = 120.0,
    summary: Summary = None,
):
    """The original's GPT-4 review: relative score per category and overall."""
    import os

    from mlx_llava.datagen.teacher import OpenAITeacher
    from mlx_llava.errors import LlavaError
    from mlx_llava.eval import llava_bench
    from mlx_llava.eval.questions import read_jsonl

    if not judge_url.startswith(("http://", "https://")):
        raise LlavaError(f"--judge-url must start with http:// or https://, not {judge_url!r}")
    _answers(answers)
    judge = OpenAITeacher(judge_url, judge_model, api_key=os.environ.get(api_key_env), timeout=timeout)
    reviews = reviews or str(Path(answers).with_suffix("")) + f".reviews-{judge_model.replace('/', '_')}.jsonl"
    count = len(read_jsonl(questions))
    done = llava_bench.review(questions, context, reference, answers, rule, reviews, judge, judge_model,
                              retry_malformed=retry_malformed,
                              progress=lambda row: typer.echo(f"reviewed {row['id']}/{count}", err=True))
    result = llava_bench.summarize(done, judge_model, count)
    _finish(result, llava_bench.render(result), answers, summary, reviews_file=reviews)


@score.command("heldout")
def score_heldout(
    answers: Answers,
    questions: Annotated[Optional[str], Opt("--questions", help="Short-answer JSON (default: the demo's held-out sample).")] = None,
    summary: Summary = None,
):
    """Exact-match accuracy by kind with the demo world's answer normalisation."""
    from mlx_llava.demo import heldout_dir
    from mlx_llava.demo.rules import exact_match
    from mlx_llava.eval import load_questions, score as run, table

    questions = questions or str(heldout_dir() / "questions.json")
    result = run(_answers(answers), load_questions(questions), exact_match)
    lines = _answers(answers)
    name = lines[0].get("model_id", "model") if lines else "model"
    text = table({name: result}) + f"\n{result['count']} of {result['questions']} questions answered ({questions})"
    _finish(result, text, answers, summary)


# ---------------------------------------------------------------- heldout, report


@evaluation.command()
def heldout(
    model: Annotated[Optional[List[str]], Opt("--model", "-m", help="Model directory (repeat to compare). Default: the demo model.")] = None,
    data: Annotated[Optional[str], Opt("--data", help="Questions: [{image, question, answer, kind}] (default: the shipped held-out sample).")] = None,
    image_folder: Annotated[Optional[str], Opt("--image-folder", help="Images of --data (default: beside it, images/).")] = None,
    ablation: Annotated[Optional[str], Opt("--ablation", help="A `mlx-llava demo train` folder: evaluate each of its variants.")] = None,
    max_tokens: Annotated[int, Opt("--max-tokens", help="Most tokens per answer.")] = 16,
    batch_size: Annotated[int, Opt("--batch-size", "-b", help="Questions decoded together.")] = 8,
    answers: Annotated[Optional[str], Opt("--answers", help="Write every answer to this JSON file.")] = None,
):
    """Exact-match accuracy by question kind (colour, shape, count, position, relation), models side by side."""
    from mlx_llava.errors import LlavaError, check_output, need

    need(max_tokens >= 1, f"--max-tokens must be at least 1, not {max_tokens}")
    need(batch_size >= 1, f"--batch-size must be at least 1, not {batch_size}")
    if answers:
        check_output(answers, [data], "--answers", folder=False)
    import mlx_llava
    from mlx_llava.demo import heldout_dir
    from mlx_llava.demo.rules import exact_match
    from mlx_llava.eval import evaluate, load_questions, table

    from .options import load

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
        models = {"demo": None}
    data = Path(data) if data else heldout_dir() / "questions.json"
    folder = Path(image_folder) if image_folder else data.parent / "images"
    questions = load_questions(data)
    results, written = {}, []
    for name, path in models.items():
        llava, processor = mlx_llava.load(path) if isinstance(path, Path) else load(path)
        results[name] = evaluate(llava, processor, questions, folder, exact_match, max_tokens=max_tokens,
                                 batch_size=batch_size)
        written += [{"model": name, **a} for a in results[name]["answers"]]
    print(table(results))
    print(f"{len(questions)} questions from {data}")
    if answers:
        Path(answers).write_text(json.dumps(written, indent=1))


@evaluation.command()
def report(
    summaries: Annotated[List[str], typer.Argument(help="JSON summaries written by `eval score`.")],
    output: Annotated[Optional[str], Opt("--output", "-o", help="Folder for report.md and a bar chart PNG per benchmark.")] = None,
    name: Annotated[Optional[List[str]], Opt("--name", help="A label per summary, in order (default: the model ids).")] = None,
):
    """Scored runs side by side: one table (and chart) per benchmark, one row per run."""
    from mlx_llava.eval.report import report as run

    typer.echo(run(summaries, output, name))
    if output:
        typer.echo(f"\nwritten: {output}/report.md and a PNG per benchmark")
