"""What a second question costs: a chat's follow-up turn, and a new process
asking about the same image with a prompt cache file.

    python benchmarks/follow_up.py [--model DIR] [--before DIR] [--max-tokens 32]

On the benchmark's checkpoint (benchmarks/inference.py builds it). For each
mlx-llava (this checkout, and with `--before` an older one), in a fresh
process: the first turn's and the follow-up's prompt tokens prefilled and
time to first token. Then `generate --prompt-cache`: a first process that
writes the file, a second that reads it, each timed from the call to the
first token. Prints a Markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHAT = r"""
import json, math, sys, time
sys.path.insert(0, SRC)
import mlx_llava
from mlx_llava.generate import Chat
sys.path.insert(0, BENCH)
from inference import make_image
model, processor = mlx_llava.load(MODEL)
image = make_image(processor.image_config.crop_size[0])
chat = Chat(model, processor, image=image)
out = []
for question in ("What is shown in this image? Describe it in detail.", "What colour is the sky in it?"):
    t = time.perf_counter()
    first, last = None, None
    for r in chat.ask(question, max_tokens=TOKENS):
        first = first or time.perf_counter() - t
        last = r
    out.append({"prompt_tokens": last.prompt_tokens, "ttft_s": first, "blas": mlx_llava.blas.loaded})
print(json.dumps(out))
"""

CACHED = r"""
import json, sys, time
sys.path.insert(0, SRC)
import mlx_llava
from mlx_llava.generate import stream_generate
sys.path.insert(0, BENCH)
from inference import make_image
model, processor = mlx_llava.load(MODEL)
image = make_image(processor.image_config.crop_size[0])
t = time.perf_counter()
first, last = None, None
for r in stream_generate(model, processor, QUESTION, image, max_tokens=TOKENS, prompt_cache=CACHE):
    first = first or time.perf_counter() - t
    last = r
print(json.dumps({"prompt_tokens": last.prompt_tokens, "ttft_s": first}))
"""


def run(code, **values):
    for k, v in values.items():
        code = code.replace(k, json.dumps(v) if not isinstance(v, int) else str(v))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="/work/bench-speed/llava-1b-hf-mlx-fp32")
    p.add_argument("--before", default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--cache", default="/tmp/mlx-llava-follow-up.safetensors")
    args = p.parse_args()
    bench = str(ROOT / "benchmarks")
    print(f"load average before: {os.getloadavg()}")
    print("| mlx-llava | turn | prompt tokens prefilled | time to first token (s) |\n|---|---|---|---|")
    sources = [("this checkout", str(ROOT))] + ([("before", str(Path(args.before).resolve()))] if args.before else [])
    for label, src in sources:
        turns = run(CHAT, SRC=src, BENCH=bench, MODEL=args.model, TOKENS=args.max_tokens)
        for i, t in enumerate(turns):
            print(f"| {label} | {i + 1} | {t['prompt_tokens']} | {t['ttft_s']:.2f} |")
    Path(args.cache).unlink(missing_ok=True)
    print("\n| prompt cache file | prompt tokens prefilled | time to first token (s) |\n|---|---|---|")
    for label, question in (("absent: written after the answer", "What is shown in this image?"),
                            ("present: read (another question)", "What colour is the sky in it?")):
        r = run(CACHED, SRC=str(ROOT), BENCH=bench, MODEL=args.model, TOKENS=args.max_tokens,
                QUESTION=question, CACHE=args.cache)
        print(f"| {label} | {r['prompt_tokens']} | {r['ttft_s']:.2f} |")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
