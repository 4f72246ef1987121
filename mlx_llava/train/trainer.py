"""LLaVA's two training stages, as one loop.

Stage 1 (feature alignment) and stage 2 (instruction tuning) differ only in
which parameters learn and which template makes the targets:

- stage 1: the projector alone; `plain` template (image, then caption).
- stage 2: projector + language model (full, LoRA or QLoRA); the model's
  conversation template. The vision tower is frozen in both.

The loss covers assistant tokens only and is averaged over every target token
of the global batch, however it is split into micro-batches and processes,
so 1 process x 4 micro-batches and 2 processes x 2 give the same step.
"""

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..conversation import IGNORE_INDEX
from ..errors import LlavaError, write_failure
from ..image import load_image
from . import checkpoint
from .config import TrainConfig, flag
from .data import Dataset, epoch_batches, pad, prepare, skip_summary
from .features import FeatureCache
from .report import plot_loss


def train(config: TrainConfig = None, on_step=None, **kwargs) -> dict:
    """Run stage 1 or 2 as `config` (or keyword arguments) says; return a summary.

    `on_step(step, loss)` is called after each optimizer step (for callers
    that watch or stop the run).
    """
    cfg = config if config is not None else TrainConfig(**kwargs)
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    out = Path(cfg.output)
    lead = rank == 0
    say = print if lead and cfg.progress else (lambda *a, **k: None)

    # ---- model: what learns
    mx.random.seed(cfg.seed)  # new layers (projector, LoRA) start the same on every rank and run
    model, model_config, processor = load_base(cfg)
    lora = setup_trainable(model, cfg)
    conv_mode = "plain" if cfg.stage == 1 else (cfg.conv_mode or processor.conv_mode)

    # ---- data
    def load_data(path):
        return prepare(path, processor.tokenizer, conv_mode, processor.image_token_index,
                       processor.num_visual_tokens, cfg.image_folder, cfg.max_length)

    data = load_data(cfg.data)
    val = load_data(cfg.val_data) if cfg.val_data else None
    features = FeatureCache(cfg.cache_features, model, processor.image_config) if cfg.cache_features else None
    if features is not None:
        fill_cache(features, model, processor, [data] + ([val] if val else []), lead and cfg.progress)
    micro, accum = split_batch(cfg.batch_size, world, cfg.grad_accum)
    per_epoch = len(data.examples) // cfg.batch_size
    if per_epoch == 0:
        why = f"; skipped {len(data.skipped)}: {skip_summary(data.skipped)}" if data.skipped else ""
        raise LlavaError(
            f"{cfg.data} has {len(data.examples)} usable examples, fewer than one global batch "
            f"(--batch-size {cfg.batch_size}){why}"
        )
    total = cfg.iters or max(1, math.ceil(cfg.epochs * per_epoch))
    lengths = [len(e.input_ids) for e in data.examples]

    # ---- optimizer and schedule
    optimizer = make_optimizer(cfg, total)
    optimizer.init(model.trainable_parameters())
    start = 0
    if cfg.resume:
        found = checkpoint.checkpoints(out / "checkpoints")
        if found:
            check_resume(found[-1], cfg, lora)
            start = checkpoint.load(found[-1], model, optimizer)["step"]
            say(f"resuming from {found[-1]} (step {start})")
        else:
            say(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from scratch")
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    say(f"stage {cfg.stage} ({cfg.method}): {len(data.examples)} examples, {total} steps of "
        f"{cfg.batch_size} ({world} process(es) x {accum} micro-batches of {micro}), "
        f"{trainable / 1e6:.2f}M trainable parameters")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    log = open_log(out / "log.jsonl", start) if lead else None
    losses, batches, epoch_cached = [], None, None
    bar = progress_bar(total, start) if lead and cfg.progress else None
    model.train()
    try:
        for step in range(start, total):
            epoch, index = divmod(step, per_epoch)
            if epoch != epoch_cached:
                batches = epoch_batches(lengths, cfg.batch_size, accum * world, cfg.seed, epoch, cfg.group_by_length)
                epoch_cached = epoch
            mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout: a function of the step, so resumes match
            tic = time.perf_counter()
            grads, loss_sum, tokens = None, mx.array(0.0), mx.array(0)
            read = 0  # every token the language model reads on this process, visual ones included
            for ids in batches[index][rank * accum:(rank + 1) * accum]:
                read += sum(lengths[i] for i in ids)
                batch = make_batch(model, processor, data, ids, features)
                if batch is None:
                    continue
                (l, n), g = loss_and_grad(model, *batch)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                loss_sum, tokens = loss_sum + l, tokens + n
                mx.eval(grads, loss_sum, tokens)
            if grads is None:
                grads = tree_map(mx.zeros_like, model.trainable_parameters())
            if world > 1:
                grads, loss_sum, tokens, read = all_sum(grads, loss_sum, tokens, read, group)
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
                      "trained_tokens": tokens.item(),  # the answer tokens the loss covers
                      "samples_per_second": round(cfg.batch_size / seconds, 2),
                      "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3)}
            if val is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                model.eval()
                record["val_loss"] = round(evaluate(model, processor, val, micro, features), 6)
                model.train()
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar:
                bar.advance(loss)
            if lead and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                checkpoint.save(out / "checkpoints", step + 1, model, optimizer,
                                {"epoch": epoch, "loss": loss, "settings": resume_settings(cfg.to_dict(), lora)},
                                cfg.keep)
            if on_step:
                on_step(step + 1, loss)
    finally:
        if bar:
            bar.close()
        if log:
            log.close()

    model.eval()
    summary = {"steps": total, "examples": len(data.examples), "skipped": data.skipped,
               "truncated": data.truncated, "final_loss": losses[-1][1] if losses else None}
    if lead:
        save_outputs(out, model, model_config, processor, cfg, lora)
        plot_loss(read_losses(out / "log.jsonl"), out / "loss.png")
        if data.skipped:
            say(f"skipped {len(data.skipped)} record(s): {skip_summary(data.skipped)}; e.g. "
                + ", ".join(f"{i} ({why})" for i, why in data.skipped[:5])
                + (" ..." if len(data.skipped) > 5 else ""))
        if data.truncated:
            say(f"truncated {data.truncated} example(s) to --max-length {cfg.max_length}")
        say(f"wrote {out}")
    return summary


# ---------------------------------------------------------------- resuming

# The settings a checkpoint's tensors depend on: resuming with others would
# load weights of other shapes, or of another model, and end in adapters
# that cannot be used.
RESUME_SETTINGS = ("stage", "method", "lora_rank", "lora_layers", "qlora_bits", "projector_type",
                   "model", "language_model", "vision_tower")
PATHS = ("model", "language_model", "vision_tower")


def resume_settings(cfg: dict, lora=None) -> dict:
    """`lora`: setup_trainable's answer, whose num_layers is the blocks
    adapted, so that --lora-layers -1 and its number agree."""
    settings = {k: cfg.get(k) for k in RESUME_SETTINGS}
    if lora is not None:
        settings["lora_layers"] = lora["num_layers"]
    if settings["method"] not in ("lora", "qlora"):
        del settings["lora_rank"], settings["lora_layers"]
    if settings["method"] != "qlora":
        del settings["qlora_bits"]
    if settings["model"]:
        del settings["projector_type"]  # the model's own
    for k in PATHS:
        if settings.get(k) and Path(settings[k]).expanduser().exists():
            settings[k] = str(Path(settings[k]).expanduser().resolve())
    return settings


def check_resume(path: Path, cfg: TrainConfig, lora=None):
    """Refuse to resume from a checkpoint made with other settings, naming the
    first that differs. An older checkpoint without its settings is compared
    with the run folder's train_config.json (paths aside: they were relative
    to another working directory, perhaps)."""
    old = checkpoint.state(path).get("settings")
    compare_paths = old is not None
    if old is None:
        saved = path.parent.parent / "train_config.json"
        if not saved.exists():
            return
        try:
            old = resume_settings(json.loads(saved.read_text()))
        except ValueError:
            return
    new = resume_settings(cfg.to_dict(), lora)
    for key in RESUME_SETTINGS:
        if key in PATHS and not compare_paths or key == "lora_layers" and -1 in (old.get(key), new.get(key)):
            continue
        if key in old or key in new:
            if old.get(key) != new.get(key):
                def show(value):
                    return f"--{value}" if key == "method" else f"--{flag(key)} {value}"

                raise LlavaError(
                    f"cannot resume from {path}: it was made with {show(old.get(key))}, this run with "
                    f"{show(new.get(key))} (resume with the same settings, or train into a new --output)"
                )


# ---------------------------------------------------------------- the model


def load_base(cfg: TrainConfig):
    """The model to train: an existing LLaVA directory, or one assembled from parts."""
    from ..processor import Processor
    from ..weights import assemble, load_model, resolve

    if cfg.model:
        path = resolve(cfg.model)
        model, config = load_model(path)
        return model, config, Processor.from_dir(path, config)
    return assemble(cfg.language_model, cfg.vision_tower, cfg.projector_type, cfg.conv_mode)


def setup_trainable(model, cfg: TrainConfig):
    """Freeze what the stage keeps fixed. Returns the LoRA settings, if any."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    lora = None
    if cfg.method in ("lora", "qlora"):
        lm = model.language_model
        if cfg.method == "qlora":
            # QLoRA: the frozen base in low precision, the adapters in full.
            nn.quantize(lm, group_size=64, bits=cfg.qlora_bits,
                        class_predicate=lambda p, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0)
        layers = len(lm.layers) if cfg.lora_layers < 0 else cfg.lora_layers
        if layers > len(lm.layers):
            raise LlavaError(f"--lora-layers {layers}: the language model has {len(lm.layers)} blocks")
        lora = {"rank": cfg.lora_rank, "scale": cfg.lora_alpha / cfg.lora_rank, "dropout": cfg.lora_dropout}
        linear_to_lora_layers(lm, layers, lora)
        lora = {"num_layers": layers, "lora_parameters": lora}
        if cfg.method == "qlora":
            lora["quantized_base"] = {"group_size": 64, "bits": cfg.qlora_bits}
    elif cfg.method == "full":
        model.language_model.unfreeze()
    model.multi_modal_projector.unfreeze()
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.language_model.layers[0])
    return lora


def loss_fn(model, input_ids, labels, vision_features):
    """(sum of token cross-entropies over the targets, number of targets)."""
    visual = model.multi_modal_projector(vision_features) if vision_features is not None else None
    embeds = model.embed(input_ids, image_features=visual)
    lm = model.language_model
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if getattr(lm, "model_type", None) not in PLAIN_HEAD:
        logits = lm(input_ids, input_embeddings=embeds)[:, :-1].astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, mx.where(mask, targets, 0)) * mask
        return ce.sum(), mask.sum()
    # Logits only where there is a target: the vocabulary projection and its
    # softmax are the costliest part of a small model's step, and most tokens
    # (system prompt, questions, image) have none.
    where = mx.array(np.flatnonzero(np.array(mask)))
    hidden = lm.model(input_ids, input_embeddings=embeds)[:, :-1]
    picked = hidden.reshape(-1, hidden.shape[-1])[where]
    head = lm.lm_head if hasattr(lm, "lm_head") else lm.model.embed_tokens.as_linear
    ce = nn.losses.cross_entropy(head(picked).astype(mx.float32), targets.reshape(-1)[where])
    return ce.sum(), mx.array(where.size)


# Language models whose logits are just the head applied to the last hidden
# state (no soft-capping or scaling), so the head can skip untrained positions.
PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3"}


def make_optimizer(cfg: TrainConfig, total: int):
    """AdamW, cosine with linear warmup (as transformers' Trainer schedules it);
    the projector in a group of its own when its learning rate differs. With
    `optimizer="muon"`, Muon updates the weight matrices (every 2-D weight but
    the embeddings and the head, as its authors advise; the projector's too,
    so `projector_lr` then sets only its biases) at `muon_lr`: a small language
    model learns to find a visual token by its content several times sooner
    (README, "The demo model")."""
    warmup = math.ceil(cfg.warmup_ratio * total)

    def schedule(lr):
        cosine = optim.cosine_decay(lr, max(total - warmup, 1))
        if warmup == 0:
            return cosine
        return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), cosine], [warmup])

    def adamw(lr):
        return optim.AdamW(learning_rate=schedule(lr), weight_decay=cfg.weight_decay)

    groups, filters = [], []
    if cfg.optimizer == "muon":
        groups.append(optim.Muon(learning_rate=schedule(cfg.muon_lr), weight_decay=cfg.weight_decay))
        filters.append(is_matrix)
    if cfg.projector_lr != cfg.learning_rate:
        groups.append(adamw(cfg.projector_lr))
        filters.append(lambda path, _: path.startswith("multi_modal_projector"))
    if not groups:
        return adamw(cfg.learning_rate)
    return optim.MultiOptimizer(groups + [adamw(cfg.learning_rate)], filters)


def is_matrix(path: str, weight) -> bool:
    """A weight Muon should update: 2-D, and neither an embedding nor the head."""
    return weight.ndim == 2 and "embed" not in path and "lm_head" not in path


def current_lr(optimizer) -> float:
    inner = optimizer.optimizers[-1] if isinstance(optimizer, optim.MultiOptimizer) else optimizer
    return float(inner.learning_rate.item())


def all_sum(grads, loss_sum, tokens, read: int, group):
    """Sum the step's gradients and counts over the processes, the gradients
    in one all-reduce (`nn.average_gradients` concatenates them): a call per
    parameter costs milliseconds each, more than a small model's step."""
    world = group.size()
    grads = tree_map(lambda g: g * world, nn.average_gradients(grads, group))
    counts = mx.distributed.all_sum(
        mx.stack([loss_sum.astype(mx.float32), tokens.astype(mx.float32), mx.array(read, mx.float32)]), group=group)
    return grads, counts[0], counts[1].astype(mx.int32), int(counts[2].item())


def split_batch(batch_size: int, world: int, grad_accum=None):
    """-> (micro-batch size, micro-batches per process) for a global batch."""
    if batch_size % world:
        raise LlavaError(f"--batch-size {batch_size} does not split over {world} processes")
    per_rank = batch_size // world
    if grad_accum is None:
        grad_accum = next(d for d in range(1, per_rank + 1) if per_rank % d == 0 and per_rank // d <= 8)
    if grad_accum < 1 or per_rank % grad_accum:
        raise LlavaError(
            f"--grad-accum {grad_accum} does not divide the {per_rank} samples each process takes per step"
        )
    return per_rank // grad_accum, grad_accum


# ---------------------------------------------------------------- batches


def make_batch(model, processor, data: Dataset, indices, features=None):
    """-> (input_ids, labels, vision features or None); an example whose image
    cannot be read is dropped (and recorded), never fatal."""
    examples, feats = [], []
    for i in indices:
        e = data.examples[i]
        if e.image is not None:
            f = image_features(model, processor, e.image, features)
            if f is None:
                data.skipped.append((e.id, f"cannot read image {e.image}"))
                continue
            feats.append(f)
        examples.append(e)
    if not examples:
        return None
    ids, labels = pad(examples)
    vision = mx.stop_gradient(mx.stack(feats)) if feats else None
    return mx.array(ids), mx.array(labels), vision


def image_features(model, processor, path, features=None):
    """The frozen vision tower's features for one image (from the cache when there is one)."""
    if features is not None:
        cached = features.get(path)
        if cached is not None:
            return cached
    try:
        pixels = processor.preprocess([load_image(path)])
    except LlavaError:
        return None
    f = model.vision_features(pixels)[0]
    if features is not None:
        mx.eval(f)
        features.put(path, f)
    return f


def fill_cache(features: FeatureCache, model, processor, datasets, show: bool):
    """Compute every image's features once, before training; drop unreadable ones."""
    images = sorted({e.image for d in datasets for e in d.examples if e.image is not None})
    todo = [p for p in images if not features.path(p).exists()]
    bar = progress_bar(len(todo), 0, "caching vision features") if show and todo else None
    bad = set()
    for p in todo:
        if image_features(model, processor, p, features) is None:
            bad.add(p)
        if bar:
            bar.advance()
    if bar:
        bar.close()
    for d in datasets:
        d.skipped += [(e.id, f"cannot read image {e.image}") for e in d.examples if e.image in bad]
        d.examples = [e for e in d.examples if e.image not in bad]


def evaluate(model, processor, data: Dataset, micro: int, features=None) -> float:
    """Token-averaged loss over a whole dataset."""
    total, count = 0.0, 0
    for start in range(0, len(data.examples), micro):
        batch = make_batch(model, processor, data, range(start, min(start + micro, len(data.examples))), features)
        if batch is not None:
            l, n = loss_fn(model, *batch)
            total, count = total + l.item(), count + n.item()
    return total / max(count, 1)


# ---------------------------------------------------------------- outputs


def save_outputs(out: Path, model, config: dict, processor, cfg: TrainConfig, lora):
    """Stage 1: projector.safetensors + a complete model in model/. Stage 2:
    LoRA adapters (mlx-lm's format) + the projector beside them, or, full,
    a complete model in model/. Every file lands atomically."""
    from ..weights import save_model

    projector = {f"multi_modal_projector.{k}": v
                 for k, v in tree_flatten(model.multi_modal_projector.parameters())}
    atomic_safetensors(out / "projector.safetensors", projector)
    if lora is not None:
        adapters = {k: v for k, v in tree_flatten(model.language_model.trainable_parameters())}
        atomic_safetensors(out / "adapters.safetensors", adapters)
        adapter_config = {"fine_tune_type": "lora", **lora, "base_model": cfg.model,
                          "conv_mode": cfg.conv_mode}
        atomic_text(out / "adapter_config.json", json.dumps(adapter_config, indent=2))
    else:
        config = {**config, "conv_mode": config.get("conv_mode") or processor.conv_mode}
        save_model(out / "model", model, config, processor, overwrite=True)


def atomic_safetensors(path: Path, arrays: dict):
    tmp = path.with_name(f".{path.name}.tmp.safetensors")
    with cleanup(tmp, path):
        mx.save_safetensors(str(tmp), arrays)
        os.replace(tmp, path)


def atomic_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    with cleanup(tmp, path):
        tmp.write_text(text)
        os.replace(tmp, path)


@contextmanager
def cleanup(tmp: Path, path: Path):
    """Remove `tmp` if the block fails; a failed write (a full disk) becomes one line about `path`."""
    try:
        yield
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        why = write_failure(e)
        if why:
            raise LlavaError(f"cannot write {path}: {why}") from None
        raise


def open_log(path: Path, start: int):
    """The JSONL log, keeping only what a resumed run has not redone."""
    kept = read_losses(path, raw=True) if path.exists() else []
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept if r["step"] <= start)
    return open(path, "a")


def read_losses(log_path: Path, raw: bool = False) -> list:
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    return rows if raw else [(r["step"], r["loss"]) for r in rows]


class progress_bar:
    """A rich progress bar with the latest loss (rich comes with typer)."""

    def __init__(self, total: int, done: int = 0, title: str = "training"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[loss]}"))
        self.task = self.progress.add_task(title, total=total, completed=done, loss="")
        self.progress.start()

    def advance(self, loss=None):
        self.progress.update(self.task, advance=1, loss="" if loss is None else f"loss {loss:.4f}")

    def close(self):
        self.progress.stop()
