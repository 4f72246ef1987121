"""Peak memory of `mlx-llava convert` on a 7B-shaped checkpoint.

Makes a random-weight float16 checkpoint on disk in the original
liuhaotian/llava-v1.5-7b layout (LLaMA-7B language model in two shards of
the real sizes, 9.98 GB and 3.54 GB, + a separate CLIP ViT-L/14-336 folder),
one shard at a time, then converts it with the CLI in a child process and
reports the child's peak resident memory (/proc/self/status VmHWM, read by
the child as it exits) against the largest source shard.

    python benchmarks/convert_memory.py                      # .bin shards (torch.save), as released
    python benchmarks/convert_memory.py --format safetensors
    python benchmarks/convert_memory.py -- -q --q-bits 4     # extra flags for `mlx-llava convert`
    python benchmarks/convert_memory.py --keep ...           # keep the source (and output) ...
    python benchmarks/convert_memory.py --reuse ...          # ... and convert it again with other flags

Needs about 28 GB of free disk under --workdir (source + output); it removes
both at the end unless --keep. The .bin format needs torch (a test dependency).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, INTERMEDIATE, VOCAB, HEADS = 4096, 32, 11008, 32000, 32
CLIP = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SHARD1_LAYERS = 24  # the real llava-v1.5-7b: embeddings + layers 0-23 in shard 1 (9.98 GB)


def llama_shapes(layers: int) -> list:
    """[(original name, shape)] of LlavaLlamaForCausalLM-7B, in shard order."""
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                   (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
                   (p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN)),
               ("model.mm_projector.0.weight", (HIDDEN, CLIP["hidden_size"])), ("model.mm_projector.0.bias", (HIDDEN,)),
               ("model.mm_projector.2.weight", (HIDDEN, HIDDEN)), ("model.mm_projector.2.bias", (HIDDEN,))]
    return shapes


def clip_shapes() -> list:
    d, n = CLIP["hidden_size"], (CLIP["image_size"] // CLIP["patch_size"]) ** 2 + 1
    shapes = [("vision_model.embeddings.class_embedding", (d,)),
              ("vision_model.embeddings.patch_embedding.weight", (d, 3, CLIP["patch_size"], CLIP["patch_size"])),
              ("vision_model.embeddings.position_embedding.weight", (n, d)),
              ("vision_model.pre_layrnorm.weight", (d,)), ("vision_model.pre_layrnorm.bias", (d,))]
    for i in range(CLIP["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes += [(p + f"self_attn.{n}.weight", (d, d)), (p + f"self_attn.{n}.bias", (d,))]
        shapes += [(p + "mlp.fc1.weight", (CLIP["intermediate_size"], d)), (p + "mlp.fc1.bias", (CLIP["intermediate_size"],)),
                   (p + "mlp.fc2.weight", (d, CLIP["intermediate_size"])), (p + "mlp.fc2.bias", (d,))]
        for n in ("layer_norm1", "layer_norm2"):
            shapes += [(p + f"{n}.weight", (d,)), (p + f"{n}.bias", (d,))]
    shapes += [("vision_model.post_layernorm.weight", (d,)), ("vision_model.post_layernorm.bias", (d,))]
    return shapes


def random_fp16(shape, rng) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)


def save_shard(path: Path, shapes, fmt: str, rng):
    """One shard, built in memory (only this shard) and saved."""
    if fmt == "bin":
        import torch

        torch.save({k: torch.from_numpy(random_fp16(s, rng)) for k, s in shapes}, path)
    else:
        import mlx.core as mx

        mx.save_safetensors(str(path), {k: mx.array(random_fp16(s, rng)) for k, s in shapes}, metadata={"format": "pt"})


def make_tokenizer(folder: Path):
    """A 32000-token stand-in for the LLaMA tokenizer (no network, no real
    vocabulary needed: the converter only registers <image> and re-saves it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


def make_checkpoint(root: Path, fmt: str, layers: int) -> tuple:
    """-> (source folder, largest shard bytes)."""
    rng = np.random.default_rng(0)
    clip, src = root / "clip-vit-large-patch14-336", root / "llava-v1.5-7b"
    clip.mkdir(parents=True)
    src.mkdir(parents=True)
    save_shard(clip / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors"), clip_shapes(), fmt, rng)
    (clip / "config.json").write_text(json.dumps({**CLIP, "model_type": "clip_vision_model"}))
    (clip / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "do_center_crop": True}))

    shapes = llama_shapes(layers)
    split = next(i for i, (k, _) in enumerate(shapes) if k == f"model.layers.{min(SHARD1_LAYERS, layers - 1)}.self_attn.q_proj.weight")
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    weight_map = {}
    for i, part in enumerate((shapes[:split], shapes[split:])):
        name = f"{stem}-{i + 1:05d}-of-00002.{ext}"
        print(f"writing {name} ({sum(np.prod(s) for _, s in part) * 2 / 1e9:.2f} GB)", flush=True)
        save_shard(src / name, part, fmt, rng)
        weight_map.update({k: name for k, _ in part})
    (src / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "mm_vision_tower": str(clip),
        "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad", "use_mm_proj": True,
    }
    (src / "config.json").write_text(json.dumps(config, indent=2))
    make_tokenizer(src)
    largest = max(f.stat().st_size for f in src.glob(f"*.{ext}"))
    return src, largest


