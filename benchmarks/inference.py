"""Inference speed: mlx-llava, transformers (torch CPU) and mlx-vlm side by side.

Builds a LLaVA-1.5-shaped checkpoint with random weights (no download): CLIP
ViT-L/14-336, the mlp2x_gelu projector and a TinyLlama-1.1B-shaped LLaMA
(`--shape 7b`: Vicuna-7B's), saved in the llava-hf layout, and an MLX copy
made with `mlx_llava.convert` (float32, float16, or 8- / 4-bit). Each
implementation runs in its own process on the same weights, image and
prompt ids; the rounds are interleaved (one round of each in turn, the order
rotated) so that ratios survive a noisy machine. Greedy decoding with the
end of sequence suppressed, so every run decodes `--max-tokens` tokens.

Per implementation and round: preprocessing (its own image processor),
vision tower, projector, time to first token (preprocessing + vision tower +
projector + prefill, from the image and the prompt to the first token), the
prompt and decode tokens/s, peak memory; then medians, the decode roofline
fraction (bytes of language-model weights read per token against the
measured memory bandwidth), the ratios to each peer and the greedy tokens'
agreement with transformers'. Writes a JSON result and a Markdown table.

It refuses to time when the machine is busy (1-minute load average above
`--max-load`, default 1.0) unless `--force`; the load is recorded either way.

    python benchmarks/inference.py                        # fp32, 3 rounds, all three
    python benchmarks/inference.py --precision q4 --rounds 2
    python benchmarks/inference.py --shape 7b --precision fp16 --impl mlx-llava mlx-vlm   # a GPU
    python benchmarks/inference.py --shape tiny --rounds 1 --force                        # a smoke test

mlx-vlm is a benchmark-only dependency: `pip install mlx-vlm` (check with
`pip install --dry-run mlx-vlm` that it upgrades neither torch nor mlx).
"""

import argparse
import inspect
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Shapes: (vision tower, language model). "1b" is the checkpoint.
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
SHAPES = {
    "1b": (CLIP_L_336, dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                            rms_norm_eps=1e-5)),
    "7b": (CLIP_L_336, dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                            rms_norm_eps=1e-5)),
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  image_size=56, patch_size=14, projection_dim=32),
             dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)),
}
VOCAB = 32000  # tokenizer pieces; <image> is 32000, <pad> 32001, the table padded to 32064 (llava-hf)
PADDED_VOCAB = 32064
IMAGE_TOKEN, PAD_TOKEN = 32000, 32001
# What mlx-llava never says (batch.only_text_tokens): the image token and the padded rows;
# the peers are told the same, so that greedy tokens can agree.
NEVER = [IMAGE_TOKEN] + list(range(PAD_TOKEN + 1, PADDED_VOCAB))
QUESTION = "What is shown in this image? Describe it in detail."
IMPLEMENTATIONS = ("mlx-llava", "transformers", "mlx-vlm")
PRECISIONS = ("fp32", "fp16", "q8", "q4", "q4-f16")  # q4-f16: 4-bit with float16 scales (convert -q's default)


# ---------------------------------------------------------------- the checkpoint


