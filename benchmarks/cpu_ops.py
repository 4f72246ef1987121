"""Where a small model's training step goes on MLX's Linux CPU backend.

Times the pieces of one forward pass of the demo model's stage-2 step (batch
8 of about 190 tokens, width 128, MLP 384, 4 heads, vocabulary 1024), each on
its own, and how much CPU time each takes per second of wall time (2.0 = both
cores busy). Run: `python benchmarks/cpu_ops.py`.
"""

import mlx_llava  # noqa: F401  (loads the system OpenBLAS first on Linux)

import resource
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

B, T, H, I, HEADS, V = 8, 189, 128, 384, 4, 1024


def measure(f, n=20):
    mx.eval(f())
    r0, tic = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n):
        mx.eval(f())
    wall = (time.perf_counter() - tic) / n
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / n
    return wall * 1e3, cpu / wall


def main():
    x = mx.random.normal((B, T, H))
    w = mx.random.normal((I, H))
    h = mx.random.normal((B, T, I))
    q = mx.random.normal((B, HEADS, T, H // HEADS))
    q2 = mx.random.normal((B, 2, T, H // 2))
    logits = mx.random.normal((B * T, V))
    targets = mx.random.randint(0, V, (B * T,))
    few = logits[: B * T // 5]
    mx.eval(x, w, h, q, q2, logits, targets, few)
    rows = [
        ("matmul (B*T x 128) @ (128 x 384)", lambda: x @ w.T),
        ("exp over B*T x 384", lambda: mx.exp(h)),
        ("silu over B*T x 384 (one MLP)", lambda: nn.silu(h)),
        ("attention, 4 heads (causal sdpa)", lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=0.2, mask="causal")),
        ("attention, 2 heads of 64", lambda: mx.fast.scaled_dot_product_attention(q2, q2, q2, scale=0.1, mask="causal")),
        ("cross-entropy, every position", lambda: nn.losses.cross_entropy(logits, targets).sum()),
        ("cross-entropy, 1 position in 5", lambda: nn.losses.cross_entropy(few, targets[: few.shape[0]]).sum()),
    ]
    print("| piece | ms | CPU cores busy |\n|---|---|---|")
    for name, f in rows:
        ms, cores = measure(f)
        print(f"| {name} | {ms:.1f} | {cores:.1f} |")
    a = np.array(h)
    tic = time.perf_counter()
    for _ in range(20):
        np.exp(a)
    print(f"| numpy exp over B*T x 384 (for scale) | {(time.perf_counter() - tic) / 20 * 1e3:.1f} | 1.0 |")


if __name__ == "__main__":
    main()