# Runs the CLI and, on the way out, records the process's own VmHWM: the
# peak resident memory of this program image. (wait4's ru_maxrss would not
# do: Linux carries the forking parent's peak across exec into it.)
CHILD = """
import os, sys
from pathlib import Path
sys.argv = ["mlx-llava", *sys.argv[1:]]
try:
    from mlx_llava.cli import main
    main()
finally:
    status = Path("/proc/self/status").read_text()
    hwm = next(l for l in status.splitlines() if l.startswith("VmHWM:"))
    Path(os.environ["PEAK_FILE"]).write_text(str(int(hwm.split()[1]) * 1024))
"""


def run_and_measure(args: list, peak_file: Path) -> dict:
    """Run `mlx-llava *args` in a child; its VmHWM at exit is the peak. RSS
    (anonymous, file-backed) is also sampled every 50 ms to show what it is made of."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], env={**os.environ, "PEAK_FILE": str(peak_file)})
    peaks = {"RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    return {"returncode": proc.returncode, "peak": int(peak_file.read_text()), "seconds": seconds, **peaks}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/llava-convert-bench")
    parser.add_argument("--format", choices=["bin", "safetensors"], default="bin")
    parser.add_argument("--layers", type=int, default=LAYERS, help="fewer for a quick trial")
    parser.add_argument("--keep", action="store_true", help="keep source and output")
    parser.add_argument("--reuse", action="store_true", help="convert the source a --keep run left (same --format)")
    parser.add_argument("extra", nargs="*", help="extra flags for mlx-llava convert (after --)")
    args = parser.parse_args()

    root = Path(args.workdir)
    src = root / "llava-v1.5-7b"
    ext = "bin" if args.format == "bin" else "safetensors"
    reuse = args.reuse and (src / "config.json").is_file() and any(src.glob(f"*.{ext}"))
    if root.exists() and not reuse:
        shutil.rmtree(root)
    try:
        t = time.perf_counter()
        if reuse:
            largest = max(f.stat().st_size for f in src.glob(f"*.{ext}"))
            print(f"reusing {src}", flush=True)
        else:
            src, largest = make_checkpoint(root, args.format, args.layers)
            print(f"made the source in {time.perf_counter() - t:.0f} s", flush=True)
        out = root / "out"
        shutil.rmtree(out, ignore_errors=True)
        cli = ["convert", "--hf", str(src), "--mlx-path", str(out), *args.extra]
        print("$ mlx-llava " + " ".join(cli), flush=True)
        result = run_and_measure(cli, root / "peak")
        if result["returncode"] != 0:
            sys.exit(f"conversion failed (exit {result['returncode']})")
        out_largest = max(f.stat().st_size for f in out.glob("*.safetensors"))
        gb = 1e9
        print(f"largest source shard: {largest / gb:.2f} GB")
        print(f"largest output shard: {out_largest / gb:.2f} GB")
        print(f"peak RSS:             {result['peak'] / gb:.2f} GB "
              f"(sampled peaks: anonymous {result['RssAnon'] / gb:.2f} GB, file-backed {result['RssFile'] / gb:.2f} GB)")
        print(f"peak / largest shard: {result['peak'] / largest:.2f}x (limit 1.5x + what is being written)")
        print(f"time:                 {result['seconds']:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
