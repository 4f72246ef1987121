"""Scored runs side by side: a Markdown table and a bar chart PNG per benchmark.

Each `score` writes a JSON summary ({"benchmark", "model", ...figures});
`report` groups the summaries by benchmark, one row per run (a base model,
a fine-tuned one, a quantized one), one column per figure the benchmark is
known by.
"""

import json
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw

from .. import atomic
from ..errors import LlavaError


def columns(result: dict) -> dict:
    """The figures a benchmark is reported by, in the order its paper shows them."""
    b = result["benchmark"]
    if b == "scienceqa":
        return {**result["table"], "IMG (original)": result["img_accuracy"]}
    if b == "pope":
        out = {}
        for split, m in result["splits"].items():
            out[f"{split} F1"] = 100 * m["f1"]
            out[f"{split} acc"] = 100 * m["accuracy"]
        return {**out, "mean F1": result["mean_f1"]}
    if b == "mme":
        out = {g: t["score"] for g, t in result["totals"].items()}
        return {**out, **{name: s["score"] for name, s in result["subtasks"].items()}}
    if b in ("textvqa",):
        return {"accuracy": result["accuracy"]}
    if b == "vqav2":
        return {"overall": result["accuracy"], **result["per_answer_type"]}
    if b == "gqa":
        return {"accuracy": result["accuracy"], "binary": result["binary"], "open": result["open"]}
    if b == "llava-bench":
        return {k: v["relative"] for k, v in result["categories"].items()}
    if b == "heldout":
        return {**{k: 100 * v for k, v in result["by_kind"].items()}, "overall": 100 * result["accuracy"]}
    return {"main": result.get("main")}


def read_summaries(paths) -> list:
    runs = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise LlavaError(f"summary not found: {path}") from None
        except json.JSONDecodeError as e:
            raise LlavaError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(data, dict) or "benchmark" not in data:
            raise LlavaError(f"{path} is not a score summary (written by `mlx-llava eval score`)")
        data.setdefault("name", data.get("model") or Path(path).stem)
        runs.append(data)
    return runs


def report(paths, output=None, names=None) -> str:
    """The Markdown report of the summaries in `paths`; with `output`, also
    `report.md` and `<benchmark>.png` there. `names` label the runs (default: model ids)."""
    runs = read_summaries(paths)
    if names:
        if len(names) != len(runs):
            raise LlavaError(f"{len(names)} names for {len(runs)} summaries")
        for run, name in zip(runs, names):
            run["name"] = name
    by_benchmark = defaultdict(list)
    for run in runs:
        by_benchmark[run["benchmark"]].append(run)
    sections = []
    for benchmark, group in by_benchmark.items():
        cols = list(dict.fromkeys(c for run in group for c in columns(run)))
        lines = [f"## {benchmark}", ""]
        judge = {run.get("judge") for run in group if run.get("judge")}
        if judge:
            lines += [f"judge: {', '.join(sorted(judge))}", ""]
        lines += ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for run in group:
            figures = columns(run)
            cells = ["" if figures.get(c) is None else f"{figures[c]:.2f}" for c in cols]
            lines.append(f"| {run['name']} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
        if output is not None:
            Path(output).mkdir(parents=True, exist_ok=True)
            bar_chart(group, cols, Path(output) / f"{benchmark}.png", title=benchmark)
    text = "\n\n".join(sections)
    if output is not None:
        atomic.write_text(Path(output) / "report.md", text + "\n")
    return text


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def bar_chart(runs: list, cols: list, path, title: str = ""):
    """Grouped bars: one group per figure, one bar per run, the runs' names as a legend."""
    group_width, bar = 24 + 18 * len(runs), 18
    width = max(480, 70 + group_width * len(cols))
    height, top, bottom = 420, 60, 330
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black")
    for i, run in enumerate(runs):  # legend
        x = 10 + 160 * (i % max(1, (width - 20) // 160))
        y = 28 + 14 * (i // max(1, (width - 20) // 160))
        draw.rectangle((x, y, x + 10, y + 10), fill=COLOURS[i % len(COLOURS)])
        draw.text((x + 14, y - 1), str(run["name"])[:24], fill="black")
    values = [v for run in runs for v in columns(run).values() if v is not None]
    high = max([100.0] + values) if values else 100.0
    left = 50
    draw.line((left, top, left, bottom), fill="black")
    draw.line((left, bottom, width - 10, bottom), fill="black")
    for tick in range(0, 5):
        value = high * tick / 4
        y = bottom - (bottom - top) * tick / 4
        draw.text((5, y - 6), f"{value:.0f}", fill="black")
        draw.line((left - 3, y, left, y), fill="black")
    for c, col in enumerate(cols):
        x0 = left + 12 + c * group_width
        for i, run in enumerate(runs):
            value = columns(run).get(col)
            if value is None:
                continue
            y = bottom - (bottom - top) * value / high
            draw.rectangle((x0 + i * bar, y, x0 + i * bar + bar - 3, bottom), fill=COLOURS[i % len(COLOURS)])
        draw.text((x0, bottom + 6 + 12 * (c % 3)), str(col)[:14], fill="black")
    with atomic.file(path) as tmp:
        image.save(tmp, format="PNG")
