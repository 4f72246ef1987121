"""LLaVA's two training stages, as one loop.

The stages differ only in what learns and which template makes the targets
(`config.STAGES`); `setup.setup` prepares a run, this module steps it. The
loss covers assistant tokens only and is averaged over every target token of
the global batch, however it is split into micro-batches and processes, so
1 process x 4 micro-batches and 2 processes x 2 give the same step.

A micro-batch's forward and backward pass is compiled (`mx.compile`): MLX
then fuses its elementwise work and skips rebuilding the graph every step.
Batches are padded to a few widths (and their target positions to a few
counts) so that only a handful of shapes are ever compiled.
"""

import json
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..conversation import IGNORE_INDEX
from ..errors import LlavaError
from ..image import load_image
from . import checkpoint
from .config import TrainConfig
from .data import Dataset, epoch_batches, pad, skip_summary
from .features import image_features
from .monitor import ProgressBar, plot_loss
from .setup import Run, current_lr, resume_settings, setup, trainable_count

WIDTH_STEP = 32  # batches are padded to a multiple of this many tokens
TARGET_STEP = 64  # and their target positions (and AnyRes token layouts) to a multiple of this many
CROP_STEP = 4  # AnyRes: a micro-batch's crops, to a multiple of this many


def train(config: TrainConfig = None, on_step=None, **kwargs) -> dict:
    """Run stage 1 or 2 as `config` (or keyword arguments) says; return a summary.

    `on_step(step, loss)` is called after each optimizer step (for callers
    that watch or stop the run).
    """
    cfg = config if config is not None else TrainConfig(**kwargs)
    lead = mx.distributed.init().rank() == 0
    say = print if lead and cfg.progress else (lambda *a, **k: None)
    run = setup(cfg, say)
    world = run.group.size()
    say(f"stage {cfg.stage} ({cfg.method}, template {run.conv_mode}): {len(run.data.examples)} examples, "
        f"{run.total} steps of {cfg.batch_size} ({world} process(es) x {run.accum} micro-batches of "
        f"{run.micro}), {trainable_count(run.model) / 1e6:.2f}M trainable parameters")
    losses = loop(run, lead, on_step)

    out, data = Path(cfg.output), run.data
    summary = {"steps": run.total, "examples": len(data.examples), "skipped": data.skipped,
               "truncated": data.truncated, "unplaced": data.unplaced, "conv_mode": run.conv_mode,
               "final_loss": losses[-1][1] if losses else None}
    if lead:
        save_outputs(out, run)
        plot_loss(read_losses(out / "log.jsonl"), out / "loss.png")
        if data.skipped:
            say(f"skipped {len(data.skipped)} record(s): {skip_summary(data.skipped)}; e.g. "
                + ", ".join(f"{i} ({why})" for i, why in data.skipped[:5])
                + (" ..." if len(data.skipped) > 5 else ""))
        if data.unplaced:
            say(f"{len(data.unplaced)} record(s) have an image but no <image> placeholder: trained as text, "
                "their image unseen, as the original does (" + ", ".join(data.unplaced[:5])
                + (" ..." if len(data.unplaced) > 5 else "") + ")")
        if data.truncated:
            say(f"truncated {data.truncated} example(s) to --max-length {cfg.max_length}")
        say(f"wrote {out}")
    return summary


