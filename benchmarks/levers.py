"""Where mlx-llava's time goes, and which levers pay: each variant timed in
turn, round by round, on the benchmark's checkpoint (benchmarks/inference.py
builds it), in one process.

    python benchmarks/levers.py [--model DIR] [--rounds 3] [--only prefill decode vision]
    python benchmarks/levers.py --only ops          # the BLAS's part, op by op

Run it once per BLAS (`MLX_LLAVA_BLAS=openblas`, `MLX_LLAVA_BLAS=mkl`): the
library is chosen when MLX loads. Prints a Markdown table of medians (wall
seconds) with the load average.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mlx_llava  # noqa: E402  (the BLAS before MLX)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from mlx_llava.models.clip import in_halves  # noqa: E402


TOKENS = int(os.environ.get("LEVERS_DECODE_TOKENS", 16))
CPU = {}  # variant -> CPU seconds of this process (all its threads) per run


def timed(f, name=None):
    t, c = time.perf_counter(), time.process_time()
    mx.eval(f())
    if name:
        CPU.setdefault(name, []).append(time.process_time() - c)
    return time.perf_counter() - t


def prefill(model, embeds, step):
    """The language model over the prompt's embeddings in chunks of `step`
    tokens (mlx-lm's prefill_step_size), the KV cache filled."""
    lm = model.language_model

    def run():
        cache = make_prompt_cache(lm)
        n = embeds.shape[0]
        for start in range(0, n - 1, step):
            stop = min(start + step, n - 1)
            lm(mx.zeros((1, stop - start), mx.int32), cache=cache, input_embeddings=embeds[None, start:stop])
            mx.eval([c.state for c in cache])
        return lm(mx.zeros((1, 1), mx.int32), cache=cache, input_embeddings=embeds[None, n - 1:])
    return run


def decode(model, embeds, tokens=TOKENS):
    """`tokens` greedy steps after the prompt (605 tokens; the prefill not timed)."""
    lm = model.language_model

    def run():
        cache = make_prompt_cache(lm)
        logits = lm(mx.zeros((1, embeds.shape[0]), mx.int32), cache=cache, input_embeddings=embeds[None])
        y = logits[:, -1].argmax(-1)
        mx.eval(y, [c.state for c in cache])
        t = time.perf_counter()
        for _ in range(tokens):
            y = lm(y[None], cache=cache)[:, -1].argmax(-1)
            mx.async_eval(y)
        mx.eval(y)
        return mx.array(tokens / (time.perf_counter() - t))  # tokens/s, not seconds
    return run


def vision(model, pixels, compiled=False, one_stream=False):
    """The tower's 23 layers LLaVA uses and the projector; `one_stream`: the
    attention and activation whole, as before models/clip.in_halves."""
    from mlx_llava.models import clip

    tower = model.vision_tower
    layers = tower.vision_model.encoder.layers
    steps = [mx.compile(layer) if compiled else layer for layer in layers]

    def run():
        split = clip.in_halves
        if one_stream:
            clip.in_halves = lambda f, axis, *arrays: f(*arrays)
        try:
            x = tower.vision_model.pre_layrnorm(tower.vision_model.embeddings(pixels))
            for step in steps[: len(layers) - 1]:
                x = step(x)
            out = model.multi_modal_projector(x[:, 1:])
            mx.eval(out)
        finally:
            clip.in_halves = split
        return out
    return run


def ops():
    """The BLAS's part, op by op (best of several, ms): large products, a
    CLIP layer's attention, and one-row products over 370 MB of weights
    (beyond the caches, as in decoding)."""
    def best(f, n=10):
        mx.eval(f())  # (numpy's results pass through mx.eval untouched)
        out = 1e9
        for _ in range(n):
            t = time.perf_counter()
            mx.eval(f())
            out = min(out, time.perf_counter() - t)
        return out * 1e3

    x, w = mx.random.normal((577, 1024)), mx.random.normal((4096, 1024))
    xl, wl = mx.random.normal((626, 2048)), mx.random.normal((5632, 2048))
    q = mx.random.normal((1, 16, 577, 64))
    ws, v = [mx.random.normal((5632, 2048)) for _ in range(8)], mx.random.normal((1, 2048))
    ql, kl = mx.random.normal((1, 32, 626, 64)), mx.random.normal((1, 4, 626, 64))
    s = mx.random.normal((32, 626, 626))
    mx.eval(x, w, xl, wl, q, ws, v, ql, kl, s)
    s_np = np.array(s)
    q32 = mx.quantize(ws[0], group_size=64, bits=4)
    v64 = mx.random.normal((64, 2048))
    q16 = (q32[0], q32[1].astype(mx.float16), q32[2].astype(mx.float16))
    rows = {
        "CLIP fc1, 577x1024 @ 1024x4096": lambda: x @ w.T,
        "LLaMA MLP, 626x2048 @ 2048x5632": lambda: xl @ wl.T,
        "CLIP attention scores q @ k^T (16 heads of 577x64)": lambda: q @ q.transpose(0, 1, 3, 2),
        "CLIP attention, mx.fast.scaled_dot_product_attention": lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=0.125),
        "softmax of those scores alone": lambda: mx.softmax(q @ q.transpose(0, 1, 3, 2), -1),
        "LLaMA attention, 32 heads (4 KV) of 626 tokens, causal": lambda: mx.fast.scaled_dot_product_attention(
            ql, kl, kl, scale=0.125, mask="causal"),
        "the same, heads in two halves on two CPU streams": lambda: in_halves(
            lambda *a: mx.fast.scaled_dot_product_attention(*a, scale=0.125, mask="causal"), 1, ql, kl, kl),
        "exp of its scores alone (12.5M floats)": lambda: mx.exp(s),
        "a product of two such arrays": lambda: s * s,
        "numpy's exp of the same floats": lambda: np.exp(s_np),
        "one row x @ W^T over 8 matrices 5632x2048 (370 MB)": lambda: [v @ m.T for m in ws],
        "the same as W @ x^T": lambda: [m @ v.T for m in ws],
        "one row through a 4-bit 5632x2048 matrix, float32 scales and activations": lambda: mx.quantized_matmul(
            v, *q32, transpose=True, group_size=64, bits=4),
        "the same in float16 (what convert -q writes, as it runs unless cast)": lambda: mx.quantized_matmul(
            v.astype(mx.float16), *q16, transpose=True, group_size=64, bits=4),
    }
    rows["64 rows through the 4-bit matrix, float32 scales and activations"] = lambda: mx.quantized_matmul(
        v64, *q32, transpose=True, group_size=64, bits=4)
    rows["64 rows through the float32 matrix"] = lambda: v64 @ ws[0].T
    out = {name: best(f) for name, f in rows.items()}
    try:  # the same large products in torch (its own MKL), for comparison
        import torch
    except ImportError:
        return out
    tx, tw = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(w))
    txl, twl = torch.from_numpy(np.array(xl)), torch.from_numpy(np.array(wl))
    out["torch: CLIP fc1, 577x1024 @ 1024x4096"] = best(lambda: torch.nn.functional.linear(tx, tw))
    out["torch: LLaMA MLP, 626x2048 @ 2048x5632"] = best(lambda: torch.nn.functional.linear(txl, twl))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.expanduser("/work/bench-speed/llava-1b-hf-mlx-fp32"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", nargs="+", default=["prefill", "decode", "vision"])
    p.add_argument("--steps", nargs="+", type=int, default=[2048, 512, 256, 128])
    p.add_argument("--as-written", action="store_true",
                   help="load without the CPU fallback (float16 scales stay float16)")
    args = p.parse_args()
    if args.only == ["ops"]:
        print(f"BLAS: {mlx_llava.blas.loaded}; load average {os.getloadavg()}")
        print("| op | ms |\n|---|---|")
        for name, ms in ops().items():
            print(f"| {name} | {ms:.1f} |")
        return
    if args.as_written:
        from mlx_llava.processor import Processor
        from mlx_llava.weights import load_model

        model, config = load_model(args.model, cpu_fallback=False)
        processor = Processor.from_dir(args.model, config)
    else:
        model, processor = mlx_llava.load(args.model)
    size = processor.image_config.crop_size[0]
    pixels = mx.random.uniform(shape=(1, size, size, 3))
    prompt = int(os.environ.get("LEVERS_PROMPT_TOKENS", 605))
    embeds = mx.random.normal((prompt, model.args.text_config["hidden_size"])) * 0.02
    mx.eval(pixels, embeds)
    variants = {}
    if "prefill" in args.only:
        variants.update({f"prefill, chunks of {s}": prefill(model, embeds, s) for s in args.steps})
    if "decode" in args.only:
        variants["decode (tokens/s)"] = decode(model, embeds)
    if "vision" in args.only:
        variants["vision tower + projector, one stream"] = vision(model, pixels, one_stream=True)
        variants["the same, each layer compiled"] = vision(model, pixels, compiled=True, one_stream=True)
        variants["the same, halves on 2 CPU streams (as mlx-llava runs it)"] = vision(model, pixels)
    results = {k: [] for k in variants}
    loads = []
    for name, f in variants.items():  # warm-up
        mx.eval(f())
    for r in range(args.rounds):
        for name, f in variants.items():
            loads.append(os.getloadavg()[0])
            results[name].append(f().item() if name.startswith("decode") else timed(f, name))
            print(f"round {r + 1}: {name}: {results[name][-1]:.3f}", file=sys.stderr)
    print(f"BLAS: {mlx_llava.blas.loaded}; load average during: {min(loads):.2f}-{max(loads):.2f}")
    print("| variant | median (s, or tokens/s) | CPU s per run (all threads) |\n|---|---|---|")
    for name, values in results.items():
        cpu = f"{statistics.median(CPU[name]):.2f}" if name in CPU else "-"
        print(f"| {name} | {statistics.median(values):.3f} | {cpu} |")


if __name__ == "__main__":
    main()
