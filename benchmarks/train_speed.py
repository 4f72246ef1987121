"""Training speed: stage 1 and stage 2 samples/s and tokens/s, vision-feature cache on and off.

A small configuration built on the spot (no download): the synthetic world's
images at 224 px, a CLIP-shaped vision tower (patch 16: 196 visual tokens,
width 256, 6 layers, random weights), a LLaMA-shaped language model (width
256, 4 layers, random weights) with the world's tokenizer. Each run trains a
fixed number of steps through `mlx_llava.train`, as `mlx-llava train` does.

    python benchmarks/train_speed.py [--steps 6] [--batch-size 8] [--out /tmp/llava-bench] [--compile both]

"Tokens" are every token the language model reads (visual and text), per
second of optimizer steps; "trained tokens" the answer tokens the loss
covers. Steps after the first are timed; "whole run" is the wall time of the
`train` call, model loading and (cache on) filling a fresh cache included.
`--compile both` runs every configuration with the compiled training step and
without it, one after the other, so that the two meet the same machine load.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import mlx_llava  # noqa: F401  (loads the system BLAS on Linux before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten


def build_parts(out: Path, n_images: int):
    from mlx_lm.models import llama

    from mlx_llava.demo.dataset import build_dataset
    from mlx_llava.demo.clip_pretrain import Clip, save_vision_tower
    from mlx_llava.demo.tokenizer import train_tokenizer
    from mlx_llava.image import ImageConfig
    from mlx_llava.models.clip import VisionConfig

    data = out / "data"
    if not (data / "meta.json").exists():
        build_dataset(data, n_images, 0, seed=0, image_size=224)
    stage1 = json.loads((data / "stage1.json").read_text())
    train_tokenizer([s["conversations"][1]["value"] for s in stage1], 1024, out / "tokenizer")
    vision = VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                          image_size=224, patch_size=16)
    mx.random.seed(0)
    save_vision_tower(Clip(vision, 1024, 64, 1, 64), vision, ImageConfig(shortest_edge=224, crop_size=(224, 224)),
                      out / "clip")
    config = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "intermediate_size": 1024, "rms_norm_eps": 1e-5, "vocab_size": 1024,
              "max_position_embeddings": 1024, "tie_word_embeddings": False}
    lm = out / "language_model"
    lm.mkdir(exist_ok=True)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(lm / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (lm / "config.json").write_text(json.dumps(config))
    for f in (out / "tokenizer").iterdir():
        shutil.copy(f, lm / f.name)
    return data


def run(name, out: Path, cache: bool, **kwargs) -> dict:
    name += "" if kwargs.get("compile", True) else "-uncompiled"
    from mlx_llava.train import train

    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    cache_dir = out / f"features-{name}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    tic = time.perf_counter()
    train(output=str(folder), cache_features=str(cache_dir) if cache else None, save_every=10**9,
          progress=False, seed=0, **kwargs)
    wall = time.perf_counter() - tic
    steps = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return {"run": name, "cache": cache, "compiled": kwargs.get("compile", True), "wall_s": round(wall, 1),
            "steps": len(steps), "log": steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="/tmp/llava-bench")
    parser.add_argument("--compile", choices=("on", "off", "both"), default="on")
    args = parser.parse_args()
    compiles = {"on": (True,), "off": (False,), "both": (True, False)}[args.compile]
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.steps * args.batch_size
    data = build_parts(out, n)
    images = str(data / "images")
    common = dict(image_folder=images, iters=args.steps, batch_size=args.batch_size, grad_accum=1)
    parts = dict(language_model=str(out / "language_model"), vision_tower=str(out / "clip"))
    rows = []
    for cache in (False, True):
        for compiled in compiles:
            rows.append(run(f"stage1-cache-{cache}", out, cache, stage=1, data=str(data / "stage1.json"),
                            compile=compiled, **parts, **common))
    stage1_model = str(out / f"stage1-cache-True{'' if compiles[0] else '-uncompiled'}" / "model")
    for method in ("lora", "full"):
        for cache in (False, True):
            for compiled in compiles:
                rows.append(run(f"stage2-{method}-cache-{cache}", out, cache, stage=2, method=method,
                                model=stage1_model, data=str(data / "instruct.json"), compile=compiled, **common))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("| run | cache | compiled | samples/s | tokens/s | trained tokens/s | first step (s) | whole run (s) | peak memory (GB) | final loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log = r["log"]
        timed = log[1:] or log
        seconds = [args.batch_size / s["samples_per_second"] for s in timed]
        sps = args.batch_size * len(timed) / sum(seconds)
        tokens = sum(s["tokens_per_second"] * t for s, t in zip(timed, seconds)) / sum(seconds)
        trained = sum(s["trained_tokens"] for s in timed) / sum(seconds)
        first = args.batch_size / log[0]["samples_per_second"]
        print(f"| {r['run']} | {'on' if r['cache'] else 'off'} | {'yes' if r['compiled'] else 'no'} | {sps:.2f} | "
              f"{tokens:.0f} | {trained:.0f} | {first:.1f} | {r['wall_s']:.0f} | "
              f"{max(s['peak_memory_gb'] for s in log):.2f} | {log[-1]['loss']:.4f} |")
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
