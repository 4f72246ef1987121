"""Load on `mlx-llava serve`: 1, 4 and 16 concurrent clients, and a 500-request soak.

Starts `mlx-llava serve` in a child process on a free loopback port, then
for each concurrency sends a fixed number of streaming chat requests (each
with its own held-out image and question, greedy, `max_tokens` fixed) from
that many client threads, and reports requests/s, generated tokens/s, p50
and p95 time to first token, the server's batch sizes and its peak memory
(VmHWM of the process; MLX's own peak from /stats). Every request must end
with [DONE] or a clean 503; anything else counts as lost. The soak sends
500 requests from 16 clients to a server with a short queue (so some are
refused and retried after Retry-After) and samples the server's resident
memory every 50 requests.

    python benchmarks/serve_load.py                        # the demo model
    python benchmarks/serve_load.py --model 1b             # a 1B-shaped checkpoint, built once (random weights)
    python benchmarks/serve_load.py --soak 500             # + the memory soak

The 1B shape: LLaMA as TinyLlama-1.1B (width 2048, 22 layers, 32 heads, 4
KV heads, MLP 5632, vocabulary 32000) with the CLIP ViT-L/14 vision tower at
224 px (256 visual tokens, LLaVA v1's), float32, the demo model's tokenizer.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def build_1b(folder: Path) -> Path:
    if (folder / "config.json").exists():
        return folder
    import mlx_llava  # noqa: F401  (the system BLAS first)
    from mlx_llava.weights import build_model, default_model, save_model

    demo = default_model()
    config = json.loads((demo / "config.json").read_text())
    config["text_config"].update(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                                 intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048,
                                 tie_word_embeddings=False)
    config["vision_config"].update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)
    model = build_model(config)
    pre = json.loads((demo / "preprocessor_config.json").read_text())
    pre.update(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    files = {name: (demo / name).read_text() for name in ("tokenizer.json", "tokenizer_config.json")}
    files["preprocessor_config.json"] = json.dumps(pre, indent=2)
    save_model(folder, model, config, extra_files=files)
    return folder


class Server:
    def __init__(self, model, *flags):
        cmd = [sys.executable, "-m", "mlx_llava.cli", "serve", "--port", "0", "--log-level", "warning", *flags]
        if model:
            cmd += ["--model", str(model)]
        self.process = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        line = self.process.stderr.readline()
        if " on http://" not in line:
            raise SystemExit(f"the server did not start: {line}{self.process.stderr.read()}")
        self.url = line.split(" on ")[1].split()[0]
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep the pipe drained

    def memory(self) -> dict:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        get = {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in status.splitlines())
               if k in ("VmRSS", "VmHWM")}
        return {"rss": get["VmRSS"], "hwm": get["VmHWM"]}

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats").json()

    def stop(self):
        self.process.terminate()
        self.process.wait(60)


def workload(n: int, images: int = 0, offset: int = 0):
    """`n` chat requests, each a held-out question about its own image (k >= 40: the
    image turned 5 degrees more per round, so its pixels differ) or, with `images`, about one of that many."""
    import base64
    import io

    from PIL import Image

    from mlx_llava.demo import heldout_dir
    from mlx_llava.eval import load_questions

    qs = load_questions(heldout_dir() / "questions.json")
    out = []
    for k in range(offset, offset + n):
        q = qs[k % len(qs)]
        picture = qs[k % images] if images else q
        image = Image.open(heldout_dir() / "images" / picture["image"]).rotate(5 * (k // len(qs)))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": q["question"].split("\n")[0]}]}])
    return out


def one(client: httpx.Client, url: str, messages, max_tokens: int, retry: bool) -> dict:
    """One streaming request: {status, ttft, seconds, tokens, refused (503s), done}."""
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    refused, start = 0, time.perf_counter()
    while True:
        first, tokens, done = None, 0, False
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code == 503 and retry:
                refused += 1
                r.read()
                time.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            if r.status_code != 200:
                r.read()
                return {"status": r.status_code, "refused": refused, "done": False}
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                        first = time.perf_counter()
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
        end = time.perf_counter()
        return {"status": 200, "ttft": (first or end) - start, "seconds": end - start, "tokens": tokens,
                "refused": refused, "done": done}


def level(server: Server, requests, clients: int, max_tokens: int, retry: bool = False, sample=None) -> dict:
    before = server.stats()
    results, lock, index = [], threading.Lock(), [0]

    def client_loop():
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if index[0] >= len(requests):
                        return
                    k = index[0]
                    index[0] += 1
                r = one(client, server.url, requests[k], max_tokens, retry)
                with lock:
                    results.append(r)
                    if sample is not None and len(results) % 50 == 0:
                        sample(len(results))

    tic = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    after = server.stats()
    ok = [r for r in results if r["status"] == 200 and r["done"]]
    ttft = sorted(r["ttft"] for r in ok)
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    steps = sum(sizes.values())
    return {
        "clients": clients, "requests": len(requests), "answered": len(ok),
        "refused_503_then_retried": sum(r["refused"] for r in results),
        "failed": [r for r in results if r["status"] != 200 or not r["done"]],
        "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 2),
        "tokens": sum(r["tokens"] for r in ok), "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
        "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 3) if ttft else None,
        "mean_batch": round(sum(k * v for k, v in sizes.items()) / steps, 2) if steps else 0,
        "max_batch": max((k for k, v in sizes.items() if v), default=0),
        "server_peak_rss_gb": round(server.memory()["hwm"] / 1e9, 2),
        "mlx_peak_gb": round(after["peak_memory_bytes"] / 1e9, 2),
    }


def main():
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, 1b, or a model folder")
    parser.add_argument("--requests", type=int, default=None, help="requests per concurrency (default: 48; 1b: 16)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: 32; 1b: 16")
    parser.add_argument("--images", type=int, default=0,
                        help="distinct images among the requests (0: one each; they then share nothing but the "
                             "system message in the prefix cache)")
    parser.add_argument("--soak", type=int, default=0, help="requests in the memory soak (0: none)")
    parser.add_argument("--workdir", default="/tmp/mlx-llava-serve-bench")
    parser.add_argument("--output", default=None, help="append the results (JSON) to this file")
    args = parser.parse_args()
    big = args.model == "1b"
    model = None if args.model == "demo" else build_1b(Path(args.workdir) / "llava-1b") if big else args.model
    n = args.requests or (16 if big else 48)
    max_tokens = args.max_tokens or (16 if big else 32)
    report = {"model": args.model, "images": args.images or "one per request", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, "
              f"{os.cpu_count()} cores", "load_average_before": os.getloadavg(), "max_tokens": max_tokens,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "levels": []}
    server = Server(model, "--max-batch", "16", "--max-queue", "64")
    try:
        report["server_rss_idle_gb"] = round(server.memory()["rss"] / 1e9, 2)
        level(server, workload(2, offset=1000), 1, 4)  # warm up, on images of its own
        for i, clients in enumerate(int(c) for c in args.clients.split(",")):
            result = level(server, workload(n, args.images, offset=0 if args.images else i * n), clients, max_tokens)
            report["levels"].append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "failed"}), flush=True)
    finally:
        server.stop()
    if args.soak:
        server = Server(model, "--max-batch", "8", "--max-queue", "4")
        samples = []
        try:
            level(server, workload(8, offset=1000), 4, 8)  # warm up
            samples.append((0, round(server.memory()["rss"] / 1e6)))
            result = level(server, workload(args.soak), 16, max_tokens, retry=True,
                           sample=lambda done: samples.append((done, round(server.memory()["rss"] / 1e6))))
            result["rss_mb_by_requests_done"] = samples
            report["soak"] = result
            print(json.dumps({k: v for k, v in result.items() if k != "failed"}), flush=True)
        finally:
            server.stop()
    report["load_average_after"] = os.getloadavg()
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