def make_tokenizer(path: Path) -> Path:
    """A LLaMA-style SentencePiece tokenizer (byte fallback, <unk> 0, <s> 1,
    </s> 2) of exactly 32000 pieces, so that <image> is 32000 as in llava-hf:
    a small BPE learned on the template's sentences, padded with unused
    symbols."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    corpus = [
        "A chat between a curious human and an artificial intelligence assistant.",
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        "USER: What is shown in this image? Describe it in detail. ASSISTANT: The image shows",
        "a cat sitting on a wooden table next to a window, with a plant and a cup of coffee.",
    ]
    learned = 300
    unused = [f"<unused{i}>" for i in range(VOCAB - 3 - 256 - learned)]
    sp_dir = path / "_spm"
    sp_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 50), model_writer=model, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        user_defined_symbols=unused, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, minloglevel=2,
    )
    (sp_dir / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer.from_pretrained(sp_dir, legacy=True, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    if tok.convert_tokens_to_ids("<image>") != IMAGE_TOKEN:
        raise SystemExit(f"tokenizer: <image> is {tok.convert_tokens_to_ids('<image>')}, not {IMAGE_TOKEN}")
    tok.save_pretrained(path)
    return path


def build_checkpoint(folder: Path, shape: str) -> Path:
    """The llava-hf directory (float32, random weights), made once."""
    if (folder / "config.json").is_file():
        return folder
    import shutil

    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision, text = SHAPES[shape]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"building the {shape} checkpoint in {folder} (random weights, float32)", file=sys.stderr)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, hidden_act="quick_gelu"),
        text_config=LlamaConfig(**text, vocab_size=PADDED_VOCAB, bos_token_id=1, eos_token_id=2,
                                pad_token_id=PAD_TOKEN, tie_word_embeddings=False, initializer_range=0.02),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(tmp)
    del model
    make_tokenizer(tmp)
    size = vision["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       do_convert_rgb=True).save_pretrained(tmp)
    saved = json.loads((tmp / "config.json").read_text())
    saved.update(projector_type="mlp2x_gelu", image_aspect_ratio="pad")
    (tmp / "config.json").write_text(json.dumps(saved, indent=2))
    tmp.rename(folder)
    return folder


def mlx_copy(source: Path, precision: str) -> Path:
    """The MLX model directory that mlx-llava and mlx-vlm read, made once with `mlx_llava.convert`."""
    out = source.with_name(f"{source.name}-mlx-{precision}")
    if (out / "config.json").is_file():
        return out
    from mlx_llava.convert import convert

    options = {
        "fp32": dict(dtype="float32"), "fp16": dict(dtype="float16"),
        "q8": dict(dtype="float32", quantize=True, q_bits=8), "q4": dict(dtype="float32", quantize=True, q_bits=4),
        "q4-f16": dict(dtype="float16", quantize=True, q_bits=4),
    }[precision]
    print(f"converting to {out} ({options})", file=sys.stderr)
    convert(str(source), str(out), force=True, **options)
    return out


def make_image(size: int):
    """A square image of the vision tower's size: LLaVA-1.5's pad-to-square
    and the peers' center crop are then both the identity, so all three see
    the same pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([(x * 255 // size), (y * 255 // size), ((x + y) * 127 // size)], -1)
    rgb = (rgb + rng.integers(0, 32, rgb.shape)).clip(0, 255).astype("uint8")
    return Image.fromarray(rgb)


# ---------------------------------------------------------------- the runners (one process each)


def now():
    return time.perf_counter()


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would count the
    parent's, which it keeps across the spawn's exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e9 if sys.platform == "darwin" else 1e6)


class MlxLlava:
    """The public API: `load`, then `stream_generate` from the image and the prompt."""

    name = "mlx-llava"

    def __init__(self, paths, settings):
        import mlx.core as mx

        import mlx_llava
        from mlx_llava.generate import Chat, stream_generate

        self.mx, self.stream_generate, self.chat_ask = mx, stream_generate, Chat.ask
        self.source = mlx_llava.__file__
        self.model, self.processor = mlx_llava.load(paths["mlx"])
        self.model.eval()
        self.eos = self.processor.tokenizer.eos_token_id
        self.ids = None

    def prompt_ids(self, question):
        messages = [{"role": "user", "content": f"<image>\n{question}"}]
        self.text = self.processor.prompt(messages)
        return self.processor.encode(self.text)

    def pieces(self, image):
        mx = self.mx
        t0 = now()
        pixels = self.processor.preprocess([image])
        mx.eval(pixels)
        t1 = now()
        features = self.model.vision_features(pixels)
        mx.eval(features)
        t2 = now()
        tokens = self.model.multi_modal_projector(features)
        mx.eval(tokens)
        t3 = now()
        return {"preprocess_s": t1 - t0, "vision_s": t2 - t1, "projector_s": t3 - t2}

    def generate(self, image, question, max_tokens):
        kwargs = dict(max_tokens=max_tokens, logit_bias={self.eos: -math.inf})
        if "logit_bias" not in inspect.signature(self.stream_generate).parameters and \
                "logit_bias" not in inspect.signature(self.chat_ask).parameters:
            del kwargs["logit_bias"]  # an mlx-llava before it took logit_bias: EOS is left as it comes
        times, tokens = [], []
        t0 = now()
        for r in self.stream_generate(self.model, self.processor, question, image, **kwargs):
            times.append(now())
            tokens.append(r.token)
        return t0, times, tokens

    def peak_gb(self):
        return self.mx.get_peak_memory() / 1e9


class Transformers:
    """LlavaForConditionalGeneration on the llava-hf directory, torch on the CPU."""

    name = "transformers"

    def __init__(self, paths, settings):
        import torch
        from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

        self.torch = torch
        dtype = torch.float16 if settings["precision"] == "fp16" and torch.cuda.is_available() else torch.float32
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = LlavaForConditionalGeneration.from_pretrained(paths["hf"], dtype=dtype).to(self.device).eval()
        self.image_processor = CLIPImageProcessor.from_pretrained(paths["hf"])
        self.dtype = dtype
        self.ids = settings["ids"]

    def pieces(self, image):
        torch = self.torch
        with torch.inference_mode():
            t0 = now()
            pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
            t1 = now()
            out = self.model.model.vision_tower(pixels, output_hidden_states=True)
            features = out.hidden_states[-2][:, 1:]
            t2 = now()
            self.model.model.multi_modal_projector(features)
            t3 = now()
        return {"preprocess_s": t1 - t0, "vision_s": t2 - t1, "projector_s": t3 - t2}

    def generate(self, image, question, max_tokens):
        torch = self.torch
        times = []

        class Clock:
            def put(self, value):
                times.append(now())

            def end(self):
                pass

        with torch.inference_mode():
            t0 = now()
            pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
            out = self.model.generate(
                input_ids=torch.tensor([self.ids], device=self.device), pixel_values=pixels, do_sample=False,
                max_new_tokens=max_tokens, min_new_tokens=max_tokens, streamer=Clock(),
                suppress_tokens=NEVER, pad_token_id=PAD_TOKEN,
            )
        return t0, times[1:], out[0, len(self.ids):].tolist()  # the first put is the prompt

    def peak_gb(self):
        if self.device == "cuda":
            return self.torch.cuda.max_memory_allocated() / 1e9
        return None


class MlxVlm:
    """mlx-vlm's model on the same MLX directory, through its generate_step."""

    name = "mlx-vlm"

    def __init__(self, paths, settings):
        import mlx.core as mx
        from mlx_vlm.generate.ar import generate_step
        from mlx_vlm.utils import load_model
        from transformers import CLIPImageProcessor

        self.mx, self.generate_step = mx, generate_step
        self.model = load_model(Path(paths["mlx"]))
        self.image_processor = CLIPImageProcessor.from_pretrained(paths["mlx"])
        self.ids = settings["ids"]

    def preprocess(self, image):
        pixels = self.image_processor(images=image, return_tensors="np")["pixel_values"]
        return self.mx.array(pixels)

    def pieces(self, image):
        mx = self.mx
        t0 = now()
        pixels = self.preprocess(image)
        mx.eval(pixels)
        t1 = now()
        *_, hidden = self.model.vision_tower(pixels.transpose(0, 2, 3, 1), output_hidden_states=True)
        features = hidden[-2][:, 1:]
        mx.eval(features)
        t2 = now()
        mx.eval(self.model.multi_modal_projector(features))
        t3 = now()
        return {"preprocess_s": t1 - t0, "vision_s": t2 - t1, "projector_s": t3 - t2}

    def generate(self, image, question, max_tokens):
        mx = self.mx
        bias = {i: -math.inf for i in NEVER}
        bias[2] = -math.inf
        times, tokens = [], []
        t0 = now()
        pixels = self.preprocess(image)
        for token, _ in self.generate_step(mx.array([self.ids]), self.model, pixels, None, max_tokens=max_tokens,
                                           temperature=0.0, logit_bias=bias):
            token = token.item() if hasattr(token, "item") else int(token)
            times.append(now())
            tokens.append(token)
            if len(tokens) == max_tokens:
                break
        return t0, times, tokens

    def peak_gb(self):
        return self.mx.get_peak_memory() / 1e9


class MlxLlavaBefore(MlxLlava):
    """mlx-llava from another checkout (`--before DIR`): the 'before' column."""

    name = "mlx-llava-before"


RUNNERS = {r.name: r for r in (MlxLlava, Transformers, MlxVlm, MlxLlavaBefore)}


def worker(name, paths, settings, conn):
    """One implementation's process: load, then answer 'round' requests."""
    try:
        if name == "mlx-llava-before":
            sys.path.insert(0, settings["before"])
        if name != "mlx-vlm" or settings["peer_blas"] == "same":
            import mlx_llava  # noqa: F401  (every MLX gets mlx-llava's BLAS on Linux: the same kernels)

        if name == "mlx-llava-before" and not mlx_llava.__file__.startswith(settings["before"]):
            raise RuntimeError(f"--before: imported mlx_llava from {mlx_llava.__file__}, not {settings['before']}")

        image = make_image(settings["image_size"])
        t = now()
        runner = RUNNERS[name](paths, settings)
        blas = sys.modules["mlx_llava.blas"].loaded if "mlx_llava.blas" in sys.modules else "MLX's own"
        conn.send({"loaded_s": now() - t, "ids": getattr(runner, "ids", None) or runner.prompt_ids(QUESTION),
                   "blas": blas})
        while True:
            request = conn.recv()
            if request == "stop":
                return
            pieces = runner.pieces(image)
            t0, times, tokens = runner.generate(image, QUESTION, settings["max_tokens"])
            ttft = times[0] - t0
            decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None
            conn.send({**pieces, "ttft_s": ttft, "decode_tps": decode, "tokens": tokens,
                       "peak_rss_gb": peak_rss_gb(), "peak_gb": runner.peak_gb()})
    except Exception as e:  # reported to the driver, which says which implementation failed
        import traceback

        conn.send({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


# ---------------------------------------------------------------- the machine


def loadavg():
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]] if Path("/proc/loadavg").exists() \
        else list(os.getloadavg())


def busy_jiffies():
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def children_jiffies(pids):
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(stat[11]) + int(stat[12])
        except OSError:
            pass
    return total


def memory_bandwidth_gbs(device: str) -> float:
    """The best of a few full reads of a 512 MB float32 array, in GB/s: with
    all threads through torch on a CPU, with MLX on a GPU."""
    n = 128 * 2**20
    if device == "gpu":
        import mlx.core as mx

        x = mx.ones((n,))
        mx.eval(x)
        best = math.inf
        for _ in range(10):
            t = now()
            mx.eval(x.sum())
            best = min(best, now() - t)
        return 4 * n / best / 1e9
    try:
        import torch

        x = torch.ones(n)
        best = math.inf
        for _ in range(10):
            t = now()
            x.sum()
            best = min(best, now() - t)
        del x
    except ImportError:
        import numpy as np

        x = np.ones(n, np.float32)
        best = math.inf
        for _ in range(10):
            t = now()
            x.sum()
            best = min(best, now() - t)
    return 4 * n / best / 1e9


def decode_bytes(path: Path) -> int:
    """Bytes of language-model weights read to decode one token: every
    language-model tensor but the input embedding table (one row of it)."""
    import struct

    from mlx_llava.weights import weight_files

    total = 0
    for f in weight_files(path):  # the safetensors headers only
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, info in header.items():
            if name.startswith("language_model.") and "embed_tokens" not in name:
                start, end = info["data_offsets"]
                total += end - start
    return total


def machine() -> dict:
    import mlx.core as mx

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "mlx": mx.__version__, "mlx_device": str(mx.default_device())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        pass
    import mlx_llava.blas

    info["blas"] = mlx_llava.blas.loaded
    for package in ("torch", "transformers", "mlx_lm", "mlx_vlm"):
        try:
            info[package] = __import__(package).__version__
        except Exception:
            info[package] = None
    return info


# ---------------------------------------------------------------- the driver


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(name, rounds, prompt_tokens, bytes_per_token, bandwidth):
    keys = ("preprocess_s", "vision_s", "projector_s", "ttft_s", "decode_tps", "peak_rss_gb", "peak_gb")
    out = {k: median([r[k] for r in rounds]) for k in keys}
    out["peak_rss_gb"] = max(r["peak_rss_gb"] for r in rounds)
    out["prefill_s"] = out["ttft_s"] - out["preprocess_s"] - out["vision_s"] - out["projector_s"]
    out["prompt_tps"] = prompt_tokens / out["prefill_s"] if out["prefill_s"] > 0 else None
    roofline = bandwidth * 1e9 / bytes_per_token
    out["roofline_tps"] = roofline
    out["roofline_fraction"] = out["decode_tps"] / roofline if out["decode_tps"] else None
    out["rounds"] = [{k: v for k, v in r.items() if k != "tokens"} for r in rounds]
    out["tokens"] = rounds[-1]["tokens"]
    return out


def agreement(a, b):
    """Leading tokens in common, as a fraction of the longer list."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), len(b), 1)


ROWS = [
    ("time to first token (s)", "ttft_s", "{:.2f}", "lower"),
    ("  preprocessing (s)", "preprocess_s", "{:.3f}", "lower"),
    ("  vision tower (s)", "vision_s", "{:.2f}", "lower"),
    ("  projector (s)", "projector_s", "{:.3f}", "lower"),
    ("  prefill (s)", "prefill_s", "{:.2f}", "lower"),
    ("prompt tokens/s", "prompt_tps", "{:.1f}", "higher"),
    ("decode tokens/s", "decode_tps", "{:.2f}", "higher"),
    ("decode roofline fraction", "roofline_fraction", "{:.0%}", "higher"),
    ("peak memory, process RSS (GB)", "peak_rss_gb", "{:.2f}", "lower"),
    ("peak memory, MLX / CUDA (GB)", "peak_gb", "{:.2f}", "lower"),
]


def markdown(result) -> str:
    impls = list(result["results"])
    lines = [
        f"`{result['command']}`",
        "",
        f"{result['shape']} shape, {result['precision']}, prompt {result['prompt_tokens']} tokens "
        f"({result['visual_tokens']} visual), {result['max_tokens']} tokens greedy, medians of {result['rounds']} "
        f"interleaved rounds; load average before {result['load_before']}, after {result['load_after']}; "
        f"other processes kept {result['others_busy_cores']:.2f} cores busy on average during the run.",
        "",
        "| | " + " | ".join(impls) + " |",
        "|---|" + "---|" * len(impls),
    ]
    for label, key, fmt, _ in ROWS:
        cells = []
        for impl in impls:
            v = result["results"][impl].get(key)
            cells.append(fmt.format(v) if v is not None else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "mlx-llava" in impls:
        for peer in impls:
            if peer == "mlx-llava":
                continue
            cells = []
            for label, key, _, better in ROWS[:7]:
                a, b = result["results"]["mlx-llava"].get(key), result["results"][peer].get(key)
                if a and b:
                    cells.append(f"{label.strip()} {(b / a if better == 'lower' else a / b):.2f}x")
            lines.append("")
            lines.append(f"mlx-llava against {peer} (above 1: mlx-llava faster): " + ", ".join(cells) + ".")
    lines.append("")
    lines.append("Greedy tokens equal to transformers' (leading fraction): " + ", ".join(
        f"{k} {v:.0%}" for k, v in result["agreement"].items()) + ".")
    lines.append("BLAS under MLX: " + ", ".join(f"{k} {v}" for k, v in result["blas"].items() if k != "transformers")
                 + ("" if result.get("peer_blas") == "own" else " (mlx-vlm is given mlx-llava's, so both run the same kernels)")
                 + ".")
    lines.append(f"Decode roofline: {result['bytes_per_token'] / 1e9:.2f} GB of weights per token at "
                 f"{result['bandwidth_gbs']:.1f} GB/s = {result['roofline_tps']:.2f} tokens/s.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="1b")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="of the MLX copy (transformers stays float32 on a CPU)")
    p.add_argument("--impl", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--workdir", default=os.environ.get("MLX_LLAVA_BENCH", "~/.cache/mlx-llava-bench"))
    p.add_argument("--out", default=None, help="JSON result (default: benchmarks/results/inference-<shape>-<precision>.json)")
    p.add_argument("--max-load", type=float, default=1.0)
    p.add_argument("--force", action="store_true", help="time even on a busy machine (the load is recorded)")
    p.add_argument("--before", default=None, metavar="DIR",
                   help="also run mlx-llava from this checkout (e.g. a worktree of an older commit), "
                        "as the column mlx-llava-before")
    p.add_argument("--peer-blas", choices=("same", "own"), default="same",
                   help="mlx-vlm under mlx-llava's BLAS (same kernels: the default) or MLX's bundled one "
                        "(what `pip install mlx-vlm` gives on Linux)")
    p.add_argument("--label", default=None, help="a name for this run in the JSON and the table")
    args = p.parse_args(argv)

    load_before = loadavg()
    if load_before[0] > args.max_load and not args.force:
        raise SystemExit(f"the machine is busy (load average {load_before}): not timing; wait, or pass --force")

    workdir = Path(args.workdir).expanduser()
    hf = build_checkpoint(workdir / f"llava-{args.shape}-hf", args.shape)
    mlx_dir = mlx_copy(hf, args.precision)
    paths = {"hf": str(hf), "mlx": str(mlx_dir)}
    vision = SHAPES[args.shape][0]
    import mlx.core as mx

    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    bandwidth = memory_bandwidth_gbs(device)
    bytes_per_token = decode_bytes(mlx_dir)

    settings = {"precision": args.precision, "max_tokens": args.max_tokens, "image_size": vision["image_size"],
                "before": str(Path(args.before).resolve()) if args.before else None, "peer_blas": args.peer_blas}
    impls = list(args.impl) + (["mlx-llava-before"] if args.before else [])
    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    order = ["mlx-llava"] + [i for i in impls if i != "mlx-llava"] if "mlx-llava" in impls else impls
    ids, blas = None, {}
    for name in order:  # mlx-llava first: its prompt ids are everyone's
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(name, paths, {**settings, "ids": ids}, child), daemon=True)
        proc.start()
        reply = parent.recv()
        if "error" in reply:
            raise SystemExit(f"{name} failed to load: {reply['error']}\n{reply['traceback']}")
        ids = ids or reply["ids"]
        procs[name], conns[name] = proc, parent
        blas[name] = reply.get("blas")
        print(f"{name}: loaded in {reply['loaded_s']:.1f} s (BLAS {blas[name]})", file=sys.stderr)
    if ids is None:
        raise SystemExit("mlx-llava gives the prompt ids: include it in --impl")
    for name in order:
        conns[name].send("round")  # a warm-up round each, not counted
        reply = conns[name].recv()
        if "error" in reply:
            raise SystemExit(f"{name} failed: {reply['error']}\n{reply['traceback']}")

    rounds = {name: [] for name in order}
    loads = []
    busy0, total0 = busy_jiffies()
    ours0 = children_jiffies([p.pid for p in procs.values()]) + sum(os.times()[:2]) * 100
    t_start = now()
    for r in range(args.rounds):
        turn = order[r % len(order):] + order[: r % len(order)]
        for name in turn:
            loads.append(loadavg()[0])
            conns[name].send("round")
            reply = conns[name].recv()
            if "error" in reply:
                raise SystemExit(f"{name} failed: {reply['error']}\n{reply['traceback']}")
            rounds[name].append(reply)
            print(f"round {r + 1} {name}: ttft {reply['ttft_s']:.2f} s, vision {reply['vision_s']:.2f} s, "
                  f"decode {reply['decode_tps'] or 0:.2f} tok/s (load {loads[-1]:.2f})", file=sys.stderr)
    elapsed = now() - t_start
    busy1, total1 = busy_jiffies()
    ours1 = children_jiffies([p.pid for p in procs.values()]) + sum(os.times()[:2]) * 100
    for name in order:
        conns[name].send("stop")
        procs[name].join(timeout=30)
    cores = os.cpu_count() or 1
    others = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / max(total1 - total0, 1) * cores)

    results = {name: summarize(name, rounds[name], len(ids), bytes_per_token, bandwidth) for name in order}
    reference = results.get("transformers", {}).get("tokens")
    agree = {name: agreement(res["tokens"], reference) for name, res in results.items()
             if reference is not None and name != "transformers"}
    result = {
        "command": "python benchmarks/inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "label": args.label, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
        "shape": args.shape, "precision": args.precision, "rounds": args.rounds, "max_tokens": args.max_tokens,
        "prompt_tokens": len(ids), "visual_tokens": ids.count(IMAGE_TOKEN),
        "load_before": load_before, "load_after": loadavg(), "load_during_max": max(loads),
        "others_busy_cores": others, "elapsed_s": elapsed, "forced": args.force and load_before[0] > args.max_load,
        "bandwidth_gbs": bandwidth, "bytes_per_token": bytes_per_token,
        "roofline_tps": bandwidth * 1e9 / bytes_per_token,
        "results": results, "agreement": agree, "blas": blas, "before": args.before, "peer_blas": args.peer_blas,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"inference-{args.shape}-{args.precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import mlx_llava  # noqa: F401  (the system OpenBLAS before MLX, on Linux)

    main()
