"""`mlx-llava eval answer`: answers/s against batch size, on the demo model.

The demo model answers its 195 shipped held-out questions through
`mlx_llava.eval.answer` (what `eval answer` runs, into a fresh answer file),
once per batch size per round; "one at a time" is one `generate` call per
question, "chat per image" the way `mlx-llava eval` answered before batching.
The machine is shared, so the settings are interleaved round by round (each
round in a new order) and the median over rounds is reported, with the load
average seen during the runs. Every run's answers are checked equal to the
one-at-a-time answers.

    python benchmarks/eval_batch.py [--rounds 5] [--sizes 1,2,4,8,16,32] [--out benchmarks/eval_batch.md]
"""

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx_llava
import mlx.core as mx


def one_at_a_time(model, processor, questions, folder):
    from mlx_llava import generate
    from mlx_llava.eval.answer import load_eval_image

    return [generate(model, processor, q.text, image=load_eval_image(folder / q.image), max_tokens=16,
                     conv_mode=processor.train_conv_mode).strip() for q in questions]


def chat_per_image(model, processor, questions, folder):
    """The held-out check as `mlx-llava eval` ran it before batching: one Chat per
    image, restarted for each of its questions, so that the image's visual tokens
    and the shared prompt prefix are computed once per image."""
    from mlx_llava import Chat
    from mlx_llava.eval.answer import load_eval_image

    texts, chat, current = [], None, None
    for q in questions:
        if q.image != current:
            chat, current = Chat(model, processor, image=load_eval_image(folder / q.image),
                                 conv_mode=processor.train_conv_mode), q.image
        chat.restart()
        texts.append(chat.say(q.text, max_tokens=16).strip())
    return texts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="1,2,4,8,16,32")
    parser.add_argument("--out", default=str(Path(__file__).with_name("eval_batch.md")))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from mlx_llava.demo import heldout_dir
    from mlx_llava.eval import answer, read_answers, read_questions
    from mlx_llava.weights import default_model

    model, processor = mlx_llava.load(default_model())
    _, questions = read_questions(heldout_dir() / "questions.json")
    folder = heldout_dir() / "images"
    answer(model, processor, questions[:16], folder, Path(tempfile.mkdtemp()) / "warm.jsonl", max_new_tokens=16)
    reference = one_at_a_time(model, processor, questions, folder)
    settings = ["one at a time", "chat per image"] + sizes
    runs = {s: [] for s in settings}
    loads = []
    rng = random.Random(0)
    for r in range(args.rounds):
        order = list(settings)
        rng.shuffle(order)
        for size in order:
            before = os.getloadavg()[0]
            tic = time.perf_counter()
            if size == "one at a time":
                texts = one_at_a_time(model, processor, questions, folder)
            elif size == "chat per image":
                texts = chat_per_image(model, processor, questions, folder)
            else:
                out = Path(tempfile.mkdtemp()) / "answers.jsonl"
                answer(model, processor, questions, folder, out, batch_size=size, max_new_tokens=16)
                texts = [a["text"] for a in read_answers(out)]
            seconds = time.perf_counter() - tic
            assert texts == reference, f"batch size {size}: answers differ from one at a time"
            runs[size].append(len(questions) / seconds)
            loads.append((before + os.getloadavg()[0]) / 2)
            print(f"round {r + 1} {size}: {len(questions) / seconds:.1f} answers/s (load {loads[-1]:.2f})",
                  file=sys.stderr)
    base = statistics.median(runs["one at a time"])
    rows = [f"| {size} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} | {statistics.median(v) / base:.2f}x |"
            for size, v in runs.items()]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"""# `mlx-llava eval answer`: answers/s against batch size

Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB, no GPU; shared with
other work (load average during the runs: median {statistics.median(loads):.2f}, min {min(loads):.2f},
max {max(loads):.2f}). MLX {mx.__version__} CPU backend. Date: {time.strftime('%Y-%m-%d %H:%M')}.

Command:

```bash
python benchmarks/eval_batch.py --rounds {args.rounds} --sizes {args.sizes}
```

The demo model (7 MB; 9 visual tokens per image, 4 layers of width 128) answers its 195 shipped
held-out questions (greedy, at most 16 new tokens) through `mlx_llava.eval.answer`, into a fresh
answer file; "one at a time" is one `generate` call per question; "chat per image" is how
`mlx-llava eval` answered before batching (one `Chat` per image, restarted per question, so the
image and the shared prompt prefix are computed once per image). Model loading is not timed.
Each round runs every setting once, in a new random order; {args.rounds} rounds. Every run's
answers equal the one-at-a-time answers.

| batch size | answers/s (median) | min | max | vs one at a time |
|---|---|---|---|---|
{chr(10).join(rows)}

Raw answers/s per round: {json.dumps({str(k): [round(x, 1) for x in v] for k, v in runs.items()})}
"""
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
