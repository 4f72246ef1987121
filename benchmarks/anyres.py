"""LLaVA-1.5 against LLaVA-1.6 (AnyRes) on the same language model: visual
tokens, vision time, time to first token and peak memory, per image.

Both models are built on the spot with random weights (no download): the
vision tower is CLIP ViT-L/14 at 336 px exactly (24 layers, width 1024),
the projector mlp2x_gelu, and the language model LLaMA-shaped (by default
TinyLlama-1.1B's shape; `--lm 0.5b` for a Qwen2-0.5B-sized one, `--lm 7b`
for Vicuna-7B's, which needs a GPU-sized machine). The 1.6 model is the 1.5 one with AnyRes switched on: the same
weight arrays, shared, plus image_newline. LLaVA-1.5 pads the image to a
square (576 visual tokens); LLaVA-1.6 encodes the base image and its grid's
crops in one vision-tower batch.

Measured, one image per prompt, rounds interleaved (1.5, then 1.6, each
round) so that a busy machine slows both alike:
- vision: preprocessing excluded, the vision tower + projector (+ the
  AnyRes layout) on the image's crops, evaluated;
- TTFT: from the pixels to the first token: vision, the prompt's embeddings
  and the prefill (mlx-lm's generate_step, as `Chat` runs it);
- peak memory: MLX's peak during that, weights included.

    python benchmarks/anyres.py                      # 3 rounds, 1000x750 and 672x672 images
    python benchmarks/anyres.py --rounds 5 --dtype float16 --out benchmarks/anyres.md
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx_llava  # noqa: E402,F401  (loads the system BLAS before mlx)
import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from PIL import Image  # noqa: E402

from mlx_llava.image import ImageConfig, preprocess_with_sizes  # noqa: E402
from mlx_llava.weights import build_model  # noqa: E402

CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu")
LANGUAGE_MODELS = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TEXT_TOKENS = 40  # a system prompt and a question around the image


def build(lm: str, dtype):
    text = dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                tie_word_embeddings=False, **LANGUAGE_MODELS[lm])
    base = dict(model_type="llava", text_config=text, vision_config=CLIP_L_336, image_token_index=32000,
                projector_type="mlp2x_gelu")
    v16 = build_model({**base, "model_type": "llava_next", "image_aspect_ratio": "anyres",
                       "image_grid_pinpoints": PINPOINTS, "mm_patch_merge_type": "spatial_unpad",
                       "unpad_rounding": "truncate"})
    v16.set_dtype(dtype)
    v15 = build_model({**base, "image_aspect_ratio": "pad"})
    shared = dict(v16.parameters())
    shared.pop("image_newline")
    v15.update(shared)  # the very same arrays: one language model, one vision tower
    mx.eval(v16.parameters())
    return v15, v16


def photo(width, height, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def measure(model, config, image):
    """-> (visual tokens, vision seconds, TTFT seconds, peak GB)."""
    pixels, sizes = preprocess_with_sizes(image, config)
    pixels = mx.array(pixels)
    mx.eval(pixels)
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    visual = model.encode_images(pixels, sizes)
    visual = visual.reshape(-1, visual.shape[-1])
    mx.eval(visual)
    vision = time.perf_counter() - start
    n = visual.shape[0]
    ids = [1] + list(range(100, 100 + TEXT_TOKENS // 2)) + [32000] * n + list(range(200, 200 + TEXT_TOKENS // 2))
    embeds = model.embed(mx.array([ids]), image_features=visual)[0]
    token, _ = next(generate_step(mx.array(ids), model.language_model, input_embeddings=embeds, max_tokens=1))
    ttft = time.perf_counter() - start
    return n, vision, ttft, mx.get_peak_memory() / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lm", choices=sorted(LANGUAGE_MODELS), default="1.1b")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        default="float16" if mx.default_device() == mx.gpu else "float32")
    parser.add_argument("--sizes", default="1000x750,672x672", help="image sizes, WIDTHxHEIGHT, comma separated")
    parser.add_argument("--out", help="also write the Markdown report here")
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    load_before = os.getloadavg()
    v15, v16 = build(args.lm, getattr(mx, args.dtype))
    configs = {"1.5": (v15, ImageConfig(image_aspect_ratio="pad")),
               "1.6": (v16, ImageConfig(image_aspect_ratio="anyres", grid_pinpoints=[tuple(p[::-1]) for p in PINPOINTS]))}
    images = {s: photo(*s) for s in sizes}
    for name, (model, config) in configs.items():  # warm up: compile kernels, fault in weights
        measure(model, config, images[sizes[0]])
    results = {(s, name): [] for s in sizes for name in configs}
    for r in range(args.rounds):
        for s in sizes:
            for name, (model, config) in configs.items():
                results[(s, name)].append(measure(model, config, images[s]))
                print(f"round {r + 1} {s[0]}x{s[1]} LLaVA-{name}: tokens {results[(s, name)][-1][0]}, "
                      f"vision {results[(s, name)][-1][1]:.2f} s, TTFT {results[(s, name)][-1][2]:.2f} s", flush=True)
    load_after = os.getloadavg()

    command = "python benchmarks/anyres.py " + " ".join(sys.argv[1:])
    lines = [
        "# LLaVA-1.5 against LLaVA-1.6 (AnyRes): visual tokens, vision time, TTFT, memory",
        "",
        f"Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"MLX {mx.__version__} on {mx.default_device()}, {args.dtype}. "
        f"Date: {datetime.date.today().isoformat()}. Load average (1, 5, 15 min): "
        f"{' '.join(f'{x:.2f}' for x in load_before)} before, {' '.join(f'{x:.2f}' for x in load_after)} after "
        "(the machine is shared).",
        "",
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Models (random weights, built on the spot): CLIP ViT-L/14-336 vision tower, mlp2x_gelu projector, "
        f"LLaMA-shaped language model `{args.lm}` ({', '.join(f'{k} {v}' for k, v in LANGUAGE_MODELS[args.lm].items())}); "
        "the two models share every weight array. LLaVA-1.6 uses LLaVA-1.6's pinpoints and spatial_unpad. "
        f"Prompt: {TEXT_TOKENS} text tokens around the image. {args.rounds} rounds, 1.5 and 1.6 interleaved; "
        "medians (min-max).",
        "",
        "| image | model | crops | visual tokens | vision (s) | TTFT (s) | peak memory (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sizes:
        for name, (model, config) in configs.items():
            rows = results[(s, name)]
            crops = model.anyres.crops((s[1], s[0])) if model.anyres else 1

            def cell(i):
                values = [row[i] for row in rows]
                return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

            lines.append(f"| {s[0]}x{s[1]} | LLaVA-{name} | {crops} | {rows[0][0]} | {cell(1)} | {cell(2)} | "
                         f"{max(row[3] for row in rows):.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
