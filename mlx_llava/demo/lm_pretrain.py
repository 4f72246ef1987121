"""A small LLaMA (mlx-lm's own model) pretrained on the world's text.

The stand-in for Vicuna: it learns the world's words and the chat format
from captions and text-only conversations, before LLaVA's two stages teach
it to look at images.
"""

import json
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.tokenizer_utils import load as load_tokenizer


def pretrain(texts, tokenizer_dir, path, hidden_size=256, num_layers=4, num_heads=4,
             intermediate_size=512, steps=600, batch_size=32, max_length=160, lr=2e-3,
             seed=0, log=print) -> Path:
    """Next-token prediction on `texts`; writes an mlx-lm model directory at `path`."""
    mx.random.seed(seed)
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    vocab = len(tokenizer._tokenizer)
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads, "intermediate_size": intermediate_size,
        "rms_norm_eps": 1e-5, "vocab_size": vocab, "max_position_embeddings": 512,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    }
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    sequences = [tokenizer.encode(t)[:max_length] for t in texts]
    rng = np.random.default_rng(seed)

    def loss_fn(model, ids, lengths):
        logits = model(ids[:, :-1])
        mask = mx.arange(ids.shape[1] - 1)[None] < (lengths[:, None] - 1)
        ce = nn.losses.cross_entropy(logits, ids[:, 1:]) * mask
        return ce.sum() / mask.sum()

    warmup = max(1, steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, lr, warmup), optim.cosine_decay(lr, steps - warmup, lr / 10)], [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    step_fn = nn.value_and_grad(model, loss_fn)
    tic = time.perf_counter()
    for step in range(steps):
        batch = [sequences[i] for i in rng.integers(0, len(sequences), batch_size)]
        width = max(len(s) for s in batch)
        ids = np.zeros((batch_size, width), np.int32)
        for row, s in enumerate(batch):
            ids[row, : len(s)] = s
        loss, grads = step_fn(model, mx.array(ids), mx.array([len(s) for s in batch]))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        if step % 100 == 0 or step == steps - 1:
            log(f"  language model step {step + 1}/{steps}: loss {loss.item():.3f} "
                f"({time.perf_counter() - tic:.0f}s)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer._tokenizer.save_pretrained(str(path))
    return path


def perplexity(path, texts) -> float:
    """For a quick check that pretraining did something."""
    from mlx_lm import load

    model, tokenizer = load(str(path))
    total, count = 0.0, 0
    for t in texts:
        ids = mx.array([tokenizer.encode(t)])
        logits = model(ids[:, :-1])
        total += nn.losses.cross_entropy(logits, ids[:, 1:]).sum().item()
        count += ids.shape[1] - 1
    return math.exp(total / max(count, 1))