def loop(run: Run, lead: bool, on_step=None) -> list:
    """The optimizer steps from `run.start` to `run.total`; -> [(step, loss)]."""
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    rank, world = run.group.rank(), run.group.size()
    out = Path(cfg.output)
    lengths = run.lengths
    micro_step = make_micro_step(model, cfg.compile)
    log = open_log(out / "log.jsonl", run.start) if lead else None
    losses, batches, epoch_cached = [], None, None
    bar = ProgressBar(run.total, run.start) if lead and cfg.progress else None
    model.train()
    try:
        for step in range(run.start, run.total):
            epoch, index = divmod(step, run.per_epoch)
            if epoch != epoch_cached:
                batches = epoch_batches(lengths, cfg.batch_size, run.accum * world, cfg.seed, epoch,
                                        cfg.group_by_length)
                epoch_cached = epoch
            mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout: a function of the step, so resumes match
            tic = time.perf_counter()
            grads, loss_sum, tokens = None, mx.array(0.0), mx.array(0.0)
            read = 0  # every token the language model reads on this process, visual ones included
            for ids in batches[index][rank * run.accum:(rank + 1) * run.accum]:
                read += sum(lengths[i] for i in ids)
                batch = make_batch(model, run.processor, run.data, ids, run.features, cfg.vision_tower_lr is not None)
                if batch is None:
                    continue
                (l, n), g = micro_step(*batch)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                loss_sum, tokens = loss_sum + l, tokens + n
                mx.eval(grads, loss_sum, tokens)
            if grads is None:
                grads = tree_map(mx.zeros_like, model.trainable_parameters())
            if world > 1:
                grads, loss_sum, tokens, read = all_sum(grads, loss_sum, tokens, read, run.group)
            scale = 1.0 / mx.maximum(tokens, 1).astype(mx.float32)
            grads = tree_map(lambda g: g * scale.astype(g.dtype), grads)
            if cfg.max_grad_norm:
                grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            lr = current_lr(optimizer)
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state)
            loss = (loss_sum / mx.maximum(tokens, 1)).item()
            seconds = time.perf_counter() - tic
            losses.append((step + 1, loss))
            record = {"step": step + 1, "loss": round(loss, 6), "learning_rate": lr,
                      "tokens_per_second": round(read / seconds, 1),  # all tokens read, visual included
                      "trained_tokens": int(tokens.item()),  # the answer tokens the loss covers
                      "samples_per_second": round(cfg.batch_size / seconds, 2),
                      "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3)}
            if run.val is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                model.eval()
                record["val_loss"] = round(evaluate(model, run.processor, run.val, run.micro, run.features,
                                                    cfg.vision_tower_lr is not None), 6)
                model.train()
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar:
                bar.advance(loss)
            if lead and (step + 1) % cfg.save_every == 0 and step + 1 < run.total:
                checkpoint.save(out / "checkpoints", step + 1, model, optimizer,
                                {"epoch": epoch, "loss": loss, "settings": resume_settings(cfg.to_dict(), run.lora)},
                                cfg.keep)
            if on_step:
                on_step(step + 1, loss)
    finally:
        if bar:
            bar.close()
        if log:
            log.close()
    model.eval()
    return losses


# ---------------------------------------------------------------- the step


def loss_fn(model, input_ids, positions, targets, weights, vision, layout):
    """(sum of token cross-entropies over the targets, number of targets).

    `positions` index the flattened (batch x length) hidden states that
    predict `targets`; padding positions have weight 0. Logits are computed
    there only: the vocabulary projection and its softmax are the costliest
    part of a small model's step, and most tokens (system prompt, questions,
    image) have no target. `vision` is the frozen vision tower's features
    (images or crops, T, C), or pixels (N, H, W, 3) when it trains; with
    AnyRes, `layout` is the token index (`anyres.py`) that lays the crops'
    projected features out as visual tokens (empty otherwise).
    """
    visual = None
    if vision.shape[0]:
        features = model.vision_features(vision) if vision.ndim == 4 else vision
        visual = model.multi_modal_projector(features)
        if layout.shape[0]:
            visual = model.lay_out(visual, layout)
    embeds = model.embed(input_ids, image_features=visual, check=False)
    lm = model.language_model
    if getattr(lm, "model_type", None) in PLAIN_HEAD:
        hidden = lm.model(input_ids, input_embeddings=embeds)
        picked = hidden.reshape(-1, hidden.shape[-1])[positions]
        head = lm.lm_head if hasattr(lm, "lm_head") else lm.model.embed_tokens.as_linear
        logits = head(picked)
    else:
        logits = lm(input_ids, input_embeddings=embeds)
        logits = logits.reshape(-1, logits.shape[-1])[positions]
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * weights
    return ce.sum(), weights.sum()


# Language models whose logits are just the head applied to the last hidden
# state (no soft-capping or scaling), so the head can skip untrained positions.
PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3"}


def make_micro_step(model, compiled: bool = True):
    """One micro-batch's ((loss sum, targets), gradients), compiled unless told
    not to. The compiled function reads the model's weights and the random
    state (LoRA dropout), and advances the random state.""" 
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step(*batch):
        return loss_and_grad(model, *batch)

    if not compiled:
        return step
    # value_and_grad puts the traced weights into the model: they are outputs too.
    state = [model.state, mx.random.state]
    return partial(mx.compile, inputs=state, outputs=state)(step)


def all_sum(grads, loss_sum, tokens, read: int, group):
    """Sum the step's gradients and counts over the processes, the gradients
    in one all-reduce (`nn.average_gradients` concatenates them): a call per
    parameter costs milliseconds each, more than a small model's step."""
    world = group.size()
    grads = tree_map(lambda g: g * world, nn.average_gradients(grads, group))
    counts = mx.distributed.all_sum(
        mx.stack([loss_sum.astype(mx.float32), tokens.astype(mx.float32), mx.array(read, mx.float32)]), group=group)
    return grads, counts[0], counts[1], int(counts[2].item())


# ---------------------------------------------------------------- batches


def make_batch(model, processor, data: Dataset, indices, features=None, pixels: bool = False):
    """-> (input_ids, positions, targets, weights, vision, layout) or None (see
    `loss_fn`); with `pixels` (a vision tower that trains) the images' pixels
    in place of their features. An example whose image cannot be read is
    dropped (and recorded), never fatal."""
    examples, feats, sizes = [], [], []
    anyres = processor.anyres
    for i in indices:
        e = data.examples[i]
        if e.image is not None:
            f = image_pixels(processor, e.image) if pixels else image_features(model, processor, e.image, features)
            if f is None:
                data.skipped.append((e.id, f"cannot read image {e.image}"))
                continue
            f = f.reshape((-1,) + f.shape[-2 if not pixels else -3:])  # (crops, ...) for both kinds
            if anyres is not None and f.shape[0] != anyres.crops(e.image_size):
                data.skipped.append((e.id, f"image {e.image} changed since it was prepared"))
                continue
            feats.append(f)
            sizes.append(e.image_size)
        examples.append(e)
    if not examples:
        return None
    ids, labels = pad(examples, multiple=WIDTH_STEP)
    rows, cols = np.nonzero(labels[:, 1:] != IGNORE_INDEX)  # position t predicts label t + 1
    n = len(rows)
    size = -(-max(n, 1) // TARGET_STEP) * TARGET_STEP
    positions = np.zeros(size, np.int32)
    positions[:n] = rows * ids.shape[1] + cols
    targets = np.zeros(size, np.int32)
    targets[:n] = labels[rows, cols + 1]
    weights = np.zeros(size, np.float32)
    weights[:n] = 1.0
    layout = np.zeros((0,), np.int32)
    if feats:
        vision = mx.concatenate(feats)
        if anyres is not None:  # pad crops and tokens to a few shapes, as the text is
            layout = anyres.batch_index(sizes)
            layout = np.pad(layout, (0, -len(layout) % TARGET_STEP))
            vision = mx.pad(vision, [(0, -vision.shape[0] % CROP_STEP)] + [(0, 0)] * (vision.ndim - 1))
        vision = vision if pixels else mx.stop_gradient(vision)
    elif pixels:  # no image in the micro-batch: an empty array keeps one call signature
        size = processor.image_config.crop_size
        vision = mx.zeros((0, size[0], size[1], 3))
    else:
        dims = model.vision_tower.config.hidden_size * len(model.args.feature_layers)
        vision = mx.zeros((0, processor.num_visual_tokens, dims))
    return (mx.array(ids), mx.array(positions), mx.array(targets), mx.array(weights), vision,
            mx.array(layout))


def image_pixels(processor, path):
    """One image's pixels ((crops or 1), H, W, 3), or None when it cannot be read."""
    try:
        return processor.preprocess([load_image(path)])
    except LlavaError:
        return None


def evaluate(model, processor, data: Dataset, micro: int, features=None, pixels: bool = False) -> float:
    """Token-averaged loss over a whole dataset."""
    total, count = 0.0, 0.0
    for start in range(0, len(data.examples), micro):
        batch = make_batch(model, processor, data, range(start, min(start + micro, len(data.examples))), features,
                           pixels)
        if batch is not None:
            l, n = loss_fn(model, *batch)
            total, count = total + l.item(), count + n.item()
    return total / max(count, 1)


# ---------------------------------------------------------------- outputs


def save_outputs(out: Path, run: Run):
    """Stage 1: projector.safetensors + a complete model in model/. Stage 2:
    LoRA adapters (mlx-lm's format) + the projector beside them, or, full,
    a complete model in model/. Every file lands atomically."""
    from ..atomic import write_safetensors, write_text
    from ..weights import save_model

    model, cfg = run.model, run.cfg
    projector = {f"multi_modal_projector.{k}": v
                 for k, v in tree_flatten(model.multi_modal_projector.parameters())}
    if "image_newline" in model:
        projector["image_newline"] = model.image_newline
    write_safetensors(out / "projector.safetensors", projector)
    if run.lora is not None:
        adapters = {k: v for k, v in tree_flatten(model.language_model.trainable_parameters())}
        write_safetensors(out / "adapters.safetensors", adapters)
        if cfg.vision_tower_lr is not None:  # beside the adapters, as the projector is
            write_safetensors(out / "vision_tower.safetensors",
                              {f"vision_tower.{k}": v for k, v in tree_flatten(model.vision_tower.parameters())})
        adapter_config = {"fine_tune_type": "lora", **run.lora, "base_model": cfg.model,
                          "conv_mode": cfg.conv_mode}
        write_text(out / "adapter_config.json", json.dumps(adapter_config, indent=2))
    else:
        config = {**run.model_config, "conv_mode": run.model_config.get("conv_mode") or run.processor.conv_mode}
        save_model(out / "model", model, config, run.processor, overwrite=True)


def open_log(path: Path, start: int):
    """The JSONL log, keeping only what a resumed run has not redone."""
    kept = read_losses(path, raw=True) if path.exists() else []
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept if r["step"] <= start)
    return open(path, "a")


def read_losses(log_path: Path, raw: bool = False) -> list:
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    return rows if raw else [(r["step"], r["loss"]) for r in rows]
